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
    # GPU proxy (see docs/experiments.md for data and cost):
    python ablation.py --train_args="--preset=nano --data_dir=data/packages-byte --max_iters=600 --decay_iters=120 \
        --warmup_iters=60 --batch_size=16 --total_batch_size=59392 --eval_interval=100" --out=runs/ablation-nano

Arms are named sets of extra train.py flags (ARMS below; --arm=NAME:FLAGS adds one). The seed (train.py --seed)
changes the initial weights; the data order is the corpus's own and the same for every seed. An arm already
finished in --out (its final checkpoint there) is not run again, so an interrupted ablation continues.
Writes --out/results.json, --out/decay.png (seed 1's stable phase and every arm's decay) and
--out/differences.png (each arm's paired difference per seed, with its interval).
"""

import contextlib
import json
import math
import os
import re
import statistics
import sys
import time

import evaluate
import train
from cli import Parser, Range, UserError, flag, run_main, split_words
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
           "differences.png": ("PNG", is_png)}  # in --out, told by their content


def train_run(argv, out_dir):
    """train.main(argv + --out_dir) in this process, its output in out_dir/train.out; the result dict. A run is
    marked finished (DONE) only when it trained and ran its final evaluation."""
    held = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    if held and not {DONE, "train.out"} & set(held):  # (train.py --overwrite would replace someone's run)
        raise AblationError(f"{out_dir} holds files ablation.py did not make; move it away or choose another --out")
    make_dir(out_dir, "--out")
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, DONE))  # (re)running: not finished until it says so again
    try:
        with open(os.path.join(out_dir, "train.out"), "a") as f, contextlib.redirect_stdout(f):
            result = train.main([*argv, f"--out_dir={out_dir}"])
    except SystemExit as e:  # (train.py's errors are cli.ErrorExits, whose code is their line: they pass on)
        if isinstance(e.code, int) and e.code > 128:  # train.py stopped at a signal, its checkpoint saved
            raise SystemExit(f"ablation.py: stopped by a signal in {out_dir}; the same command continues (finished "
                             f"arms are kept, an unfinished one runs again)") from None
        raise
    if result.get("val_loss") is None:  # e.g. resumed at or past its end: nothing trained, no final evaluation
        raise AblationError(f"train.py {' '.join(argv)} trained nothing in {out_dir}; it is not marked finished")
    write_json(os.path.join(out_dir, DONE), {"argv": argv, "val_loss": result["val_loss"]})
    return result


def finished(out_dir, argv):
    """Whether out_dir holds a finished run of exactly these flags (a run of other --train_args, another --arm
    definition, one killed before its final evaluation, or one that trained nothing runs again)."""
    try:
        with open(os.path.join(out_dir, DONE)) as f:
            done = json.load(f)
        return done["argv"] == argv and done["val_loss"] is not None
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_seed(seed, arms, args, base_argv, decay_at, end):
    """One seed: the shared stable phase (branch=decay), then every arm; {arm: metrics}."""
    root = os.path.join(args.out, f"seed{seed}")
    base = os.path.join(root, "base")
    stable = [*base_argv, f"--seed={seed}", f"--stop_after={decay_at}", "--overwrite"]
    rerun = args.branch == "decay" and not finished(base, stable)
    if rerun:
        train_run(stable, base)
    out = {}
    for arm in arms:
        d = os.path.join(root, arm)
        branch = [f"--resume={os.path.join(base, f'ckpt_{decay_at:07d}.pt')}"] if args.branch == "decay" else []
        argv = [*base_argv, f"--seed={seed}", *branch, "--overwrite", *arm_flags(arm, args)]
        if rerun or not finished(d, argv):  # (a new stable phase: every arm branches from it again)
            t0 = time.time()
            train_run(argv, d)
            print(f"seed {seed} {arm}: {time.time() - t0:.0f} s", file=sys.stderr)
        out[arm] = metrics(d, decay_at, args)
    return out


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


def pictures(results, summary, arms, control, args, decay_at):
    """decay.png via plot.py (seed 1: the shared stable phase and every arm), differences.png (paired, per seed)."""
    try:
        import plot
        import matplotlib
    except ImportError:
        return print("ablation.py: the pictures need matplotlib: pip install matplotlib")
    seed = sorted(results)[0]
    root = os.path.join(args.out, f"seed{seed}")
    runs = ([os.path.join(root, "base")] if args.branch == "decay" else []) + [os.path.join(root, a) for a in arms]
    labels = (["stable phase"] if args.branch == "decay" else []) + list(arms)
    plot.plot_runs(runs, os.path.join(args.out, "decay.png"), labels=labels,  # (branch=start: the whole runs)
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
    ax.set_title(f"paired differences over {len(results)} seeds (grey) and their mean with a 95% interval",
                 fontsize=8)
    fig.tight_layout()
    with atomic_write(os.path.join(args.out, "differences.png")) as f:  # a full disk leaves the old picture
        fig.savefig(f, format="png", dpi=120)
    print(f"wrote {args.out}/decay.png and differences.png (matplotlib {matplotlib.__version__})")


def get_args(argv=None):
    p = Parser(prog="ablation.py", description=__doc__.split("\n")[1])
    flag(p, "arms", default="adamw,muon,muon_rewarm", help=f"comma-separated, of {', '.join(ARMS)}; the first is "
         "the control")
    flag(p, "arm", action="append", default=[], metavar="NAME:FLAGS", help="define an arm, e.g. "
         "'muon_m9:--muon_at_decay --muon_momentum=0.9' (repeatable); then name it in --arms")
    flag(p, "seeds", default="1,2,3,4,5", help="train.py --seed of each stable phase, each once")
    flag(p, "branch", default="decay", choices=["decay", "start"], help="decay: the arms branch at the decay start "
         "from one stable phase (the paper's design); start: every arm trains from step 0 (e.g. FP8 parity)")
    flag(p, "train_args", default=CPU_TRAIN_ARGS, help="train.py flags shared by every run")
    flag(p, "val_tokens", type=int, default=1 << 20, range=Range(1), help="evaluate.py --val tokens per arm")
    flag(p, "device", default="auto")
    flag(p, "out", default="runs/ablation", help="where the runs, results.json and the pictures go")
    flag(p, "quick", action="store_true", help="a tiny version for a test: 2 seeds, 24 steps of a 1-layer model")
    args = p.parse_args(argv)
    if args.quick:  # (the flags given still apply)
        args.train_args = QUICK_TRAIN_ARGS if args.train_args == CPU_TRAIN_ARGS else args.train_args
        args.seeds = "1,2" if args.seeds == "1,2,3,4,5" else args.seeds
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
    args.arm_list = comma_list(p, "--arms", args.arms, str, "names")
    unknown = [a for a in args.arm_list if a not in args.arm_defs]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(args.arm_defs)} or define one with "
                "--arm=NAME:FLAGS")
    args.seed_list = comma_list(p, "--seeds", args.seeds, seed_number, "non-negative integers")
    return args


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # an arm's name: a directory name, never a path


def seed_number(s):
    if not s.isdigit():
        raise ValueError(s)
    return int(s)


def comma_list(p, name, text, item, kind):
    """The values of a comma-separated flag (item parses one), each once: a seed given twice would count one result
    as two, an arm given twice would be compared with itself. One line for a bad, repeated or missing value."""
    try:
        values = [item(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{name}={text}: expected comma-separated {kind}")
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if not values or twice:
        p.error(f"{name}={text}: " + (f"{twice[0]} is given twice; name each once" if twice else "name at least one"))
    return values


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
    for arm in args.arm_list:  # each arm's flags too, before hours of training reach it
        check_arm(arm, args, base_argv, decay_at if args.branch == "decay" else 0)
    make_dir(args.out, "--out")
    with FileLock(os.path.join(args.out, ".lock"), "ablation.py run"):  # a second ablation into --out: one line
        for name, (kind, is_ours) in OUTPUTS.items():  # it replaces its own outputs, nothing else
            check_output(os.path.join(args.out, name), "--out", kind, is_ours, name)
        return run_arms(args, base_argv, decay_at, end)


def run_arms(args, base_argv, decay_at, end):
    t0 = time.time()
    print(f"ablation: arms {', '.join(args.arm_list)} (control {args.arm_list[0]}), seeds {args.seeds}, branch at "
          f"{'the decay start, step ' + str(decay_at) if args.branch == 'decay' else 'step 0'} of {end}; "
          f"runs in {args.out}", flush=True)
    results = {}
    for seed in args.seed_list:
        results[seed] = run_seed(seed, args.arm_list, args, base_argv, decay_at, end)
        print(f"seed {seed}: " + ", ".join(f"{a} {m['val_loss']:.4f}" for a, m in results[seed].items()), flush=True)
    control = args.arm_list[0]
    summary = summarize(results, args.arm_list, control)
    print_table(results, summary, args.arm_list, control)
    write_json(os.path.join(args.out, "results.json"), dict(
        arms={a: args.arm_defs[a] for a in args.arm_list}, control=control, branch=args.branch, decay_start=decay_at,
        train_args=args.train_args, seeds=args.seed_list, results={str(k): v for k, v in results.items()},
        summary=summary, seconds=round(time.time() - t0)), indent=1)
    pictures(results, summary, args.arm_list, control, args, decay_at)
    print(f"wrote {args.out}/results.json ({time.time() - t0:.0f} s)")
    return results, summary


if __name__ == "__main__":
    main()
