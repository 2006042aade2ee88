#!/usr/bin/env bash
# Table 1: the four LIBERO suites x {baseline SFT, CRaFT} x seeds; each run is trained, then evaluated in LIBERO.
#
#   bash run_table1_experiments.sh                 # full grid (GPU cluster)
#   DRY_RUN=1 bash run_table1_experiments.sh       # print the exact commands
#   SMOKE=1 SMOKE_DATA_ROOT=... SMOKE_VLM_PATH=... bash run_table1_experiments.sh   # tiny end-to-end check
#
# Environment (defaults in brackets; all listed in docs/EXPERIMENTS_AND_TRAINING.md): NUM_GPUS [1], DATA_ROOT,
# VLM_PATH, OUTPUT_ROOT, WANDB_PROJECT [vla-craft-training], SUITES [all four], SEEDS [7 42 123],
# METHODS [baseline craft], BATCH_SIZE [8], LEARNING_RATE [5e-4], EPOCHS [20], MAX_STEPS_<SUITE>.
source "$(dirname "${BASH_SOURCE[0]}")/../common_utils/runner.sh"

cx_init table1
methods="${METHODS:-baseline craft}"
for suite in $CX_SUITES; do
    steps="$(cx_max_steps "$suite")"
    cx_note "suite $suite: $steps steps"
    for seed in $CX_SEEDS; do
        for method in $methods; do
            cx_method_flags "$method"
            cx_train_and_eval "t1-$suite-$method-s$seed" "$suite" "$seed" "$steps" "$method" "${CX_METHOD_FLAGS[@]}"
        done
    done
done
cx_finish
