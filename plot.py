"""
plot.py: pictures of training runs. Train and validation loss against steps or tokens, the learning rate on a
second axis, the WSD phases (RECIPE.md section 3) as background bands and the AdamW -> Muon switch (section 4)
as a vertical line, for one run or several overlaid. Reads what train.py writes: out_dir/log.jsonl (and
out_dir/config.json for the switch of a run resumed at the decay start).

    python plot.py out                                   # out/loss.png
    python plot.py out-base out-adamw out-muon --out=decay.png --from_step=500000   # the ablation's two decays
    python plot.py out --x=tokens --smooth=0 --ylim=2,4 --title="cpu preset"
    python plot.py out-a out-b --labels=adamw,muon --val_only

From another script (matplotlib is needed only to draw):

    import plot
    run = plot.read_run("out")             # run.train["loss"], run.val["val_loss"], plot.phase_spans(run), ...
    plot.plot_runs(["out-adamw", "out-muon"], "decay.png", labels=["adamw", "muon"], from_step=500000)
"""

import argparse
import json
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from cli import Parser, Range, UserError, flag, run_main
from safeio import atomic_write, check_output, is_png, read_jsonl

TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "seq_len", "phase", "optimizer")
VAL_KEYS = ("step", "val_loss", "tokens")
PHASES = {"warmup": ("warmup", "#fbe3bf"), "stable": ("stable", "#dcefd5"), "stable2": ("stable 2", "#cfe3f6"),
          "decay": ("decay", "#f7d0d0"), "long_context": ("long context", "#e4d8f2")}


def _phase(p):
    return PHASES.get(p, (str(p), "#e6e6e6"))  # (label, colour); an unknown phase is grey


class PlotError(UserError):
    """A run that cannot be read or drawn; the message is one line for the user."""


@dataclass
class Run:
    name: str
    path: str
    train: dict  # key -> list over training steps; None where some entry lacks the key (an older log)
    val: dict
    config: dict = field(default_factory=dict)
    torn: int = 0  # lines of log.jsonl skipped: torn by a crash mid-append, or not an entry it can draw


def _series(entries, keys):
    return {k: [e[k] for e in entries] if all(k in e for e in entries) else None for k in keys}


def _usable(e):
    """A log entry that can be drawn: an integer step, finite numbers where it has them (a NaN loss before a
    divergence stop, a hand-edited line, are skipped and counted)."""
    return isinstance(e.get("step"), int) and all(
        isinstance(e[k], (int, float)) and math.isfinite(e[k]) for k in ("loss", "val_loss", "lr", "tokens") if k in e)


def read_run(path, name=None):
    """A run directory's log.jsonl split into training and validation series, plus its config.json."""
    log = os.path.join(path, "log.jsonl")
    if not os.path.isdir(path):
        raise PlotError(f"{path}: no such run directory")
    if not os.path.exists(log):
        raise PlotError(f"{path} has no log.jsonl (is it a train.py --out_dir?)")
    entries, torn = read_jsonl(log)
    usable = [e for e in entries if _usable(e)]
    entries, torn = usable, torn + len(entries) - len(usable)
    if not entries:
        raise PlotError(f"{log} has no entries yet")
    config = {}
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        pass  # only the switch of a resumed arm needs it
    return Run(name or os.path.basename(os.path.abspath(path)), path,
               _series([e for e in entries if "loss" in e], TRAIN_KEYS),
               _series([e for e in entries if "val_loss" in e], VAL_KEYS), config, torn)


def phase_spans(run):
    """[(phase, first_step, end_step)]: the log's runs of one phase, end exclusive."""
    steps, phases, spans = run.train["step"], run.train["phase"] or [], []
    for s, p in zip(steps, phases):
        if spans and spans[-1][0] == p and spans[-1][2] == s:
            spans[-1][2] = s + 1
        else:
            spans.append([p, s, s + 1])
    return [tuple(s) for s in spans]


def switch_steps(run):
    """[(step, old, new)]: where the optimizer changes within the log. An arm resumed from the decay-start
    checkpoint with --muon_at_decay switches on its first step, which its config.json tells."""
    steps, opts = run.train["step"], run.train["optimizer"] or []
    out = [(s, a, b) for s, a, b in zip(steps[1:], opts, opts[1:]) if a != b]
    args = run.config.get("args", {})
    if opts and opts[0] == "muon" and args.get("muon_at_decay") and args.get("optimizer") == "adamw" \
            and steps[0] == args.get("max_iters", 0) - args.get("decay_iters", 0):
        out.insert(0, (steps[0], "adamw", "muon"))
    return out


def ema(values, beta):
    out, m = [], values[0] if values else 0.0
    for v in values:
        m = beta * m + (1 - beta) * v
        out.append(m)
    return out


def _uncovered(lo, hi, covered):
    # the parts of [lo, hi] that no earlier run's bands cover
    pieces = [(lo, hi)] if hi > lo else []
    for a, b in covered:
        pieces = [q for p0, p1 in pieces for q in ((p0, min(p1, a)), (max(p0, b), p1)) if q[1] > q[0]]
    return pieces


def _tokens_before(run):
    # training tokens seen before a step: each train entry holds the count after its step, and the first
    # step's batch is taken to be the second's
    s, t = run.train["step"], run.train["tokens"]
    first = t[0] - (t[1] - t[0] if len(t) > 1 else t[0])
    return lambda step: float(np.interp(step - 1, [s[0] - 1] + s, [first] + t))


def figure(runs, x="step", from_step=None, to_step=None, ylim=None, title=None, smooth=0.9, val_only=False):
    """The matplotlib Figure for these Runs (see plot_runs)."""
    if x == "tokens":
        for r in runs:
            if not r.train["step"] or r.train["tokens"] is None or (r.val["step"] and r.val["tokens"] is None):
                raise PlotError(f"{r.path}/log.jsonl has no token counts (no training step logged yet, or "
                                f"written by an older train.py); use --x=step")
    try:  # a bare Figure draws with Agg: no display, no pyplot state, nothing to close
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    lo, hi = -np.inf if from_step is None else from_step, np.inf if to_step is None else to_step
    fig = Figure(figsize=(10, 5.5), dpi=120)
    ax = fig.subplots()
    ax_lr = ax.twinx()
    covered, seen, curves = [], {}, []  # curves: (xs, ys) of the smoothed train and the val losses
    for i, r in enumerate(runs):
        color, t, v = f"C{i}", r.train, r.val
        to_x = _tokens_before(r) if x == "tokens" else float  # where a step begins on the x axis
        for p, s0, s1 in phase_spans(r):
            for a, b in _uncovered(to_x(max(s0, lo)), to_x(min(s1, hi + 1)), covered):
                ax_lr.axvspan(a, b, color=_phase(p)[1], alpha=0.8, lw=0, zorder=0)
                covered.append((a, b))
                seen[p] = True
        for s, a, b in switch_steps(r):
            if lo <= s <= hi:
                ax.axvline(to_x(s), color=color, lw=1.2, ls=":", zorder=3)
                ax.annotate(f"{a} \u2192 {b}", (to_x(s), 1), xycoords=("data", "axes fraction"), xytext=(2, -4),
                            textcoords="offset points", ha="left", va="top", rotation=90, fontsize=8, color=color)
        keep = [j for j, s in enumerate(t["step"]) if lo <= s <= hi]
        if keep:
            xs = [(t["tokens"] if x == "tokens" else t["step"])[j] for j in keep]
            loss = [t["loss"][j] for j in keep]
            if not val_only:
                ax.plot(xs, loss, color=color, lw=0.7, alpha=0.25 if smooth else 1, zorder=2,
                        label=None if smooth else f"{r.name} train")
                curves.append((xs, ema(loss, smooth)))
                if smooth:
                    ax.plot(*curves[-1], color=color, lw=1.6, zorder=2, label=f"{r.name} train (EMA)")
            if t["lr"] is not None:  # (every entry has one; a foreign log may not)
                ax_lr.plot(xs, [t["lr"][j] for j in keep], color=color, lw=0.9, ls="--", alpha=0.8, zorder=1)
        keep = [j for j, s in enumerate(v["step"]) if lo <= s <= hi]
        if keep:
            xs = [(v["tokens"] if x == "tokens" else v["step"])[j] for j in keep]
            curves.append((xs, [v["val_loss"][j] for j in keep]))
            ax.plot(*curves[-1], color=color, marker="o", ms=4, lw=1.2, mec="white", mew=0.6, zorder=4,
                    label=f"{r.name} val")
    if not curves:
        where = "" if from_step is None and to_step is None else \
            f" in steps {from_step or 0} to {'the end' if to_step is None else to_step}"
        raise PlotError(f"nothing to draw{where}" + (" (--val_only: the runs have no val_loss)" if val_only else ""))
    ends = [x for xs, _ in curves for x in (min(xs), max(xs))] + [x for band in covered for x in band]
    x0, x1 = min(ends), max(ends)
    if x1 > x0:
        ax.set_xlim(x0, x1)
    if ylim is None:
        # fit the smoothed and val curves after the first tenth of the x range: the initial loss would squash
        # the rest (the raw loss's noise may leave the plot)
        late = [y for xs, ys in curves for xx, y in zip(xs, ys) if xx >= x0 + 0.1 * (x1 - x0)]
        pad = 0.08 * (max(late) - min(late)) or 0.5
        ylim = (min(late) - pad, max(late) + pad)
    ax.set_ylim(*ylim)
    si = FuncFormatter(lambda v, _: next((f"{v / d:g}{u}" for d, u in ((1e12, "T"), (1e9, "B"), (1e6, "M"),
                                                                        (1e3, "k")) if abs(v) >= d), f"{v:g}"))
    ax.xaxis.set_major_formatter(si)
    ax.set_xlabel("training tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss")
    ax_lr.set_ylabel("learning rate (dashed)")
    ax_lr.set_ylim(0, 1.15 * ax_lr.get_ylim()[1])  # headroom over the peak for the switch label
    ax.set_zorder(ax_lr.get_zorder() + 1)  # loss curves above the lr lines, bands below both
    ax.patch.set_visible(False)
    ax.grid(alpha=0.3, zorder=1)
    # both legends sit above the plot, where they cannot hide a curve: phases on the left, runs on the right
    n = len(ax.get_legend_handles_labels()[0])
    runs_legend = ax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncol=n if n <= 3 else min(-(-n // 2), 4),
                            fontsize=8, frameon=False, borderaxespad=0.2)  # several runs: a column each
    if seen:
        ax.add_artist(runs_legend)  # a second ax.legend() would replace it
        ax.legend(handles=[Patch(color=_phase(p)[1], alpha=0.8, label=_phase(p)[0]) for p in seen], loc="lower left",
                  bbox_to_anchor=(0, 1), ncol=len(seen), fontsize=8, frameon=False, handlelength=1.2,
                  borderaxespad=0.2)
    if title or len(runs) == 1:
        fig.suptitle(title or runs[0].name)
    fig.tight_layout()
    return fig


def plot_runs(runs, out=None, labels=None, x="step", from_step=None, to_step=None, ylim=None, title=None,
              smooth=0.9, val_only=False):
    """Draw runs (run directories or Runs from read_run) overlaid into the PNG out (default: <run>/loss.png
    for one, ./loss.png for several) and return its path. labels name the runs (default: the directories')."""
    if labels is not None and len(labels) != len(runs):
        raise PlotError(f"{len(labels)} labels for {len(runs)} runs")
    runs = [r if isinstance(r, Run) else read_run(r) for r in runs]
    runs = [replace(r, name=n) for r, n in zip(runs, labels)] if labels else runs
    out = out or (os.path.join(runs[0].path, "loss.png") if len(runs) == 1 else "loss.png")
    check_output(out, "--out", "PNG", is_png, "loss.png")  # before drawing; it replaces a picture, nothing else
    fig = figure(runs, x, from_step, to_step, ylim, title, smooth, val_only)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png")
    return out


def _limits(s):
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"expected lo,hi with lo < hi, e.g. 2,4; got {s!r}")
    return lo, hi


def main(argv=None):
    p = Parser(prog="plot.py", description="Plot train.py runs: loss, learning rate, phases, optimizer switch.")
    p.add_argument("runs", nargs="+", help="run directories (train.py --out_dir), drawn in this order")
    flag(p, "out", help="PNG to write (default: RUN/loss.png for one run, ./loss.png for several)")
    flag(p, "labels", help="comma-separated legend names, one per run (default: the directories' names)")
    flag(p, "x", default="step", choices=["step", "tokens"], help="the x axis")
    flag(p, "from_step", type=int, range=Range(0), help="first step to show")
    flag(p, "to_step", type=int, range=Range(0), help="last step to show")
    flag(p, "ylim", type=_limits, help="loss axis limits lo,hi (default: fitted to all but the first tenth)")
    flag(p, "title", help="figure title (default: the run's name for one run)")
    flag(p, "smooth", type=float, default=0.9, range=Range(0, 1, hi_open=True),
         help="EMA coefficient for the train loss; 0 draws the raw loss only")
    flag(p, "val_only", action="store_true", help="validation loss only (and the learning rate)")
    a = p.parse_args(argv)
    labels = a.labels.split(",") if a.labels else None
    if labels and len(labels) != len(a.runs):
        p.error(f"--labels has {len(labels)} names for {len(a.runs)} runs")
    if a.from_step is not None and a.to_step is not None and a.from_step > a.to_step:
        p.error(f"--from_step={a.from_step} is after --to_step={a.to_step}")
    run_main("plot.py", draw, a, labels)


def draw(a, labels):
    runs = [read_run(d) for d in a.runs]
    for r in runs:
        if r.torn:
            print(f"plot.py: note: {r.path}/log.jsonl: skipped {r.torn} line(s) that are not entries it can draw")
    out = plot_runs(runs, a.out, labels, a.x, a.from_step, a.to_step, a.ylim, a.title, a.smooth, a.val_only)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
