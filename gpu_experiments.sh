#!/usr/bin/env bash
# The recipe's claims at GPU proxy scale, in one command for one lent H100/H200 (estimated 8-10 minutes; the
# first session that runs it records the real time in docs/experiments.md). What it runs:
#   1. data: the embedded corpus plus the docstrings of every installed package, byte tokens, no network
#      (prepare_data.py --source embedded,packages=1: tens of MB on a machine with torch, jax and friends;
#      each run below reads ~18M tokens of it, under one epoch)
#   2. the decay ablation: the nano proxy, 2 seeds, AdamW vs the switch to Muon vs the switch with an LR
#      re-warmup, each decay branched from its seed's decay-start checkpoint (ablation.py)
#   3. FP8 parity: the same nano run in bf16, with --fp8 (delayed scaling) and with current scaling, from step 0
#      (ablation.py --branch=start): final val loss within 1% of bf16 is the target
# Results: $OUT_DIR/ablation and $OUT_DIR/fp8 (results.json, decay.png, differences.png). On the device machine:
#   OUT_DIR=$OUT/gpu bash gpu_experiments.sh
# The speed figures are bench.py --report's, a separate ~8-minute command: one per session.
set -euo pipefail
cd "$(dirname "$0")"
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
python ablation.py --train_args="$NANO" --arms=adamw,muon,muon_rewarm --seeds=1,2 --out="$OUT_DIR/ablation"
python ablation.py --branch=start --train_args="$NANO" --arms=hp,fp8,fp8_current --seeds=1 --out="$OUT_DIR/fp8"
echo "gpu_experiments.sh: done in $(( $(date +%s) - start )) s; results in $OUT_DIR"
