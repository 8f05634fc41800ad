#!/usr/bin/env bash
# Full-size Fashion-MNIST pipeline on one accelerator, stage by stage, each stage timed:
#   A. meta-train the CNN rater (configs/fashion_mnist.py: 50k train images, 20% confusion label
#      noise, K=8, B=128, T=2) for STEPS outer steps, once per seed in SEEDS;
#   B. fresh CNNs (config.train: 3 seeds, 5 epochs, batch 128) on all 50k images with uniform
#      weights, the first rater's online weights, and its online batch filter;
#   C. TracIn self-influence, Mimic and data value embedding of all 50k images (launch.valuate).
# Usage: OUT=folder [STEPS=2000] [SEEDS="0"] [STAGES="A B C"] bash bench/gpu_fashion_mnist.sh
# Logs, reports and stages.txt (wall time per stage) go under OUT. The H200 figures in
# bench/results/fashion_mnist_h200.json came from `STEPS=2000 SEEDS=0 STAGES="A B C"` (tracin
# only in C) and `STEPS=6000 SEEDS="0 1 2" STAGES="A C"` (mimic, dvemb in C).
set -uo pipefail
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
STEPS=${STEPS:-2000}
SEEDS=${SEEDS:-0}
STAGES=${STAGES:-A B C}
C=configs/fashion_mnist.py
stage() {  # name, command...: runs it, logs to OUT/name.log, records the wall time
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall_s=$(( $(date +%s) - t0 ))" | tee -a "$OUT/stages.txt"
}
first=${SEEDS%% *}
if [[ $STAGES == *A* ]]; then
  for s in $SEEDS; do
    stage rater$s python -m launch.train_rater --config=$C --workdir=$OUT/rater$s \
      --config.seed=$s --config.data.noise_seed=$s --config.outer.steps=$STEPS \
      --config.log_every=250 --config.checkpoint_every=$STEPS
  done
fi
if [[ $STAGES == *B* ]]; then
  for policy in uniform datarater datarater_batch_filter; do
    rater=--rater=$OUT/rater$first  # read only by the datarater policies; refused by uniform
    [[ $policy == datarater* ]] || rater=
    stage train_$policy python -m launch.train --config=$C --policy=$policy \
      $rater --workdir=$OUT/train_$policy
  done
fi
if [[ $STAGES == *C* ]]; then
  for method in tracin mimic dvemb; do
    stage $method python -m launch.valuate --config=$C --method=$method --workdir=$OUT/$method
  done
fi
