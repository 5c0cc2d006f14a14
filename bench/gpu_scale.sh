#!/usr/bin/env bash
# The GPU checks of scale (docs/benchmarks.md, "Scale"), as one run on one CUDA GPU: about 10 minutes on an H100.
#
#     bash bench/gpu_scale.sh [OUT_DIR]        # default bench/out/gpu_scale; everything printed is also in OUT/log.txt
#
# 1. Throughput and MFU, bare loop beside train.py: DiT-B/2 on 256 px latents (4×32×32, batch 256) and unet-cifar10
#    (batch 128), each at TF32, bf16, and bf16 + torch.compile.
# 2. DiT-XL/2 on 256 px latents: the largest batch that fits, with and without activation checkpointing (bf16).
# 3. train.py under FSDP2 (configs/accelerate/fsdp.yaml, one process: the code path of several) with DiT-XL/2, bf16
#    and activation checkpointing: 20 steps, resumed to 30, the weights sampled by sample.py; then 10 steps without
#    activation checkpointing. metrics.jsonl has each one's samples/s and peak GPU memory (max_memory_gib).
# Each part has its own time limit, so that one failure leaves the others' figures.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/gpu_scale}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PY=${PYTHON:-python}
run() {  # run LIMIT_SECONDS COMMAND...: print the command and its output into the log
    local limit=$1
    shift
    echo "\$ $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "(exit ${PIPESTATUS[0]})" | tee -a "$LOG"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } 2>&1 | tee -a "$LOG"
$PY -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" | tee -a "$LOG"

T="bench/train_throughput.py --steps 20 --warmup 5 --repeats 1"
for model in "DiT-B/2 --shape 4 32 32 --batch 256" "unet-cifar10 --batch 128"; do
    run 150 $PY $T --models $model --mixed-precision no
    run 150 $PY $T --models $model --mixed-precision bf16
    run 240 $PY $T --models $model --mixed-precision bf16 --compile
done

run 120 $PY bench/train_throughput.py --models DiT-XL/2 --shape 4 32 32 --mixed-precision bf16 --find-batch
run 120 $PY bench/train_throughput.py --models DiT-XL/2 --shape 4 32 32 --mixed-precision bf16 --find-batch \
    --grad-checkpoint

DATA="$OUT/latents.npy"
$PY -c "import numpy as np; np.save('$DATA', np.random.default_rng(0).standard_normal((2048, 4, 32, 32), dtype=np.float32))"
ARGS=(-e "$OUT/fsdp_run" model.name=DiT-XL/2 data.name=fields "data.path=$DATA" train.batch_size=64
      train.grad_checkpoint=true train.checkpoint_every=10 train.log_every=10 train.preview_every=0
      train.preview_images=4 train.preview_steps=2 "train.trackers=[]" -mp bf16)
FSDP=($PY -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 --main_process_port 0)
rm -rf "$OUT/fsdp_run" "$OUT/fsdp_plain"
run 240 "${FSDP[@]}" train.py "${ARGS[@]}" train.steps=20
run 120 "${FSDP[@]}" train.py "${ARGS[@]}" train.steps=30
run 60 $PY sample.py --weights "$OUT/fsdp_run/checkpoints/step_0000030" --n-samples 16 --steps 8 \
    --save-dir "$OUT/fsdp_samples"
run 180 "${FSDP[@]}" train.py "${ARGS[@]}" -e "$OUT/fsdp_plain" train.grad_checkpoint=false train.steps=10
for run_dir in fsdp_run fsdp_plain; do  # samples/s and the peak GPU memory of each logged step
    echo "$run_dir" | tee -a "$LOG"
    cut -c1-200 "$OUT/$run_dir/metrics.jsonl" | tee -a "$LOG"
done
echo "done; figures in $LOG" | tee -a "$LOG"
