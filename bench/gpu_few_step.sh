#!/usr/bin/env bash
# The GPU rows of the few-step objectives (docs/benchmarks.md, issues 17 and 34), as one run on one CUDA GPU: the cost
# of a training step of MeanFlow (its JVP, and the central difference in its place), AlphaFlow (mid-curriculum) and a
# shortcut model against flow matching, DiT-B/2 on 256 px latents (batch 256) and the CIFAR UNet (batch 128), bf16
# with and without torch.compile. About 7 minutes.
#
#     bash bench/gpu_few_step.sh [OUT_DIR]      # default bench/out/gpu_few_step; everything printed is in OUT/log.txt
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/gpu_few_step}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PY=${PYTHON:-python}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } 2>&1 | tee -a "$LOG"
for model in "DiT-B/2 --batch 256" "unet-cifar10 --batch 128"; do
    for compile in "" "--compile"; do
        echo "\$ bench/meanflow_step.py --models $model $compile" | tee -a "$LOG"
        timeout 300 $PY bench/meanflow_step.py --device cuda --models $model --mixed-precision bf16 $compile \
            --objectives cfm meanflow meanflow_central alphaflow shortcut \
            --steps 10 --warmup 3 --repeats 2 2>&1 | tee -a "$LOG"
    done
done
echo "done; figures in $LOG" | tee -a "$LOG"
