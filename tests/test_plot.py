"""Tests for plot.py: reading a run (train and val series, a torn last line, an older log without token counts),
the phase bands and the optimizer switch it draws, from one run or a base run and arms resumed at its decay,
the PNG, and the CLI's one-line errors. Synthetic logs, CPU, a few seconds."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plot  # noqa: E402

# the synthetic run, as train.py --max_iters=12 --warmup_iters=2 --decay_iters=4 --eval_interval=4 writes it:
# warmup 0-1, stable 2-7, decay 8-11 (AdamW -> Muon at 8); 256 tokens per step of 32-token sequences
ARGS = dict(max_iters=12, warmup_iters=2, decay_iters=4, muon_at_decay=True, optimizer="adamw")
PHASE = ["warmup"] * 2 + ["stable"] * 6 + ["decay"] * 4


def loss(s):
    return 5.0 - 0.25 * s  # exact in binary, so the series compare with ==


def val_loss(s):
    return 5.125 - 0.25 * s


def log_entries(start=0, muon_at_decay=True, tokens=True, stop=12):
    out = []
    for s in range(start, stop + 1):
        if s % 4 == 0:
            out.append(dict(step=s, val_loss=val_loss(s), **({"tokens": 256 * s} if tokens else {})))
        if s == stop:
            break
        e = dict(step=s, loss=loss(s), lr=0.01 * min(1, (s + 1) / 2) * (0.5 if s >= 8 else 1), grad_norm=1.0 + s,
                 tokens_per_sec=1000.0, mfu=None, phase=PHASE[s], optimizer="muon" if muon_at_decay and s >= 8
                 else "adamw")
        out.append(dict(e, tokens=256 * (s + 1), seq_len=32) if tokens else e)
    return out


def write_run(path, entries, args=ARGS, tail=""):
    os.makedirs(path)
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
        f.write(tail)
    if args is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"args": args, "model": {"n_layer": 1}}, f)
    return str(path)


@pytest.fixture
def runs(tmp_path):
    """a base run through warmup/stable/decay with the switch, and two arms resumed from its decay start"""
    return dict(base=write_run(tmp_path / "base", log_entries()),
                adamw=write_run(tmp_path / "adamw", log_entries(8, muon_at_decay=False),
                                dict(ARGS, muon_at_decay=False)),
                muon=write_run(tmp_path / "muon", log_entries(8)))


def test_read_run_series(runs):
    r = plot.read_run(runs["base"])
    assert r.name == "base" and r.torn == 0 and r.config["args"] == ARGS
    assert r.train["step"] == list(range(12)) and r.train["loss"] == [loss(s) for s in range(12)]
    assert r.train["phase"] == PHASE and r.train["optimizer"] == ["adamw"] * 8 + ["muon"] * 4
    assert r.train["tokens"] == [256 * (s + 1) for s in range(12)] and r.train["seq_len"] == [32] * 12
    assert r.train["lr"][:3] == [0.005, 0.01, 0.01] and r.train["grad_norm"] == [1.0 + s for s in range(12)]
    assert r.val == {"step": [0, 4, 8, 12], "val_loss": [5.125, 4.125, 3.125, 2.125], "tokens": [0, 1024, 2048, 3072]}
    arm = plot.read_run(runs["muon"])
    assert arm.train["step"] == list(range(8, 12)) and arm.val["step"] == [8, 12]


def test_torn_last_line_and_old_format(tmp_path):
    torn = plot.read_run(write_run(tmp_path / "torn", log_entries(), tail='{"step": 12, "loss": 1.'))
    whole = plot.read_run(write_run(tmp_path / "whole", log_entries()))
    assert torn.torn == 1 and torn.train == whole.train and torn.val == whole.val
    old = plot.read_run(write_run(tmp_path / "old", log_entries(tokens=False), args=None))
    assert old.train["tokens"] is None and old.train["seq_len"] is None and old.val["tokens"] is None
    assert old.train["loss"] == whole.train["loss"] and old.val["val_loss"] == whole.val["val_loss"]
    assert old.config == {}


def test_phase_spans_and_switch(runs, tmp_path):
    base, adamw, muon = (plot.read_run(runs[k]) for k in ("base", "adamw", "muon"))
    assert plot.phase_spans(base) == [("warmup", 0, 2), ("stable", 2, 8), ("decay", 8, 12)]
    assert plot.phase_spans(muon) == plot.phase_spans(adamw) == [("decay", 8, 12)]
    assert plot.switch_steps(base) == [(8, "adamw", "muon")]
    # the Muon arm's log begins with Muon: its config says the switch came at its first step, the decay start
    assert plot.switch_steps(muon) == [(8, "adamw", "muon")] and plot.switch_steps(adamw) == []
    # resumed after the switch: it happened before this log, so it is not drawn
    late = plot.read_run(write_run(tmp_path / "late", log_entries(9)))
    assert plot.switch_steps(late) == []
    # batch doubling: stable 2 after stable, a phase change the spans must split on
    two = [dict(e, phase="stable2") if e.get("phase") == "stable" and e["step"] >= 5 else e for e in log_entries()]
    assert plot.phase_spans(plot.read_run(write_run(tmp_path / "two", two))) == \
        [("warmup", 0, 2), ("stable", 2, 5), ("stable2", 5, 8), ("decay", 8, 12)]
    assert plot.ema([1.0, 2.0, 3.0], 0.5) == [1.0, 1.5, 2.25] and plot.ema([1.0, 2.0], 0) == [1.0, 2.0]


def drawn(fig):
    """(bands, switches) of a figure: [(phase, x0, x1)] from their colours, [(x, text)]"""
    from matplotlib.colors import to_rgb
    ax, ax_lr = fig.axes
    colour = {tuple(round(c, 3) for c in to_rgb(v[1])): k for k, v in plot.PHASES.items()}
    bands = [(colour[tuple(round(c, 3) for c in p.get_facecolor()[:3])], p.get_bbox().x0, p.get_bbox().x1)
             for p in ax_lr.patches]
    return sorted(bands, key=lambda b: b[1]), [(t.xy[0], t.get_text().strip()) for t in ax.texts]


def test_figure_phases_and_switch(runs, tmp_path):
    pytest.importorskip("matplotlib")
    read = {k: plot.read_run(v) for k, v in runs.items()}
    fig = plot.figure([read["base"]])
    assert drawn(fig) == ([("warmup", 0, 2), ("stable", 2, 8), ("decay", 8, 12)], [(8, "adamw \u2192 muon")])
    # the ablation: bands from the first run that covers each step, a switch line for each run that switches
    fig = plot.figure([read["base"], read["adamw"], read["muon"]])
    assert drawn(fig) == ([("warmup", 0, 2), ("stable", 2, 8), ("decay", 8, 12)],
                          [(8, "adamw \u2192 muon"), (8, "adamw \u2192 muon")])
    assert [t.get_color() for t in fig.axes[0].texts] == ["C0", "C2"]  # the base and the muon arm
    # a base stopped at the decay start: the decay band comes from the arm
    stopped = plot.read_run(write_run(tmp_path / "stopped", log_entries(stop=8)))
    assert drawn(plot.figure([stopped, read["muon"]]))[0] == [("warmup", 0, 2), ("stable", 2, 8), ("decay", 8, 12)]
    # tokens: a phase begins where the tokens seen before its first step end
    fig = plot.figure([read["base"]], x="tokens")
    assert drawn(fig) == ([("warmup", 0, 512), ("stable", 512, 2048), ("decay", 2048, 3072)],
                          [(2048, "adamw \u2192 muon")])
    # a zoom on the decay: its band and the switch only, the loss axis fitted to the decay's losses
    fig = plot.figure([read["base"]], from_step=8)
    assert drawn(fig) == ([("decay", 8, 12)], [(8, "adamw \u2192 muon")])
    assert fig.axes[0].get_ylim()[1] < 4
    with pytest.raises(plot.PlotError, match="--x=step"):
        plot.figure([plot.read_run(write_run(tmp_path / "old", log_entries(tokens=False)))], x="tokens")
    with pytest.raises(plot.PlotError, match="nothing to draw in steps 20 to the end"):
        plot.figure([read["base"]], from_step=20)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_plot_runs_png(runs, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    assert plot.plot_runs([runs["base"]]) == os.path.join(runs["base"], "loss.png")
    assert is_png(os.path.join(runs["base"], "loss.png"))
    monkeypatch.chdir(tmp_path)
    assert plot.plot_runs(list(runs.values())) == "loss.png" and is_png(tmp_path / "loss.png")
    out = plot.plot_runs([runs["adamw"], plot.read_run(runs["muon"])], str(tmp_path / "new" / "decay.png"),
                         labels=["a", "m"], x="tokens", ylim=(2, 4), title="decay", smooth=0, val_only=True)
    assert is_png(out)
    with pytest.raises(plot.PlotError, match="1 labels for 2 runs"):
        plot.plot_runs([runs["adamw"], runs["muon"]], labels=["a"])


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli(runs, tmp_path):
    pytest.importorskip("matplotlib")
    r = cli(*runs.values(), f"--out={tmp_path}/ablation.png", "--labels=base,adamw,muon", "--from_step=4")
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {tmp_path}/ablation.png", r.stderr
    assert is_png(tmp_path / "ablation.png")


@pytest.mark.parametrize("case, error", [
    ("missing", "no such run directory"), ("nolog", "has no log.jsonl"), ("empty", "has no entries yet"),
    ("unwritable", "is a file, not a directory"), ("tokens", "has no token counts"),
])
def test_cli_errors(tmp_path, case, error):
    run = str(tmp_path / "run")
    flags = []
    if case == "nolog":
        os.makedirs(run)
    elif case == "empty":
        write_run(run, [])
    elif case in ("unwritable", "tokens"):
        write_run(run, log_entries(tokens=case != "tokens"))
        flags = [f"--out={run}/log.jsonl/loss.png"] if case == "unwritable" else ["--x=tokens"]
    r = cli(run, *flags)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("plot.py: error: ") and error in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_without_matplotlib(runs):
    # reading needs no matplotlib; drawing says what to install, in one line
    code = ("import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, {root!r}); import plot; "
            "assert plot.read_run({run!r}).train['step'][0] == 0; sys.argv = ['plot.py', {run!r}]; plot.main()")
    r = subprocess.run([sys.executable, "-c", code.format(root=ROOT, run=runs["base"])], capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr == "plot.py: error: plotting needs matplotlib: pip install matplotlib\n"


def test_odd_logs_draw_or_say_why(tmp_path):
    pytest.importorskip("matplotlib")
    good = log_entries()
    odd = [*good, dict(step=12, loss=float("inf"), lr=0.001), dict(step="13", loss=2.0), dict(step=14, loss=None),
           dict(step=15, loss="abc")]
    run = plot.read_run(write_run(tmp_path / "odd", odd))
    assert run.torn == 4 and run.train["step"] == list(range(12))  # the odd entries skipped, and counted
    plot.figure([run])
    no_lr = plot.read_run(write_run(tmp_path / "no_lr", [{k: v for k, v in e.items() if k != "lr"} for e in good]))
    assert no_lr.train["lr"] is None and plot.figure([no_lr])  # drawn without its learning-rate line
    val_only = plot.read_run(write_run(tmp_path / "val_only", [e for e in good if "val_loss" in e][:1]))
    with pytest.raises(plot.PlotError, match=r"has no token counts \(no training step logged yet.*; use --x=step"):
        plot.figure([val_only], x="tokens")


def test_out_replaces_a_picture_never_a_runs_files_and_names_a_file(tmp_path):
    """Round 2 (issue 19): --out=RUN/log.jsonl once turned the log into a PNG, --out=dir/ said 'Not a directory'."""
    run = write_run(str(tmp_path / "run"), log_entries())
    (tmp_path / "run" / "ckpt_0000012.pt").write_bytes(b"PK\x03\x04 a checkpoint")
    (tmp_path / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in [*(tmp_path / "run").iterdir(), tmp_path / "notes.txt"]}
    for out, says in [(f"{run}/log.jsonl", f"is a file of the train.py run in {run}; choose another --out"),
                      (f"{run}/ckpt_0000012.pt", f"is a file of the train.py run in {run}; choose another --out"),
                      (f"{run}/config.json", f"is a file of the train.py run in {run}; choose another --out"),
                      (f"{tmp_path}/notes.txt", "is not a PNG file; it is not replaced: choose another --out, "
                                                "or move it away"),
                      (f"{tmp_path}/pics/", f"names a directory; name the PNG file, e.g. "
                                            f"--out={tmp_path}/pics/loss.png"),
                      (run, f"is a directory; name the PNG file, e.g. --out={run}/loss.png")]:
        r = cli(run, f"--out={out}")
        assert r.returncode == 1 and r.stderr == f"plot.py: error: --out={out} {says}\n", r.stderr
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "pics").exists()
