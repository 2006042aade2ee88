#!/usr/bin/env bash
# Few-shot: SHOTS demonstrations per task (5 and 10), baseline SFT vs CRaFT vs knowledge insulation, every suite and
# seed; train + evaluate.
# A k-shot run gets the same number of epochs as the suite's full-data recipe: steps x min(k * 10, episodes) / episodes.
#
#   bash run_fewshot_experiments.sh | DRY_RUN=1 bash run_fewshot_experiments.sh | SMOKE=1 ... bash run_fewshot_experiments.sh
#
# Environment: as run_table1_experiments.sh, plus SHOTS [5 10] (SMOKE: SMOKE_SHOTS [1; SMOKE_FULL=1: 1 2], the tiny
# dataset has few episodes per task).
# The grid itself lives in craft_experiments/common_utils/grid.py (docs/EXPERIMENTS_AND_TRAINING.md).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../../.venv/bin/python"
[[ -x "$python" ]] || python="$(command -v python3 || command -v python)"
exec "$python" "$here/../common_utils/grid.py" fewshot
