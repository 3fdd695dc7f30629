#!/usr/bin/env bash
# The recipe's claims at GPU proxy scale, one lent H100/H200, in two parts of an estimated 8-10 minutes each (a
# guess: the first session that runs a part records its real time in docs/experiments.md). Data first: the
# embedded corpus plus the docstrings of every installed package, byte tokens, no network (prepare_data.py
# --source embedded,packages=1: tens of MB on a machine with torch, jax and friends; each run below reads under
# one epoch of it).
#   recipe (the default):
#     the decay ablation: the nano proxy, 2 seeds, AdamW vs the switch to Muon vs the switch with an LR re-warmup,
#     each decay branched from its seed's decay-start checkpoint (ablation.py); FP8 parity: the same nano run in
#     bf16, with --fp8 (delayed scaling) and with current scaling, from step 0 (ablation.py --branch=start): final
#     val loss within 1% of bf16 is the target
#   widths (issue 21, beyond the paper): at the nano proxy's depth, widths 256 (the proxy), 512 and 1024:
#     Muon's decay LR per width rule, the recipe's (moonlight) and the width-invariant one (unit_rms_norm), one
#     AdamW stable phase per width (mup_sweep.py --optimizer=muon --muon_phase=decay); the switch's gain against
#     width, 2 seeds (ablation.py --widths)
# Results under $OUT_DIR (results.json / the sweep's JSON, and their pictures). On the device machine:
#   OUT_DIR=$OUT/gpu bash gpu_experiments.sh [recipe|widths]
# The speed figures are bench.py --report's, a separate ~8-minute command: one per session.
set -euo pipefail
cd "$(dirname "$0")"
PART=${1:-recipe}
case "$PART" in
recipe|widths) ;;
*) echo "gpu_experiments.sh: unknown part $PART; give recipe or widths" >&2; exit 2;;
esac
OUT_DIR=${OUT_DIR:-runs/gpu}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_experiments.sh: needs a CUDA GPU; on a CPU run ablation.py and mup_sweep.py (docs/experiments.md)" >&2
    exit 1
fi
start=$(date +%s)
python prepare_data.py --source embedded,packages=1 --out_dir=data/packages-byte --workers="$(nproc)"
# 300 steps of 16 x 3712 tokens: warmup 30, stable to 240, decay 60 (20%, as the cpu preset's 80 of 360)
NANO="--preset=nano --data_dir=data/packages-byte --max_iters=300 --warmup_iters=30 --decay_iters=60 \
--batch_size=16 --total_batch_size=59392 --eval_interval=60 --eval_iters=10 --log_interval=20 --ckpt_interval=0"
case "$PART" in
recipe)
    python ablation.py --train_args="$NANO" --arms=adamw,muon,muon_rewarm --seeds=1,2 --out="$OUT_DIR/ablation"
    python ablation.py --branch=start --train_args="$NANO" --arms=hp,fp8,fp8_current --seeds=1 --out="$OUT_DIR/fp8";;
widths)
    # shorter runs (200 steps, decay 40) without torch.compile: dozens of runs, each would compile anew
    SHORT="--preset=nano --data_dir=data/packages-byte --max_iters=200 --warmup_iters=20 --decay_iters=40 \
--batch_size=16 --total_batch_size=59392 --eval_iters=10 --log_interval=50 --compile=0"
    python mup_sweep.py --optimizer=muon --muon_phase=decay --muon_scales=moonlight,unit_rms_norm \
        --widths=256,512,1024 --head_dim=64 --seeds=1 --jobs=4 --train_args="$SHORT" --out="$OUT_DIR/muon_decay.json"
    python ablation.py --widths=256,512,1024 --arms=adamw,muon --seeds=1,2 --train_args="$SHORT" \
        --out="$OUT_DIR/widths";;
esac
echo "gpu_experiments.sh: done in $(( $(date +%s) - start )) s; results in $OUT_DIR"
