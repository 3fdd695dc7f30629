"""
checkpoint.py: a run that can always continue.

Everything train.py needs so that a run, however it ends (a kill, a full disk, a diverged loss, a second run
started into the same directory), leaves checkpoints that resume it bit-for-bit: the out_dir lock, the resume
and branch checks, atomic saves that refuse a diverged state, pruning that keeps the decay's start and end, and
signals that finish the step and save. It never decides the schedule, the switch or the model: train.py does.
"""

import glob
import math
import os
import random
import re
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist

from model import GPTConfig
from safeio import FileLock, LockError, WriteError, atomic_write, make_dir, remove_temp_files


CKPT_VERSION = 1


def list_ckpts(out_dir):
    found = []
    for path in glob.glob(os.path.join(out_dir, "ckpt_*.pt")):
        m = re.fullmatch(r"ckpt_(\d+)\.pt", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_ckpt(state, out_dir, keep, protected_steps=(), replaced=()):
    path = os.path.join(out_dir, f"ckpt_{state['step']:07d}.pt")
    size = sum(t.numel() * t.element_size() for t in tensors_of(state))
    with atomic_write(path, size_hint=size) as f:  # a kill or a full disk leaves the old checkpoints as they were
        torch.save(state, f)
    for old in replaced:  # --overwrite: the replaced run's checkpoints go once the new one is safe
        if old != path and os.path.exists(old):
            remove_ckpt(old)
    for step, old in list_ckpts(out_dir)[:-keep]:
        if step not in protected_steps:
            remove_ckpt(old)
    return path


def remove_ckpt(path):
    """Delete an old checkpoint; one that cannot be deleted is a warning (the new one is already safe)."""
    try:
        os.remove(path)
    except OSError as e:
        print(f"train.py: warning: cannot delete {path} ({e.strerror}); it stays", file=sys.stderr)


def tensors_of(obj):
    """Every tensor inside nested dicts / lists (a state_dict, an optimizer's state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


# a weight this large is a run blowing up: trained weights stay within ~10 and norm gains within ~100; an exploded
# model (seen at --lr=10: |w| ~ 1e13) still gives a finite loss (a uniform guess, ln vocab) but never learns again
MAX_WEIGHT = 1e3


def diverged(model, optimizer, loss, vocab_size):
    """Why these weights must not be saved, or None. A checkpoint has to resume: every weight and optimizer moment
    finite, no weight beyond MAX_WEIGHT, and the weights themselves (after the step's update, which no training
    loss has seen yet) scoring a loss under 2 ln(vocab) on the step's last batch (a uniform guess scores ln vocab)."""
    params = [p.detach() for p in model.parameters()]
    moments = [t for t in tensors_of(optimizer.state_dict()["state"]) if t.is_floating_point()]
    if not bool(torch.stack([t.isfinite().all() for t in params + moments]).all()):
        return "weights or optimizer state not finite"
    biggest = torch.stack([p.abs().max() for p in params]).max().item()
    if biggest > MAX_WEIGHT:
        return f"a weight reached {biggest:.3g} (trained weights stay far under {MAX_WEIGHT:g})"
    if not loss < 2 * math.log(vocab_size):  # (NaN fails too)
        return f"the new weights score a loss of {loss:.4g}, above 2 ln(vocab) = {2 * math.log(vocab_size):.2f}"
    return None


def stop_diverged(step, problem, last_saved, out_dir):
    where = f"the last good checkpoint is step {last_saved} in {out_dir} (--resume)" if last_saved else \
        "no checkpoint was written yet"
    raise SystemExit(f"train.py: error: the run diverged at step {step}: {problem}; stopped without saving; {where}; "
                     f"try a lower --lr or --grad_clip")


CKPT_KEYS = ("step", "model", "optimizer", "optimizer_name", "model_config", "args", "tokenizer", "train_loader",
             "rng", "best_val")


def load_ckpt(path, config, tokenizer, longer_context=False):
    """A checkpoint of this model config and tokenizer; longer_context: the long-context phase may continue one
    of a shorter block_size (the weights do not depend on it; the RoPE tables are rebuilt)."""
    older = "resume from an older ckpt_*.pt with --resume=PATH --overwrite (which replaces the later ones)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # 8 ranks, one copy in RAM
        assert isinstance(ckpt, dict) and ckpt.get("version") == CKPT_VERSION
    except Exception as e:
        raise SystemExit(f"train.py: error: cannot read checkpoint {path} ({type(e).__name__}); it is damaged or not "
                         f"from this version of train.py; {older}")
    missing = [k for k in CKPT_KEYS if k not in ckpt or ckpt[k] is None and k != "best_val"]  # (None: no eval yet)
    if missing or not isinstance(ckpt["model"], dict) or not isinstance(ckpt["model_config"], dict):
        raise SystemExit(f"train.py: error: {path} lacks {', '.join(missing) or 'a model state_dict'}: it can be "
                         f"scored (evaluate.py --ckpt) but not resumed; {older}")
    unknown = sorted(set(ckpt["model_config"]) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise SystemExit(f"train.py: error: {path} comes from a newer model.py (model fields {', '.join(unknown)}); "
                         f"update nanoXmodel to resume it")
    if not all(t.isfinite().all() for t in ckpt["model"].values() if torch.is_tensor(t) and t.is_floating_point()):
        raise SystemExit(f"train.py: error: {path} holds weights that are not finite (NaN or inf): it cannot "
                         f"train further; {older}")
    diff = [f"{k}: checkpoint {v!r}, now {getattr(config, k)!r}" for k, v in ckpt["model_config"].items()
            if getattr(config, k) != v and not (k == "block_size" and longer_context and v < config.block_size)]
    if any(d.startswith("block_size") for d in diff) and not longer_context:
        diff.append("a longer block_size continues a checkpoint only in the long-context phase: --long_context")
    if ckpt["tokenizer"] != tokenizer:
        diff.append(f"tokenizer: checkpoint {ckpt['tokenizer']!r}, data {tokenizer!r}")
    if diff:
        raise SystemExit(f"train.py: error: {path} was trained with another config ({'; '.join(diff)}); "
                         f"pass the same model flags and data, or start a new run with another --out_dir")
    return ckpt


def rng_state():
    # cuda: this process's device only, so a checkpoint resumes on a node with fewer (visible) GPUs
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None)


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(s["cuda"])


def load_optimizer_state(optimizer, state):
    """The checkpoint's moments into this run's optimizer, keeping its hyperparameters (betas, weight decay, Muon's
    settings: a resume, an ablation arm, may change them; load_state_dict alone would bring back the saved ones)."""
    flags = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, hyper in zip(optimizer.param_groups, flags):
        group.update(hyper)


def branches(args):
    """Whether --resume names another run's checkpoint: a branch (an ablation arm, the long-context phase) that
    starts its own out_dir."""
    return args.resume not in ("", "auto") and \
        os.path.realpath(os.path.dirname(os.path.abspath(args.resume))) != os.path.realpath(args.out_dir)


def resume_checkpoint(args, ckpts, config, meta, world_size, log):
    """The checkpoint --resume names, refused if it cannot continue this run; what changed since it is logged."""
    path = args.resume if args.resume != "auto" else (ckpts[-1][1] if ckpts else None)
    if path is None or not os.path.exists(path):
        raise SystemExit(f"train.py: error: no checkpoint to resume at {path or args.out_dir}; "
                         f"drop --resume to start a new run")
    if os.path.isdir(path):
        raise SystemExit(f"train.py: error: --resume={path} is a directory; give a checkpoint file, or "
                         f"--out_dir={path} --resume for its newest")
    if branches(args) and ckpts and not args.overwrite:  # its pruning and log would mix with, and delete, that run
        raise SystemExit(f"train.py: error: {args.out_dir} holds another run (checkpoint at step {ckpts[-1][0]}); "
                         f"branch {path} into a new --out_dir, or pass --overwrite to replace that run")
    ckpt = load_ckpt(path, config, meta["tokenizer"], longer_context=bool(args.long_context))
    later = [s for s, _ in ckpts if s > ckpt["step"]]
    if later and not args.overwrite:
        raise SystemExit(f"train.py: error: {args.out_dir} holds later checkpoints (step {later[-1]}) than "
                         f"{path}; branch into a new --out_dir, or pass --overwrite to replace them")
    # legitimate but not silent: a new batch size or world size (the recipe doubles its batch), a new schedule
    saved, now = dict(ckpt["args"], world_size=ckpt.get("world_size")), dict(vars(args), world_size=world_size)
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if saved.get(k) is not None and saved[k] != v
               and k not in ("resume", "overwrite", "out_dir", "dry_run")]
    log(f"resumed from {path} at step {ckpt['step']}" + ("; changed since it was saved: " + ", ".join(changed)
                                                         if changed else ""))
    return ckpt


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler taking the node back) asks the run to stop: it finishes the step,
    saves a checkpoint and exits with 128 + the signal's number. A second signal interrupts at once."""

    def __init__(self):
        self.signal, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # (signals reach the main thread only)
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)
        print(f"train.py: {self.signal.name}: stopping after this step (again to stop at once, without saving)")

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


@contextmanager
def run_dir(args, master, ddp):
    """--out_dir, made and locked by rank 0 for the life of the run, so a second run into it is refused (the lock
    goes with its process, however it ends: a crashed run never blocks the next); every rank stops if that fails."""
    lock, error = None, None
    if master:
        try:
            make_dir(args.out_dir, "--out_dir")
            lock = FileLock(os.path.join(args.out_dir, ".lock"), "train.py run").acquire()
            remove_temp_files(args.out_dir)  # a run killed mid-save left a checkpoint-sized one
        except WriteError as e:
            error = str(e)
        except LockError as e:
            error = f"{e}; wait for it to end, or use another --out_dir"
    if ddp:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise SystemExit(f"train.py: error: {error}")
    try:
        yield
    finally:
        if lock:
            lock.release()
