#!/usr/bin/env bash
# One-shot GPU check (issue 16): run it once on a machine with one H100/H200-class GPU, no network needed.
#
#   bash benchmarks/gpu_check.sh [WORK_DIR]          # GPU: real-size preset, random init, bf16 autocast, batch 8,
#                                                    # 2 images; budget ~8 min
#   DRY_RUN=1 bash benchmarks/gpu_check.sh [WORK_DIR]  # CPU: prints each command, then runs a 2-step tiny-preset
#                                                    # version of every step (what CI runs)
#
# Steps, each timed; one summary table at the end (benchmarks/gpu_check.py summary):
#   1. plain vs CRaFT offline vs CRaFT online: step time, peak torch.cuda.max_memory_allocated, tokens/s
#   2. the torchrun code paths with world size 1, DDP then FSDP2 (--distributed_strategy): 3 steps of CRaFT online
#      LoRA each through vla-scripts/finetune.py, saving a checkpoint; the table compares their last logged loss and λ
#   3. one LIBERO episode (libero_spatial task 0, MUJOCO_GL=egl) of that checkpoint on the GPU policy (no center
#      crop: the check trains without augmentation)
# Exit status: 0 when every step succeeded, 1 otherwise (the table says which); 2 on a bad environment.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$(mktemp -d -t gpu_check.XXXXXX)}"
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DRY_RUN" == "1" ]]; then
    PRESET=tiny; BATCH=2; STEPS=1; WARMUP=1; TRAIN_STEPS=2; DEVICE=cpu; EPISODE_STEPS=8; LORA_RANK=4
    export OMP_NUM_THREADS=1  # tiny ops: more threads only contend on a shared CPU machine
else
    PRESET=real; BATCH=8; STEPS=5; WARMUP=2; TRAIN_STEPS=3; DEVICE=cuda; EPISODE_STEPS=48; LORA_RANK=32
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: no CUDA device visible to torch — run on a GPU machine, or DRY_RUN=1 for the CPU dry run" >&2
        exit 2
    fi
fi
mkdir -p "$WORK" || { echo "error: cannot create $WORK — pass a writable WORK_DIR" >&2; exit 2; }
if [[ -e "$WORK/modes.json" || -e "$WORK/runs" ]]; then
    echo "error: $WORK already holds a GPU check — pass a new WORK_DIR (nothing is overwritten)" >&2
    exit 2
fi
echo "gpu_check: work dir $WORK, preset $PRESET, batch $BATCH, 2 images, device $DEVICE (DRY_RUN=$DRY_RUN)"
FAILED=0

run_step() {  # name, then the command; prints it, times it, logs to $WORK/<name>.log
    local name="$1"; shift
    echo "+ [$name] $*"
    local t0=$SECONDS
    if "$@" >"$WORK/$name.log" 2>&1; then
        echo "  [$name] ok in $((SECONDS - t0)) s"
        return 0
    fi
    echo "  [$name] FAILED after $((SECONDS - t0)) s (last lines of $WORK/$name.log):"
    tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
    FAILED=1
    return 1
}

write_json() {  # file, ok (true/false), detail
    "$PYTHON" -c "import json, sys; json.dump({'ok': sys.argv[2] == 'true', 'detail': sys.argv[3]}, open(sys.argv[1], 'w'))" \
        "$1" "$2" "$3"
}

# 1. the three training modes (fresh process each; data, random-init model and offline cache prepared first)
run_step modes "$PYTHON" "$REPO/benchmarks/gpu_check.py" modes --work_dir "$WORK" --preset "$PRESET" \
    --batch_size "$BATCH" --num_images 2 --lora_rank "$LORA_RANK" --steps "$STEPS" --warmup "$WARMUP"

# 2. torchrun, world size 1, CRaFT online, saving the last step: the DDP code path, then the same run under FSDP2
MODEL_DIR="$WORK/bench/random_init_${PRESET}_seed7"
DATA_DIR="$WORK/bench/rlds"
for STRATEGY in ddp fsdp; do
    RUN_ID=gpu_check; [[ "$STRATEGY" == "fsdp" ]] && RUN_ID=gpu_check_fsdp
    if [[ -d "$MODEL_DIR" && -d "$DATA_DIR" ]]; then
        T0=$SECONDS
        if run_step "$STRATEGY" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 \
            "$REPO/vla-scripts/finetune.py" --distributed_strategy "$STRATEGY" \
            --config_file_path "$MODEL_DIR" --model_preset "$PRESET" --data_root_dir "$DATA_DIR" \
            --dataset_name synthetic_libero_no_noops --run_root_dir "$WORK/runs" --run_id "$RUN_ID" \
            --batch_size "$BATCH" --num_images_in_input 2 --use_lora True --lora_rank "$LORA_RANK" \
            --max_steps "$TRAIN_STEPS" --save_freq "$TRAIN_STEPS" --image_aug False --wandb_mode disabled \
            --use_craft True --craft_anchor_source online; then
            write_json "$WORK/$STRATEGY.json" true "$TRAIN_STEPS CRaFT-online steps in $((SECONDS - T0)) s (start-up and save included), checkpoint $WORK/runs/${RUN_ID}--${TRAIN_STEPS}_chkpt"
        else
            write_json "$WORK/$STRATEGY.json" false "see $WORK/$STRATEGY.log"
        fi
    else
        write_json "$WORK/$STRATEGY.json" false "step 1 did not prepare the model / data"
        FAILED=1
    fi
done

# 3. one LIBERO episode of that checkpoint on the policy's device (EGL rendering)
CKPT="$WORK/runs/gpu_check--${TRAIN_STEPS}_chkpt"
if [[ -d "$CKPT" ]]; then
    if MUJOCO_GL=egl run_step libero "$PYTHON" "$REPO/LIBERO/run_libero_eval.py" --pretrained_checkpoint "$CKPT" \
        --task_suite_name libero_spatial --task_ids "[0]" --num_trials_per_task 1 --num_envs 0 --center_crop false \
        --max_steps_override "$EPISODE_STEPS" --device "$DEVICE" --local_log_dir "$WORK/libero" --progress false; then
        write_json "$WORK/libero.json" true "1 episode, $EPISODE_STEPS policy steps, $WORK/libero/summary.json"
    else
        write_json "$WORK/libero.json" false "see $WORK/libero.log"
    fi
else
    write_json "$WORK/libero.json" false "no checkpoint from step 2"
    FAILED=1
fi

echo
"$PYTHON" "$REPO/benchmarks/gpu_check.py" summary --work_dir "$WORK" || FAILED=1
exit "$FAILED"
