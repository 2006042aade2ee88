#!/usr/bin/env bash
# Table 1: the four LIBERO suites x {baseline SFT, CRaFT, knowledge insulation} x seeds; each run is trained, then evaluated in LIBERO.
#
#   bash run_table1_experiments.sh                 # full grid (GPU cluster)
#   DRY_RUN=1 bash run_table1_experiments.sh       # print the exact commands
#   SMOKE=1 SMOKE_DATA_ROOT=... SMOKE_VLM_PATH=... bash run_table1_experiments.sh   # tiny end-to-end check (minutes;
#                                                                                  SMOKE_FULL=1: the whole grid)
#
# Recipe: upstream VLA-Adapter's LIBERO recipe (craft_experiments/recipes/<suite>.json; the banner prints it and any
# departure). Environment (defaults in brackets; all listed in docs/EXPERIMENTS_AND_TRAINING.md): NUM_GPUS [1],
# BATCH_SIZE [16; accumulation keeps the global batch at 64], DATA_ROOT, VLM_PATH, OUTPUT_ROOT, WANDB_PROJECT
# [vla-craft-training], WANDB_MODE [offline], SUITES [all four], SEEDS [7 42 123], METHODS [baseline craft ki];
# overrides: LEARNING_RATE, LORA_RANK, EPOCHS, MAX_STEPS, MAX_STEPS_<SUITE>, LR_SCHEDULE=project.
# The grid itself lives in craft_experiments/common_utils/grid.py (docs/EXPERIMENTS_AND_TRAINING.md).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../../.venv/bin/python"
[[ -x "$python" ]] || python="$(command -v python3 || command -v python)"
exec "$python" "$here/../common_utils/grid.py" table1
