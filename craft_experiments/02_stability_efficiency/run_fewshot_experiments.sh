#!/usr/bin/env bash
# Few-shot: SHOTS demonstrations per task (5 and 10), baseline SFT vs CRaFT, every suite and seed; train + evaluate.
# A k-shot run trains for the same number of epochs as a full-data run over its k * 10 episodes (see cx_max_steps).
#
#   bash run_fewshot_experiments.sh | DRY_RUN=1 bash run_fewshot_experiments.sh | SMOKE=1 ... bash run_fewshot_experiments.sh
#
# Environment: as run_table1_experiments.sh, plus SHOTS [5 10] (SMOKE: SMOKE_SHOTS [1 2], the tiny dataset has few
# episodes per task).
source "$(dirname "${BASH_SOURCE[0]}")/../common_utils/runner.sh"

cx_init fewshot
methods="${METHODS:-baseline craft}"
if ((CX_SMOKE)); then shots_list="${SMOKE_SHOTS:-1 2}"; else shots_list="${SHOTS:-5 10}"; fi
for shots in $shots_list; do cx_require_int "SHOTS entry" "$shots" 1; done
for suite in $CX_SUITES; do
    for shots in $shots_list; do
        steps="$(cx_max_steps "$suite" "$shots")"
        cx_note "suite $suite, $shots demos per task: $steps steps"
        for seed in $CX_SEEDS; do
            for method in $methods; do
                cx_method_flags "$method"
                cx_train_and_eval "fs-$suite-${shots}shot-$method-s$seed" "$suite" "$seed" "$steps" \
                    "${shots}shot-$method" --num_demos_per_task "$shots" "${CX_METHOD_FLAGS[@]}"
            done
        done
    done
done
cx_finish
