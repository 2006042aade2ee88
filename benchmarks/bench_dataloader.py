"""Throughput of the RLDS training loader: frames/s with 2 images per frame at 224 px (augmentation on), and its
ratio to what the tiny preset consumes when training (LoRA, same batch), measured side by side in one run.

    python benchmarks/bench_dataloader.py --num_workers 2 --batch_size 16 --num_batches 30
    python benchmarks/bench_dataloader.py --data_root_dir /data/libero_rlds --dataset_name libero_spatial_no_noops

Without --data_root_dir a synthetic LIBERO-like dataset is written to a temporary folder first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vla-scripts"))  # `from finetune import train`

from prismatic.cli_errors import UserError, cli_entry
from prismatic.data.collator import VLACollator
from prismatic.data.loader import make_train_loader
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.data.synthetic_libero import make_synthetic_libero_dataset
from prismatic.models.tokenizer_tiny import train_tiny_tokenizer
from prismatic.training.data_setup import dataset_errors_as_user_errors


def measure_loader_fps(dataset: RLDSFrameDataset, batch_size: int = 16, num_workers: int = 2,
                       num_batches: int = 30, warmup_batches: int = 3) -> float:
    """Frames per second delivered by `make_train_loader` (collated batches, pixel_values included)."""
    loader = make_train_loader(dataset, per_rank_batch=batch_size, num_workers=num_workers,
                               num_steps=num_batches + warmup_batches)
    iterator = iter(loader)
    for _ in range(warmup_batches):  # worker start-up and first reads are not steady-state throughput
        next(iterator)
    start = time.perf_counter()
    frames = 0
    for batch in iterator:
        frames += batch["pixel_values"].shape[0]
    return frames / (time.perf_counter() - start)


def measure_cpu_ms_per_frame(dataset: RLDSFrameDataset, num_frames: int = 64, batch_size: int = 16) -> float:
    """CPU time (process time, 1 torch thread) to produce and collate one frame: load-independent cost.

    On an otherwise idle machine, workers on C cores deliver about C * 1000 / this value frames/s.
    """
    collate = VLACollator(dataset.pad_token_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        for first in range(0, num_frames, batch_size):
            collate([dataset[p] for p in range(first, min(first + batch_size, num_frames))])
        return (time.process_time() - start) * 1000.0 / num_frames
    finally:
        torch.set_num_threads(threads)


def measure_training_fps(data_root_dir: Path, dataset_name: str, run_root_dir: Path, batch_size: int = 8,
                         steps: int = 12, warmup_steps: int = 3) -> float:
    """Frames per second the tiny preset consumes while training (LoRA rank 8, 2 images, proprio, no workers)."""
    from finetune import TrainHooks, train
    from prismatic.training.finetune_config import FinetuneConfig

    stamps: list[float] = []
    cfg = FinetuneConfig(model_preset="tiny", data_root_dir=data_root_dir, dataset_name=dataset_name,
                         run_root_dir=run_root_dir, run_id="bench-consumer", batch_size=batch_size,
                         max_steps=steps + warmup_steps, save_freq=10 * (steps + warmup_steps), use_lora=True,
                         lora_rank=8, image_aug=True, num_images_in_input=2, wandb_mode="disabled")
    train(cfg, TrainHooks(on_step_end=lambda step, _metrics: stamps.append(time.perf_counter())))
    return batch_size * steps / (stamps[-1] - stamps[warmup_steps - 1])


@cli_entry("bench_dataloader")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     exit_on_error=False)
    parser.add_argument("--data_root_dir", type=Path, default=None)
    parser.add_argument("--dataset_name", default="libero_spatial_no_noops")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--num_batches", type=int, default=30)
    parser.add_argument("--no_aug", action="store_true", help="disable training augmentation")
    parser.add_argument("--with_model", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the tiny preset's training consumption and print the ratio")
    args = parser.parse_args(argv)
    if args.data_root_dir is not None and not args.data_root_dir.is_dir():
        raise UserError(f"--data_root_dir '{args.data_root_dir}' does not exist",
                        "pass the folder holding <dataset_name>/1.0.0/, or omit it to use synthetic data")
    for name in ("batch_size", "num_batches"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}", f"pass a positive --{name}")
    tokenizer = train_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root_dir
        if root is None:
            root = Path(tmp)
            make_synthetic_libero_dataset(root, args.dataset_name, num_tasks=4, episodes_per_task=5, steps=60)
        with dataset_errors_as_user_errors(args):
            dataset = RLDSFrameDataset(root, args.dataset_name, tokenizer, num_images_in_input=2, use_proprio=True,
                                       image_aug=not args.no_aug, seed=7)
        cpu_ms = measure_cpu_ms_per_frame(dataset)
        fps = measure_loader_fps(dataset, args.batch_size, args.num_workers, args.num_batches)
        consumed = measure_training_fps(root, args.dataset_name, Path(tmp) / "runs") if args.with_model else None
    print(f"loader: {fps:.1f} frames/s (2 images/frame, 224 px, aug={'off' if args.no_aug else 'on'}, "
          f"batch {args.batch_size}, {args.num_workers} workers); CPU cost {cpu_ms:.2f} ms/frame "
          f"(= {2000.0 / cpu_ms:.0f} frames/s on 2 idle cores)")
    if consumed is not None:
        print(f"tiny preset training consumes {consumed:.1f} frames/s (LoRA rank 8, batch 8, 2 images); "
              f"loader / consumption = {fps / consumed:.1f}x (goal >= 5x: the loader is never the bottleneck)")


if __name__ == "__main__":
    main()
