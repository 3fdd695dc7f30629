"""Tests for train.py: the WSD schedule, gradient accumulation, muP learning rates, exact resume, DDP on CPU,
the safety of checkpoints and the CLI. CPU only; tiny models on 200k tokens of the embedded corpus; under a minute."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import prepare_data as pd  # noqa: E402
import train  # noqa: E402
from model import GPT  # noqa: E402

# a 1-layer, 64-wide model; a micro-batch is 4 x 32 = 128 tokens, a step 256 tokens (2 micro-batches)
TINY = ["--n_layer=1", "--n_embd=64", "--n_head=2", "--n_kv_head=1", "--mlp_hidden=160", "--block_size=32",
        "--batch_size=4", "--total_batch_size=256", "--eval_iters=2", "--sample_len=0", "--log_interval=1000"]
MICRO_TOKENS = 4 * 32
WIDTH_MULT = 64 / 256  # n_embd / GPTConfig.base_width
# the reference run: warmup 0-1, stable 2-7, decay 8-11; checkpoints after steps 3, 6, 8 (decay start), 9, 12
REF = ["--max_iters=12", "--warmup_iters=2", "--decay_iters=4", "--eval_interval=3", "--ckpt_interval=3",
       "--keep_ckpts=10"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py, as data_dir)


def run(data_dir, out_dir, *flags):
    return train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *flags])


def read_log(out_dir):
    """log.jsonl -> ({step: train entry}, {step: val loss}); fails on a step logged twice."""
    steps, vals = {}, {}
    for line in open(os.path.join(out_dir, "log.jsonl")):
        e = json.loads(line)
        into = vals if "val_loss" in e else steps
        assert e["step"] not in into, f"step {e['step']} logged twice"
        into[e["step"]] = e["val_loss"] if "val_loss" in e else e
    return steps, vals


def ckpt_path(out_dir, step):
    return os.path.join(out_dir, f"ckpt_{step:07d}.pt")


def ckpt_steps(out_dir):
    return sorted(int(re.fullmatch(r"ckpt_(\d+)\.pt", f).group(1)) for f in os.listdir(out_dir)
                  if re.fullmatch(r"ckpt_(\d+)\.pt", f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def snapshot(out_dir):
    """Every file's bytes and mtime, to show that nothing was touched (but the lock a run takes on out_dir)."""
    return {f: (open(os.path.join(out_dir, f), "rb").read(), os.stat(os.path.join(out_dir, f)).st_mtime_ns)
            for f in sorted(os.listdir(out_dir)) if f != ".lock"}


def assert_same_tree(a, b, exact=True):
    """Nested dicts/lists of tensors and numbers: equal (exact) or equal to fp32 tolerance."""
    if isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y, exact)
    else:
        assert a == b


OPTIMIZERS = {"adamw": [], "muon": ["--optimizer=muon"], "muon_at_decay": ["--muon_at_decay"]}


@pytest.fixture(scope="module")
def ref_runs(data_dir, tmp_path_factory):
    """The reference run with each optimizer setting, made once on first use: (out_dir, result)."""
    cache = {}

    def get(optimizer):
        if optimizer not in cache:
            out = str(tmp_path_factory.mktemp("ref") / "out")
            cache[optimizer] = out, run(data_dir, out, *REF, *OPTIMIZERS[optimizer])
        return cache[optimizer]
    return get


@pytest.fixture(scope="module")
def ref_run(ref_runs):
    return ref_runs("adamw")


# -----------------------------------------------------------------------------
# the Warmup-Stable-Decay schedule, against the definitions (RECIPE.md section 3)

def ref_lr_mult(step, max_iters, warmup, decay, shape, min_ratio):
    # Megatron's convention (RECIPE.md section 3): step i trains with lr(i), 0 on the first warmup step, the peak on
    # the decay's first step
    if step < warmup:
        return step / warmup
    decay_start = max_iters - decay
    if step < decay_start:
        return 1.0
    t = (step - decay_start) / decay
    coeff = {"exponential": 2 * 0.5 ** t - 1, "minicpm": 0.5 ** t, "linear": 1 - t,
             "cosine": (1 + math.cos(math.pi * t)) / 2, "1-sqrt": 1 - math.sqrt(t)}[shape]
    return min_ratio + coeff * (1 - min_ratio)


def ref_phase(step, max_iters, warmup, decay, double=0):
    if step < warmup:
        return "warmup"
    if step >= max_iters - decay:
        return "decay"
    return "stable2" if double and step >= double else "stable"


def schedule_args(max_iters, warmup, decay, shape="exponential", min_ratio=1 / 16, double=0):
    return train.parse_args([f"--max_iters={max_iters}", f"--warmup_iters={warmup}", f"--decay_iters={decay}",
                             f"--decay_shape={shape}", f"--min_lr_ratio={min_ratio}", f"--batch_double_step={double}"])


SHAPES = ["exponential", "minicpm", "linear", "cosine", "1-sqrt"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("max_iters,warmup,decay,min_ratio", [(100, 10, 20, 1 / 16), (37, 0, 37, 0.1),
                                                              (50, 7, 13, 0.0), (30, 30, 0, 0.2), (9, 3, 1, 0.5)])
def test_lr_mult_matches_reference(shape, max_iters, warmup, decay, min_ratio):
    args = schedule_args(max_iters, warmup, decay, shape, min_ratio)
    for step in range(max_iters):
        assert train.lr_mult(step, args) == pytest.approx(
            ref_lr_mult(step, max_iters, warmup, decay, shape, min_ratio), rel=1e-12, abs=1e-15), step
        assert train.phase(step, args) == ref_phase(step, max_iters, warmup, decay)


@pytest.mark.parametrize("shape", SHAPES)
def test_schedule_shape_properties(shape):
    max_iters, warmup, decay, min_ratio = 60, 6, 21, 1 / 16
    args = schedule_args(max_iters, warmup, decay, shape, min_ratio)
    lrs = [train.lr_mult(s, args) for s in range(max_iters + 1)]  # (step max_iters: where the decay ends)
    # rises strictly from 0 to the peak, which the first stable step reaches
    assert lrs[0] == 0 and lrs[:warmup + 1] == sorted(set(lrs[:warmup + 1])) and lrs[warmup] == 1.0
    assert lrs[warmup:max_iters - decay + 1] == [1.0] * (max_iters - decay - warmup + 1)  # the decay starts at it
    tail = lrs[max_iters - decay:]  # the decay, then where it ends
    assert all(a > b for a, b in zip(tail, tail[1:]))
    if shape == "minicpm":  # MiniCPM's 0.5^t ends halfway between the peak and min_lr_ratio
        assert lrs[-1] == pytest.approx(min_ratio + 0.5 * (1 - min_ratio), rel=1e-12)
    else:  # the others end exactly at min_lr_ratio, which the last step trains just above
        assert lrs[-1] == pytest.approx(min_ratio, abs=1e-15) and lrs[-2] > min_ratio
    assert min(lrs[1:]) >= min_ratio


def test_phase_with_batch_doubling():
    args = schedule_args(40, 4, 10, double=15)
    assert [train.phase(s, args) for s in range(40)] == [ref_phase(s, 40, 4, 10, 15) for s in range(40)]
    assert train.phase(14, args) == "stable" and train.phase(15, args) == "stable2"


def test_decay_frac_equals_decay_iters():
    a = train.parse_args(["--max_iters=80", "--warmup_iters=5", "--decay_frac=0.25", "--decay_shape=cosine"])
    b = train.parse_args(["--max_iters=80", "--warmup_iters=5", "--decay_iters=20", "--decay_shape=cosine"])
    assert a.decay_iters == 20
    assert [train.lr_mult(s, a) for s in range(80)] == [train.lr_mult(s, b) for s in range(80)]
    with pytest.raises(SystemExit, match="decay_iters.*decay_frac"):
        train.parse_args(["--max_iters=80", "--decay_iters=20", "--decay_frac=0.25"])


@pytest.mark.parametrize("flags", [["--warmup_iters=30", "--decay_iters=80"], ["--warmup_iters=30", "--decay_frac=0.8"]])
def test_schedule_that_does_not_fit_is_refused(flags):
    with pytest.raises(SystemExit, match="max_iters=100"):
        train.parse_args(["--max_iters=100", *flags])


def test_dry_run_prints_schedule_and_trains_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    res = run(data_dir, out, "--max_iters=40", "--warmup_iters=4", "--decay_iters=12", "--batch_double_step=20",
              "--dry_run")
    assert not out.exists()  # no checkpoint, no log, not even the dir
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+ ", line)]
    steps = [int(r[0]) for r in rows]
    assert {0, 3, 27, 39, 19, 20} <= set(steps)  # first, end of warmup, end of stable, last, around the doubling
    for r in rows:
        s = int(r[0])
        mult = ref_lr_mult(s, 40, 4, 12, "exponential", 1 / 16)
        accum = 2 * (2 if s >= 20 else 1)
        assert r[1] == ref_phase(s, 40, 4, 12, 20)
        assert float(r[2]) == pytest.approx(mult, abs=5e-5)
        for lr, group_mult in zip(r[3:6], [1, 1 / WIDTH_MULT, 1 / WIDTH_MULT]):  # embedding, hidden, norm
            assert float(lr) == pytest.approx(0.01 * mult * group_mult, rel=1e-3)
        assert int(r[6].replace(",", "")) == accum * MICRO_TOKENS and int(r[7]) == accum
    assert res["args"].decay_iters == 12


# -----------------------------------------------------------------------------
# batch size and gradient accumulation

def test_grad_accum_steps_reference():
    args = schedule_args(100, 0, 0, double=40)
    args.total_batch_size, args.batch_size, args.block_size = 4096, 4, 32
    for world_size in (1, 2, 4, 8):
        for step in (0, 39, 40, 99):
            tokens = 4096 * (2 if step >= 40 else 1)
            assert train.grad_accum_steps(step, args, world_size) == tokens // (4 * 32 * world_size)
    args.total_batch_size = 384  # 3 micro-batches on one process, 1.5 on two
    assert train.grad_accum_steps(0, args, 1) == 3
    with pytest.raises(SystemExit, match="multiple of 256"):
        train.grad_accum_steps(0, args, 2)


def test_indivisible_batch_names_a_valid_multiple(data_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / "a", "--max_iters=2", "--warmup_iters=0", "--decay_iters=0", "--total_batch_size=200")
    msg = str(e.value.code)
    assert "\n" not in msg and "--total_batch_size" in msg
    multiple = int(re.search(r"multiple of (\d+)", msg).group(1))
    assert multiple == MICRO_TOKENS
    assert not os.path.exists(tmp_path / "a" / "log.jsonl")
    # the multiple it names works
    run(data_dir, tmp_path / "b", "--max_iters=1", "--warmup_iters=0", "--decay_iters=0",
        f"--total_batch_size={3 * multiple}")
    assert len(read_log(tmp_path / "b")[0]) == 1


def test_accumulation_is_the_mean_over_the_whole_batch(data_dir, tmp_path):
    # 2 micro-batches of 4 sequences read the same 8 sequences as 1 micro-batch of 8: the same step, up to fp32
    flags = ["--max_iters=6", "--warmup_iters=1", "--decay_iters=2", "--eval_interval=0", "--ckpt_interval=0"]
    run(data_dir, tmp_path / "accum", *flags)
    run(data_dir, tmp_path / "big", *flags, "--batch_size=8")
    a, b = read_log(tmp_path / "accum")[0], read_log(tmp_path / "big")[0]
    for s in range(6):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5)
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=1e-4)  # the loss is scaled by 1/accum
    assert_same_tree(load(ckpt_path(tmp_path / "accum", 6))["model"], load(ckpt_path(tmp_path / "big", 6))["model"],
                     exact=False)


def test_group_learning_rates_and_batch_doubling(data_dir, tmp_path, monkeypatch):
    """What the optimizer sees at each step: lr * lr_mult(step) * group multiplier, and the micro-batch count."""
    max_iters, warmup, decay, double = 10, 3, 3, 5
    micro, seen = [0], []
    forward = GPT.forward

    def counting_forward(self, idx, targets=None):
        if self.training:
            micro[0] += 1
        return forward(self, idx, targets)

    def record(opt, args, kwargs):
        seen.append(({g["name"]: g["lr"] for g in opt.param_groups}, micro[0]))
        micro[0] = 0

    monkeypatch.setattr(GPT, "forward", counting_forward)
    handle = register_optimizer_step_pre_hook(record)
    try:
        res = run(data_dir, tmp_path, f"--max_iters={max_iters}", f"--warmup_iters={warmup}",
                  f"--decay_iters={decay}", f"--batch_double_step={double}", "--eval_interval=0", "--lr=0.02",
                  "--decay_shape=linear")
    finally:
        handle.remove()
    group_mult = {"embedding": 1.0, "hidden": 1 / WIDTH_MULT, "norm": 1 / WIDTH_MULT}  # muP: eta and eta/m
    assert len(seen) == max_iters
    accums = []
    for step, (lrs, n_micro) in enumerate(seen):
        mult = ref_lr_mult(step, max_iters, warmup, decay, "linear", 1 / 16)
        assert lrs == pytest.approx({k: 0.02 * mult * m for k, m in group_mult.items()}, rel=1e-12)
        accums.append(2 * (2 if step >= double else 1))
        assert n_micro == accums[-1], step
    log = read_log(tmp_path)[0]
    assert [log[s]["phase"] for s in range(max_iters)] == [ref_phase(s, max_iters, warmup, decay, double)
                                                           for s in range(max_iters)]
    assert [log[s]["lr"] for s in range(max_iters)] == pytest.approx([lrs["embedding"] for lrs, _ in seen])
    # the saved optimizer holds the last step's rates and the loader has consumed exactly the doubled batches
    ckpt = load(ckpt_path(tmp_path, max_iters))
    for g in ckpt["optimizer"]["param_groups"]:
        assert g["lr_mult"] == group_mult[g["name"]] and g["lr"] == pytest.approx(seen[-1][0][g["name"]])
    assert ckpt["train_loader"] == {"shard": 0, "pos": sum(accums) * MICRO_TOKENS, "epoch": 0}
    assert res["config"].width_mult == WIDTH_MULT


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_gradients_are_clipped_to_grad_clip(data_dir, tmp_path, clip):
    """The optimizer steps with the gradient clipped to norm grad_clip (0: untouched); the log has the norm before."""
    norms = []

    def record(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"]]
        norms.append(math.sqrt(sum(g.double().pow(2).sum().item() for g in grads)))

    handle = register_optimizer_step_pre_hook(record)
    try:
        run(data_dir, tmp_path, "--max_iters=5", "--warmup_iters=1", "--decay_iters=1", "--eval_interval=0",
            "--ckpt_interval=0", f"--grad_clip={clip}")
    finally:
        handle.remove()
    logged = [e["grad_norm"] for _, e in sorted(read_log(tmp_path)[0].items())]
    assert len(norms) == len(logged) == 5
    assert norms == pytest.approx([min(n, clip) if clip else n for n in logged], rel=1e-5)
    assert max(logged) > 0.5  # so the clip did bite


# -----------------------------------------------------------------------------
# the log and checkpoints of a run

def test_log_records_every_step(ref_run):
    out, res = ref_run
    steps, vals = read_log(out)
    assert sorted(steps) == list(range(12)) and sorted(vals) == [0, 3, 6, 9, 12]
    for s, e in steps.items():
        assert set(e) >= {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "phase"}
        assert e["lr"] == pytest.approx(0.01 * ref_lr_mult(s, 12, 2, 4, "exponential", 1 / 16), rel=1e-12)
        assert e["phase"] == ref_phase(s, 12, 2, 4) and math.isfinite(e["loss"]) and e["tokens_per_sec"] > 0
    assert res["val_loss"] == vals[12] and res["best_val"] == min(vals.values())
    assert json.load(open(os.path.join(out, "config.json")))["model"]["n_embd"] == 64


@pytest.mark.parametrize("max_iters,decay,interval,keep", [(12, 8, 2, 2), (12, 4, 3, 10), (10, 3, 4, 1)])
def test_checkpoint_retention(data_dir, tmp_path, max_iters, decay, interval, keep):
    run(data_dir, tmp_path, f"--max_iters={max_iters}", "--warmup_iters=1", f"--decay_iters={decay}",
        f"--ckpt_interval={interval}", f"--keep_ckpts={keep}", "--eval_interval=0")
    decay_start = max_iters - decay
    saved = [s for s in range(1, max_iters + 1) if s % interval == 0 or s in (decay_start, max_iters)]
    assert ckpt_steps(tmp_path) == sorted(set(saved[-keep:]) | {decay_start})
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    for s in ckpt_steps(tmp_path):
        assert load(ckpt_path(tmp_path, s))["step"] == s


# -----------------------------------------------------------------------------
# resume: bit for bit

# resume points: stable, the decay start, inside the decay; with --muon_at_decay: before the switch, at it (the
# step-8 checkpoint is AdamW's, the switch happens on resume) and after it (the step-9 one is Muon's)
@pytest.mark.parametrize("optimizer,k,how", [("adamw", 6, "auto"), ("adamw", 8, "path"), ("adamw", 9, "path"),
                                             ("muon", 6, "path"), ("muon_at_decay", 6, "path"),
                                             ("muon_at_decay", 8, "auto"), ("muon_at_decay", 9, "path")])
def test_resume_is_bit_exact(ref_runs, data_dir, tmp_path, optimizer, k, how):
    ref, ref_res = ref_runs(optimizer)
    flags = [*REF, *OPTIMIZERS[optimizer]]
    out = tmp_path / "out"
    if how == "auto":  # the checkpoint copied into a fresh out_dir, found there
        out.mkdir()
        shutil.copy(ckpt_path(ref, k), out)
        res = run(data_dir, out, *flags, "--resume")
    else:  # the checkpoint named, a fresh out_dir
        res = run(data_dir, out, *flags, f"--resume={ckpt_path(ref, k)}")
    a, a_val = read_log(ref)
    b, b_val = read_log(out)
    assert sorted(b) == list(range(k, 12))
    timing = ("tokens_per_sec", "mfu")
    for s in range(k, 12):
        assert {n: v for n, v in b[s].items() if n not in timing} == {n: v for n, v in a[s].items() if n not in timing}
    assert b_val == {s: v for s, v in a_val.items() if s >= k}
    assert res["val_loss"] == ref_res["val_loss"] and res["best_val"] == ref_res["best_val"]
    fa, fb = load(ckpt_path(ref, 12)), load(ckpt_path(out, 12))
    for key in ("model", "optimizer", "train_loader", "best_val"):
        assert_same_tree(fa[key], fb[key])


def test_resume_carries_best_val(ref_run, data_dir, tmp_path):
    ref = ref_run[0]
    ckpt = load(ckpt_path(ref, 6))
    assert ckpt["best_val"] == min(v for s, v in read_log(ref)[1].items() if s < 6)  # the evals at steps 0 and 3
    ckpt["best_val"] = 0.125  # better than any val loss this run reaches: it must survive the resume
    torch.save(ckpt, ckpt_path(tmp_path, 6))
    res = run(data_dir, tmp_path, *REF, "--resume")
    assert res["best_val"] == 0.125 and load(ckpt_path(tmp_path, 12))["best_val"] == 0.125


def test_crash_then_resume_in_the_same_out_dir(ref_run, data_dir, tmp_path, monkeypatch):
    """A run dies in step 10; --resume continues from the step-9 checkpoint and the log ends up as if it never died."""
    forward, calls = GPT.forward, [0]

    def dying_forward(self, idx, targets=None):
        if self.training:
            calls[0] += 1
            if calls[0] > 2 * 10:
                raise RuntimeError("killed")
        return forward(self, idx, targets)

    monkeypatch.setattr(GPT, "forward", dying_forward)
    with pytest.raises(RuntimeError, match="killed"):
        run(data_dir, tmp_path, *REF)
    monkeypatch.setattr(GPT, "forward", forward)
    assert ckpt_steps(tmp_path) == [3, 6, 8, 9] and max(read_log(tmp_path)[0]) == 9
    run(data_dir, tmp_path, *REF, "--resume")
    a, a_val = read_log(ref_run[0])
    b, b_val = read_log(tmp_path)  # read_log fails if a step is there twice
    assert sorted(b) == list(range(12)) and b_val == a_val
    assert [b[s]["loss"] for s in range(12)] == [a[s]["loss"] for s in range(12)]
    assert_same_tree(load(ckpt_path(ref_run[0], 12))["model"], load(ckpt_path(tmp_path, 12))["model"])


# -----------------------------------------------------------------------------
# the AdamW -> Muon switch at the start of the decay (RECIPE.md section 4)

def test_muon_at_decay_switch(data_dir, tmp_path, capsys):
    """9 steps, decay from step 8: AdamW for steps 0-7, one Muon step at step 8, which starts from zero state."""
    seen = []  # (optimizer, step's group lrs, the hidden grads) at every optimizer step

    def hook(opt, args, kwargs):
        hidden = next(g for g in opt.param_groups if g["name"] == "hidden")
        seen.append((opt, {g["name"]: g["lr"] for g in opt.param_groups}, [p.grad.clone() for p in hidden["params"]]))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        run(data_dir, tmp_path, "--max_iters=9", "--warmup_iters=2", "--decay_iters=1", "--eval_interval=0",
            "--ckpt_interval=0", "--muon_at_decay", "--keep_ckpts=0")
    finally:
        handle.remove()
    assert "step 8: switching adamw -> muon" in capsys.readouterr().out
    assert [type(o).__name__ for o, _, _ in seen] == ["AdamW"] * 8 + ["Muon"]

    # the schedule and the muP multipliers carry on across the switch: every group at eta * lr_mult(step) * mult
    args = train.parse_args(TINY + ["--max_iters=9", "--warmup_iters=2", "--decay_iters=1"])
    mults = {"embedding": 1.0, "hidden": 1 / WIDTH_MULT, "norm": 1 / WIDTH_MULT}
    for step, (_, lrs, _) in enumerate(seen):
        assert lrs == pytest.approx({n: 0.01 * train.lr_mult(step, args) * m for n, m in mults.items()}, rel=1e-12)

    before, after = load(ckpt_path(tmp_path, 8)), load(ckpt_path(tmp_path, 9))
    assert (before["optimizer_name"], after["optimizer_name"]) == ("adamw", "muon")
    assert all(s["step"] == 8 for s in before["optimizer"]["state"].values())
    groups = {g["name"]: g for g in after["optimizer"]["param_groups"]}
    assert groups["hidden"]["muon"] and not groups["embedding"]["muon"] and not groups["norm"]["muon"]
    state = after["optimizer"]["state"]
    # Muon momentum started at zero: after one step buf = (1 - mu) * g exactly
    for i, g in zip(groups["hidden"]["params"], seen[-1][2]):
        assert state[i].keys() == {"momentum_buffer"}
        assert torch.equal(state[i]["momentum_buffer"], torch.zeros_like(g).lerp_(g, 1 - 0.95))
    # the AdamW moments were dropped too: one step from zero gives m^2 / v = (1 - beta1)^2 / (1 - beta2) = 0.2
    for i in groups["embedding"]["params"] + groups["norm"]["params"]:
        m, v = state[i]["exp_avg"], state[i]["exp_avg_sq"]
        assert state[i]["step"] == 1
        nz = v > 1e-20
        torch.testing.assert_close(m[nz] ** 2 / v[nz], torch.full_like(v[nz], 0.2), rtol=1e-4, atol=0)


def test_optimizer_muon_from_the_start(ref_runs):
    out = ref_runs("muon")[0]
    for step in ckpt_steps(out):
        assert load(ckpt_path(out, step))["optimizer_name"] == "muon"
    entries = read_log(out)[0]
    assert {e["optimizer"] for e in entries.values()} == {"muon"}


# -----------------------------------------------------------------------------
# safety: no run silently replaces or damages another

def test_fresh_run_into_a_used_out_dir_is_refused(ref_run, data_dir, tmp_path):
    for f in ("ckpt_0000006.pt", "log.jsonl", "config.json"):
        shutil.copy(os.path.join(ref_run[0], f), tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, *REF, "--seed=7")
    assert "--resume" in str(e.value.code) and "--overwrite" in str(e.value.code)
    assert snapshot(tmp_path) == before


def test_resume_from_an_older_checkpoint_is_refused(ref_run, data_dir, tmp_path):
    for s in (6, 9):
        shutil.copy(ckpt_path(ref_run[0], s), tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit, match="later checkpoints"):
        run(data_dir, tmp_path, *REF, f"--resume={ckpt_path(tmp_path, 6)}")
    assert snapshot(tmp_path) == before


def test_resume_without_a_checkpoint_is_refused(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint to resume"):
        run(data_dir, tmp_path, *REF, "--resume")


@pytest.mark.parametrize("flag,field", [("--n_embd=128", "n_embd"), ("--n_layer=2", "n_layer"),
                                        ("--mup=0", "mup")])
def test_resume_with_another_model_config_is_refused(ref_run, data_dir, tmp_path, flag, field):
    shutil.copy(ckpt_path(ref_run[0], 6), tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, *REF, flag, "--resume")
    msg = str(e.value.code)
    assert re.search(rf"\b{field}\b", msg) and "\n" not in msg
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_dict"])
def test_corrupt_checkpoint_gives_a_clear_error(ref_run, data_dir, tmp_path, damage):
    path = ckpt_path(tmp_path, 6)
    raw = open(ckpt_path(ref_run[0], 6), "rb").read()
    if damage == "garbage":
        open(path, "wb").write(b"this is not a checkpoint\n" * 10)
    elif damage == "truncated":
        open(path, "wb").write(raw[:len(raw) // 2])
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, *REF, "--resume")
    msg = str(e.value.code)
    assert msg.startswith("train.py: error:") and path in msg and "\n" not in msg


def test_resume_on_data_that_does_not_fit_the_checkpoint(ref_run, data_dir, tmp_path):
    """The step-6 checkpoint's loader is 1536 tokens into a train split that now holds 1000."""
    small = tmp_path / "small"
    small.mkdir()
    meta = pd.read_meta(data_dir)
    train_tokens = np.asarray(pd.read_shard(os.path.join(data_dir, "train_000000.bin")))[:1000]
    pd.write_shard(str(small / "train_000000.bin"), train_tokens, 257, "byte")
    shutil.copy(os.path.join(data_dir, "val_000000.bin"), small)
    pd.write_meta(str(small), {**meta, "tokens": {**meta["tokens"], "train": 1000}})
    assert load(ckpt_path(ref_run[0], 6))["train_loader"]["pos"] == 6 * 256
    with pytest.raises(SystemExit) as e:
        run(small, tmp_path / "out", *REF, f"--resume={ckpt_path(ref_run[0], 6)}")
    msg = str(e.value.code)
    assert msg.startswith("train.py: error:") and "\n" not in msg and "data" in msg


class InfGrad(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss over an overflowing backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_nan_loss_stops_and_names_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, bad):
    forward, calls, before = GPT.forward, [0], {}

    def nan_forward(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            calls[0] += 1
            if calls[0] > 2 * 7:  # from step 7 on
                before.setdefault("files", snapshot(tmp_path))
                loss = loss * float("nan") if bad == "loss" else InfGrad.apply(loss)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", nan_forward)
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, *REF)
    msg = str(e.value.code)
    assert "nan" in msg and "step 7" in msg and "\n" not in msg
    assert re.search(r"last good checkpoint\D*6\b", msg) and os.path.exists(ckpt_path(tmp_path, 6))
    assert ckpt_steps(tmp_path) == [3, 6]
    assert snapshot(tmp_path) == before["files"]  # nothing written after the bad step, not even the log
    steps = read_log(tmp_path)[0]
    assert sorted(steps) == list(range(7)) and all(math.isfinite(e["loss"]) for e in steps.values())


class Killed(Exception):
    pass


def test_kill_during_save_keeps_the_previous_checkpoint(ref_run, data_dir, tmp_path, monkeypatch):
    real_save, saves, before = torch.save, [0], {}

    def dying_save(obj, f, *a, **kw):
        saves[0] += 1
        if saves[0] == 1:
            return real_save(obj, f, *a, **kw)
        before["files"] = snapshot(tmp_path)
        f.write(b"PK\x03\x04half a checkpoint")
        raise Killed()

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        run(data_dir, tmp_path, *REF)
    monkeypatch.setattr(torch, "save", real_save)
    after = snapshot(tmp_path)
    assert ckpt_steps(tmp_path) == [3]  # no partial ckpt_0000006.pt
    assert after["ckpt_0000003.pt"] == before["files"]["ckpt_0000003.pt"]
    assert load(ckpt_path(tmp_path, 3))["step"] == 3
    # the run continues from the intact checkpoint as if nothing happened
    run(data_dir, tmp_path, *REF, "--resume")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert_same_tree(load(ckpt_path(ref_run[0], 12))["model"], load(ckpt_path(tmp_path, 12))["model"])


def test_overwrite_leaves_the_new_runs_checkpoints(data_dir, tmp_path):
    flags = ["--max_iters=8", "--warmup_iters=1", "--decay_iters=2", "--ckpt_interval=4", "--eval_interval=0"]
    run(data_dir, tmp_path / "fresh", *flags, "--seed=2")
    run(data_dir, tmp_path / "out", *flags, "--seed=1")
    assert ckpt_steps(tmp_path / "out") == [4, 6, 8]
    run(data_dir, tmp_path / "out", *flags, "--seed=2", "--overwrite")
    # the same checkpoints as a fresh run into an empty dir, and they are the new run's
    assert ckpt_steps(tmp_path / "out") == ckpt_steps(tmp_path / "fresh") == [4, 6, 8]
    for s in (4, 6, 8):
        assert_same_tree(load(ckpt_path(tmp_path / "fresh", s))["model"], load(ckpt_path(tmp_path / "out", s))["model"])


def test_resuming_a_finished_run_keeps_its_log(ref_run, data_dir, tmp_path):
    for f in ("ckpt_0000012.pt", "log.jsonl"):
        shutil.copy(os.path.join(ref_run[0], f), tmp_path)
    before = open(tmp_path / "log.jsonl").read()
    run(data_dir, tmp_path, *REF, "--resume")  # nothing left to train
    assert open(tmp_path / "log.jsonl").read() == before


# -----------------------------------------------------------------------------
# DDP: torchrun on CPU (gloo)

def env_1thread():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def torchrun(*flags):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *flags], cwd=ROOT, capture_output=True, text=True, env=env_1thread(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("optimizer", ["adamw", "muon_at_decay"])  # Muon: each rank orthogonalizes a share
def test_two_processes_equal_one_with_accumulation(ref_runs, data_dir, tmp_path, optimizer):
    """12 steps of 256 tokens stay inside the one train shard, where the loader's streams are the same."""
    ref = ref_runs(optimizer)[0]
    torchrun(*TINY, *REF, *OPTIMIZERS[optimizer], f"--data_dir={data_dir}", f"--out_dir={tmp_path}")
    assert json.load(open(os.path.join(tmp_path, "config.json")))["args"]["total_batch_size"] == 256
    a, b = read_log(ref)[0], read_log(tmp_path)[0]
    assert sorted(b) == list(range(12))
    for s in range(12):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-4), s
    fa, fb = load(ckpt_path(ref, 12)), load(ckpt_path(tmp_path, 12))
    assert_same_tree(fa["model"], fb["model"], exact=False)
    assert fa["train_loader"] == fb["train_loader"]


def test_checkpoint_resumes_on_another_world_size(ref_run, data_dir, tmp_path):
    ref = ref_run[0]
    torchrun(*TINY, *REF, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", f"--resume={ckpt_path(ref, 6)}")
    a, b = read_log(ref)[0], read_log(tmp_path)[0]
    assert sorted(b) == list(range(6, 12))
    for s in range(6, 12):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
    assert_same_tree(load(ckpt_path(ref, 12))["model"], load(ckpt_path(tmp_path, 12))["model"], exact=False)


# -----------------------------------------------------------------------------
# the command line

def run_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env_1thread(), timeout=120)


def one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("train.py: error:")
    return lines[0]


def test_cli_unknown_flag_is_one_line():
    line = one_line_error(run_cli("--bogus_flag"))
    assert "--bogus_flag" in line
    line = one_line_error(run_cli("--max_iter=5"))
    assert "--max_iters" in line  # the closest real flag


def test_cli_bad_value_is_one_line(tmp_path):
    assert "--max_iters" in one_line_error(run_cli("--max_iters=abc"))
    assert "--decay_frac" in one_line_error(run_cli("--decay_iters=3", "--decay_frac=0.5",
                                                    f"--out_dir={tmp_path}"))


def test_cli_help_lists_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0 and r.stderr == ""
    flags = [o for a in config.get_parser()._actions for o in a.option_strings]
    assert len(flags) > 40
    for flag in flags:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", r.stdout), flag


def test_cli_missing_data_dir_is_one_line(tmp_path):
    line = one_line_error(run_cli("--data_dir=/nonexistent", f"--out_dir={tmp_path / 'out'}", "--max_iters=2",
                                  "--warmup_iters=0", "--decay_iters=0"))
    assert "/nonexistent" in line
    assert not os.path.exists(tmp_path / "out")


def test_cli_truncated_shard_names_the_shard(data_dir, tmp_path):
    bad = str(tmp_path / "data")
    shutil.copytree(data_dir, bad)
    shard = os.path.join(bad, "train_000000.bin")
    os.truncate(shard, os.path.getsize(shard) - 7)
    line = one_line_error(run_cli(f"--data_dir={bad}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=2",
                                  "--warmup_iters=0", "--decay_iters=0"))
    assert shard in line and "truncated" in line


def test_cli_shard_too_small_for_a_batch_is_one_line(data_dir, tmp_path):
    small = tmp_path / "data"
    small.mkdir()
    meta = pd.read_meta(data_dir)
    for split, n in (("train", 5000), ("val", 100)):  # a val micro-batch needs 4*32+1 = 129 tokens
        tokens = np.asarray(pd.read_shard(os.path.join(data_dir, f"{split}_000000.bin")))[:n]
        pd.write_shard(str(small / f"{split}_000000.bin"), tokens, 257, "byte")
    pd.write_meta(str(small), {**meta, "tokens": {"train": 5000, "val": 100}})
    # no evaluation until the end: the check must still come before any training
    line = one_line_error(run_cli(f"--data_dir={small}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=2",
                                  "--warmup_iters=0", "--decay_iters=0", "--eval_interval=0"))
    assert "val_000000.bin" in line
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# a short real run

def test_short_run_learns(data_dir, tmp_path):
    """100 steps: the val loss falls far below its start and below the best context-free (unigram) guess."""
    eval_iters = 8
    res = run(data_dir, tmp_path, "--max_iters=100", "--warmup_iters=5", "--decay_iters=20", "--eval_interval=100",
              f"--eval_iters={eval_iters}", "--ckpt_interval=0")
    vals = read_log(tmp_path)[1]
    assert sorted(vals) == [0, 100] and res["val_loss"] == vals[100]
    # cross-entropy of the train split's byte frequencies on the very targets evaluate() scores
    train_tokens = np.asarray(pd.read_shard(os.path.join(data_dir, "train_000000.bin")), dtype=np.int64)
    p = (np.bincount(train_tokens, minlength=257) + 1.0) / (len(train_tokens) + 257)
    loader = pd.TokenLoader(data_dir, "val")
    targets = torch.cat([loader.next_batch(4, 32)[1].flatten() for _ in range(eval_iters)]).numpy()
    unigram = -np.log(p[targets]).mean()
    assert vals[100] < unigram < vals[0]
    assert vals[100] < 0.5 * vals[0]


# -----------------------------------------------------------------------------
# the recipe's fourth phase (long context), the switch's re-warmup, --stop_after

def test_long_context_continues_a_decay_checkpoint_and_learns_the_longer_context(data_dir, tmp_path):
    base = tmp_path / "base"
    run(data_dir, base, *REF, "--eval_interval=0")  # block_size 32 through warmup, stable, decay: step 12
    lc = tmp_path / "lc"
    flags = [*REF, "--eval_interval=4", f"--resume={ckpt_path(base, 12)}", "--long_context=64:8,128:4",
             "--long_context_warmup=4"]
    run(data_dir, lc, *flags)
    steps, vals = read_log(lc)
    assert sorted(steps) == list(range(12, 24)) and all(steps[s]["phase"] == "long_context" for s in steps)
    assert [steps[s]["seq_len"] for s in sorted(steps)] == [64] * 8 + [128] * 4
    # the same tokens a step (half the sequences, twice as long); the release's fresh schedule: a warmup from 1e-6
    # to the decay's end (0.01/16 for the embedding), then linear to 1e-5 at the phase's end (12 steps, warmup 4)
    assert all(steps[s]["tokens"] - steps[s - 1]["tokens"] == 256 for s in range(13, 24))
    for s in range(12, 24):
        j, top = s - 12, 0.01 / 16
        ref = 1e-6 + (top - 1e-6) * j / 4 if j <= 4 else 1e-5 + (1 - (j - 4) / 8) * (top - 1e-5)
        assert steps[s]["lr"] == pytest.approx(ref, rel=1e-12)
    # at the longer context the continued model is better than the decay checkpoint it started from
    entries = [json.loads(line) for line in open(lc / "log.jsonl") if "val_loss" in line]
    at_64 = [e["val_loss"] for e in entries if e["seq_len"] == 64]
    assert at_64[0] == vals[12] and at_64[-1] < at_64[0] - 0.05, at_64
    ckpt = load(ckpt_path(lc, 24))
    assert ckpt["model_config"]["block_size"] == 128 and ckpt["step"] == 24
    assert os.path.exists(ckpt_path(lc, 20))  # the end of the 64-token sub-phase


def test_a_longer_block_size_is_refused_outside_the_long_context_phase(ref_run, data_dir, tmp_path):
    with pytest.raises(SystemExit, match="block_size: checkpoint 32, now 64.*only in the long-context phase: "
                                         "--long_context"):
        train.main([*TINY, "--block_size=64", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *REF,
                    f"--resume={ckpt_path(ref_run[0], 12)}"])


def test_bad_long_context_values_are_one_line():
    for bad in ("512", "512:0", "a:b", "512:10:3:2:1", "-512:10", "512:10:0"):
        with pytest.raises(SystemExit, match="expected SEQ:STEPS"):
            train.parse_args([f"--long_context={bad}"])


@pytest.mark.parametrize("muon_at_decay", [True, False])
def test_switch_warmup_rewarms_the_lr_after_the_switch_only(muon_at_decay):
    args = train.parse_args(["--max_iters=40", "--warmup_iters=4", "--decay_iters=12", "--switch_warmup=3",
                             *(["--muon_at_decay"] if muon_at_decay else [])])
    for s in range(40):
        ref = ref_lr_mult(s, 40, 4, 12, "exponential", 1 / 16)
        if muon_at_decay and 28 <= s < 31:
            ref *= (s - 28 + 1) / 4  # 1/4, 2/4, 3/4 of the scheduled LR, then the schedule
        assert train.lr_mult(s, args) == pytest.approx(ref), s


def test_muon_lr_moves_only_the_matrices_muon_steps(data_dir, tmp_path, capsys):
    """--muon_lr: after the switch the hidden (Muon) group's LR is muon_lr * lr_mult(step) / m; the embedding and
    norms, and every group before the switch, keep --lr's. The dry-run plan prints the same."""
    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: seen.append({g["name"]: g["lr"] for g in
                                                                             opt.param_groups}))
    flags = ["--max_iters=9", "--warmup_iters=2", "--decay_iters=2", "--muon_at_decay", "--muon_lr=0.03"]
    try:
        run(data_dir, tmp_path, *flags, "--eval_interval=0", "--ckpt_interval=0", "--keep_ckpts=0")
    finally:
        handle.remove()
    args = train.parse_args(TINY + flags)
    for step, lrs in enumerate(seen):
        hidden_eta = 0.03 if step >= 7 else 0.01
        want = {"embedding": 0.01, "hidden": hidden_eta / WIDTH_MULT, "norm": 0.01 / WIDTH_MULT}
        assert lrs == pytest.approx({n: v * train.lr_mult(step, args) for n, v in want.items()}, rel=1e-12), step
    capsys.readouterr()
    run(data_dir, tmp_path / "plan", *flags, "--dry_run")
    rows = {int(r[0]): r for r in (line.split() for line in capsys.readouterr().out.splitlines())
            if r and r[0].isdigit()}
    for s in (6, 7):  # the last AdamW step, the first Muon step: embedding, hidden, norm
        hidden_eta = 0.03 if s == 7 else 0.01
        assert [float(v) for v in rows[s][3:6]] == pytest.approx(
            [m * train.lr_mult(s, args) for m in (0.01, hidden_eta / WIDTH_MULT, 0.01 / WIDTH_MULT)], rel=1e-3)


def test_config_describes_train_py_as_its_docstring_does():
    assert config.DESCRIPTION == train.__doc__.split("\n")[1]  # --help's first line, kept where train.py is read


def test_muon_lr_from_step_0_and_in_the_long_context_phase():
    """--optimizer=muon: the hidden group on --muon_lr from step 0; in the long-context phase its fresh schedule
    warms up to where its own decay ended (muon_lr / m / 16), the other groups' to theirs; an AdamW group ignores
    --muon_lr."""
    args = train.parse_args(["--max_iters=40", "--warmup_iters=4", "--decay_iters=12", "--optimizer=muon",
                             "--muon_lr=0.03", "--long_context=512:10", "--long_context_warmup=2"])
    hidden, emb = dict(name="hidden", lr_mult=0.25), dict(name="embedding", lr_mult=1.0)
    assert {train.optimizer_kind(s, args) for s in range(50)} == {"muon"}
    assert train.group_eta(args, hidden, "muon") == 0.03 and train.group_eta(args, emb, "muon") == 0.01
    assert train.group_eta(args, hidden, "adamw") == 0.01
    assert train.group_lr(20, args, 0.25, 0.03) == pytest.approx(0.03 * 0.25)
    assert train.group_lr(42, args, 0.25, 0.03) == pytest.approx(0.03 * 0.25 / 16)  # the phase's warmup end
    assert train.group_lr(42, args, 1.0) == pytest.approx(0.01 / 16)
    assert train.group_lr(40, args, 0.25, 0.03) == train.group_lr(40, args, 1.0) == pytest.approx(1e-6)


def test_stop_after_leaves_the_decay_start_to_branch_from(ref_run, data_dir, tmp_path):
    base = tmp_path / "base"
    run(data_dir, base, *REF, "--stop_after=8")  # stop where the decay starts (max_iters 12, decay 4)
    assert ckpt_steps(base) == [3, 6, 8] and max(read_log(base)[0]) == 7
    run(data_dir, tmp_path / "arm", *REF, f"--resume={ckpt_path(base, 8)}")  # the branch: same as not stopping
    assert_same_tree(load(ckpt_path(ref_run[0], 12))["model"], load(ckpt_path(tmp_path / "arm", 12))["model"])


def test_compile_without_a_compiler_is_one_line(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train.shutil, "which", lambda name: None)  # a machine with no C/C++ compiler on PATH
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / "out", "--max_iters=2", "--warmup_iters=0", "--decay_iters=0", "--compile=1")
    message = str(e.value.code)
    assert "needs a C/C++ compiler" in message and "--compile=0" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
