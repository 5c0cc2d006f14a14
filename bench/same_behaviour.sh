#!/bin/bash
# The behaviour check of a refactor (issue 32): run on two trees (e.g. a `git worktree` of the commit before, and
# this one), then compare the two output folders with bench/same_behaviour.py. Runs, on the CPU, in about 2 minutes:
# the default toy run to step 3000; sample.py on it (euler, heun on a cosine grid with a 64-bit seed, dopri5 at
# --bspp 33, euler_maruyama, reflow pairs); a 20-step MNIST UNet and 4-step samples of it (plain with --grid/--npz,
# and inpainting); evaluate.py rows of both runs (W2/MMD, pixel-feature FID) and an inpainting task row.
#
#     bash bench/same_behaviour.sh TREE OUT          # TREE: the repository root to run, OUT: a new folder
#     python bench/same_behaviour.py OUT_BEFORE OUT_AFTER
set -e
TREE=$(cd "$1" && pwd); OUT=$2; PY=${PY:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
MNIST=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/mnist
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); cd "$TREE"
$PY train.py -e $OUT/default train.trackers=[] > $OUT/train_default.log 2>&1
W=$OUT/default/checkpoints/step_0003000
$PY sample.py --weights $W --n-samples 300 --save-dir $OUT/s_toy --seed 7 > $OUT/s_toy.log 2>&1
$PY sample.py --weights $W --n-samples 300 --save-dir $OUT/s_toy_heun --solver heun --steps 7 --schedule cosine \
    --seed 123456789012 > /dev/null 2>&1
$PY sample.py --weights $W --n-samples 100 --save-dir $OUT/s_toy_dopri --solver dopri5 --bspp 33 > /dev/null 2>&1
$PY sample.py --weights $W --n-samples 100 --save-dir $OUT/s_toy_sde --solver euler_maruyama --steps 20 > /dev/null 2>&1
$PY sample.py --weights $W --n-samples 1500 --save-dir $OUT/pairs_toy --steps 5 --pairs > /dev/null 2>&1
$PY train.py -c configs/mnist_icfm_unet.yaml -e $OUT/mnist data.path=$MNIST data.split=test train.steps=20 \
    train.checkpoint_every=10 train.preview_every=10 train.log_every=5 train.trackers=[] > $OUT/train_mnist.log 2>&1
M=$OUT/mnist/checkpoints/step_0000020
$PY sample.py --weights $M --n-samples 40 --save-dir $OUT/s_mnist --steps 4 --seed 3 --grid 16 --npz > $OUT/s_mnist.log 2>&1
$PY sample.py --weights $M --n-samples 12 --save-dir $OUT/s_mnist_inpaint --task inpaint --steps 4 --grid 6 > /dev/null 2>&1
$PY evaluate.py -e $OUT/default --samplers euler:10,heun:4:cosine,dopri5 --n-samples 400 > $OUT/eval_toy.log 2>&1
$PY evaluate.py -e $OUT/mnist --samplers euler:4,midpoint:2 --n-samples 60 --features pixels --bspp 25 \
    > $OUT/eval_mnist.log 2>&1
$PY evaluate.py -e $OUT/mnist --checkpoints last --samplers euler:4 --n-samples 20 --features pixels --task inpaint \
    --method replace > $OUT/eval_task.log 2>&1
echo "done: $OUT"
