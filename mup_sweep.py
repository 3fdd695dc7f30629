"""
mup_sweep.py: does the learning rate transfer across width? The evidence for muP, as two pictures.

1. The sweep (the figure of microsoft/mup's README). Proxies of several widths train over a grid of learning
   rates, once with muP and once with the standard parameterization (train.py --mup=0), for one or more seeds.
   The figure plots the final validation loss against log2 of the learning rate, one curve per width, muP
   and SP side by side, with a star at each width's best LR. Under muP the best LR should stay put as the
   model widens; under SP it should move (down).
2. The coordinate check (--coord). Models of several widths take a few AdamW steps at a high LR; the figure
   plots the mean |activation| at four places in the network against width, one line per step. Under muP
   the lines are flat; under SP they climb. tests/test_model.py::test_coordinate_check asserts the slopes of
   the same measurement (coordinate_sizes below).

    python mup_sweep.py --threads=1 --overwrite      # CPU: widths 64-512, 6 LRs, seed 1: ~1 h on 2 shared cores
                                                     # (--overwrite: the committed figures/mup_sweep.json is redone)
    python mup_sweep.py --threads=1 --seeds=2 --resume    # + a second seed for error bars: ~1 h more
    python mup_sweep.py --coord --overwrite          # the coordinate check, a few minutes on a CPU
    python mup_sweep.py --plot_only=figures/mup_sweep.json      # redraw a figure from its JSON
    python mup_sweep.py --quick                      # a tiny sweep for a test, well under a minute
    python mup_sweep.py --widths=256,512,1024,1536 --out=runs/mup_gpu.json \
        --train_args="--preset=nano --data_dir=data/X --max_iters=2000"

Any train.py flag can go through --train_args; the width flags (n_embd, n_head, n_kv_head, mlp_hidden), --lr,
--mup and --seed are set per run. The JSON keeps every run (its final val loss, NaN where the loss went
non-finite and train.py stopped); the printed table and the figure show the mean over seeds and its spread.
The figure needs matplotlib (imported only to draw); without it the numbers still come.
"""

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from cli import ErrorExit, Parser, Range, UserError, flag, run_main, split_words, str2bool
from model import GPT, GPTConfig
from safeio import atomic_write, check_output, is_png, json_with, write_json

PARAMS = ("muP", "SP")  # the two parameterizations, in the figure's order (train.py --mup=1 / --mup=0)
DEFAULT_TRAIN_ARGS = ("--n_layer=2 --block_size=128 --batch_size=16 --total_batch_size=2048 --max_iters=150 "
                      "--warmup_iters=15 --decay_iters=30 --eval_iters=20")
# --quick: a tiny version of everything, for tests (any flag given explicitly still wins)
QUICK = dict(widths=[32, 64], lrs=[0.005, 0.02], seeds=[1], out="out/mup_sweep_quick.json",
             train_args="--n_layer=1 --block_size=32 --batch_size=4 --total_batch_size=128 --max_iters=10 "
                        "--warmup_iters=2 --decay_iters=2 --eval_iters=2",
             coord_widths=[64, 128], coord_steps=2, coord_seeds=[0], coord_out="out/mup_coord_quick.json",
             overwrite=True)


class SweepError(UserError):
    """A sweep or coordinate check that cannot run or be read as asked; one line that says what to do."""

# -----------------------------------------------------------------------------
# the sweep


def run(width, lr, mup, seed, train_args, head_dim):
    """Final validation loss of one train.py run, or NaN when its loss went non-finite (a diverged run)."""
    import train  # here, so the coordinate check (and its test) needs only model.py
    from checkpoint import Diverged
    heads = max(1, width // head_dim)
    argv = shlex.split(train_args) + [
        f"--n_embd={width}", f"--n_head={heads}", f"--n_kv_head={heads}", f"--mlp_hidden={int(2.5 * width)}",
        f"--lr={lr}", f"--mup={int(mup)}", f"--seed={seed}", "--eval_interval=0", "--ckpt_interval=0",
        "--sample_len=0"]
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        try:
            return float(train.main(argv + [f"--out_dir={out}", "--keep_ckpts=1"])["val_loss"])
        except ErrorExit as e:  # a diverged run is a data point, not a crash
            if not isinstance(e.error, Diverged):
                raise
            return float("nan")


def summarize(runs):
    """Per (parameterization, width, lr): mean, std, min and max over seeds; per (parameterization, width): the
    best LR, the argmin of the mean. A cell where any seed diverged has mean NaN and is never the best."""
    vals = {}
    for r in runs:
        vals.setdefault((r["parameterization"], r["width"], r["lr"]), []).append(r["val_loss"])
    cells = []
    for (name, width, lr), v in sorted(vals.items(), key=lambda kv: (PARAMS.index(kv[0][0]), *kv[0][1:])):
        v = np.asarray(v, dtype=float)
        ok = bool(np.isfinite(v).all())
        cells.append(dict(parameterization=name, width=width, lr=lr, n=len(v), diverged=int((~np.isfinite(v)).sum()),
                          mean=float(v.mean()) if ok else math.nan,
                          std=float(v.std(ddof=1)) if ok and len(v) > 1 else math.nan,
                          min=float(v.min()) if ok else math.nan, max=float(v.max()) if ok else math.nan))
    best = {}
    for c in cells:
        key = (c["parameterization"], c["width"])
        if math.isfinite(c["mean"]) and (key not in best or c["mean"] < best[key]["mean"]):
            best[key] = c
    return cells, {key: c["lr"] for key, c in best.items()}


def spread(c):
    """The error of a cell's mean as the table prints it: half the min-max range for 2 seeds, else the std."""
    return (c["max"] - c["min"]) / 2 if c["n"] == 2 else c["std"]


def seed_note(runs):
    """Which seeds ran at which widths: 'seeds 1,2 at widths 64,128; seed 1 at width 256'."""
    groups = {}
    for w in sorted({r["width"] for r in runs}):
        groups.setdefault(tuple(sorted({r["seed"] for r in runs if r["width"] == w})), []).append(w)
    words = lambda word, xs: f"{word}{'s' * (len(xs) > 1)} {','.join(map(str, xs))}"
    return "; ".join(words("seed", s) + " at " + words("width", ws) for s, ws in groups.items())


def spread_note(cells):
    ns = sorted({c["n"] for c in cells})
    if ns == [1]:
        return "one seed per cell, so no spread"
    parts = []
    if 2 in ns:
        parts.append("+- half the min-max range over 2 seeds (error bars: min to max)")
    if any(n > 2 for n in ns):
        parts.append("+- the std over seeds (ddof=1; error bars: +-1 std)")
    if 1 in ns:
        parts.append("cells without +- ran one seed")
    return "; ".join(parts)


def table(cells, best, name):
    """One parameterization's results as a markdown table: mean over seeds (+- spread), best LR in bold."""
    mine = [c for c in cells if c["parameterization"] == name]
    lrs, widths = sorted({c["lr"] for c in cells}), sorted({c["width"] for c in cells})  # the whole grid
    at = {(c["width"], c["lr"]): c for c in mine}
    lines = [f"| {name}, width | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for w in widths:
        row = []
        for lr in lrs:
            c = at.get((w, lr))
            if c is None:
                s = "not run"
            elif c["diverged"]:
                s = "diverged" + (f" ({c['diverged']}/{c['n']} seeds)" if c["n"] > 1 else "")
            else:
                s = f"{c['mean']:.3f}" + (f" +- {spread(c):.3f}" if c["n"] > 1 else "")
                s = f"**{s}**" if best.get((name, w)) == lr else s
            row.append(s)
        lines.append(f"| {w} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def run_info():
    """Where and when: recorded in every JSON so a figure can be traced to its run."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return dict(command="python " + " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:]),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), commit=commit, dirty=dirty,
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
                        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
                torch_threads=torch.get_num_threads(), torch=torch.__version__)


NEEDS = {"sweep": ("runs", "cells", "widths", "lrs", "best_lr"), "coord": ("widths", "steps", "lr", "muP", "SP")}


def read_json(path, what, kind=None):
    """A sweep's or coordinate check's JSON (of this kind, if given), or one line on why the file is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SweepError(f"cannot read {what}={path}: {e}") from None
    found = data.get("kind") if isinstance(data, dict) else None
    if found not in NEEDS or (kind and found != kind) or any(k not in data for k in NEEDS[found]):
        raise SweepError(f"{what}={path} is not a {kind or 'sweep or coordinate check'} JSON that mup_sweep.py "
                         f"wrote")
    return data


def check_outputs(path, what, kind):
    """A JSON of this kind and its figure beside it: one line now, before any run, where either would replace what
    mup_sweep.py did not write (safeio.check_output)."""
    png = os.path.splitext(path)[0] + ".png"
    if png == path:
        raise SweepError(f"{what}={path} names the JSON; the figure goes beside it, as .png")
    check_output(path, what, f"{kind} JSON", json_with("kind", *NEEDS[kind]), f"mup_{kind}.json")
    check_output(png, what, "PNG", is_png, f"mup_{kind}.png")
    return png


def refuse_to_replace(path, what):
    """A finished sweep can cost hours: a new one does not silently take its place."""
    if os.path.exists(path):
        raise SweepError(f"{what}={path} already exists; --resume adds to a sweep, --overwrite replaces it, or "
                         f"choose another {what}")


def sweep(args):
    """Run the grid (seeds x parameterizations x widths x LRs), writing the JSON after every run. With --resume
    the runs already in --out are kept (also those outside this grid: a second seed can be added to some widths
    only) and only the missing ones run."""
    runs, history = [], []
    if args.resume and os.path.exists(args.out):
        old = read_json(args.out, "--resume: --out", "sweep")
        if old.get("train_args") != args.train_args or old.get("head_dim") != args.head_dim:
            raise SweepError(f"{args.out} holds a sweep with other --train_args/--head_dim; drop --resume or choose "
                             "another --out")
        runs, history = old["runs"], old.get("history", []) + [old["info"]]
    have = {(r["parameterization"], r["width"], r["lr"], r["seed"]) for r in runs}
    # seeds outermost, so a sweep cut short has every width at its first seed(s)
    todo = [(s, name, w, lr) for s in args.seeds for name in PARAMS for w in args.widths for lr in args.lrs
            if (name, w, lr, s) not in have]
    info, t_start = run_info(), time.time()

    def save(complete):
        cells, best = summarize(runs)
        data = dict(kind="sweep", train_args=args.train_args, head_dim=args.head_dim,
                    widths=sorted({r["width"] for r in runs}), lrs=sorted({r["lr"] for r in runs}),
                    seeds=sorted({r["seed"] for r in runs}), runs=runs, cells=cells,
                    best_lr=[dict(parameterization=n, width=w, lr=lr) for (n, w), lr in best.items()],
                    info=dict(info, wall_seconds=round(time.time() - t_start, 1), complete=complete),
                    history=history)  # the earlier invocations' info, for a resumed sweep
        write_json(args.out, data, indent=1)
        return data

    for i, (seed, name, width, lr) in enumerate(todo):
        t0 = time.time()
        val = run(width, lr, name == "muP", seed, args.train_args, args.head_dim)
        runs.append(dict(parameterization=name, width=width, lr=lr, seed=seed, val_loss=val,
                         seconds=round(time.time() - t0, 1)))
        print(f"[{i + 1}/{len(todo)}] {name:>3} width {width:>4} lr {lr:<8g} seed {seed}: val loss {val:.4f} "
              f"({runs[-1]['seconds']:.0f} s)", flush=True)
        save(complete=False)  # after every run: a kill loses at most the run in flight
    return save(complete=True)


def report(data):
    cells = data["cells"]
    best = {(b["parameterization"], b["width"]): b["lr"] for b in data["best_lr"]}
    for name in PARAMS:
        print(f"\n{name}: final val loss, mean over {seed_note(data['runs'])}; best LR of each width in bold")
        print(table(cells, best, name))
    print(f"({spread_note(cells)})")


# -----------------------------------------------------------------------------
# the coordinate check

COORD_SITES = ("embedding", "attn", "mlp", "logits")  # the places the test checks; logits_change is extra


def coordinate_sizes(mup, widths=(64, 128, 256, 512), steps=5, lr=0.03, seeds=(0, 1)):
    """Mean |activation| per width at four places in the network, at init and after each of `steps` AdamW
    steps at a high LR (mean over seeds). Returns {site: array (steps + 1, len(widths))}, row t = after step t.

    The sites: the embedding's output (before scale_emb), the last block's attention and MLP outputs (before
    the residual scale) and the logits. Then the logits' change since init and its two parts through the tied
    readout E (h: the final normed hidden state; 1/m: the output multiplier, output_scale / m):
        logits_t - logits_0 = (h_t - h_0)/m . E_0  +  h_t/m . (E_t - E_0)
                              change_via_init        change_via_update
    The first goes through E's random init, which h's change is mostly not aligned with; the second through
    E's own update, which is."""
    sizes = {k: np.zeros((steps + 1, len(widths)))
             for k in COORD_SITES + ("logits_change", "change_via_init", "change_via_update")}
    x = torch.randint(0, 128, (8, 33), generator=torch.Generator().manual_seed(1234))
    for i, width in enumerate(widths):
        for seed in seeds:
            torch.manual_seed(seed)
            # head dim fixed at 32 so only width changes; base width 64 so every model is m >= 1
            model = GPT(GPTConfig(n_layer=2, n_embd=width, n_head=width // 32, n_kv_head=width // 32,
                                  mlp_hidden=int(2.5 * width), vocab_size=128, block_size=32, mup=mup,
                                  base_width=64))
            opt = torch.optim.AdamW(model.param_groups(0.0), lr=lr, betas=(0.9, 0.95))
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            acts = {}
            grab = lambda key: (lambda mod, inp, out: acts.__setitem__(key, out.detach()))
            model.wte.register_forward_hook(grab("embedding"))
            model.blocks[-1].attn.register_forward_hook(grab("attn"))
            model.blocks[-1].mlp.register_forward_hook(grab("mlp"))
            model.norm.register_forward_hook(grab("h"))
            E0 = model.wte.weight.detach().clone()
            for t in range(steps + 1):
                if t > 0:
                    model(x[:, :-1], x[:, 1:])[1].backward()
                    opt.step()
                    opt.zero_grad()
                with torch.no_grad():  # measure on the same batch; changes nothing the training sees
                    acts["logits"] = model(x[:, :-1])[0]
                    h = acts["h"] * model.config.logit_mult
                    if t == 0:
                        logits0, h0 = acts["logits"], h
                    acts["logits_change"] = acts["logits"] - logits0
                    acts["change_via_init"] = (h - h0) @ E0.T
                    acts["change_via_update"] = h @ (model.wte.weight - E0).T
                for k in sizes:
                    sizes[k][t, i] += acts[k].abs().mean().item() / len(seeds)
    return sizes


def coordinate_slopes(sizes, widths, step=-1):
    """The log-log slope of each site's size against width after `step`: 0 is width-independent."""
    return {k: float(np.polyfit(np.log(widths), np.log(v[step]), 1)[0]) for k, v in sizes.items()}


def coord(args):
    out = dict(kind="coord", widths=args.coord_widths, steps=args.coord_steps, lr=args.coord_lr,
               seeds=args.coord_seeds, info=run_info())
    t0 = time.time()
    for name in PARAMS:
        sizes = coordinate_sizes(name == "muP", args.coord_widths, args.coord_steps, args.coord_lr, args.coord_seeds)
        out[name] = {k: v.tolist() for k, v in sizes.items()}
        slopes = coordinate_slopes(sizes, args.coord_widths)
        print(f"{name}: log-log slope of size vs width after step {args.coord_steps}: "
              + ", ".join(f"{k} {s:+.2f}" for k, s in slopes.items()), flush=True)
    out["info"]["wall_seconds"] = round(time.time() - t0, 1)
    write_json(args.coord_out, out, indent=1)
    return out


# -----------------------------------------------------------------------------
# the pictures (matplotlib only here)


def pyplot():
    try:
        import matplotlib
    except ImportError:
        print("no figure: pip install matplotlib for the figure (the numbers above are complete without it)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def width_colors(plt, n):
    # a sequential map, wider = darker; the light end is cut so the narrowest curve still shows on white
    return [plt.get_cmap("viridis_r")(0.2 + 0.8 * i / max(1, n - 1)) for i in range(n)]


def plot_sweep(data, path):
    plt = pyplot()
    if plt is None:
        return None
    cells = data["cells"]
    best = {(b["parameterization"], b["width"]): b["lr"] for b in data["best_lr"]}
    widths = sorted({c["width"] for c in cells})
    lrs = sorted({c["lr"] for c in cells})
    colors = dict(zip(widths, width_colors(plt, len(widths))))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8), sharey=True)
    for ax, name in zip(axes, PARAMS):
        moves = []
        for w in widths:
            mine = sorted((c for c in cells if c["parameterization"] == name and c["width"] == w),
                          key=lambda c: c["lr"])
            if not mine:  # a sweep cut short
                continue
            ok = [c for c in mine if math.isfinite(c["mean"])]
            x = np.log2([c["lr"] for c in ok])
            y = np.array([c["mean"] for c in ok])
            lo = np.array([c["mean"] - c["min"] if c["n"] == 2 else (c["std"] if c["n"] > 2 else 0) for c in ok])
            hi = np.array([c["max"] - c["mean"] if c["n"] == 2 else (c["std"] if c["n"] > 2 else 0) for c in ok])
            seeds = max(c["n"] for c in mine)
            ax.errorbar(x, y, yerr=[lo, hi], color=colors[w], marker="o", ms=4, lw=1.8, capsize=3,
                        label=f"width {w}" + ("" if seeds > 1 else " (1 seed)"))
            for c in mine:  # a diverged cell: a cross at the top edge
                if not math.isfinite(c["mean"]):
                    ax.plot(math.log2(c["lr"]), 0.97, "x", color=colors[w], ms=9, mew=2,
                            transform=ax.get_xaxis_transform(), clip_on=False)
            if (name, w) in best:
                b = next(c for c in ok if c["lr"] == best[(name, w)])
                ax.plot(math.log2(b["lr"]), b["mean"], "*", color=colors[w], ms=20, mec="black", mew=1, zorder=5)
                moves.append((w, best[(name, w)]))
        ax.set_title(f"{name} ({'train.py --mup=1' if name == 'muP' else 'standard: train.py --mup=0'})\n"
                     f"best LR at width {', '.join(str(w) for w, _ in moves)}: "
                     + ", ".join(f"{lr:g}" for _, lr in moves), fontsize=11)
        ax.set_xticks(np.log2(lrs))
        ax.set_xticklabels([f"{math.log2(lr):.1f}\n({lr:g})" for lr in lrs])
        ax.set_xlabel("log2 learning rate  (eta: embedding LR; hidden LR = eta/m under muP)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final validation loss (mean over seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], ls="", marker="*", ms=14, color="grey", mec="black"))
    labels.append("best LR of that width")
    if any(not math.isfinite(c["mean"]) for c in cells):
        handles.append(plt.Line2D([], [], ls="", marker="x", ms=8, mew=2, color="grey"))
        labels.append("diverged (loss went NaN)")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=10, bbox_to_anchor=(0.5, 0.085),
               frameon=False)
    seeds = seed_note(data["runs"])
    bars = {2: "error bars: min to max over the 2 seeds", 3: "error bars: +-1 std over the seeds (ddof=1)"}
    ns = {c["n"] for c in cells}
    bars = "no error bars (one seed)" if ns == {1} else bars[2] if max(ns) == 2 else bars[3]
    fig.suptitle("Learning-rate transfer across width: muP vs standard parameterization", fontsize=13)
    info = data.get("info", {})
    fig.text(0.5, 0.01, f"Final validation loss, mean over seeds ({bars}); {seeds}.\n"
             f"Each run: train.py {data['train_args']}\n(embedded byte corpus unless --data_dir says otherwise); "
             f"head dim {data['head_dim']}, base width 256 (m = width / 256). {info.get('date', '')[:10]}, commit "
             f"{info.get('commit')}, {info.get('machine', '')}, torch {info.get('torch', '')}.",
             ha="center", va="bottom", fontsize=8.5)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return path


COORD_TITLES = dict(embedding="embedding output", attn="last block: attention out", mlp="last block: MLP out",
                    logits="logits", logits_change="logits - logits at init",
                    split="that change after the last step,\nsplit at the tied readout E")


def save_png(fig, path, dpi):
    """savefig, then down to a 256-colour palette: a third of the bytes, no visible change for line plots."""
    from PIL import Image  # a dependency of matplotlib
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    with atomic_write(path) as f:  # a full disk leaves the old figure, not a truncated one
        Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(f, format="PNG",
                                                                                                    optimize=True)


def plot_coord(data, path):
    plt = pyplot()
    if plt is None:
        return None
    widths, steps = data["widths"], data["steps"]
    sites = list(COORD_TITLES)
    slope = lambda name, site, t: np.polyfit(np.log(widths), np.log(data[name][site][t]), 1)[0]
    fig, axes = plt.subplots(2, len(sites), figsize=(3.0 * len(sites), 7.6), sharey="col", sharex=True)
    cmap = plt.get_cmap("viridis_r")
    split = {"logits_change": ("total", dict(color="black", ls="-")),
             "change_via_init": ("via E's init,\n(h_t - h_0)/m . E_0", dict(color="tab:red", ls="--")),
             "change_via_update": ("via E's update,\nh_t/m . (E_t - E_0)", dict(color="tab:orange", ls="-."))}
    for row, name in enumerate(PARAMS):
        for col, site in enumerate(sites):
            ax = axes[row, col]
            if site == "split":  # the last step's change and its two parts, each with its slope
                for key, (label, style) in split.items():
                    ax.plot(widths, data[name][key][steps], marker="o", ms=3,
                            label=f"{label}: slope {slope(name, key, steps):+.2f}", **style)
                if name == "muP":
                    ax.legend(fontsize=7.5, loc="upper right", handlelength=2.5)
                else:  # the same three lines; where they climb, only their slopes fit
                    ax.text(0.96, 0.05, "slopes: total {:+.2f}\nvia init {:+.2f}\nvia update {:+.2f}".format(
                        *(slope(name, k, steps) for k in split)), transform=ax.transAxes, ha="right",
                        va="bottom", fontsize=8.5, bbox=dict(fc="white", ec="none", alpha=0.8))
            else:
                v = np.asarray(data[name][site])
                if site != "logits_change":
                    ax.plot(widths, v[0], ls="--", color="grey", marker=".", label="init (step 0)")
                for t in range(1, steps + 1):
                    ax.plot(widths, v[t], color=cmap(0.25 + 0.75 * (t - 1) / max(1, steps - 1)), marker="o", ms=3,
                            label=f"after step {t}")
                ax.text(0.04, 0.95, f"slope {slope(name, site, steps):+.2f}", transform=ax.transAxes, va="top",
                        fontsize=9, bbox=dict(fc="white", ec="none", alpha=0.8))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(widths)
            ax.set_xticklabels([str(w) for w in widths], fontsize=8)
            ax.yaxis.set_major_locator(plt.LogLocator(subs=(1.0, 3.0)))
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(plt.NullFormatter())
            ax.grid(alpha=0.3, which="both")
            if row == 0:
                ax.set_title(COORD_TITLES[site], fontsize=10)
            if row == 1:
                ax.set_xlabel("width (n_embd)")
            if col == 0:
                ax.set_ylabel(f"{name}\nmean |activation|", fontsize=11)
    for col in range(len(sites)):  # at least a factor 30 per column, so a flat line looks flat
        lo, hi = axes[0, col].get_ylim()
        if hi / lo < 30:
            mid = math.sqrt(lo * hi)
            axes[0, col].set_ylim(mid / math.sqrt(30), mid * math.sqrt(30))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=9, bbox_to_anchor=(0.99, 0.955))
    seeds = ",".join(str(s) for s in data["seeds"])
    fig.suptitle(f"Coordinate check: activation size vs width at init and after steps 1..{steps} of AdamW at lr "
                 f"{data['lr']:g} (2 layers, head dim 32, base width 64, seeds {seeds}); slope: log-log, after step "
                 f"{steps}", fontsize=11.5, x=0.01, ha="left")
    s = lambda site, t=steps, name="muP": f"{slope(name, site, t):+.2f}"
    fig.text(0.5, 0.01, (
        f"muP (top): the embedding, attention and MLP outputs keep their size as width grows. The logits nearly do "
        f"(slope {s('logits')}), but the tied readout E is not zero-initialised:\nat init the logits (h/m).E are a "
        f"random sum that shrinks as width^{s('logits', 0)} (dashed). Training's change to the logits splits in two "
        f"(right): the part through E's random init shrinks as width^{s('change_via_init')};\nthe part through E's "
        f"own update, which is aligned with h, is nearly flat (width^{s('change_via_update')}) and grows with every "
        f"step, so the logits' slope goes from {s('logits', 1)} after step 1 to {s('logits')} after step {steps}."
        f"\nSP (bottom): attention and MLP outputs grow as width^{s('attn', name='SP')} and "
        f"width^{s('mlp', name='SP')}, the logits as width^{s('logits', name='SP')}. "
        f"tests/test_model.py::test_coordinate_check asserts these slopes on widths 64-512."),
        ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.11, 1, 0.93))
    save_png(fig, path, dpi=95)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------


def number_list(kind, positive=True):
    def parse(s):
        try:
            v = [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}")
        if not v or any(not math.isfinite(x) or (x <= 0 if positive else x < 0) for x in v):
            raise argparse.ArgumentTypeError(f"expected comma-separated {'positive' if positive else '>= 0'} "
                                             f"{kind.__name__}s, got {s!r}")
        twice = [x for i, x in enumerate(v) if x in v[:i]]
        if twice:  # one run reported as two (seeds), a grid point run twice
            raise argparse.ArgumentTypeError(f"{twice[0]:g} is given twice in {s!r}; name each once")
        return v
    return parse


def parse_args(argv=None):
    p = Parser(prog="mup_sweep.py", description=__doc__.split("\n")[1])
    g = p.add_argument_group("the learning-rate sweep")
    flag(g, "widths", type=number_list(int), default=[64, 128, 256, 512], help="n_embd values, comma-separated")
    flag(g, "lrs", type=number_list(float), default=[0.000625, 0.00125, 0.0025, 0.005, 0.01, 0.02],
         help="peak eta values (train.py --lr), comma-separated")
    flag(g, "seeds", type=number_list(int, positive=False), default=[1], help="train.py --seed values: 1,2 gives "
         "error bars (the seed sets the init; the data order is the same)")
    flag(g, "head_dim", type=int, default=32, range=Range(2), help="n_head = width / head_dim")
    flag(g, "train_args", default=DEFAULT_TRAIN_ARGS, help="passed to every train.py run")
    flag(g, "threads", type=int, default=0, range=Range(0), help="torch threads; 0 = torch's default. 1 is "
         "fastest for these small models on a busy CPU")
    flag(g, "out", default="figures/mup_sweep.json", help="the JSON; the figure goes next to it as .png")
    flag(g, "resume", type=str2bool, nargs="?", const=True, default=False,
         help="reuse the runs already in --out (same --train_args) and run only the missing ones")
    g = p.add_argument_group("the coordinate check")
    flag(g, "coord", type=str2bool, nargs="?", const=True, default=False, help="draw it instead of the sweep")
    flag(g, "coord_widths", type=number_list(int), default=[64, 128, 256, 512, 1024, 2048],
         help="multiples of 32 (head dim 32)")
    flag(g, "coord_steps", type=int, default=5, range=Range(1))
    flag(g, "coord_lr", type=float, default=0.03, range=Range(0, lo_open=True))
    flag(g, "coord_seeds", type=number_list(int, positive=False), default=[0, 1])
    flag(g, "coord_out", default="figures/mup_coord.json", help="the JSON; the figure goes next to it as .png")
    g = p.add_argument_group("both")
    flag(g, "quick", type=str2bool, nargs="?", const=True, default=False,
         help="a tiny version for tests (" + ", ".join(f"{k}={v}" for k, v in QUICK.items() if k != "train_args")
              + ", 10 steps); explicit flags still win")
    flag(g, "overwrite", type=str2bool, nargs="?", const=True, default=False,
         help="replace an existing --out (or --coord_out) instead of refusing to")
    flag(g, "plot_only", default=None, metavar="JSON", help="redraw the figure of a sweep's or coordinate check's "
         "JSON, without running anything")
    args = p.parse_args(argv)
    if args.quick:  # quick's values replace the defaults only: parse again with them as defaults
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    split_words(p, args.train_args, "--train_args")  # an unbalanced quote: now, not at the first run
    if any(w % 32 for w in args.coord_widths) and args.coord:
        p.error("--coord_widths must be multiples of 32 (the coordinate check's head dim)")
    return args


def main(argv=None):
    return run_main("mup_sweep.py", command, parse_args(argv))


def command(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot_only:
        data = read_json(args.plot_only, "--plot_only")
        if data.get("kind") == "sweep":
            report(data)
        png = check_output(os.path.splitext(args.plot_only)[0] + ".png", "--plot_only", "PNG", is_png, "mup.png")
        png = (plot_sweep if data.get("kind") == "sweep" else plot_coord)(data, png)
    elif args.coord:
        if not args.overwrite:
            refuse_to_replace(args.coord_out, "--coord_out")
        png = check_outputs(args.coord_out, "--coord_out", "coord")
        data = coord(args)
        png = plot_coord(data, png)
        print(f"wrote {args.coord_out}")
    else:
        if not (args.resume or args.overwrite):
            refuse_to_replace(args.out, "--out")
        png = check_outputs(args.out, "--out", "sweep")
        data = sweep(args)
        report(data)
        png = plot_sweep(data, png)
        print(f"wrote {args.out}")
    if png:
        print(f"wrote {png}")
    return data


if __name__ == "__main__":
    main()
