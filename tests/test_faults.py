"""Fault injection for train.py: kills, a full disk, a second run, signals, bad flag values, divergence. Each case
checks the exit (a clean code and one line, never a traceback) and that nothing earlier was lost: the checkpoints,
the log, the run's ability to --resume. (prepare_data.py's faults: tests/test_data.py; evaluate.py and hf.py's:
their own test files.) CPU, tiny models; real processes where the fault is a process's (signals, locks, limits)."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import cli  # noqa: E402
import config  # noqa: E402
import safeio  # noqa: E402
import train  # noqa: E402

from test_train import REF, TINY  # noqa: E402  (the 1-layer model; 12 steps, checkpoints after 3, 6, 8, 9, 12)
# a longer run for the process-level faults: about 10 ms a step, a checkpoint every 20
LONG = ["--max_iters=600", "--warmup_iters=10", "--decay_iters=100", "--eval_interval=0", "--ckpt_interval=20",
        "--keep_ckpts=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py, as data_dir)


def run(data_dir, out_dir, *flags):
    return train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *flags])


def env_1thread():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cmd(data_dir, out_dir, *flags):
    return [sys.executable, "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *flags]


def train_process(data_dir, out_dir, *flags, **kw):
    return subprocess.run(cmd(data_dir, out_dir, *flags), cwd=ROOT, capture_output=True, text=True,
                          env=env_1thread(), timeout=300, **kw)


def error_line(r):
    """The one line a failed command printed to stderr: there must be exactly one, and no traceback."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip() and "%|" not in line]  # (no progress bars)
    assert len(lines) == 1, r.stderr
    return lines[0]


def ckpt_steps(out_dir):
    return [s for s, _ in checkpoint.list_ckpts(str(out_dir))]


def log_steps(out_dir):
    """Steps of the training entries in log.jsonl; fails on a step logged twice or an unreadable line."""
    entries, torn = safeio.read_jsonl(os.path.join(out_dir, "log.jsonl"))
    steps = [e["step"] for e in entries if "loss" in e]
    assert torn == 0 and len(steps) == len(set(steps)), steps
    return steps


def final_model(out_dir):
    step, path = checkpoint.list_ckpts(str(out_dir))[-1]
    return step, torch.load(path, map_location="cpu", weights_only=False)["model"]


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def can_mount():
    return os.geteuid() == 0 and sys.platform.startswith("linux")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (root only); unmounted after the test."""
    mounted = []

    def mount(size, *opts):
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d
    if not can_mount():
        pytest.skip("mounting a tmpfs needs root on Linux")
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)

# -----------------------------------------------------------------------------
# bad flag values: one line from the parser, before any work


BAD_FLAGS = ["--batch_size=0", "--batch_size=-4", "--block_size=0", "--log_interval=0", "--lr=-0.01", "--lr=nan",
             "--lr=inf", "--beta1=1", "--beta1=-0.1", "--beta2=1.5", "--eps=0", "--decay_frac=nan", "--decay_frac=1.5",
             "--decay_iters=-1", "--warmup_iters=-1", "--max_iters=0", "--grad_clip=-1", "--min_lr_ratio=-0.1",
             "--min_lr_ratio=2", "--ckpt_interval=-1", "--eval_interval=-1", "--eval_iters=0",
             "--total_batch_size=0", "--keep_ckpts=-1", "--muon_momentum=1", "--ns_steps=0", "--sample_len=-1",
             "--seed=-1", "--n_layer=0", "--n_head=0", "--n_embd=-8", "--rope_theta=0", "--norm_eps=nan",
             "--device=mps", "--device=xla", "--device=gpu", "--device=cuda:7"]


@pytest.mark.parametrize("bad", BAD_FLAGS)
def test_bad_flag_value_is_one_line_and_touches_nothing(data_dir, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / "out", *REF, bad)
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    assert message.startswith("train.py: error:") and "\n" not in message, message
    assert bad.split("=")[0].lstrip("-") in message, message  # it names the flag
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_a_bad_value_from_the_command_line_is_one_line(tmp_path):
    r = train_process(str(tmp_path / "nodata"), tmp_path / "out", "--lr=nan")
    assert r.returncode == 2 and "allowed >= 0" in error_line(r)


def test_help_shows_each_range():
    blocks = re.split(r"\n  (?=-)", config.get_parser().format_help())  # one block per option
    for flag, allowed in [("--beta1", "[0, 1)"), ("--batch_size", ">= 1"), ("--decay_frac", "[0, 1]"),
                          ("--keep_ckpts", ">= 0"), ("--eps", "> 0")]:
        block = next(b for b in blocks if b.startswith(flag + " "))
        assert f"(allowed: {allowed})" in " ".join(block.split()), block


def test_range_rejects_what_it_should():
    unit = cli.Range(0, 1, hi_open=True)
    assert 0 in unit and 0.999 in unit and 1 not in unit and -1e-9 not in unit and float("nan") not in unit
    assert float("inf") not in cli.Range(0) and 5 in cli.Range(1) and 0 not in cli.Range(0, lo_open=True)

# -----------------------------------------------------------------------------
# out_dir problems


def test_out_dir_under_a_regular_file(data_dir, tmp_path):
    (tmp_path / "file").write_text("not a dir")
    r = train_process(data_dir, tmp_path / "file" / "run", *REF)
    assert r.returncode == 1 and "is a file, not a directory" in error_line(r)
    assert (tmp_path / "file").read_text() == "not a dir"


def test_read_only_out_dir_new_run_and_resume(data_dir, tmpfs):
    d = tmpfs("4m")
    run(data_dir, d / "run", *REF)
    before = {f: (d / "run" / f).read_bytes() for f in os.listdir(d / "run")}
    subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
    for out, flags in [(d / "new", []), (d / "run", ["--resume"])]:
        r = train_process(data_dir, out, *REF, *flags)
        assert r.returncode == 1 and "read-only" in error_line(r).lower(), r.stderr
    assert {f: (d / "run" / f).read_bytes() for f in os.listdir(d / "run")} == before

# -----------------------------------------------------------------------------
# the log: rewritten atomically at --resume, a torn last line tolerated


class Killed(Exception):
    pass


def test_kill_during_the_log_rewrite_keeps_the_old_log(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(data_dir, out, "--max_iters=12", "--warmup_iters=2", "--decay_iters=4", "--eval_interval=3",
        "--ckpt_interval=3", "--keep_ckpts=10")
    os.remove(out / "ckpt_0000012.pt")  # so --resume continues from step 9 and rewrites the log
    before = (out / "log.jsonl").read_bytes()
    real, calls = json.dumps, [0]

    def dying_dumps(obj, *a, **kw):
        calls[0] += 1
        if calls[0] > 5:  # the rewrite is half-way
            raise Killed()
        return real(obj, *a, **kw)

    monkeypatch.setattr(safeio.json, "dumps", dying_dumps)
    with pytest.raises(Killed):
        run(data_dir, out, *REF, "--resume")
    monkeypatch.setattr(safeio.json, "dumps", real)
    assert (out / "log.jsonl").read_bytes() == before and not list(out.glob("*.tmp"))
    run(data_dir, out, *REF, "--resume")
    assert log_steps(out) == list(range(12))


def test_sigkill_during_a_rewrite_leaves_the_old_or_the_new_file_whole(tmp_path):
    path = tmp_path / "log.jsonl"
    old = [{"step": i, "loss": 1.0} for i in range(1000)]
    safeio.rewrite_jsonl(str(path), old)
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import safeio; "
            f"safeio.rewrite_jsonl({str(path)!r}, [{{'step': i, 'loss': 2.0, 'pad': 'x' * 200}} for i in range(400000)])")
    for delay in (0.3, 0.6, 1.2):
        p = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(delay)
        p.kill()
        p.wait()
        entries, torn = safeio.read_jsonl(str(path))
        assert torn == 0 and entries and (entries == old or len(entries) == 400000)


def test_torn_last_line_does_not_stop_a_resume(data_dir, tmp_path):
    out = tmp_path / "out"
    run(data_dir, out, *REF)
    os.remove(out / "ckpt_0000012.pt")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 12, "val_lo')  # a crash mid-append
    run(data_dir, out, *REF, "--resume")
    assert log_steps(out) == list(range(12))

# -----------------------------------------------------------------------------
# divergence: no checkpoint of blown-up weights, and the one named resumes


def test_divergence_names_a_checkpoint_that_resumes(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run(data_dir, out, *REF, "--max_iters=40", "--ckpt_interval=6", "--eval_interval=0")  # a good run to step 40
    for s in (12, 18, 24, 30, 36, 40):
        os.remove(out / f"ckpt_{s:07d}.pt")
    # from step 6, a learning rate that blows the weights up (|w| ~ 1e8 within a few steps)
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, *REF, "--max_iters=40", "--ckpt_interval=2", "--eval_interval=0", "--lr=1000", "--resume")
    message = str(e.value.code)
    assert "diverged" in message and "stopped without saving" in message and "\n" not in message
    named = int(re.search(r"last good checkpoint is step (\d+)", message).group(1))
    for step, path in checkpoint.list_ckpts(str(out)):  # every checkpoint written is sane
        model = torch.load(path, map_location="cpu", weights_only=False)["model"]
        assert all(t.isfinite().all() and t.abs().max() < checkpoint.MAX_WEIGHT for t in model.values()), step
    # the named checkpoint resumes at a sane learning rate and learns
    res = run(data_dir, tmp_path / "again", *REF, "--max_iters=40", "--ckpt_interval=0", "--eval_interval=0",
              f"--resume={out / f'ckpt_{named:07d}.pt'}")
    assert res["val_loss"] < 3.5  # the bytes' ln 256 = 5.5 at the start


def test_diverged_refuses_exploded_and_nonfinite_state():
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_embd=64, n_head=2, mlp_hidden=160))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    assert checkpoint.diverged(model, opt, 3.0, 320) is None
    assert "loss" in checkpoint.diverged(model, opt, float("nan"), 320)
    assert "loss" in checkpoint.diverged(model, opt, 2 * 5.8, 320)  # above 2 ln 320 = 11.54
    next(iter(opt.state.values()))["exp_avg_sq"][0] = float("inf")
    assert "not finite" in checkpoint.diverged(model, opt, 3.0, 320)
    next(iter(opt.state.values()))["exp_avg_sq"][0] = 0.0
    with torch.no_grad():
        model.blocks[0].mlp.down.weight[0, 0] = 1e6
    assert "1e+06" in checkpoint.diverged(model, opt, 3.0, 320)

# -----------------------------------------------------------------------------
# a full disk during a save


def test_disk_full_during_a_save(data_dir, tmp_path, tmpfs):
    d = tmpfs("1200k")  # room for one checkpoint (~0.8 MB) and the log, not two
    r = train_process(data_dir, d / "run", *REF)
    line = error_line(r)
    assert r.returncode == 1 and "ckpt_0000006.pt" in line and "disk is full" in line and "MB needed" in line
    assert ckpt_steps(d / "run") == [3] and not list((d / "run").glob("*.tmp"))
    assert torch.load(d / "run" / "ckpt_0000003.pt", weights_only=False)["step"] == 3
    subprocess.run(["mount", "-o", "remount,size=20m", str(d)], check=True)  # space freed
    r = train_process(data_dir, d / "run", *REF, "--resume")
    assert r.returncode == 0, r.stderr
    run(data_dir, tmp_path / "ref", *REF)  # and it ends where an undisturbed run ends
    for a, b in zip(final_model(d / "run")[1].values(), final_model(tmp_path / "ref")[1].values()):
        assert torch.equal(a, b)


def test_file_size_limit_during_a_save(data_dir, tmp_path):
    """Without root: a write that fails part-way (EFBIG under ulimit -f) is handled like a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the log fits, a checkpoint does not

    r = subprocess.run(cmd(data_dir, tmp_path / "run", *REF), cwd=ROOT, capture_output=True, text=True,
                       env=env_1thread(), timeout=300, preexec_fn=limit)
    line = error_line(r)
    assert r.returncode == 1 and "ckpt_0000003.pt" in line and "file-size limit" in line
    assert not os.listdir(tmp_path / "run").count("ckpt_0000003.pt.tmp") and log_steps(tmp_path / "run")

# -----------------------------------------------------------------------------
# processes: a second run into a live out_dir, a crashed owner, Ctrl-C


@pytest.fixture(scope="module")
def long_ref(data_dir, tmp_path_factory):
    """The LONG run, undisturbed: (final step, final weights)."""
    out = tmp_path_factory.mktemp("long") / "ref"
    assert train_process(data_dir, out, *LONG).returncode == 0
    return final_model(out)


def test_second_run_is_refused_and_a_dead_owners_lock_does_not_block(data_dir, tmp_path):
    out, endless = tmp_path / "out", [*LONG, "--max_iters=100000"]
    first = subprocess.Popen(cmd(data_dir, out, *endless), cwd=ROOT, env=env_1thread(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ckpt_steps(out), first)
    second = train_process(data_dir, out, *endless, "--resume")
    assert second.returncode == 1 and "in use by another train.py run" in error_line(second)
    assert first.poll() is None  # the first run goes on, undisturbed
    first.kill()  # ... until it crashes (kill -9: no chance to clean up)
    first.communicate()
    last = ckpt_steps(out)[-1]  # the dead run's lock must not block a resume (to 20 steps past its last checkpoint)
    third = train_process(data_dir, out, *LONG, f"--max_iters={last + 20}", "--decay_iters=10", "--resume")
    assert third.returncode == 0, third.stderr
    assert log_steps(out) == list(range(last + 20)) and ckpt_steps(out)[-1] == last + 20


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_and_the_resume_is_exact(data_dir, tmp_path, long_ref, sig):
    out = tmp_path / "out"
    p = subprocess.Popen(cmd(data_dir, out, *LONG), cwd=ROOT, env=env_1thread(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(safeio.read_jsonl(os.path.join(out, "log.jsonl"))[0]) > 30, p)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + sig and "Traceback" not in stdout + stderr, stderr
    stopped = re.search(r"stopped by (SIG\w+); saved step (\d+): --resume continues from it", stdout)
    assert stopped and stopped.group(1) == signal.Signals(sig).name, stdout[-2000:]
    assert int(stopped.group(2)) in ckpt_steps(out) and int(stopped.group(2)) < 600
    r = train_process(data_dir, out, *LONG, "--resume")
    assert r.returncode == 0, r.stderr
    (sa, a), (sb, b) = final_model(out), long_ref
    assert sa == sb == 600 and all(torch.equal(a[k], b[k]) for k in a)
    assert log_steps(out) == list(range(600))


def test_a_second_ctrl_c_stops_at_once_and_loses_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(cmd(data_dir, out, *LONG), cwd=ROOT, env=env_1thread(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ckpt_steps(out), p)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode in (1, 130) and "Traceback" not in stdout + stderr, stderr
    assert re.search(r"interrupted; --resume continues from \S+ckpt_\d+\.pt|stopped by SIGINT", stdout + stderr)
    assert not list(out.glob("*.tmp"))
    for _, path in checkpoint.list_ckpts(str(out)):
        torch.load(path, map_location="cpu", weights_only=False)  # every checkpoint left is whole
    assert train_process(data_dir, out, *LONG, "--resume").returncode == 0

# -----------------------------------------------------------------------------
# say what changes at a resume


def test_resume_says_what_changed(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run(data_dir, out, *REF)
    os.remove(out / "ckpt_0000012.pt")
    capsys.readouterr()
    run(data_dir, out, *REF, "--resume", "--total_batch_size=512", "--batch_size=8", "--muon_lr=0.02")
    said = capsys.readouterr().out
    line = next(line for line in said.splitlines() if line.startswith("resumed from"))
    assert re.match(r"resumed from \S+ckpt_0000009.pt at step 9; changed since it was saved: ", line), line
    assert "total_batch_size 256 -> 512" in line and ", batch_size 4 -> 8" in line
    assert "muon_lr None -> 0.02" in line  # a flag given now that was unset then is a change too


def test_a_resume_trains_with_this_runs_optimizer_flags(data_dir, tmp_path):
    # the moments come from the checkpoint, the hyperparameters from the flags (an ablation arm changes them)
    out = tmp_path / "out"
    run(data_dir, out, *REF, "--stop_after=8")
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append({(g["weight_decay"], g["betas"]) for g in opt.param_groups}))
    try:
        run(data_dir, tmp_path / "arm", *REF, f"--resume={out / 'ckpt_0000008.pt'}", "--weight_decay=0.05",
            "--beta2=0.99")
    finally:
        handle.remove()
    assert len(seen) == 4 and all({b for _, b in s} == {(0.9, 0.99)} for s in seen), seen
    assert all({wd for wd, _ in s} == {0.0, 0.05} for s in seen), seen  # (norms and embeddings: no decay)


def test_a_branch_into_another_runs_dir_is_refused_and_overwrite_replaces_that_run(data_dir, tmp_path, capsys):
    other, base = tmp_path / "other", tmp_path / "base"
    run(data_dir, other, *REF, "--keep_ckpts=2")  # checkpoints 8 (decay start) and 12 (the end) kept
    run(data_dir, base, *REF, "--max_iters=24", "--decay_iters=8", "--seed=7")
    before = {p: open(p, "rb").read() for _, p in checkpoint.list_ckpts(str(other))}
    with pytest.raises(SystemExit, match=rf"{re.escape(str(other))} holds another run \(checkpoint at step 12\); "
                                         r"branch \S+ckpt_0000015.pt into a new --out_dir, or pass --overwrite"):
        run(data_dir, other, *REF, "--max_iters=24", "--decay_iters=8", f"--resume={base / 'ckpt_0000015.pt'}")
    assert {p: open(p, "rb").read() for _, p in checkpoint.list_ckpts(str(other))} == before
    run(data_dir, other, *REF, "--max_iters=24", "--decay_iters=8", f"--resume={base / 'ckpt_0000015.pt'}",
        "--overwrite")
    assert ckpt_steps(other) == [16, 18, 21, 24] and log_steps(other) == list(range(15, 24))  # none of the old


def damage(path, how):
    """Rewrite a checkpoint so that it reads but cannot be resumed."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if how == "no optimizer":  # a weights-only checkpoint, stripped for sharing
        del ckpt["optimizer"]
    elif how == "newer model.py":
        ckpt["model_config"]["qk_norm"] = True
    elif how == "nan weight":  # bit rot, or a run saved by a version without the divergence check
        ckpt["model"]["wte.weight"][0, 0] = float("nan")
    elif how == "renamed weight":
        ckpt["model"]["tok_emb.weight"] = ckpt["model"].pop("wte.weight")
    torch.save(ckpt, path)


@pytest.mark.parametrize("how, says", [
    ("no optimizer", r"lacks optimizer: it can be scored \(evaluate.py --ckpt\) but not resumed; resume from an "
                     r"older ckpt_\*.pt with --resume=PATH --overwrite"),
    ("newer model.py", r"comes from a newer model.py \(model fields qk_norm\); update nanoXmodel"),
    ("nan weight", r"holds weights that are not finite \(NaN or inf\): it cannot train further; resume from an older"),
    ("renamed weight", r"the checkpoint's weights do not fit this model \(Missing key\(s\) in state_dict: "
                       r"\"wte.weight\""),
    ("a directory", r"--resume=\S+ is a directory; give a checkpoint file, or --out_dir=\S+ --resume for its newest"),
])
def test_a_checkpoint_that_cannot_resume_is_one_line(data_dir, tmp_path, how, says):
    out = tmp_path / "out"
    run(data_dir, out, *REF)
    if how == "a directory":
        target = str(out)
    else:
        target = str(out / "ckpt_0000012.pt")
        damage(target, how)
    before = open(out / "ckpt_0000009.pt", "rb").read()
    line = error_line(train_process(data_dir, out, *REF, "--max_iters=15", f"--resume={target}"))
    assert re.match(r"train.py: error: ", line) and re.search(says, line), line
    assert open(out / "ckpt_0000009.pt", "rb").read() == before  # the older one, to resume from, untouched


def test_a_checkpoint_that_cannot_be_pruned_is_a_warning(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run(data_dir, out, *REF)
    os.remove(out / "ckpt_0000003.pt")
    os.mkdir(out / "ckpt_0000003.pt")  # os.remove fails on it, as on a file it may not delete
    res = run(data_dir, out, *REF, "--max_iters=15", "--resume", "--keep_ckpts=2")
    assert res["val_loss"] is not None and ckpt_steps(out)[-1] == 15  # the run went on to its end
    assert re.search(r"train.py: warning: cannot delete \S+ckpt_0000003.pt \(.+\); it stays", capsys.readouterr().err)


def test_a_killed_saves_temp_file_is_cleared_and_stray_log_lines_are_torn(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run(data_dir, out, *REF)
    (out / "ckpt_0000015.pt.tmp").write_bytes(b"\0" * 1000)  # what a SIGKILL mid-save leaves
    with open(out / "log.jsonl", "a") as f:
        f.write("7\n")  # JSON, but not an entry
    run(data_dir, out, *REF, "--max_iters=15", "--resume")
    assert not (out / "ckpt_0000015.pt.tmp").exists() and log_steps(out) == list(range(15))
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out


def test_a_log_that_is_a_directory_is_one_line_at_resume(data_dir, tmp_path):
    out = tmp_path / "out"
    run(data_dir, out, *REF)
    os.remove(out / "log.jsonl")
    os.mkdir(out / "log.jsonl")
    line = error_line(train_process(data_dir, out, *REF, "--max_iters=15", "--resume"))
    assert re.fullmatch(r"train.py: error: cannot read \S+log.jsonl \(Is a directory\): move it away to start a "
                        r"new log", line), line


@pytest.mark.parametrize("flags, says", [
    (["--ns_triton=1", "--optimizer=muon"], r"--ns_triton=1 needs a CUDA device \(or TRITON_INTERPRET=1"),
    (["--init_from={tmp}/nowhere"], r"\S+/nowhere is not a checkpoint directory, nor a hub id like org/name"),
    (["--init_from={tmp}/run"], r"\S+/run is a train.py run, not a Hugging Face checkpoint: continue it with "
                                r"train.py --resume"),
])
def test_setups_that_cannot_run_are_one_line_before_training(data_dir, tmp_path, flags, says):
    run(data_dir, tmp_path / "run", *REF)
    flags = [f.format(tmp=tmp_path) for f in flags]
    drop = ("--n_layer", "--n_embd", "--n_head", "--n_kv_head", "--mlp_hidden") if "--init_from" in flags[0] else ()
    argv = [a for a in cmd(data_dir, tmp_path / "new", *REF, *flags) if not a.startswith(drop)]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**env_1thread(), "HF_HUB_OFFLINE": "1"},
                       timeout=300)
    line = error_line(r)
    assert re.search(says, line), line
    assert not (tmp_path / "new").exists()


def test_a_tokenizer_that_cannot_load_drops_the_sample_at_the_start(data_dir, tmp_path, capsys, monkeypatch):
    def offline(name):  # as tiktoken's gpt2 without a network, or an hf: tokenizer file moved away
        raise train.prepare_data.DataError(f"could not load tokenizer {name!r}")
    monkeypatch.setattr(train.prepare_data, "get_tokenizer", offline)
    res = run(data_dir, tmp_path / "out", *REF, "--sample_len=20")
    said = capsys.readouterr().out
    assert said.index("train.py: warning: --sample_len=0, no sample at the end: could not load tokenizer") < \
        said.index("step 0")
    assert res["val_loss"] is not None and "sample:" not in said and ckpt_steps(tmp_path / "out")[-1] == 12

# =============================================================================
# round 2 (issue 19), safeio and cli: one temp file per write, outputs that never replace what a script did not
# make, finite flag values. (The scripts' own cases: test_evaluate, test_plot, test_hf, test_data, test_bench,
# test_ablation, test_mup_sweep.)


def test_two_writers_of_one_file_never_share_a_temp_file(tmp_path):
    path = str(tmp_path / "results.json")
    with safeio.atomic_write(path, "w") as first:
        first.write("first")
        with safeio.atomic_write(path, "w") as second:  # a second process writing the same file meanwhile
            second.write("second")
        assert open(path).read() == "second"
    assert open(path).read() == "first" and os.listdir(tmp_path) == ["results.json"]  # the last rename wins, whole


def test_two_processes_writing_one_file_both_succeed(tmp_path):
    path = str(tmp_path / "results.json")
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import safeio\n"
            f"for i in range(300): safeio.write_json({path!r}, {{'writer': sys.argv[1], 'i': i, 'pad': 'x' * 5000}})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert json.load(open(path))["i"] == 299 and os.listdir(tmp_path) == ["results.json"]


def test_a_killed_writers_temp_files_are_known_and_cleared(tmp_path):
    for name in ("ckpt_0000015.pt", "log.jsonl", "model.safetensors", "README"):
        temp = os.path.basename(safeio.temp_path(str(tmp_path / name)))
        assert temp != safeio.temp_path(str(tmp_path / name)) and safeio.temp_target(temp) == name
    assert safeio.temp_path("out/ckpt_0000015.pt").endswith(".pt.tmp")  # .gitignore's *.pt.tmp
    assert safeio.temp_target("meta.json.tmp") == "meta.json" and safeio.temp_target("meta.json") is None
    (tmp_path / "ckpt_0000014.pt").write_bytes(b"kept")
    (tmp_path / "ckpt_0000015.pt.tmp").write_bytes(b"an older PATH.tmp")
    open(safeio.temp_path(str(tmp_path / "ckpt_0000016.pt")), "wb").write(b"what a SIGKILL mid-save leaves")
    safeio.remove_temp_files(str(tmp_path))
    assert os.listdir(tmp_path) == ["ckpt_0000014.pt"]


def test_an_output_never_replaces_what_the_script_did_not_make(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt_0000012.pt").write_bytes(b"PK\x03\x04 a checkpoint")
    (run / "log.jsonl").write_text('{"step": 0, "loss": 5.0}\n')
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    (tmp_path / "old.json").write_text('{"model": "m", "results": {}}')
    ours = safeio.json_with("model", "results")
    before = {p: p.read_bytes() for p in [*run.iterdir(), tmp_path / "notes.json"]}
    for out, says in [(run / "ckpt_0000012.pt", "is a file of the train.py run in"),
                      (run / "log.jsonl", "is a file of the train.py run in"),
                      (run / "config.json", "is a file of the train.py run in"),
                      (tmp_path / "notes.json", "is not a results file; it is not replaced"),
                      (tmp_path, "is a directory; name the results file, e.g. --out="),
                      (f"{tmp_path}/new/", "names a directory; name the results file, e.g. --out=")]:
        with pytest.raises(safeio.WriteError, match=re.escape(f"--out={out} {says}")):
            safeio.check_output(str(out), "--out", "results", ours, "results.json")
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "new").exists()
    for out in (tmp_path / "old.json", tmp_path / "new" / "r.json", run / "r.json"):  # its own, or a new name
        assert safeio.check_output(str(out), "--out", "results", ours, "results.json") == str(out)
    assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_non_finite_flag_value_is_said_to_be_one(capsys, value):
    with pytest.raises(SystemExit) as e:
        config.get_parser().parse_args([f"--lr={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--lr={value} is out of range: allowed >= 0, and the value must be finite" in err

# -----------------------------------------------------------------------------
# signals cover the whole run: the final evaluation and the sample; a missing final evaluation comes on --resume


def val_entries(out_dir):
    entries, _ = safeio.read_jsonl(os.path.join(out_dir, "log.jsonl"))
    return [e for e in entries if "val_loss" in e]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_the_final_evaluation_lets_it_finish(data_dir, tmp_path, monkeypatch, capsys, sig):
    out, real = tmp_path / "out", train.validate

    def signalled(run, log, model, loader, step, *a, final=False, **k):
        if final:  # the signal arrives while the final evaluation runs
            os.kill(os.getpid(), sig)
        return real(run, log, model, loader, step, *a, final=final, **k)
    monkeypatch.setattr(train, "validate", signalled)
    with pytest.raises(SystemExit) as e:
        run(data_dir, out, *REF, "--sample_len=20")
    assert e.value.code == 128 + sig
    said = capsys.readouterr().out
    assert "the run is complete, nothing to resume" in said and "sample:" not in said
    assert [v["step"] for v in val_entries(out)][-1] == 12  # the final evaluation, logged
    monkeypatch.setattr(train, "validate", real)
    before = open(out / "log.jsonl").read()
    run(data_dir, out, *REF, "--resume")  # nothing to do, and it says so
    assert "evaluated, and this command ends at 12: nothing to do" in capsys.readouterr().out
    assert open(out / "log.jsonl").read() == before
    run(data_dir, out, *REF, "--resume", "--stop_after=6")  # ends before the checkpoint: nothing evaluated, no entry
    assert "reached step 12, evaluated, and this command ends at 6" in capsys.readouterr().out
    assert open(out / "log.jsonl").read() == before


def test_a_finished_run_without_its_final_evaluation_gets_it_on_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first = run(data_dir, out, *REF)
    lines = open(out / "log.jsonl").read().splitlines()
    assert '"val_loss"' in lines[-1] and '"step": 12' in lines[-1]
    open(out / "log.jsonl", "w").write("\n".join(lines[:-1]) + "\n")  # killed (SIGKILL) during it
    again = run(data_dir, out, *REF, "--resume")
    assert "its final evaluation is missing: evaluating it now" in capsys.readouterr().out
    assert again["val_loss"] == first["val_loss"] and open(out / "log.jsonl").read().splitlines()[:-1] == lines[:-1]
    assert [v["step"] for v in val_entries(out)][-1] == 12


def test_resuming_an_init_from_run_does_not_need_the_release_again(data_dir, tmp_path):
    pytest.importorskip("safetensors")  # (hf.py's Hugging Face checkpoints: optional)
    import hf
    base = tmp_path / "base"
    run(data_dir, base, "--max_iters=2", "--warmup_iters=0", "--decay_iters=1", "--eval_interval=0")
    model, _, _ = hf.load_checkpoint(str(base))
    release = hf.save_pretrained(model, str(tmp_path / "release"))
    common = ["--max_iters=4", "--warmup_iters=0", "--decay_iters=1", "--eval_interval=0", "--block_size=32",
              "--batch_size=4", "--total_batch_size=256", "--eval_iters=2", "--sample_len=0", f"--data_dir={data_dir}",
              f"--out_dir={tmp_path / 'out'}", f"--init_from={release}"]  # (no model flags: the release's)
    train.main([*common, "--stop_after=2"])
    os.rename(release, tmp_path / "moved")  # the release is gone (or the hub unreachable): the run holds it all
    res = train.main([*common, "--resume"])
    assert res["config"].n_embd == model.config.n_embd and checkpoint.list_ckpts(str(tmp_path / "out"))[-1][0] == 4
