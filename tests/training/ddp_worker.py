"""torchrun worker of test_distributed.py: train the tiny preset and dump this rank's trainable tensors.

    torchrun --standalone --nproc_per_node 2 tests/training/ddp_worker.py DATA_ROOT RUN_ROOT OUT_DIR BATCH STEPS K1,K2

Runs one training per gradient-accumulation value K (same per-rank batch), writing OUT_DIR/k{K}_rank{r}.pt.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vla-scripts"))  # `from finetune import train`

import torch

from finetune import train
from prismatic.training.distributed import init_distributed
from prismatic.training.finetune_config import FinetuneConfig
from prismatic.training.policy_setup import trainable_state


def worker_config(data_root: Path, run_root: Path, batch_size: int, max_steps: int, **overrides) -> FinetuneConfig:
    """The configuration both sides of the DDP equivalence test use (only batch size and world size differ)."""
    values = dict(data_root_dir=data_root, dataset_name="synthetic_libero_no_noops", run_root_dir=run_root,
                  model_preset="tiny", batch_size=batch_size, max_steps=max_steps, save_freq=max_steps,
                  learning_rate=1e-3, wandb_mode="disabled", image_aug=False, num_images_in_input=1, use_lora=True,
                  lora_rank=4, run_id="ddp", seed=7)
    values.update(overrides)
    return FinetuneConfig(**values)


def main() -> None:
    data_root, run_root, out_dir = (Path(a) for a in sys.argv[1:4])
    batch_size, max_steps = int(sys.argv[4]), int(sys.argv[5])
    accumulations = [int(k) for k in sys.argv[6].split(",")]
    torch.set_num_threads(1)
    init_distributed()  # one process group for all runs below (train() leaves a caller's group alone)
    rank = torch.distributed.get_rank()
    for k in accumulations:
        result = train(worker_config(data_root, run_root / f"k{k}", batch_size, max_steps,
                                     grad_accumulation_steps=k))
        losses = torch.tensor([h["VLA Train/Loss"] for h in result.history], dtype=torch.float64)
        torch.save({"params": trainable_state(result.policy), "losses": losses}, out_dir / f"k{k}_rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
