"""
ablation.py: the paper's headline ablation, as the paper ran it, with seeds and an uncertainty.

Xmodel-2.5's two decays start from the same stable-phase weights and differ only in the optimizer: AdamW
throughout, or the switch to Muon at the decay start (RECIPE.md section 4: +4.58 points on a 13-task average).
Per seed, this script trains warmup + stable once (train.py --stop_after=<decay start>, which keeps that
checkpoint), then runs the decay from that one checkpoint once per arm, each into its own out_dir: the same
weights, the same data order (the loader's position travels in the checkpoint), only the arm's flags differ.
Each arm's final checkpoint is scored by evaluate.py --val (loss and bits per byte on the held-out split), and
each arm is compared with the control seed by seed: the paired difference (arm - control), its mean, standard
deviation and 95% t-interval, and whether that interval excludes zero. Right after the switch the arms see the
same batches, so their training losses there compare step by step: a spike from Muon's zero momentum would show
as a positive difference over the first decay steps.

    python ablation.py                       # CPU: the cpu preset, 5 seeds, arms adamw, muon, muon_rewarm
    python ablation.py --arms=adamw,muon,muon_spectral,muon_polar,muon_split --seeds=1,2,3
    python ablation.py --branch=start --arms=hp,fp8,fp8_current    # FP8 parity: every arm from step 0
    python ablation.py --quick               # a tiny version, under a minute (tests/ run it)
    python ablation.py --widths=64,128,256 --seeds=1,2,3,4,5,6,7,8 --arms=adamw,muon --jobs=2 --out=runs/widths
    python ablation.py --quick --widths=32,64 --arms=adamw,muon --jobs=2     # the same, tiny (tests/ run it)
    python ablation.py --widths=64,128,256 --arms=adamw,muon,muon_unit --jobs=2 --out=runs/widths \
        --arm='muon_unit:--muon_at_decay --muon_scale=unit_rms_norm'     # + Muon with the width-invariant rule
    # GPU proxy (see docs/experiments.md for data and cost):
    python ablation.py --train_args="--preset=nano --data_dir=data/packages-byte --max_iters=600 --decay_iters=120 \
        --warmup_iters=60 --batch_size=16 --total_batch_size=59392 --eval_interval=100" --out=runs/ablation-nano

Arms are named sets of extra train.py flags (ARMS below; --arm=NAME:FLAGS adds one). The seed (train.py --seed)
changes the initial weights; the data order is the corpus's own and the same for every seed. An arm already
finished in --out (its final checkpoint there) is not run again, so an interrupted ablation continues.
Writes --out/results.json, --out/decay.png (seed 1's stable phase and every arm's decay) and
--out/differences.png (each arm's paired difference per seed, with its interval).

--widths=64,128,256: the same ablation at each width (n_embd; n_head = width / head_dim, the MLP 2.5x as wide,
--train_args' depth and schedule), each in --out/w<width>/ as above, then --out/widths.json and --out/gain.png:
each arm's paired difference from the control, its mean and 95% interval, against width. --jobs=N runs N
train.py processes at once, one thread each (the seeds' stable phases are independent; an arm's decay starts once
its seed's stable phase is done), with the same numbers as --jobs=1 on one thread. Every run is named for a dashboard
(--train_args="--logger=wandb"): w<width>-s<seed>-<arm> (s<seed>-<arm> without --widths; the stable phase's arm
is "stable").
"""

import contextlib
import math
import os
import re
import statistics
import sys
import time

import config
import evaluate
import train
from cli import Parser, Range, UserError, comma_list, flag, run_main, split_words
from model import PRESETS, GPTConfig
from jobs import Job, claim_run_dir, is_finished, mark_finished, run_jobs
from mup_sweep import width_flags
from safeio import FileLock, atomic_write, check_output, is_png, json_with, make_dir, read_jsonl, write_json

# an arm: its extra train.py flags; {rewarm} is a tenth of the decay window
ARMS = {
    "adamw": [],                                                   # the control: AdamW through the decay
    "muon": ["--muon_at_decay"],                                   # the recipe's switch (RECIPE.md section 4)
    "muon_rewarm": ["--muon_at_decay", "--switch_warmup={rewarm}"],  # to ease the switch: LR re-warmup
    "muon_spectral": ["--muon_at_decay", "--muon_scale=spectral"],   # Keller Jordan's update scale
    "muon_polar": ["--muon_at_decay", "--ns_coeffs=polar_express"],  # Polar Express coefficients
    "muon_split": ["--muon_at_decay", "--split_fused"],              # q/k/v and gate/up orthogonalised apart
    "hp": [],                                                      # high precision: bf16 on a GPU, fp32 on CPU
    "fp8": ["--fp8"],                                              # delayed scaling, the recipe's
    "fp8_current": ["--fp8", "--fp8_recipe=current"],
}
CPU_TRAIN_ARGS = "--preset=cpu --sample_len=0"
QUICK_TRAIN_ARGS = ("--n_layer=1 --n_embd=64 --n_head=2 --n_kv_head=1 --mlp_hidden=160 --block_size=32 "
                    "--batch_size=4 --total_batch_size=256 --max_iters=24 --warmup_iters=3 --decay_iters=8 "
                    "--eval_interval=8 --eval_iters=4 --sample_len=0 --log_interval=1000")
# Student's t, two-sided 95% (the 97.5% quantile), by degrees of freedom; above 30 the normal's 1.96
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired(diffs):
    """Mean, sample standard deviation and 95% t-interval of paired differences; None where n is too small."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else None
    if n < 2:
        return dict(n=n, mean=mean, std=None, ci95=None, excludes_zero=None)
    std = statistics.stdev(diffs)
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return dict(n=n, mean=mean, std=std, ci95=[lo, hi], excludes_zero=bool(lo > 0 or hi < 0))


class AblationError(UserError):
    """An ablation that cannot run as asked; one line that says what to change."""


DONE = "ablation_run.json"  # in a run's out_dir once it has finished: the train.py flags it was made with
OUTPUTS = {"results.json": ("results", json_with("arms", "control", "summary")), "decay.png": ("PNG", is_png),
           "differences.png": ("PNG", is_png)}  # in --out (--widths: in each width's), told by their content
WIDTH_OUTPUTS = {"widths.json": ("results", json_with("widths", "control", "gains")), "gain.png": ("PNG", is_png)}


def train_runs(jobs, n):
    """Each job's train.py (run_jobs: n at a time), into an out_dir of ablation.py's own; a run is marked finished
    (DONE) only when it trained and ran its final evaluation."""
    for job in jobs:  # (train.py --overwrite would replace someone's run)
        claim_run_dir(job.out_dir, DONE, "ablation.py", "--out", AblationError)

    def done(job, result):
        where = f"train.py {' '.join(job.argv)} {{}} in {job.out_dir}"
        if result.get("diverged"):
            raise AblationError(where.format("diverged (its loss went non-finite; see train.out there)"))
        if result.get("val_loss") is None:  # e.g. resumed at or past its end: nothing trained, no final evaluation
            raise AblationError(where.format("trained nothing") + "; it is not marked finished")
        mark_finished(job.out_dir, DONE, job.argv, result["val_loss"])
        print(f"{job.key}: {result['seconds']:.0f} s", file=sys.stderr)
    run_jobs(jobs, n, done)


def finished(out_dir, argv):
    """Whether out_dir holds a finished run of exactly these flags (a run of other --train_args, another --arm
    definition, one killed before its final evaluation, or one that trained nothing runs again)."""
    return is_finished(out_dir, DONE, argv)


def seed_jobs(seed, args, out, base_argv, decay_at, prefix=""):
    """One seed's runs still to do in out: the shared stable phase (branch=decay), then every arm; a new stable
    phase means every arm branches from it again. Each run's key is its name in a dashboard (--run_name, which
    changes no number: finished() ignores it): <prefix>s<seed>-<arm>, the stable phase's arm "stable"."""
    root = os.path.join(out, f"seed{seed}")
    base = os.path.join(root, "base")
    name = lambda arm: f"{prefix}s{seed}-{arm}"
    stable = [*base_argv, f"--seed={seed}", f"--stop_after={decay_at}", "--overwrite"]
    rerun = args.branch == "decay" and not finished(base, stable)
    jobs = [Job(name("stable"), stable + [f"--run_name={name('stable')}"], base, None)] if rerun else []
    for arm in args.arm_list:
        d = os.path.join(root, arm)
        branch = [f"--resume={os.path.join(base, f'ckpt_{decay_at:07d}.pt')}"] if args.branch == "decay" else []
        argv = [*base_argv, f"--seed={seed}", *branch, "--overwrite", *arm_flags(arm, args)]
        if rerun or not finished(d, argv):
            jobs.append(Job(name(arm), argv + [f"--run_name={name(arm)}"], d, name("stable") if rerun else None))
    return jobs


def arm_flags(arm, args):
    return [f.format(rewarm=max(1, args.decay_iters // 10)) for f in args.arm_defs[arm]]


def check_arm(arm, args, base_argv, branch_at):
    """An arm's flags, checked before any training: train.py takes them, and the arm trains past its branch point
    (a --stop_after at or before it, or a --dry_run, would train nothing and leave no result)."""
    a = train.parse_args([*base_argv, *arm_flags(arm, args)])  # (a bad flag: train.py's line, here)
    stop = 0 if a.dry_run else min(train.total_iters(a), a.stop_after or math.inf)
    if stop <= branch_at:
        raise AblationError(f"arm {arm} ({' '.join(args.arm_defs[arm]) or 'no flags'}) would train nothing: with "
                            f"--train_args it ends at step {stop}, at or before its branch point, step {branch_at}")


EARLY = 10  # the decay steps right after the switch whose training losses are compared (the same batches)


def metrics(arm_dir, decay_at, args):
    """An arm's final val loss (train.py's), evaluate.py --val's loss and bits per byte, and the training losses of
    the first EARLY steps of the decay, where the switch's effect shows."""
    log, _ = read_jsonl(os.path.join(arm_dir, "log.jsonl"))
    val = [e["val_loss"] for e in log if "val_loss" in e][-1]  # (finished(): the final evaluation's)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ev = evaluate.main([f"--ckpt={arm_dir}", "--val", f"--val_tokens={args.val_tokens}", f"--device={args.device}",
                            f"--out={os.path.join(arm_dir, 'eval.json')}"])["val"]["metrics"]
    losses = {e["step"]: e["loss"] for e in log if "loss" in e}
    return dict(val_loss=val, eval_loss=ev["loss"], bits_per_byte=ev["bits_per_byte"],
                early=[losses[s] for s in range(decay_at, decay_at + EARLY) if s in losses])


def summarize(results, arms, control):
    """Per arm: the mean of each metric; for the other arms the paired differences from the control (final val
    loss, bits per byte, and the mean training loss of the first EARLY decay steps: the same batches in every arm,
    so a spike at the switch shows as a positive difference) and the worst single early step."""
    seeds = sorted(results)
    summary = {}
    for arm in arms:
        s = dict(mean={m: statistics.fmean(results[k][arm][m] for k in seeds) for m in
                       ("val_loss", "eval_loss", "bits_per_byte")})
        if arm != control:
            s["paired"] = {m: paired([results[k][arm][m] - results[k][control][m] for k in seeds])
                           for m in ("val_loss", "bits_per_byte")}
            early = [[a - c for a, c in zip(results[k][arm]["early"], results[k][control]["early"])] for k in seeds]
            if all(early):
                s["paired"]["early_loss"] = paired([statistics.fmean(d) for d in early])
                s["worst_early_step"] = max(max(d) for d in early)
        summary[arm] = s
    return summary


def print_table(results, summary, arms, control):
    cell = lambda m: f"{m['val_loss']:.4f} / {m['bits_per_byte']:.4f}"
    print(f"\n{'final val loss / bits per byte':32s}" + "".join(f"{a:>20s}" for a in arms))
    for k in sorted(results):
        print(f"{'seed ' + str(k):32s}" + "".join(f"{cell(results[k][a]):>20s}" for a in arms))
    print(f"{'mean':32s}" + "".join(f"{cell(summary[a]['mean']):>20s}" for a in arms))
    worst = [summary[a].get("worst_early_step") for a in arms]
    print(f"{'worst early step vs ' + control:32s}" + "".join(f"{v:>+20.3f}" if v is not None else f"{'-':>20s}"
                                                             for v in worst))
    for a in arms:
        for m, p in summary[a].get("paired", {}).items():
            if p["std"] is None:
                print(f"{a} - {control}, {m}: {p['mean']:+.4f} (one seed: no interval)")
                continue
            verdict = "excludes zero" if p["excludes_zero"] else "includes zero: no difference shown"
            what = f"training loss over the first {EARLY} decay steps" if m == "early_loss" else m
            print(f"{a} - {control}, {what}: mean {p['mean']:+.4f}, std {p['std']:.4f}, 95% interval "
                  f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] over {p['n']} seeds: {verdict}")


def pictures(results, summary, arms, control, args, decay_at, out=None):
    """decay.png via plot.py (seed 1: the shared stable phase and every arm), differences.png (paired, per seed),
    in out (--out, or a width's directory)."""
    try:
        import plot
        import matplotlib
    except ImportError:
        return print("ablation.py: the pictures need matplotlib: pip install matplotlib")
    out = out or args.out
    seed = sorted(results)[0]
    root = os.path.join(out, f"seed{seed}")
    runs = ([os.path.join(root, "base")] if args.branch == "decay" else []) + [os.path.join(root, a) for a in arms]
    labels = (["stable phase"] if args.branch == "decay" else []) + list(arms)
    plot.plot_runs(runs, os.path.join(out, "decay.png"), labels=labels,  # (branch=start: the whole runs)
                   from_step=max(0, decay_at - args.decay_iters) if args.branch == "decay" else None,
                   title=f"seed {seed}: " + (f"{', '.join(arms)}: each decay from one stable-phase checkpoint"
                                             if args.branch == "decay" else f"{', '.join(arms)}, from step 0"))
    others = [a for a in arms if a != control]
    if not others:
        return
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2.2 + 1.6 * len(others), 3.6))
    ax = fig.add_subplot()
    for i, a in enumerate(others):
        d = [results[k][a]["val_loss"] - results[k][control]["val_loss"] for k in sorted(results)]
        ax.scatter([i] * len(d), d, color="0.5", s=14, zorder=3)
        p = summary[a]["paired"]["val_loss"]
        ax.errorbar([i + 0.15], [p["mean"]], yerr=None if p["ci95"] is None else [[p["mean"] - p["ci95"][0]],
                                                                                    [p["ci95"][1] - p["mean"]]],
                    fmt="o", color="C3", capsize=4, zorder=4)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(others)), others)
    ax.set_xlim(-0.6, len(others) - 0.4)
    ax.set_ylabel(f"final val loss, arm - {control}")
    ax.set_title(f"paired differences over {len(results)} seeds (grey),\ntheir mean and its 95% interval", fontsize=8)
    fig.tight_layout()
    with atomic_write(os.path.join(out, "differences.png")) as f:  # a full disk leaves the old picture
        fig.savefig(f, format="png", dpi=120)
    print(f"wrote {out}/decay.png and differences.png (matplotlib {matplotlib.__version__})")


def gain_picture(widths, gains, control, path, note=""):
    """gain.png: each arm's paired difference from the control (mean, 95% interval) against width, for the final
    val loss and bits per byte; below zero the arm is better."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return print("ablation.py: the pictures need matplotlib: pip install matplotlib")
    fig = Figure(figsize=(10, 4))
    arms = list(gains)
    for j, (m, what) in enumerate([("val_loss", "final val loss"), ("bits_per_byte", "bits per byte")]):
        ax = fig.add_subplot(1, 2, j + 1)
        for i, a in enumerate(arms):
            x = [math.log2(w) + 0.06 * (i - (len(arms) - 1) / 2) for w in widths]  # (arms side by side)
            ps = [g["paired"][m] for g in gains[a]]
            y = [p["mean"] for p in ps]
            err = [[p["mean"] - p["ci95"][0] if p["ci95"] else 0 for p in ps],
                   [p["ci95"][1] - p["mean"] if p["ci95"] else 0 for p in ps]]
            ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{3 + i}", capsize=4, label=f"{a} - {control}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks([math.log2(w) for w in widths], [str(w) for w in widths])
        ax.set_xlabel("width (n_embd)")
        ax.set_ylabel(f"{what}, arm - {control}")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize=8)
    n = sorted({p["n"] for a in arms for g in gains[a] for p in [g["paired"]["val_loss"]]})
    fig.suptitle(f"The switch's gain against width: paired differences, mean and 95% interval over "
                 f"{'/'.join(map(str, n))} seeds (below zero: the arm is better)", fontsize=10)
    fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    print(f"wrote {path}")


def get_args(argv=None):
    p = Parser(prog="ablation.py", description=__doc__.split("\n")[1])
    flag(p, "arms", type=comma_list(str, what="names"), default="adamw,muon,muon_rewarm", help="comma-separated, "
         f"of {', '.join(ARMS)}; the first is the control")
    flag(p, "arm", action="append", default=[], metavar="NAME:FLAGS", help="define an arm, e.g. "
         "'muon_m9:--muon_at_decay --muon_momentum=0.9' or Muon with the width-invariant rule, "
         "'muon_unit:--muon_at_decay --muon_scale=unit_rms_norm' (repeatable); then name it in --arms")
    flag(p, "seeds", type=comma_list(int, Range(0), "non-negative integers"), default="1,2,3,4,5",
         help="train.py --seed of each stable phase, each once")
    flag(p, "branch", default="decay", choices=["decay", "start"], help="decay: the arms branch at the decay start "
         "from one stable phase (the paper's design); start: every arm trains from step 0 (e.g. FP8 parity)")
    flag(p, "train_args", default=CPU_TRAIN_ARGS, help="train.py flags shared by every run")
    flag(p, "widths", type=comma_list(int, Range(1), "positive integers"), default=None, help="n_embd values: the "
         "ablation at each width, in --out/w<width>/, and the gain against width (default: --train_args' width)")
    flag(p, "head_dim", type=int, default=None, range=Range(1), help="--widths: n_head = width / head_dim (default: "
         "--train_args' model's; its query heads per kv head stay too)")
    flag(p, "jobs", type=int, default=1, range=Range(1), help="train.py runs at once, each its own process on one "
         "thread (2 on a 2-core machine); the same numbers as --jobs=1 on one thread (OMP_NUM_THREADS=1), which "
         "runs them here, one at a time")
    flag(p, "val_tokens", type=int, default=1 << 20, range=Range(1), help="evaluate.py --val tokens per arm")
    flag(p, "device", default="auto")
    flag(p, "out", default="runs/ablation", help="where the runs, results.json and the pictures go")
    flag(p, "quick", action="store_true", help="a tiny version for a test: 2 seeds, 24 steps of a 1-layer model")
    args = p.parse_args(argv)
    if args.quick:  # (the flags given still apply)
        args.train_args = QUICK_TRAIN_ARGS if args.train_args == CPU_TRAIN_ARGS else args.train_args
        args.seeds = [1, 2] if args.seeds == [1, 2, 3, 4, 5] else args.seeds
        args.val_tokens = 4096
    args.train_flags = split_words(p, args.train_args, "--train_args")
    args.arm_defs = dict(ARMS)
    for spec in args.arm:
        name, _, flags = spec.partition(":")
        if not name or not flags:
            p.error(f"--arm={spec!r}: expected NAME:FLAGS")
        if not PLAIN_NAME.fullmatch(name) or ".." in name or name == "base":
            p.error(f"--arm={spec}: {name!r} is not a plain name (letters, digits, _ . -; not base): it names the "
                    "arm's run directory under --out")
        args.arm_defs[name] = split_words(p, flags, f"--arm={spec}")
    args.arm_list, args.seed_list = args.arms, args.seeds
    unknown = [a for a in args.arm_list if a not in args.arm_defs]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(args.arm_defs)} or define one with "
                "--arm=NAME:FLAGS")
    return args


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # an arm's name: a directory name, never a path


def main(argv=None):
    return run_main("ablation.py", ablate, get_args(argv))


def ablate(args):
    base_argv = args.train_flags + ([f"--device={args.device}"] if args.device != "auto" else [])
    sched = train.parse_args(base_argv)  # the schedule every run shares (and a bad flag fails here, once)
    args.decay_iters = sched.decay_iters
    decay_at, end = (train.decay_start(sched), train.total_iters(sched))
    if args.branch == "decay" and decay_at == 0:
        raise AblationError("the decay starts at step 0, so there is no stable phase to share; give --train_args a "
                            "--max_iters above --decay_iters")
    # each width: its directory (--out itself without --widths) and its train.py flags
    args.shape = model_shape(sched, args) if args.widths else None
    widths = {None: (args.out, base_argv)} if not args.widths else {
        w: (os.path.join(args.out, f"w{w}"), base_argv + width_flags(w, *args.shape)) for w in args.widths}
    for out, argv in widths.values():
        for arm in args.arm_list:  # each arm's flags too, before hours of training reach it
            check_arm(arm, args, argv, decay_at if args.branch == "decay" else 0)
    make_dir(args.out, "--out")
    with FileLock(os.path.join(args.out, ".lock"), "ablation.py run"):  # a second ablation into --out: one line
        for out in [o for o, _ in widths.values()]:  # it replaces its own outputs, nothing else
            for name, (kind, is_ours) in OUTPUTS.items():
                check_output(os.path.join(out, name), "--out", kind, is_ours, name)
        for name, (kind, is_ours) in WIDTH_OUTPUTS.items() if args.widths else ():
            check_output(os.path.join(args.out, name), "--out", kind, is_ours, name)
        t0 = time.time()
        print(f"ablation: arms {', '.join(args.arm_list)} (control {args.arm_list[0]}), seeds "
              f"{','.join(map(str, args.seed_list))}, " + (f"widths {','.join(map(str, args.widths))}, "
                                                           if args.widths else "")
              + f"branch at {'the decay start, step ' + str(decay_at) if args.branch == 'decay' else 'step 0'} of "
              f"{end}; runs in {args.out}", flush=True)
        train_runs([job for w, (out, argv) in widths.items() for seed in args.seed_list
                    for job in seed_jobs(seed, args, out, argv, decay_at, f"w{w}-" if w else "")], args.jobs)
        done = {w: report(args, out, decay_at, t0) for w, (out, _) in widths.items()}
        return done[None] if not args.widths else width_report(args, done, t0)


def model_shape(sched, args):
    """--widths: the head dim and query heads per kv head of --train_args' model (its preset and flags), which
    every width keeps; --head_dim replaces the first."""
    c = GPTConfig(**{**PRESETS[sched.preset], **{k: getattr(sched, k) for k in config.MODEL_FIELDS
                                                 if getattr(sched, k) is not None}})
    head_dim = args.head_dim or c.n_embd // c.n_head
    odd = [w for w in args.widths if w % head_dim]
    if odd:
        raise AblationError(f"--widths: {', '.join(map(str, odd))} is not a multiple of the head dim, {head_dim}; "
                            "choose other widths or --head_dim")
    return head_dim, c.n_head // c.n_kv_head


def report(args, out, decay_at, t0):
    """One width's ablation, its runs done: every arm's metrics, the table, out/results.json and its pictures."""
    results = {}
    for seed in args.seed_list:
        root = os.path.join(out, f"seed{seed}")
        results[seed] = {arm: metrics(os.path.join(root, arm), decay_at, args) for arm in args.arm_list}
        print(f"seed {seed}: " + ", ".join(f"{a} {m['val_loss']:.4f}" for a, m in results[seed].items()), flush=True)
    control = args.arm_list[0]
    summary = summarize(results, args.arm_list, control)
    print_table(results, summary, args.arm_list, control)
    write_json(os.path.join(out, "results.json"), dict(
        arms={a: args.arm_defs[a] for a in args.arm_list}, control=control, branch=args.branch, decay_start=decay_at,
        train_args=args.train_args, seeds=args.seed_list, results={str(k): v for k, v in results.items()},
        summary=summary, seconds=round(time.time() - t0)), indent=1)
    pictures(results, summary, args.arm_list, control, args, decay_at, out)
    print(f"wrote {out}/results.json ({time.time() - t0:.0f} s)")
    return results, summary


def width_report(args, done, t0):
    """--widths: each arm's paired difference from the control at each width, in a table, --out/widths.json and
    --out/gain.png; {width: (results, summary)}."""
    control, widths = args.arm_list[0], sorted(done)
    gains = {a: [dict(width=w, paired=done[w][1][a]["paired"], mean=done[w][1][a]["mean"]) for w in widths]
             for a in args.arm_list[1:]}
    print("\n| width | " + " | ".join(f"{a} - {control}: {m}, mean [95% interval]" for a in gains
                                        for m in ("val loss", "bits per byte")) + " |")
    print("|---" * (1 + 2 * len(gains)) + "|")
    cell = lambda p: f"{p['mean']:+.4f}" + (f" [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p["ci95"] else "")
    for i, w in enumerate(widths):
        print(f"| {w} | " + " | ".join(cell(gains[a][i]["paired"][m]) for a in gains
                                       for m in ("val_loss", "bits_per_byte")) + " |")
    write_json(os.path.join(args.out, "widths.json"), dict(
        widths=widths, control=control, arms={a: args.arm_defs[a] for a in args.arm_list}, train_args=args.train_args,
        head_dim=args.shape[0], heads_per_kv_head=args.shape[1], seeds=args.seed_list, gains=gains,
        date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - t0)), indent=1)
    if gains:
        note = (f"Each run: train.py {args.train_args} at n_embd = width, n_head = width / {args.shape[0]} "
                f"({args.shape[1]} per kv head), mlp_hidden = 2.5 width; {time.strftime('%Y-%m-%d')}.")
        gain_picture(widths, gains, control, os.path.join(args.out, "gain.png"), note)
    print(f"wrote {args.out}/widths.json ({time.time() - t0:.0f} s)")
    return done


if __name__ == "__main__":
    main()
