"""
checkpoint.py: a run that can always continue.

train.py decides what to train (the schedule, the switch, the model); this file makes sure that however a run
ends (a kill, a full disk, a diverged loss, a second run started into the same directory) it leaves checkpoints
that continue it bit-for-bit. One object, Run, owns that life:

    with Run(args, launch, log, keep_steps) as run:  # makes and locks --out_dir; Ctrl-C / SIGTERM now stop cleanly
        start = run.start(model, train_loader, config, tokenizer, end)  # --resume's checkpoint loaded, or step 0
        loss, stopping = run.agree(loss)             # the step's mean loss; whether any rank was asked to stop
        run.check_finite(step, loss, grad_norm)      # a non-finite step stops every rank, without saving
        run.save(step, model, optimizer, opt_kind, probe, best_val, tokens_seen)   # refuses a diverged state
        run.log(entry)                               # log.jsonl (and --logger's dashboards), in step with the saves
        run.stop(step) / run.complete()              # after a signal: exit 128+n, saying how to go on or that it ended

Under torchrun, the methods marked collective must be called by every rank, in the same order.
"""

import glob
import json
import math
import os
import random
import re
import signal
import sys
import threading
from collections import namedtuple
from contextlib import ExitStack
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist

import fp8
from cli import UserError, all_mean
from loggers import Dashboards
from model import GPTConfig
from safeio import FileLock, LockError, WriteError, atomic_write, make_dir, read_jsonl, remove_temp_files, \
    rewrite_jsonl, write_json

CKPT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot continue this run, or a run this one would silently replace."""


class Diverged(UserError):
    """The run diverged: it stopped without saving the bad state; the message names the last good checkpoint."""


# flags that change where a run's outputs go or how it is watched, not what it trains: not reported at a resume
NOT_TRAINING = ("resume", "overwrite", "out_dir", "dry_run", "world_size", "logger", "logger_dir", "run_name")

# where a run starts: step 0, or a checkpoint's state (the optimizer's, for train.py to load into the one it builds)
Start = namedtuple("Start", "step best_val tokens_seen optimizer_name optimizer_state final_eval")


class Run:
    """One training run's life in --out_dir: lock, resume, save, log, stop. It never decides the schedule, the
    switch or the model: train.py tells it the steps whose checkpoints pruning keeps (keep_steps)."""

    def __init__(self, args, launch, log, keep_steps=()):
        self.args, self.launch, self.print = args, launch, log
        self.keep_steps = keep_steps
        self.log_path = os.path.join(args.out_dir, "log.jsonl")
        self.last_saved = None  # the newest good checkpoint's step, named when the run diverges
        self.stale = []  # --overwrite: the replaced run's checkpoints, deleted once this run's first one is safe
        self.dashboards = Dashboards(args.logger)  # --logger: a missing package stops every rank here

    def __enter__(self):
        """Collective. Make and lock --out_dir for the life of the run (a second run into it is refused; the lock
        goes with its process, however it ends), and take SIGINT/SIGTERM: finish the step, save, exit."""
        self.stack = ExitStack()
        self.lock = None
        error = None
        if self.launch.master:
            try:
                make_dir(self.args.out_dir, "--out_dir")
                self.lock = FileLock(os.path.join(self.args.out_dir, ".lock"), "train.py run").acquire()
                self.stack.callback(self.lock.release)
                remove_temp_files(self.args.out_dir)  # a run killed mid-save left a checkpoint-sized one
            except WriteError as e:
                error = str(e)
            except LockError as e:
                error = f"{e}; wait for it to end, or use another --out_dir"
        error = self.agreed(lambda: error)  # every rank stops if rank 0 could not lock
        if error:
            self.stack.close()
            raise CheckpointError(error)
        self.signals = self.stack.enter_context(StopRequest())
        return self

    def __exit__(self, *exc):
        try:
            self.dashboards.close(failed=exc[0] is not None)
        finally:
            self.stack.close()

    def start(self, model, train_loader, config, tokenizer, end):
        """Collective. Where the run starts. With --resume: the checkpoint it names (refused, in one line, if it
        cannot continue this run) loaded into model, loader and RNG. Without: step 0, refused if --out_dir holds a
        run (unless --overwrite). The log is trimmed to the start step; config.json written."""
        args = self.args
        self.model_config, self.tokenizer, self.train_loader = config, tokenizer, train_loader
        ckpts, branched = list_ckpts(args.out_dir), self.branches()
        start = Start(0, None, 0, None, None, True)
        if args.resume:
            ckpt = self.checkpoint_to_resume(ckpts, config, tokenizer)
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as e:  # missing, unexpected or misshapen weights: a checkpoint of another model.py
                detail = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:200]
                raise CheckpointError(f"the checkpoint's weights do not fit this model ({detail}); start a new run "
                                      f"with another --out_dir") from None
            if args.fp8 and ckpt.get("fp8") is not None:  # delayed scaling's amax histories
                fp8.load_fp8_state_dict(model, ckpt["fp8"])
            if args.long_context and ckpt["args"].get("data_dir") != args.data_dir:  # e.g. long documents
                self.print(f"the long-context phase reads {args.data_dir} from its start")
            else:
                train_loader.load_state_dict(ckpt["train_loader"])
            set_rng_state(ckpt["rng"])
            # a run that reached its end evaluates it, unless the log has it (a kill during it left none)
            start = Start(ckpt["step"], ckpt["best_val"], ckpt.get("tokens_seen"), ckpt["optimizer_name"],
                          ckpt["optimizer"], ckpt["step"] < end or ckpt["step"] == end
                          and not self.agreed(evaluated, args.out_dir, end))
            self.last_saved = ckpt["step"]
            del ckpt
        elif ckpts and not args.overwrite:
            raise CheckpointError(f"{args.out_dir} already holds a run (checkpoint at step {ckpts[-1][0]}); pass "
                                  f"--resume to continue it, --out_dir=NEW for a new run, or --overwrite to replace it")
        self.stale = [p for s, p in ckpts if s > start.step or branched] if args.overwrite else []
        if self.launch.master:
            write_json(os.path.join(args.out_dir, "config.json"), {"args": vars(args), "model": asdict(config)},
                       indent=1)
            # keep the log consistent with the checkpoint: drop entries the resumed run will write again;
            # atomically, so a kill mid-rewrite leaves the old log (a torn last line, from a crash mid-append, goes)
            if start.step < end:  # (a finished run's log stays as it is)
                entries, torn = read_jsonl(self.log_path) if start.step > 0 and not branched else ([], 0)
                rewrite_jsonl(self.log_path, [e for e in entries if e.get("step", math.inf) < start.step])
                if torn:
                    self.print(f"{self.log_path}: dropped {torn} unreadable line(s), a write torn by a crash")
                # the dashboards too: the same run from start.step on, or a new one (a new run, a branch)
                self.dashboards.open(args, start.step, resumed=bool(args.resume) and not branched,
                                     config={**vars(args), **asdict(config), "world_size": self.launch.world_size})
            elif start.final_eval:
                self.print(f"the run reached step {end}, but its final evaluation is missing: evaluating it now")
            else:
                self.print(f"the run already reached step {start.step}, evaluated, and this command ends at {end}: "
                           f"nothing to do; raise --max_iters (or --stop_after, --long_context) to train further")
        return start

    def agreed(self, fn, *a):
        """Collective. fn(*a) as rank 0 finds it (on its disk), the same on every rank."""
        box = [fn(*a) if self.launch.master else None]
        if self.launch.ddp:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def branches(self):
        """Whether --resume names another run's checkpoint: a branch (an ablation arm, the long-context phase)
        that starts its own out_dir."""
        args = self.args
        return args.resume not in ("", "auto") and \
            os.path.realpath(os.path.dirname(os.path.abspath(args.resume))) != os.path.realpath(args.out_dir)

    def checkpoint_to_resume(self, ckpts, config, tokenizer):
        """The checkpoint --resume names, refused if it cannot continue this run; what changed since is logged."""
        args = self.args
        path = resume_path(args, ckpts)
        if path is None or not os.path.exists(path):
            raise CheckpointError(f"no checkpoint to resume at {path or args.out_dir}; drop --resume to start a new "
                                  f"run")
        if os.path.isdir(path):
            raise CheckpointError(f"--resume={path} is a directory; give a checkpoint file, or --out_dir={path} "
                                  f"--resume for its newest")
        if self.branches() and ckpts and not args.overwrite:  # its pruning and log would mix with that run's
            raise CheckpointError(f"{args.out_dir} holds another run (checkpoint at step {ckpts[-1][0]}); branch "
                                  f"{path} into a new --out_dir, or pass --overwrite to replace that run")
        ckpt = load_ckpt(path, config, tokenizer, longer_context=bool(args.long_context))
        later = [s for s, _ in ckpts if s > ckpt["step"]]
        if later and not args.overwrite:
            raise CheckpointError(f"{args.out_dir} holds later checkpoints (step {later[-1]}) than {path}; branch "
                                  f"into a new --out_dir, or pass --overwrite to replace them")
        # legitimate but not silent: a new batch size or world size (the recipe doubles its batch), a new schedule
        saved = dict(ckpt["args"], world_size=ckpt.get("world_size"))
        now = dict(vars(args), world_size=self.launch.world_size)
        changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v
                   and k not in NOT_TRAINING]  # (a flag newer than the checkpoint is not a change)
        self.print(f"resumed from {path} at step {ckpt['step']}" + ("; changed since it was saved: "
                                                                   + ", ".join(changed) if changed else ""))
        return ckpt

    def agree(self, loss):
        """Collective. The step's loss averaged over ranks, and whether any rank was asked to stop (so that all
        stop after the same step): one all-reduce."""
        stop = torch.tensor(float(self.signals.signal is not None), device=loss.device)
        stats = all_mean(torch.stack([loss, stop]))
        return stats[0].item(), stats[1].item() > 0

    def check_finite(self, step, loss, grad_norm):
        """A non-finite loss or gradient stops the run before the optimizer step (the loss is the all-reduced one,
        so every rank stops together)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.diverged(step, f"loss {loss}, gradient norm {grad_norm}")

    def diverged(self, step, problem):
        where = f"the last good checkpoint is step {self.last_saved} in {self.args.out_dir} (--resume)" \
            if self.last_saved else "no checkpoint was written yet"
        raise Diverged(f"the run diverged at step {step}: {problem}; stopped without saving; {where}; try a lower "
                       f"--lr" + (" or --muon_lr" if self.args.muon_lr is not None else "") + " or --grad_clip")

    def save(self, step, model, optimizer, opt_kind, probe_loss, best_val, tokens_seen):
        """Collective. Save the state after `step` steps, or stop the run instead if diverged() objects on any rank;
        a failed write on rank 0 stops every rank (the earlier checkpoints stay intact)."""
        problem = diverged(model, optimizer, probe_loss, self.model_config.vocab_size)
        if all_mean(torch.tensor(float(problem is not None), device=self.launch.device)).item() > 0:
            self.diverged(step, problem or "on another rank")
        error = None
        if self.launch.master:
            state = dict(version=CKPT_VERSION, step=step, model=model.state_dict(),
                         optimizer=optimizer.state_dict(), optimizer_name=opt_kind,
                         model_config=asdict(self.model_config), args=vars(self.args), tokenizer=self.tokenizer,
                         train_loader=self.train_loader.state_dict(), rng=rng_state(), best_val=best_val,
                         tokens_seen=tokens_seen, world_size=self.launch.world_size,
                         fp8=fp8.fp8_state_dict(model) if self.args.fp8 else None)
            try:
                path = save_ckpt(state, self.args.out_dir, self.args.keep_ckpts, self.keep_steps, self.stale)
                self.print(f"saved {path}")
                self.stale.clear()
            except WriteError as e:
                error = f"{e}; the earlier checkpoints are intact: free some space, then --resume"
        if all_mean(torch.tensor(float(error is not None), device=self.launch.device)).item() > 0:
            raise CheckpointError(error or "rank 0 could not write a checkpoint")
        self.last_saved = step

    def log(self, entry):
        """Append one entry to log.jsonl, and send it to the --logger dashboards (rank 0)."""
        if self.launch.master:
            try:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            except OSError as e:
                raise WriteError(f"cannot append to {self.log_path} ({e.strerror}); the checkpoints are intact: fix "
                                 f"it, then --resume") from None
            self.dashboards.log(entry)

    def stopping(self):
        return self.signals.signal is not None

    def complete(self):
        """After the final evaluation and sample: a stop asked for during them ends the process now, the run complete
        (SIGINT and SIGTERM are taken until the run is, so they never cut its last evaluation short)."""
        if self.stopping():
            self.print(f"train.py: stopped by {self.signals.signal.name} after the final evaluation: the run is "
                       f"complete, nothing to resume")
            raise SystemExit(128 + self.signals.signal)

    def stop(self, step):
        """After the checkpoint of a stop request: say how to go on, and exit with 128 + the signal's number."""
        name = self.signals.signal.name if self.signals.signal else "a signal to another rank"
        self.print(f"train.py: stopped by {name}; saved step {step}: --resume continues from it")
        raise SystemExit(128 + (self.signals.signal or signal.SIGINT))

# -----------------------------------------------------------------------------
# the pieces: checkpoint files, the divergence test, RNG state, signals


def evaluated(out_dir, step):
    """Whether out_dir's log holds the validation loss after `step` steps (a run's final evaluation)."""
    try:
        entries, _ = read_jsonl(os.path.join(out_dir, "log.jsonl"))
    except (OSError, ValueError):
        return False
    return any(e.get("step") == step and "val_loss" in e for e in entries)


def resume_path(args, ckpts):
    """The checkpoint --resume names: its PATH, or (--resume alone) the newest of ckpts; None if there is none."""
    return args.resume if args.resume != "auto" else (ckpts[-1][1] if ckpts else None)


def saved_model_config(args):
    """The GPTConfig of the checkpoint --resume names, or None if there is none to read: a run started with
    --init_from continues from its own checkpoint, which holds the architecture (and the weights)."""
    path = resume_path(args, list_ckpts(args.out_dir))
    try:
        return GPTConfig(**torch.load(path, map_location="cpu", weights_only=False, mmap=True)["model_config"])
    except Exception:  # (what is wrong with it is said, in one line, when the run resumes it)
        return None


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
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}); it is damaged or not "
                         f"from this version of train.py; {older}")
    missing = [k for k in CKPT_KEYS if k not in ckpt or ckpt[k] is None and k != "best_val"]  # (None: no eval yet)
    if missing or not isinstance(ckpt["model"], dict) or not isinstance(ckpt["model_config"], dict):
        raise CheckpointError(f"{path} lacks {', '.join(missing) or 'a model state_dict'}: it can be "
                         f"scored (evaluate.py --ckpt) but not resumed; {older}")
    unknown = sorted(set(ckpt["model_config"]) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise CheckpointError(f"{path} comes from a newer model.py (model fields {', '.join(unknown)}); "
                         f"update nanoXmodel to resume it")
    if not all(t.isfinite().all() for t in ckpt["model"].values() if torch.is_tensor(t) and t.is_floating_point()):
        raise CheckpointError(f"{path} holds weights that are not finite (NaN or inf): it cannot "
                         f"train further; {older}")
    diff = [f"{k}: checkpoint {v!r}, now {getattr(config, k)!r}" for k, v in ckpt["model_config"].items()
            if getattr(config, k) != v and not (k == "block_size" and longer_context and v < config.block_size)]
    if any(d.startswith("block_size") for d in diff) and not longer_context:
        diff.append("a longer block_size continues a checkpoint only in the long-context phase: --long_context")
    if ckpt["tokenizer"] != tokenizer:
        diff.append(f"tokenizer: checkpoint {ckpt['tokenizer']!r}, data {tokenizer!r}")
    if diff:
        raise CheckpointError(f"{path} was trained with another config ({'; '.join(diff)}); "
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
