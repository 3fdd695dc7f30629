"""
mup_sweep.py: does the learning rate transfer across width? The evidence for muP.

Trains proxies at several widths over a grid of learning rates, once with muP and once with the standard
parameterization (--mup=0 in train.py), and prints the final validation loss of each. Under muP the best
learning rate should stay put as the model widens; under SP it should move (usually down).

    python mup_sweep.py                                        # CPU: widths 64-256, ~25 min on 2 cores
    python mup_sweep.py --widths=256,512,1024,1536 --train_args="--preset=nano --data_dir=data/X --max_iters=2000"

Any train.py flag can be passed through --train_args; the width flags (n_embd, n_head, n_kv_head, mlp_hidden),
--lr and --mup are set per run.
"""

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import tempfile

import train


def run(width, lr, mup, train_args, head_dim):
    heads = max(1, width // head_dim)
    argv = shlex.split(train_args) + [
        f"--n_embd={width}", f"--n_head={heads}", f"--n_kv_head={heads}", f"--mlp_hidden={int(2.5 * width)}",
        f"--lr={lr}", f"--mup={int(mup)}", "--eval_interval=0", "--ckpt_interval=0", "--sample_len=0"]
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        try:
            val = train.main(argv + [f"--out_dir={out}", "--keep_ckpts=1"])["val_loss"]
        except SystemExit as e:  # a diverged run (NaN loss) is a data point, not a crash
            if "stopped without saving" not in str(e):
                raise
            val = float("nan")
    return val


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--widths", default="64,128,256")
    p.add_argument("--lrs", default="0.0025,0.005,0.01,0.02,0.04,0.08", help="peak eta values")
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--train_args", default="--n_layer=2 --block_size=128 --batch_size=16 --total_batch_size=2048 "
                   "--max_iters=150 --warmup_iters=15 --decay_iters=30 --eval_iters=20")
    p.add_argument("--out", default="mup_sweep.json", help="where to write the results")
    args = p.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]

    results = {}
    for mup in (True, False):
        name = "muP" if mup else "SP"
        results[name] = {w: {lr: run(w, lr, mup, args.train_args, args.head_dim) for lr in lrs} for w in widths}
        print(f"\n{name}: final val loss (* = best LR for that width)")
        print(f"{'width':>6} " + " ".join(f"{lr:>9g}" for lr in lrs))
        for w in widths:
            row = results[name][w]
            best = min(lrs, key=lambda lr: row[lr] if math.isfinite(row[lr]) else float("inf"))
            print(f"{w:>6} " + " ".join(f"{row[lr]:>8.4f}{'*' if lr == best else ' '}" for lr in lrs), flush=True)
    with open(args.out, "w") as f:
        json.dump({"train_args": args.train_args, "results": results}, f, indent=1)
    print(f"\nwrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
