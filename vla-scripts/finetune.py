"""Fine-tune a VLA-Adapter policy on LIBERO RLDS data (1 process or torchrun; LoRA or full; optional CRaFT).

    python vla-scripts/finetune.py --config_file_path <model or checkpoint dir> --dataset_name libero_spatial_no_noops \
        --batch_size 8 --learning_rate 5e-4 --max_steps 5000 --use_l1_regression True --use_craft False
    torchrun --standalone --nproc_per_node 2 vla-scripts/finetune.py ...          # DDP (nccl on GPU, gloo on CPU)
    python vla-scripts/finetune.py --config_file_path runs/<run id>--10000_chkpt --resume True --resume_step 10000 ...
    python vla-scripts/finetune.py --config_path my_run.yaml                     # flags from YAML (CLI overrides)

Flags: prismatic/training/finetune_config.py (FinetuneConfig). The loop: prismatic/training/finetune_loop.py.
SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, exit code 0.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import draccus

from prismatic.training.finetune_config import ConfigError, FinetuneConfig
from prismatic.training.finetune_loop import train


@draccus.wrap()
def finetune(cfg: FinetuneConfig) -> None:
    try:
        result = train(cfg)
    except ConfigError as exc:
        print(f"[finetune] {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[finetune] run {result.run_id}: finished at step {result.final_step}; last checkpoint "
              f"{result.last_checkpoint}{' (stopped by signal)' if result.stopped_by_signal else ''}")


if __name__ == "__main__":
    finetune()
