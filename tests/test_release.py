"""
Faithful to the release, to the step: the LR schedule against Megatron's scheduler, the long-context phase as the
released scripts run it, and every multi-GPU command the README and docs/ give, checked at its world size.
"""
import glob
import math
import os
import re
import shlex
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

from test_train import REF, TINY, read_log, run  # noqa: E402

# -----------------------------------------------------------------------------
# Megatron's OptimizerParamScheduler, written from RECIPE.md section 3 (not from train.py): the scheduler is built
# with step(0) and stepped after each optimizer step, so iteration i trains with get_lr(i)


def megatron_lr(i, max_lr, min_lr, warmup, decay_steps, style, wsd_decay_steps=0, wsd_style="", init_lr=0.0):
    if warmup > 0 and i <= warmup:
        return init_lr + (max_lr - init_lr) * i / warmup
    if i > decay_steps:
        return min_lr
    if style == "WSD":
        anneal_start = decay_steps - wsd_decay_steps
        if i <= anneal_start:
            coeff = 1.0
        else:
            r = (i - anneal_start) / wsd_decay_steps
            coeff = {"exponential": 2.0 * 0.5 ** r - 1.0, "linear": 1.0 - r}[wsd_style]
    else:  # linear, from the end of the warmup
        coeff = 1.0 - (i - warmup) / (decay_steps - warmup)
    return min_lr + coeff * (max_lr - min_lr)


def release_lr(step, group_mult):
    """The xmodel-2.5 scripts: peak 0.01 x the muP multiplier (embedding 1, hidden and norms 1/6), 2k warmup, WSD
    over 550k iterations with an exponential 20k decay to peak/16; then the long-context run's fresh schedule (its
    own iteration count from 0): 500 warmup iterations from 1e-6 to the decay's end, linear to 1e-5 over 10k."""
    peak = 0.01 * group_mult
    if step < 550_000:
        return megatron_lr(step, peak, peak / 16, 2000, 550_000, "WSD", 20_000, "exponential")
    return megatron_lr(step - 550_000, peak / 16, 1e-5, 500, 10_000, "linear", init_lr=1e-6)


def test_lr_equals_megatrons_at_every_step_of_the_release():
    args = train.parse_args(["--preset=xmodel-2.5", "--long_context=8192:3000,16384:7000"])
    assert train.total_iters(args) == 560_000
    for mult in (1.0, 1 / 6):  # the embedding; the hidden matrices and norms (m = 6)
        worst = max(abs(train.group_lr(s, args, mult) / release_lr(s, mult) - 1) if release_lr(s, mult) else
                    abs(train.group_lr(s, args, mult)) for s in range(560_000))
        assert worst < 1e-12, worst
    # pinned by hand where a one-step shift shows: the first step trains at 0, the decay's first at the peak, the
    # long-context phase's first at 1e-6 and its warmup's end at the decay's end
    assert train.group_lr(0, args) == 0 and train.group_lr(1, args) == pytest.approx(0.01 / 2000)
    assert train.group_lr(530_000, args) == 0.01 and train.group_lr(529_999, args) == 0.01
    assert train.group_lr(530_001, args) < 0.01
    assert train.group_lr(550_000, args, 1 / 6) == pytest.approx(1e-6)
    assert train.group_lr(550_500, args, 1 / 6) == pytest.approx(0.01 / 6 / 16)  # 1.041667e-4
    assert train.group_lr(559_999, args) == pytest.approx(1e-5 + (6.25e-4 - 1e-5) / 9500)


def test_release_batches_at_eight_and_sixteen_gpus():
    args = train.parse_args(["--preset=xmodel-2.5", "--long_context=8192:3000,16384:7000"])
    for step, seqs, seq in [(0, 480, 3712), (270_000, 960, 3712), (550_000, 960, 8192), (553_000, 240, 16384)]:
        assert (train.step_sequences(step, args), train.seq_len(step, args)) == (seqs, seq)
    assert [train.grad_accum_steps(s, args, 8) for s in (0, 270_000, 550_000, 553_000)] == [15, 30, 60, 30]
    with pytest.raises(SystemExit, match="multiple of 237568"):  # 480 x 3712 over 16 GPUs of 4 sequences
        train.check_batches(args, 16)
    args = train.parse_args(["--preset=xmodel-2.5", "--batch_size=2", "--long_context=8192:3000,16384:7000"])
    train.check_batches(args, 16)  # micro-batches of 2: 15, 30, 30, 15 of them


def test_stages_take_their_batch_from_the_flag_or_the_decays_tokens():
    args = train.parse_args(["--block_size=32", "--batch_size=4", "--total_batch_size=256",
                             "--long_context=64:8,128:4:6:3"])
    assert args.long_context == [(64, 8, 4, 2), (128, 4, 6, 3)]  # (seq, steps, batch, micro)
    with pytest.raises(SystemExit, match="shorter than the training context"):
        train.parse_args(["--block_size=256", "--long_context=128:2"])
    with pytest.raises(SystemExit, match=r"--long_context_warmup=500 steps do not fit in the long-context phase's 40"):
        train.parse_args(["--preset=xmodel-2.5", "--long_context=8192:20,16384:20", "--long_context_warmup=500"])
    assert train.parse_args(["--long_context=512:80"]).long_context_warmup == 4  # 5% of the phase, as released
    with pytest.raises(SystemExit, match=r"not a whole number of 8192-token sequences; give the stage's batch"):
        train.parse_args(["--block_size=3712", "--batch_size=4", "--long_context=8192:10"])

# -----------------------------------------------------------------------------
# the long-context phase, run


LC = ["--eval_interval=0", "--long_context=64:6,128:6:4:2", "--long_context_warmup=3", "--keep_ckpts=0"]


@pytest.fixture(scope="module")
def decay_ckpt(data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    run(data_dir, base, *REF, "--eval_interval=0", "--muon_at_decay")  # warmup, stable, decay to step 12
    return os.path.join(base, "ckpt_0000012.pt")


@pytest.fixture(scope="module")
def long_run(data_dir, decay_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("lc")
    run(data_dir, out, *REF, "--muon_at_decay", *LC, f"--resume={decay_ckpt}", "--ckpt_interval=1")
    return out


def test_the_phase_starts_a_fresh_optimizer_and_schedule(long_run, decay_ckpt):
    steps, _ = read_log(long_run)
    args = train.parse_args(TINY + REF + ["--muon_at_decay", *LC])
    assert sorted(steps) == list(range(12, 24))
    # the LR each step trained with: from 1e-6 up to the decay's end in 3 steps, then linear to 1e-5 (every group)
    assert [steps[s]["lr"] for s in range(12, 24)] == [train.group_lr(s, args) for s in range(12, 24)]
    assert steps[12]["lr"] == pytest.approx(1e-6) and steps[15]["lr"] == pytest.approx(0.01 / 16)
    assert all(steps[s]["lr"] > steps[s + 1]["lr"] for s in range(15, 23))
    for mult in (1.0, 4.0):  # the embedding, the hidden matrices (1/m, m = 1/4): the same floor at the end
        assert train.group_lr(24, args, mult) == pytest.approx(1e-5, rel=1e-12)
    # the optimizer kind continues (Muon, from the decay), its state starts afresh: one step of moments
    before = torch.load(decay_ckpt, weights_only=False)["optimizer"]
    first = torch.load(os.path.join(long_run, "ckpt_0000013.pt"), weights_only=False)
    steps_of = lambda opt: {int(s["step"]) for s in opt["state"].values() if "step" in s}
    assert first["optimizer_name"] == "muon" and steps_of(before) == {4}  # the decay's 4 Muon steps
    assert steps_of(first["optimizer"]) == {1}
    # the stage boundary: the sequence length and the batch change at step 18
    assert [steps[s]["seq_len"] for s in range(12, 24)] == [64] * 6 + [128] * 6
    tokens = [steps[s]["tokens"] - steps[s - 1]["tokens"] for s in range(13, 24)]
    assert tokens == [256] * 5 + [512] * 6  # 64: the decay's tokens a step (the default); 128: 4 x 128 (given)


@pytest.mark.parametrize("stop", [15, 18])  # inside the first stage, and at the stage boundary
def test_resume_inside_the_phase_is_exact(data_dir, decay_ckpt, long_run, tmp_path, stop):
    out = tmp_path / "out"
    run(data_dir, out, *REF, "--muon_at_decay", *LC, f"--resume={decay_ckpt}", f"--stop_after={stop}")
    run(data_dir, out, *REF, "--muon_at_decay", *LC, "--resume")
    a = torch.load(os.path.join(out, "ckpt_0000024.pt"), weights_only=False)
    b = torch.load(os.path.join(long_run, "ckpt_0000024.pt"), weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    timing = ("tokens_per_sec", "mfu")
    strip = lambda log: {s: {k: v for k, v in e.items() if k not in timing} for s, e in log.items()}
    assert strip(read_log(out)[0]) == strip(read_log(long_run)[0])

# -----------------------------------------------------------------------------
# every torchrun train.py command of the README and docs/ plans at its world size


def torchrun_commands():
    found = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text = open(path).read().replace("\\\n", " ")
        for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("torchrun") and " train.py" in line:
                    found.append((os.path.relpath(path, ROOT), line))
    return found


def test_the_docs_have_torchrun_commands():
    assert len(torchrun_commands()) >= 3


@pytest.mark.parametrize("where,command", torchrun_commands())
def test_every_torchrun_command_plans_at_its_world_size(where, command, capsys):
    words = shlex.split(command)
    launcher, flags = words[:words.index("train.py")], words[words.index("train.py") + 1:]
    opt = dict(w[2:].split("=", 1) for w in launcher if w.startswith("--") and "=" in w)
    world = int(opt.get("nproc_per_node", 1)) * int(opt.get("nnodes", 1))
    res = train.main([*flags, "--dry_run", f"--world_size={world}"])  # SystemExit (one line) if it cannot run
    assert res["args"].dry_run and f"{world} process(es)" in capsys.readouterr().out
    assert math.isfinite(train.total_iters(res["args"]))


def test_world_size_only_plans():
    with pytest.raises(SystemExit, match="--world_size=8 plans a run"):
        train.parse_args(["--world_size=8"])
