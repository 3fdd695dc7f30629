"""A checkpoint saved by the code before issue 17's restructure (commit 89ca434) resumes with today's code, bit-exact.

tests/data/compat/ holds what that code made in one uninterrupted run (tests/data/make_compat_fixture.py says how;
the tests need neither git history nor that script): its checkpoints after step 5 (stable phase, AdamW moments,
before the switch to Muon at step 8) and after step 8 (Muon momenta), the data it trained on, its log, and what it
saved one step after each. For each checkpoint, today's train.main resumes it:
  - the loaded state is the checkpoint's, bit for bit: weights, optimizer moments, loader position, RNG;
  - what it saves back has the old format and the old run's values;
  - the continuation's losses, LRs and gradient norms are the old run's (exactly on the machine that made them);
  - resuming twice (today's code saving and loading in between) ends in exactly the state of resuming once.
CPU, one thread, a 2-layer 32-wide model, 12 steps; a few seconds."""

import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from model import GPT  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "data", "compat")
sys.path.insert(0, os.path.dirname(FIXTURE))
from make_compat_fixture import machine, skeleton  # noqa: E402  (what the fixture's generator recorded)
with open(os.path.join(FIXTURE, "old_run.json")) as _f:
    OLD = json.load(_f)
FLAGS = OLD["flags"]  # the old run's own flags (the model, the schedule with --muon_at_decay, a checkpoint a step)
FLAG = dict(f[2:].split("=", 1) for f in FLAGS if "=" in f)
END, MICRO = int(FLAG["max_iters"]), (int(FLAG["batch_size"]), int(FLAG["block_size"]))
ACCUM = int(FLAG["total_batch_size"]) // (MICRO[0] * MICRO[1])
# the resumed runs use another --seed than the old run (1337): a fresh process's RNG then differs from the
# checkpoint's, so only a restored RNG passes (the training itself draws no random numbers: with the same seed, not
# restoring it would go unseen); the weights come from the checkpoint, so the seed changes nothing else
SEED = 4242
# (the checkpoint resumed, --stop_after of the first leg of test_resumed_twice_equals_resumed_once)
CASES = [(6, 7),  # AdamW, stable phase: the resume crosses the switch; the second leg loads today's AdamW state
         (9, 10)]  # Muon, decay phase: the second leg loads today's Muon state
OPTIMIZER_CLASS = {"adamw": "AdamW", "muon": "Muon"}  # a checkpoint's optimizer_name -> its class

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py; the old run had one thread too)


# Losses, gradient norms and val losses come out of fp32 matmuls and reductions, whose last bits depend on the
# CPU's kernels (AVX2 vs AVX-512 code paths, another torch's oneDNN/MKL blocking): on another machine the same code
# from the same checkpoint may differ in the last bits of fp32 (~1e-7 relative), growing a little over the steps.
# So they must be == where the old run was made (same torch, same CPU kind, one thread) and agree to 1e-5 relative
# elsewhere: far above fp32's noise over six steps, below what a wrong weight, moment, batch or LR moves them (every
# LR 1e-4 too high moves a gradient norm by 5e-5: caught; 1e-6 too high is caught only by the == on this machine).
SAME_MACHINE = machine() == OLD["machine"]
REL = 1e-5


def assert_close(new, old, what, rel=REL):
    if SAME_MACHINE or old is None or new is None:
        assert new == old, f"{what}: {new!r} != {old!r} (the old run's, on this machine: must be bit-exact)"
    else:
        assert new == pytest.approx(old, rel=rel, abs=0), f"{what}: {new!r} vs the old run's {old!r}"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def ckpt_path(out_dir, step):
    return os.path.join(out_dir, f"ckpt_{step:07d}.pt")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_tree(a, b, where="state"):
    """Nested dicts / lists / tuples of tensors, numpy arrays and plain values: the same keys, bit-equal values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert np.array_equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_lr(optimizer_state):
    """An optimizer state_dict (or its skeleton) without the groups' lr: the LR of the step it was taken at."""
    return dict(optimizer_state, param_groups=[{k: v for k, v in g.items() if k != "lr"}
                                               for g in optimizer_state["param_groups"]])


class FirstStep:
    """What a resumed run computes its first step with, taken by torch's global hooks (nothing in the code under
    test is patched): the weights and the RNG at the model's first forward (the step's evaluation or its first
    micro-batch: before any update), the inputs of the training forwards before the first optimizer step (that
    step's micro-batches), and the optimizer as that step begins (its moments, before it updates them)."""

    def __init__(self):
        self.weights = self.rng = self.optimizer = None
        self.inputs = []

    def __enter__(self):
        self.handles = [register_module_forward_pre_hook(self.forward), register_optimizer_step_pre_hook(self.step)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def forward(self, module, inputs):
        if not isinstance(module, GPT):
            return
        if self.weights is None:
            self.weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        if module.training and self.optimizer is None:
            self.inputs.append(inputs[0].detach().clone() if inputs else None)

    def step(self, optimizer, args, kwargs):
        if self.optimizer is None:
            self.optimizer = type(optimizer).__name__, copy.deepcopy(optimizer.state_dict())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The old run's data, copied (the runs only read it); its shards checked against what the old run read."""
    out = str(tmp_path_factory.mktemp("compat") / "dataset")
    shutil.copytree(os.path.join(FIXTURE, "dataset"), out)
    for name, digest in OLD["shards_sha256"].items():
        with open(os.path.join(out, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"tests/data/compat/dataset/{name} was changed"
    return out


def run(data_dir, out_dir, *flags):
    return train.main([*FLAGS, f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--seed={SEED}", *flags])


def fixture_copy(tmp, step):
    """A copy of the old checkpoint after `step` steps (a run may not touch tests/data)."""
    os.makedirs(tmp, exist_ok=True)
    return shutil.copy2(os.path.join(FIXTURE, f"ckpt_{step:07d}.pt"), tmp)


@pytest.fixture(scope="module")
def resumed(data, tmp_path_factory):
    """Today's code resuming each old checkpoint to the end, made once on first use: (out_dir, FirstStep, result)."""
    cache = {}

    def get(step):
        if step not in cache:
            tmp = tmp_path_factory.mktemp(f"resumed{step}")
            with FirstStep() as first:
                result = run(data, tmp / "out", f"--resume={fixture_copy(tmp / 'old', step)}")
            cache[step] = str(tmp / "out"), first, result
        return cache[step]
    return get


# -----------------------------------------------------------------------------
# (a) the loaded state is the checkpoint's, bit for bit (machine-independent)

@pytest.mark.parametrize("step", [s for s, _ in CASES])
def test_resume_loads_the_old_checkpoint_exactly(resumed, step):
    old = load(os.path.join(FIXTURE, f"ckpt_{step:07d}.pt"))
    _, first, _ = resumed(step)
    assert first.weights is not None and first.optimizer is not None, "the resumed run trained no step"
    # the weights its first step computes with
    assert_same_tree(first.weights, old["model"], "weights")
    # the optimizer: the checkpoint's kind, its moments (AdamW's exp_avg/exp_avg_sq/step, Muon's momentum buffers)
    # and its groups' hyperparameters (the lr aside: the schedule sets each step's own)
    name, state = first.optimizer
    assert name == OPTIMIZER_CLASS[old["optimizer_name"]]
    assert_same_tree(without_lr(state), without_lr(old["optimizer"]), "optimizer")
    # the RNG (python, numpy, torch) as saved
    assert_same_tree(first.rng, {k: v for k, v in old["rng"].items() if k != "cuda"}, "rng")
    # the loader's position: the first step's micro-batches are the tokens at the saved position, read here from
    # the shard itself (its token count from meta.json, the header before them)
    meta = json.load(open(os.path.join(FIXTURE, "dataset", "meta.json")))
    assert old["train_loader"]["shard"] == 0 and len(meta["splits"]["train"]) == 1
    n = meta["tokens"]["train"]
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    raw = np.fromfile(os.path.join(FIXTURE, "dataset", meta["splits"]["train"][0]), dtype=np.uint8)
    tokens = raw[len(raw) - dtype.itemsize * n:].view(dtype).astype(np.int64)
    B, T = MICRO
    pos = old["train_loader"]["pos"]
    assert pos + ACCUM * B * T < n  # (no wrap to a next epoch in this step)
    expected = [torch.from_numpy(tokens[pos + m * B * T:pos + (m + 1) * B * T]).view(B, T) for m in range(ACCUM)]
    assert len(first.inputs) == ACCUM
    for m, (got, want) in enumerate(zip(first.inputs, expected)):
        assert got is not None and torch.equal(got.cpu(), want), f"micro-batch {m} of step {step}: another position"


@pytest.mark.parametrize("step", [s for s, _ in CASES])
def test_saved_checkpoint_keeps_the_old_format(resumed, step):
    """The checkpoint today's code saves one step after the resume: the old run's checkpoint of that step, field for
    field (the weights' and the optimizer's names, shapes and dtypes; their values: the next tests)."""
    out, _, _ = resumed(step)
    new, old = load(ckpt_path(out, step + 1)), load(os.path.join(FIXTURE, "after_resume.pt"))[step + 1]
    assert new.keys() == old.keys()
    for k in ("version", "step", "optimizer_name", "model_config", "tokenizer", "train_loader", "tokens_seen",
              "world_size", "fp8"):
        assert_same_tree(new[k], old[k], k)
    assert_same_tree(new["rng"], old["rng"], "rng")
    assert_close(new["best_val"], old["best_val"], "best_val")  # (an evaluation's loss)
    # the run's flags: the old ones all there, with the same values but for those this test changes (flags added
    # since, at their defaults, may join them)
    # (long_context_lr_end: retired by the release's long-context schedule, which has flags of its own)
    changed = ("data_dir", "out_dir", "resume", "seed", "long_context_lr_end")
    assert {k: v for k, v in new["args"].items() if k in old["args"] and k not in changed} == \
        {k: v for k, v in old["args"].items() if k not in changed}
    assert skeleton(new["model"]) == old["model"]
    assert skeleton(without_lr(new["optimizer"])) == without_lr(old["optimizer"])
    args = train.parse_args(FLAGS)
    for g in new["optimizer"]["param_groups"]:  # the LR of the step saved: today's schedule (Megatron's alignment)
        assert g["lr"] == pytest.approx(train.group_lr(step, args, g["lr_mult"]), rel=1e-12)


# -----------------------------------------------------------------------------
# (b) the continuation is the old run's continuation

@pytest.mark.parametrize("step", [s for s, _ in CASES])
def test_continuation_matches_the_old_run(resumed, step):
    # the resumed weights, before any update (the resumed step's evaluation, training loss and gradient norm), are
    # the old run's; the LRs are today's schedule's: its alignment with Megatron's moved every LR one step earlier
    # than the code that made the fixture, so the losses after the first update differ from the old run's by design
    out, _, result = resumed(step)
    new = read_log(out)  # (a branch: its own log, from the resumed step on)
    old = [e for e in OLD["log"] if e["step"] >= step]
    args = train.parse_args(FLAGS)
    assert [(e["step"], "val_loss" in e) for e in new] == [(e["step"], "val_loss" in e) for e in old]
    for n, o in zip(new, old):
        what = f"step {o['step']} " + ("val" if "val_loss" in o else "train")
        assert n.keys() == o.keys(), what  # the same log fields
        for k in ("step", "phase", "optimizer", "tokens", "seq_len"):
            assert n.get(k) == o.get(k), f"{what}: {k}"
        for k in ("loss", "grad_norm", "val_loss"):
            if k in o and n["step"] == step:
                assert_close(n[k], o[k], f"{what}: {k}")
        if "lr" in o:
            assert n["lr"] == pytest.approx(train.group_lr(n["step"], args), rel=1e-12), what
        if "mfu" in o:
            assert (n["mfu"] is None) == (o["mfu"] is None), what
    assert math.isfinite(result["val_loss"])


# -----------------------------------------------------------------------------
# (c) resuming twice = resuming once, exactly (machine-independent: both from the same old checkpoint, here)

@pytest.mark.parametrize("step,stop", CASES)
def test_resumed_twice_equals_resumed_once(data, resumed, tmp_path, step, stop):
    once, _, result_once = resumed(step)
    out = tmp_path / "out"
    run(data, out, f"--resume={fixture_copy(tmp_path / 'old', step)}", f"--stop_after={stop}")
    assert os.path.exists(ckpt_path(out, stop)) and not os.path.exists(ckpt_path(out, stop + 1))
    result_twice = run(data, out, "--resume")  # today's checkpoint at `stop`, in its own out_dir
    a, b = load(ckpt_path(once, END)), load(ckpt_path(out, END))
    for k in ("model", "optimizer", "optimizer_name", "train_loader", "rng", "tokens_seen", "best_val", "step"):
        assert_same_tree(b[k], a[k], k)
    assert result_twice["val_loss"] == result_once["val_loss"]
    timing = ("tokens_per_sec", "mfu")
    assert [{k: v for k, v in e.items() if k not in timing} for e in read_log(out)] == \
        [{k: v for k, v in e.items() if k not in timing} for e in read_log(once)]
