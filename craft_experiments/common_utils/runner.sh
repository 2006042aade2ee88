# shellcheck shell=bash
# Shared logic of the CRaFT experiment scripts (table 1, few-shot, ablations). Source it, do not execute it.
#
# A script calls `cx_init <experiment>` once, then `cx_train_and_eval` / `cx_build_cache` for every grid entry,
# then `cx_finish`. Everything configurable comes from environment variables (see docs/EXPERIMENTS_AND_TRAINING.md);
# `cx_init` resolves and validates them and prints the resolved values, so a log always says what was run.
#
# Modes:  DRY_RUN=1  print the exact commands ("[DRY_RUN][train] ...", "[DRY_RUN][eval] ...", "[DRY_RUN][cache] ...")
#                    and run nothing;
#         SMOKE=1    the same grid on the tiny preset, the tiny dataset (SMOKE_DATA_ROOT) and a few steps, with a
#                    one-episode evaluation (SMOKE_SKIP_EVAL=1 skips evaluation, loudly).
# Resume: a training is finished when `{run_root}/{run_id}--{max_steps}_chkpt/COMPLETE` exists, an evaluation when
# `{run_root}/{run_id}/eval/summary.json` exists; both are skipped. An interrupted training resumes from its newest
# complete checkpoint (AUTO_RESUME=1), an interrupted evaluation from its episodes.jsonl. The first failing command
# stops the script and is printed.

set -euo pipefail

# LIBERO facts (docs: VLA_ADAPTER_FACTS §5): episodes and steps per suite. A frame needs 7 future actions, so the
# number of training frames is steps - 7 * episodes. Every LIBERO suite has 10 tasks.
declare -gA CX_SUITE_EPISODES=([libero_spatial]=432 [libero_object]=454 [libero_goal]=428 [libero_10]=379)
declare -gA CX_SUITE_STEPS=([libero_spatial]=52970 [libero_object]=66984 [libero_goal]=52042 [libero_10]=101469)
CX_TASKS_PER_SUITE=10
CX_CHUNK_TAIL=7
CX_ALL_SUITES="libero_spatial libero_object libero_goal libero_10"

CX_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CX_REPO_ROOT="$(cd "$CX_LIB_DIR/../.." && pwd)"
CX_INVOKE_DIR="$(pwd)"

cx_die() {
    echo "ERROR: $*" >&2
    exit 1
}

cx_warn_loud() {
    {
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        echo "!!! $*"
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    } >&2
}

# Absolute path of a user-given path, relative to the directory the script was started from (the commands run
# from the repository root, so relative paths would otherwise change meaning).
cx_abs() {
    case "$1" in
        /*) printf '%s' "$1" ;;
        *) printf '%s' "$CX_INVOKE_DIR/$1" ;;
    esac
}

cx_require_int() {  # name value min
    [[ "$2" =~ ^[0-9]+$ ]] || cx_die "$1 must be a non-negative integer, got '$2'"
    ((10#$2 >= $3)) || cx_die "$1 must be >= $3, got '$2'"
}

cx_require_bool() {  # name value
    [[ "$2" == "True" || "$2" == "False" ]] || cx_die "$1 must be True or False (finetune.py's spelling), got '$2'"
}

cx_require_number() {  # name value
    [[ "$2" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || cx_die "$1 must be a non-negative number, got '$2'"
}

cx_is_on() { [[ "${1:-0}" == "1" || "${1:-}" == "true" || "${1:-}" == "True" ]]; }

# ------------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------------
cx_init() {
    CX_EXPERIMENT="$1"
    CX_DRY_RUN=0
    CX_SMOKE=0
    cx_is_on "${DRY_RUN:-0}" && CX_DRY_RUN=1
    cx_is_on "${SMOKE:-0}" && CX_SMOKE=1
    CX_SKIP_EVAL=0
    CX_N_TRAIN=0 CX_N_EVAL=0 CX_N_CACHE=0 CX_N_SKIP=0 CX_N_GUARDED=0

    CX_PYTHON="${PYTHON:-}"
    if [[ -z "$CX_PYTHON" ]]; then
        if [[ -x "$CX_REPO_ROOT/.venv/bin/python" ]]; then CX_PYTHON="$CX_REPO_ROOT/.venv/bin/python"; else CX_PYTHON=python; fi
    fi
    CX_TORCHRUN="${TORCHRUN:-}"
    if [[ -z "$CX_TORCHRUN" ]]; then
        if [[ -x "$CX_REPO_ROOT/.venv/bin/torchrun" ]]; then CX_TORCHRUN="$CX_REPO_ROOT/.venv/bin/torchrun"; else CX_TORCHRUN=torchrun; fi
    fi

    # Recipe (VLA_ADAPTER_FACTS §4): AdamW lr 5e-4 (upstream scripts; the paper states 1e-4), batch 8 per GPU,
    # LoRA rank 64, augmentation, proprio, 2 images, Pro head, 10% warm-up, x0.1 decay late in training.
    CX_SEEDS="${SEEDS:-7 42 123}"
    CX_SUITES="${SUITES:-$CX_ALL_SUITES}"
    CX_BATCH_SIZE="${BATCH_SIZE:-8}"
    CX_GRAD_ACCUM="${GRAD_ACCUMULATION_STEPS:-1}"
    CX_LR="${LEARNING_RATE:-5e-4}"
    CX_LORA_RANK="${LORA_RANK:-64}"
    CX_EPOCHS="${EPOCHS:-20}"
    CX_SAVE_FREQ="${SAVE_FREQ:-5000}"
    CX_WARMUP_PERCENT="${WARMUP_PERCENT:-10}"
    CX_DECAY_PERCENT="${DECAY_PERCENT:-80}"
    CX_SAVE_LATEST_ONLY="${SAVE_LATEST_CHECKPOINT_ONLY:-True}"
    CX_IMAGE_AUG="${IMAGE_AUG:-True}"
    CX_NUM_GPUS="${NUM_GPUS:-1}"
    CX_MODEL_PRESET="real"
    CX_NUM_WORKERS="${NUM_WORKERS:-}"
    CX_WANDB_PROJECT="${WANDB_PROJECT:-vla-craft-training}"
    CX_WANDB_ENTITY="${WANDB_ENTITY:-}"
    CX_WANDB_MODE="${WANDB_MODE:-online}"
    CX_AUTO_RESUME="${AUTO_RESUME:-1}"
    # CRaFT defaults (CRAFT_METHOD.md): epsilon 0.1, eta_lambda 0.01; layers are left to finetune.py (m = L // 2,
    # M = L) unless a sweep sets them, so the same commands serve the real and the tiny preset.
    CX_EPSILON="${CRAFT_RETENTION_BUDGET:-0.1}"
    CX_DUAL_LR="${CRAFT_DUAL_LR:-0.01}"
    # Evaluation protocol (VLA_ADAPTER_FACTS §6): 50 trials per task, seed 7.
    CX_EVAL_TRIALS="${EVAL_TRIALS_PER_TASK:-50}"
    CX_EVAL_SEED="${EVAL_SEED:-7}"
    CX_EVAL_EXTRA=()

    local data_root="${DATA_ROOT:-$CX_REPO_ROOT/datasets/rlds}"
    local vlm_path="${VLM_PATH:-$CX_REPO_ROOT/pretrained_models/prism-qwen25-extra-dinosiglip-224px-0_5b}"
    local output_root="${OUTPUT_ROOT:-$CX_REPO_ROOT/runs/craft_experiments}"

    if ((CX_SMOKE)); then
        # Tiny preset, a few steps, one short episode: proves the grid runs end to end, says nothing about results.
        CX_MODEL_PRESET="tiny"
        # SMOKE_VLM_PATH is optional: without it finetune.py builds the tiny model from scratch.
        data_root="${SMOKE_DATA_ROOT:-}"
        vlm_path="${SMOKE_VLM_PATH:-}"
        if [[ -z "$data_root" ]]; then
            ((CX_DRY_RUN)) || cx_die "SMOKE=1 needs SMOKE_DATA_ROOT (a folder holding the tiny <suite>_no_noops RLDS" \
                "datasets); SMOKE_VLM_PATH (tiny VLM) is optional"
            data_root="\$SMOKE_DATA_ROOT"
        fi
        output_root="${OUTPUT_ROOT:-$CX_REPO_ROOT/runs/craft_experiments_smoke}"
        CX_SMOKE_MAX_STEPS="${SMOKE_MAX_STEPS:-4}"
        CX_SAVE_FREQ="$CX_SMOKE_MAX_STEPS"
        CX_BATCH_SIZE="${SMOKE_BATCH_SIZE:-2}"
        CX_GRAD_ACCUM=1
        CX_LORA_RANK="${SMOKE_LORA_RANK:-4}"
        CX_NUM_GPUS="${SMOKE_NUM_GPUS:-1}"
        CX_NUM_WORKERS=0
        CX_WANDB_MODE="${SMOKE_WANDB_MODE:-disabled}"
        CX_EVAL_TRIALS=1
        CX_EVAL_EXTRA=(--task_ids "[0]" --max_steps_override "${SMOKE_EVAL_MAX_STEPS:-20}")
        cx_is_on "${SMOKE_SKIP_EVAL:-0}" && CX_SKIP_EVAL=1
    elif cx_is_on "${SMOKE_SKIP_EVAL:-0}"; then
        cx_die "SMOKE_SKIP_EVAL=1 is only allowed together with SMOKE=1 (a real grid must be evaluated)"
    fi
    [[ "$data_root" == \$* ]] || data_root="$(cx_abs "$data_root")"
    [[ -z "$vlm_path" ]] || vlm_path="$(cx_abs "$vlm_path")"
    CX_DATA_ROOT="$data_root"
    CX_VLM_PATH="$vlm_path"
    local config_file_path="${CONFIG_FILE_PATH:-}"
    ((CX_SMOKE)) && config_file_path="${SMOKE_CONFIG_FILE_PATH:-}"
    CX_CONFIG_FILE_PATH=""
    [[ -n "$config_file_path" ]] && CX_CONFIG_FILE_PATH="$(cx_abs "$config_file_path")"
    CX_OUTPUT_ROOT="$(cx_abs "$output_root")"
    CX_RUN_ROOT="$CX_OUTPUT_ROOT/$CX_EXPERIMENT"
    CX_CACHE_ROOT="$CX_OUTPUT_ROOT/craft_cache"

    cx_require_int NUM_GPUS "$CX_NUM_GPUS" 1
    cx_require_int BATCH_SIZE "$CX_BATCH_SIZE" 1
    cx_require_int GRAD_ACCUMULATION_STEPS "$CX_GRAD_ACCUM" 1
    cx_require_int LORA_RANK "$CX_LORA_RANK" 1
    cx_require_int EPOCHS "$CX_EPOCHS" 1
    cx_require_int SAVE_FREQ "$CX_SAVE_FREQ" 1
    cx_require_int WARMUP_PERCENT "$CX_WARMUP_PERCENT" 0
    cx_require_int DECAY_PERCENT "$CX_DECAY_PERCENT" 1
    cx_require_int EVAL_TRIALS_PER_TASK "$CX_EVAL_TRIALS" 1
    cx_require_number LEARNING_RATE "$CX_LR"
    cx_require_number CRAFT_RETENTION_BUDGET "$CX_EPSILON"
    cx_require_number CRAFT_DUAL_LR "$CX_DUAL_LR"
    cx_require_bool SAVE_LATEST_CHECKPOINT_ONLY "$CX_SAVE_LATEST_ONLY"
    cx_require_bool IMAGE_AUG "$CX_IMAGE_AUG"
    ((CX_SMOKE)) && cx_require_int SMOKE_MAX_STEPS "$CX_SMOKE_MAX_STEPS" 1
    case "$CX_WANDB_MODE" in online | offline | disabled) ;; *) cx_die "WANDB_MODE must be online, offline or disabled, got '$CX_WANDB_MODE'" ;; esac
    [[ -n "${CX_SEEDS// /}" ]] || cx_die "SEEDS is empty"
    local seed suite
    for seed in $CX_SEEDS; do cx_require_int "SEEDS entry" "$seed" 0; done
    [[ -n "${CX_SUITES// /}" ]] || cx_die "SUITES is empty"
    for suite in $CX_SUITES; do
        [[ -n "${CX_SUITE_EPISODES[$suite]:-}" ]] || cx_die "SUITES: unknown suite '$suite' (known: $CX_ALL_SUITES)"
    done

    cd "$CX_REPO_ROOT"
    echo "# ==== CRaFT experiments: $CX_EXPERIMENT ===="
    echo "# mode: $( ((CX_DRY_RUN)) && echo 'DRY_RUN ' )$( ((CX_SMOKE)) && echo 'SMOKE (tiny preset)' || echo 'full')"
    echo "# working directory: $CX_REPO_ROOT"
    echo "# run root: $CX_RUN_ROOT"
    echo "# data: $CX_DATA_ROOT | VLM: ${CX_VLM_PATH:-<none: tiny model from scratch>} | preset: $CX_MODEL_PRESET | GPUs: $CX_NUM_GPUS"
    echo "# suites: $CX_SUITES | seeds: $CX_SEEDS"
    echo "# recipe: batch $CX_BATCH_SIZE/GPU x accum $CX_GRAD_ACCUM, lr $CX_LR, LoRA rank $CX_LORA_RANK," \
        "epochs $CX_EPOCHS, save every $CX_SAVE_FREQ, warm-up $CX_WARMUP_PERCENT%, decay at $CX_DECAY_PERCENT%"
    echo "# wandb: project $CX_WANDB_PROJECT entity ${CX_WANDB_ENTITY:-<default>} mode $CX_WANDB_MODE"
    if ((CX_SKIP_EVAL)); then
        cx_warn_loud "SMOKE_SKIP_EVAL=1: EVALUATION IS SKIPPED for every run (no LIBERO simulator). Training only."
    fi
}

# Steps for one run: EPOCHS passes over the training frames (scaled to `shots` demos per task when given) at the
# global batch, rounded up to a multiple of SAVE_FREQ (finetune.py also saves the final step). Overrides:
# MAX_STEPS_<SUITE> (e.g. MAX_STEPS_LIBERO_SPATIAL) for full-data runs, MAX_STEPS for every run.
cx_max_steps() {  # suite [shots]
    local suite="$1" shots="${2:-}"
    if ((CX_SMOKE)); then
        echo "$CX_SMOKE_MAX_STEPS"
        return
    fi
    local override_var="MAX_STEPS_${suite^^}"
    local steps=""
    if [[ -n "${MAX_STEPS:-}" ]]; then
        steps="$MAX_STEPS"
    elif [[ -z "$shots" && -n "${!override_var:-}" ]]; then
        steps="${!override_var}"
    fi
    if [[ -n "$steps" ]]; then
        cx_require_int "MAX_STEPS" "$steps" 1
        echo "$steps"
        return
    fi
    local episodes=${CX_SUITE_EPISODES[$suite]}
    local frames=$((CX_SUITE_STEPS[$suite] - CX_CHUNK_TAIL * episodes))
    if [[ -n "$shots" ]]; then
        local kept=$((shots * CX_TASKS_PER_SUITE))
        ((kept < episodes)) && frames=$((frames * kept / episodes))
    fi
    local global_batch=$((CX_BATCH_SIZE * CX_GRAD_ACCUM * CX_NUM_GPUS))
    local raw=$(((CX_EPOCHS * frames + global_batch - 1) / global_batch))
    echo $(((raw + CX_SAVE_FREQ - 1) / CX_SAVE_FREQ * CX_SAVE_FREQ))
}

# ------------------------------------------------------------------------------------------------------------------
# Command construction
# ------------------------------------------------------------------------------------------------------------------

# CX_CMD <- the launcher for finetune.py (torchrun for several GPUs).
cx_finetune_launcher() {
    if ((CX_NUM_GPUS > 1)); then
        CX_CMD=("$CX_TORCHRUN" --standalone --nnodes 1 --nproc_per_node "$CX_NUM_GPUS" vla-scripts/finetune.py)
    else
        CX_CMD=("$CX_PYTHON" vla-scripts/finetune.py)
    fi
}

# Method flags. `baseline` -> plain SFT; `craft [key=value ...]` -> CRaFT with overrides of the defaults below
# (keys: budget dual_lr projection dual fixed_lambda raw_layer aq_layer anchor_type anchor_source cache_dir).
# CX_METHOD_FLAGS <- the flags.
cx_method_flags() {
    local method="$1"
    shift
    case "$method" in
        baseline)
            CX_METHOD_FLAGS=(--use_craft False)
            [[ $# -eq 0 ]] || cx_die "baseline takes no CRaFT overrides, got: $*"
            ;;
        craft)
            local -A o=([budget]="$CX_EPSILON" [dual_lr]="$CX_DUAL_LR" [projection]=True [dual]=True [fixed_lambda]=""
                [raw_layer]="" [aq_layer]="" [anchor_type]=concat [anchor_source]=online [cache_dir]="")
            local kv
            for kv in "$@"; do
                [[ "$kv" == *=* && -v "o[${kv%%=*}]" ]] || cx_die "unknown CRaFT override '$kv' (keys: ${!o[*]})"
                o[${kv%%=*}]="${kv#*=}"
            done
            CX_METHOD_FLAGS=(--use_craft True --craft_retention_budget "${o[budget]}" --craft_dual_lr "${o[dual_lr]}"
                --craft_enable_projection "${o[projection]}" --craft_enable_dual "${o[dual]}")
            [[ -n "${o[fixed_lambda]}" ]] && CX_METHOD_FLAGS+=(--craft_fixed_lambda "${o[fixed_lambda]}")
            [[ -n "${o[raw_layer]}" ]] && CX_METHOD_FLAGS+=(--craft_raw_layer "${o[raw_layer]}")
            [[ -n "${o[aq_layer]}" ]] && CX_METHOD_FLAGS+=(--craft_aq_layer "${o[aq_layer]}")
            CX_METHOD_FLAGS+=(--craft_anchor_type "${o[anchor_type]}" --craft_anchor_source "${o[anchor_source]}")
            [[ -n "${o[cache_dir]}" ]] && CX_METHOD_FLAGS+=(--craft_cache_dir "${o[cache_dir]}")
            ;;
        *) cx_die "unknown method '$method' (baseline | craft)" ;;
    esac
    return 0
}

# ------------------------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------------------------
cx_print_cmd() {  # tag cmd...
    local tag="$1"
    shift
    local prefix=""
    ((CX_DRY_RUN)) && prefix="[DRY_RUN]"
    printf '%s[%s]' "$prefix" "$tag"
    printf ' %q' "$@"
    printf '\n'
}

# Run a command (or only print it with DRY_RUN), its output also going to `log`; stop the script on failure.
cx_run() {  # tag log cmd...
    local tag="$1" log="$2"
    shift 2
    cx_print_cmd "$tag" "$@"
    ((CX_DRY_RUN)) && return 0
    mkdir -p "$(dirname "$log")"
    local rc
    set +e
    "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc != 0)); then
        {
            echo "FAILED (exit $rc) [$tag]; log: $log"
            printf 'failing command:'
            printf ' %q' "$@"
            printf '\n'
        } >&2
        exit "$rc"
    fi
}

cx_note() { echo "# $*"; }

# Move an unfinished output aside instead of deleting it (so nothing is appended to a half-written file).
cx_move_aside() {  # path
    local stamp
    stamp="$(date -u +%Y%m%dT%H%M%SZ)"
    if ((CX_DRY_RUN)); then
        cx_note "would move unfinished '$1' to '$1.partial-$stamp'"
    else
        mv "$1" "$1.partial-$stamp"
        cx_note "moved unfinished '$1' to '$1.partial-$stamp'"
    fi
}

# Newest complete checkpoint step of a run below `max_steps` (empty if none).
cx_latest_checkpoint_step() {  # run_id max_steps
    local best="" dir step
    for dir in "$CX_RUN_ROOT/$1"--*_chkpt; do
        [[ -f "$dir/COMPLETE" ]] || continue
        step="${dir##*--}"
        step="${step%_chkpt}"
        [[ "$step" =~ ^[0-9]+$ ]] || continue
        ((10#$step < $2)) || continue
        if [[ -z "$best" ]] || ((10#$step > 10#$best)); then best="$step"; fi
    done
    echo "$best"
}

cx_final_checkpoint() { echo "$CX_RUN_ROOT/$1--$2_chkpt"; }  # run_id max_steps

# Train one run (skipped when its final checkpoint is complete).
#   cx_train <run_id> <suite> <seed> <max_steps> <note> <extra flags...>
cx_train() {
    local run_id="$1" suite="$2" seed="$3" max_steps="$4" note="$5"
    shift 5
    local final
    final="$(cx_final_checkpoint "$run_id" "$max_steps")"
    if [[ -f "$final/COMPLETE" ]]; then
        cx_note "[skip-train] $run_id: final checkpoint complete ($final)"
        CX_N_SKIP=$((CX_N_SKIP + 1))
        return 0
    fi
    local warmup=$((max_steps * CX_WARMUP_PERCENT / 100))
    local decay=$((max_steps * CX_DECAY_PERCENT / 100))
    ((decay >= 1)) || decay=1
    cx_finetune_launcher
    [[ -n "$CX_VLM_PATH" ]] && CX_CMD+=(--vlm_path "$CX_VLM_PATH")
    local resume_step=""
    if cx_is_on "$CX_AUTO_RESUME"; then resume_step="$(cx_latest_checkpoint_step "$run_id" "$max_steps")"; fi
    if [[ -n "$resume_step" ]]; then
        cx_note "[resume] $run_id from step $resume_step"
        CX_CMD+=(--config_file_path "$CX_RUN_ROOT/$run_id--${resume_step}_chkpt" --resume True --resume_step "$resume_step")
    else
        [[ -n "$CX_CONFIG_FILE_PATH" ]] && CX_CMD+=(--config_file_path "$CX_CONFIG_FILE_PATH")
        # A run folder without any complete checkpoint holds only a partial metrics file: start it afresh.
        [[ -e "$CX_RUN_ROOT/$run_id" ]] && cx_move_aside "$CX_RUN_ROOT/$run_id"
    fi
    CX_CMD+=(--model_preset "$CX_MODEL_PRESET" --data_root_dir "$CX_DATA_ROOT" --dataset_name "${suite}_no_noops"
        --run_root_dir "$CX_RUN_ROOT" --run_id "$run_id" --run_id_note "$note"
        --batch_size "$CX_BATCH_SIZE" --learning_rate "$CX_LR" --lr_warmup_steps "$warmup"
        --num_steps_before_decay "$decay" --grad_accumulation_steps "$CX_GRAD_ACCUM" --max_steps "$max_steps"
        --save_freq "$CX_SAVE_FREQ" --save_latest_checkpoint_only "$CX_SAVE_LATEST_ONLY" --image_aug "$CX_IMAGE_AUG"
        --use_lora True --lora_rank "$CX_LORA_RANK" --use_proprio True --num_images_in_input 2
        --use_pro_version True --use_l1_regression True --seed "$seed"
        --wandb_project "$CX_WANDB_PROJECT" --wandb_mode "$CX_WANDB_MODE")
    [[ -n "$CX_WANDB_ENTITY" ]] && CX_CMD+=(--wandb_entity "$CX_WANDB_ENTITY")
    [[ -n "$CX_NUM_WORKERS" ]] && CX_CMD+=(--num_workers "$CX_NUM_WORKERS")
    CX_CMD+=("$@")
    cx_run train "$CX_RUN_ROOT/logs/$run_id.train.log" "${CX_CMD[@]}"
    CX_N_TRAIN=$((CX_N_TRAIN + 1))
    if ((!CX_DRY_RUN)) && [[ ! -f "$final/COMPLETE" ]]; then
        cx_die "training of $run_id exited 0 but left no complete final checkpoint '$final' (stopped by SIGTERM /" \
            "SIGINT? rerun the script to resume; log: $CX_RUN_ROOT/logs/$run_id.train.log)"
    fi
    return 0
}

# Evaluate the final checkpoint of a run in LIBERO (skipped when its summary.json exists).
cx_eval() {  # run_id suite max_steps
    local run_id="$1" suite="$2" max_steps="$3"
    local eval_dir="$CX_RUN_ROOT/$run_id/eval"
    if ((CX_SKIP_EVAL)); then
        cx_warn_loud "SMOKE_SKIP_EVAL=1: evaluation of $run_id SKIPPED"
        return 0
    fi
    if [[ -s "$eval_dir/summary.json" ]]; then
        cx_note "[skip-eval] $run_id: $eval_dir/summary.json exists"
        CX_N_SKIP=$((CX_N_SKIP + 1))
        return 0
    fi
    # An interrupted evaluation left episodes.jsonl: run_libero_eval.py resumes it (and refuses other settings).
    [[ -e "$eval_dir" ]] && cx_note "[resume-eval] $run_id: $eval_dir exists without summary.json"
    CX_CMD=("$CX_PYTHON" LIBERO/run_libero_eval.py --pretrained_checkpoint "$(cx_final_checkpoint "$run_id" "$max_steps")"
        --task_suite_name "$suite" --num_trials_per_task "$CX_EVAL_TRIALS" --seed "$CX_EVAL_SEED"
        --local_log_dir "$eval_dir" --num_images_in_input 2 --use_proprio True --center_crop True
        "${CX_EVAL_EXTRA[@]}")
    cx_run eval "$CX_RUN_ROOT/logs/$run_id.eval.log" "${CX_CMD[@]}"
    CX_N_EVAL=$((CX_N_EVAL + 1))
    if ((!CX_DRY_RUN)) && [[ ! -s "$eval_dir/summary.json" ]]; then
        cx_die "evaluation of $run_id exited 0 but wrote no $eval_dir/summary.json"
    fi
    return 0
}

# One grid entry: train, then evaluate.
#   cx_train_and_eval <run_id> <suite> <seed> <max_steps> <note> <extra finetune flags...>
cx_train_and_eval() {
    cx_train "$@"
    cx_eval "$1" "$2" "$4"
}

# Build (once) the offline anchor cache of a suite for given layers / anchor type. CX_CACHE_DIR <- its folder.
# A cache counts as built when its manifest exists (the builder writes it after the shards).
cx_build_cache() {  # suite raw_layer aq_layer anchor_type   (layers may be empty: builder defaults)
    local suite="$1" raw="$2" aq="$3" anchor="$4"
    CX_CACHE_DIR="$CX_CACHE_ROOT/${suite}-${CX_MODEL_PRESET}-m${raw:-default}-M${aq:-default}-${anchor}"
    if [[ -f "$CX_CACHE_DIR/COMPLETE" || -f "$CX_CACHE_DIR/manifest.json" ]]; then
        cx_note "[skip-cache] $CX_CACHE_DIR exists"
        CX_N_SKIP=$((CX_N_SKIP + 1))
        return 0
    fi
    # θ0 must be a fixed model for a cache to mean anything (a scratch tiny model depends on the run's seed).
    [[ -n "$CX_VLM_PATH" ]] || cx_die "offline anchors need a fixed base model: set VLM_PATH (SMOKE: SMOKE_VLM_PATH)" \
        "or leave the anchor_source group out of ABLATIONS"
    CX_CMD=("$CX_PYTHON" vla-scripts/build_craft_cache.py --vlm_path "$CX_VLM_PATH")
    # Optional model flags, passed when the builder accepts them (always printed with DRY_RUN).
    if [[ -n "$CX_CONFIG_FILE_PATH" ]] && cx_script_accepts vla-scripts/build_craft_cache.py --config_file_path; then
        CX_CMD+=(--config_file_path "$CX_CONFIG_FILE_PATH")
    fi
    if cx_script_accepts vla-scripts/build_craft_cache.py --model_preset; then
        CX_CMD+=(--model_preset "$CX_MODEL_PRESET")
    fi
    CX_CMD+=(--data_root_dir "$CX_DATA_ROOT" --dataset_name "${suite}_no_noops" --output_dir "$CX_CACHE_DIR")
    [[ -n "$raw" ]] && CX_CMD+=(--craft_raw_layer "$raw")
    [[ -n "$aq" ]] && CX_CMD+=(--craft_aq_layer "$aq")
    CX_CMD+=(--craft_anchor_type "$anchor")
    cx_run cache "$CX_RUN_ROOT/logs/cache-$(basename "$CX_CACHE_DIR").log" "${CX_CMD[@]}"
    CX_N_CACHE=$((CX_N_CACHE + 1))
    return 0
}

# Whether a script accepts a flag: its `--help` lists it; if `--help` itself fails (no "usage:" printed), whether a
# dataclass field of that name is declared in the script or under prismatic/. With DRY_RUN, or while the script does
# not exist yet, every flag counts as accepted (the commands are printed in full).
declare -gA CX_HELP_CACHE=()
cx_script_accepts() {  # script flag
    if ((CX_DRY_RUN)) || [[ ! -f "$CX_REPO_ROOT/$1" ]]; then return 0; fi
    if [[ -z "${CX_HELP_CACHE[$1]+set}" ]]; then
        CX_HELP_CACHE[$1]="$("$CX_PYTHON" "$1" --help 2>&1 || true)"
    fi
    if grep -q "usage:" <<<"${CX_HELP_CACHE[$1]}"; then
        grep -q -- "$2" <<<"${CX_HELP_CACHE[$1]}"
    else
        grep -rqE --include='*.py' "^[[:space:]]+${2#--}[[:space:]]*:" "$CX_REPO_ROOT/$1" "$CX_REPO_ROOT/prismatic"
    fi
}

# Whether finetune.py supports a flag needed by a guarded entry (e.g. --retention_method).
# RELATED_BASELINES=auto (default) checks with cx_script_accepts; 1 = always run; 0 = never.
cx_feature_available() {  # flag
    local mode="${RELATED_BASELINES:-auto}"
    case "$mode" in
        1) return 0 ;;
        0) return 1 ;;
        auto) cx_script_accepts vla-scripts/finetune.py "$1" ;;
        *) cx_die "RELATED_BASELINES must be auto, 1 or 0, got '$mode'" ;;
    esac
}

# A grid entry that needs a finetune.py feature: always printed with DRY_RUN, otherwise run only when available.
#   cx_guarded_train_and_eval <required flag> <run_id> <suite> <seed> <max_steps> <note> <extra flags...>
cx_guarded_train_and_eval() {
    local flag="$1"
    shift
    if ((CX_DRY_RUN)); then
        cx_note "[guarded] $1 requires finetune.py support for $flag"
        cx_train_and_eval "$@"
        return 0
    fi
    if cx_feature_available "$flag"; then
        cx_train_and_eval "$@"
    else
        cx_warn_loud "SKIPPING $1: vla-scripts/finetune.py does not support $flag yet (RELATED_BASELINES=${RELATED_BASELINES:-auto})"
        CX_N_GUARDED=$((CX_N_GUARDED + 1))
    fi
    return 0
}

cx_finish() {
    echo "# ==== $CX_EXPERIMENT done: $CX_N_TRAIN training(s), $CX_N_EVAL evaluation(s), $CX_N_CACHE cache build(s)" \
        "$( ((CX_DRY_RUN)) && echo 'printed' || echo 'run'), $CX_N_SKIP skipped as finished," \
        "$CX_N_GUARDED skipped for missing features ===="
    ((CX_SKIP_EVAL)) && cx_warn_loud "SMOKE_SKIP_EVAL=1 was set: NO evaluation was run."
    ((CX_DRY_RUN)) || echo "# aggregate with: $CX_PYTHON craft_experiments/common_utils/log_parser.py --runs_dir $CX_RUN_ROOT --output_dir $CX_OUTPUT_ROOT/results/$CX_EXPERIMENT --generate_latex_table"
    return 0
}
