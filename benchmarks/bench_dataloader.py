"""Throughput of the RLDS training loader, side by side with a tf.data pipeline over the same files, and its ratio
to what the tiny preset consumes when training (LoRA, same batch), all measured in one run.

    python benchmarks/bench_dataloader.py --num_workers 2 --batch_size 16 --num_batches 30
    python benchmarks/bench_dataloader.py --data_root_dir /data/libero_rlds --dataset_name libero_spatial_no_noops

Without --data_root_dir a synthetic LIBERO-like dataset is written to a temporary folder first.

What each side does per frame (2 cameras, 224 px, augmentation on unless --no_aug):
- loader: `make_train_loader` with --num_workers workers: read JPEG bytes (pread), decode, TF-lanczos3 resize, random
  crop + resize, brightness / contrast / saturation / hue, prompt ids, 8-step action chunk, proprio, and the
  collated batch with the images as uint8 (B, 2, 3, 224, 224) (normalised on the device by `to_device`).
- tf.data: `tfds.builder_from_directory` over the same folder, frames shuffled in a buffer, then in a parallel map
  (`num_parallel_calls=AUTOTUNE`, TensorFlow's default thread pools) decode_jpeg, lanczos3 antialiased resize,
  random crop (area 0.9, `crop_and_resize`) + random_brightness / contrast / saturation / hue (upstream's
  recipe), batched and transposed to the same uint8 (B, 2, 3, 224, 224) in the graph; the consumer takes numpy
  arrays (torch.from_numpy). It carries the step's action and instruction, not chunks or prompt ids. torch's
  num_workers is 0 for it: tf.data parallelises itself.
- loader with backend="tf" (the dataset's TFDS reader: TF eager decode_jpeg + lanczos3 per sample, then the same
  numpy augmentation and collation), num_workers 0 as TensorFlow requires; one round (it is slow: a reference
  reader for checking the native path, not a throughput path).
- rounds alternate loader and tf.data so both see the same machine load; the best round of each is reported.
CPU ms/frame counts every process and thread that worked (loader: main + workers; tf.data: the process).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vla-scripts"))  # `from finetune import train`

from prismatic.cli_errors import UserError, cli_entry
from prismatic.data.collator import VLACollator
from prismatic.data.loader import make_train_loader
from prismatic.data.rlds_catalog import resolve_dataset
from prismatic.data.rlds_dataset import CAMERAS, RLDSFrameDataset
from prismatic.data.synthetic_libero import make_synthetic_libero_dataset
from prismatic.models.tokenizer_tiny import train_tiny_tokenizer
from prismatic.training.data_setup import dataset_errors_as_user_errors


def _children_cpu_s() -> float:
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure_loader(dataset: RLDSFrameDataset, batch_size: int = 16, num_workers: int = 2,
                   num_batches: int = 30, warmup_batches: int = 3) -> dict[str, float]:
    """Frames/s delivered by `make_train_loader` (collated batches, uint8 images included) and the CPU it used:
    {"fps", "cpu_ms_per_frame"} (main process + workers, over the timed batches)."""
    loader = make_train_loader(dataset, per_rank_batch=batch_size, num_workers=num_workers,
                               num_steps=num_batches + warmup_batches)
    iterator = iter(loader)
    for _ in range(warmup_batches):  # worker start-up and first reads are not steady-state throughput
        next(iterator)
    cpu0, children0, start = time.process_time(), _children_cpu_s(), time.perf_counter()
    frames = 0
    for _ in range(num_batches):  # read the workers' CPU before the last next() shuts them down
        frames += next(iterator)["images"].shape[0]
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0 + _children_cpu_s() - children0
    for _ in iterator:
        pass
    return {"fps": frames / elapsed, "cpu_ms_per_frame": cpu * 1000.0 / frames}


def measure_loader_fps(dataset: RLDSFrameDataset, batch_size: int = 16, num_workers: int = 2,
                       num_batches: int = 30, warmup_batches: int = 3) -> float:
    """Frames per second delivered by `make_train_loader` (collated batches, uint8 images included)."""
    return measure_loader(dataset, batch_size, num_workers, num_batches, warmup_batches)["fps"]


def measure_cpu_ms_per_frame(dataset: RLDSFrameDataset, num_frames: int = 64, batch_size: int = 16) -> float:
    """CPU time (process time, 1 torch thread) to produce and collate one frame: load-independent cost.

    On an otherwise idle machine, workers on C cores deliver about C * 1000 / this value frames/s.
    """
    collate = VLACollator(dataset.pad_token_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collate([dataset[0]])  # warm-up: one-off costs (the resize kernel's load) are not per-frame costs
        start = time.process_time()
        for first in range(0, num_frames, batch_size):
            collate([dataset[p] for p in range(first, min(first + batch_size, num_frames))])
        return (time.process_time() - start) * 1000.0 / num_frames
    finally:
        torch.set_num_threads(threads)


def make_tf_data_pipeline(data_root_dir: Path, dataset_name: str, batch_size: int = 16, image_size: int = 224,
                          augment: bool = True, seed: int = 7, shuffle_buffer: int = 1000) -> Any:
    """Endless tf.data pipeline of batches {"images": uint8 (B, 2, 3, S, S), "action", "instruction"} over
    the same RLDS folder, built the way upstream's tf.data input pipeline works (see the module docstring)."""
    from prismatic.data.rlds_tf_backend import _import_tf

    tf, tfds = _import_tf()
    layout = resolve_dataset(data_root_dir, dataset_name)
    builder = tfds.builder_from_directory(str(layout.directory))
    skip = {camera: tfds.decode.SkipDecoding() for camera in CAMERAS}
    episodes = builder.as_dataset(split="train", shuffle_files=True, decoders={"steps": {"observation": skip}})
    frames = episodes.flat_map(lambda episode: episode["steps"]).repeat().shuffle(shuffle_buffer, seed=seed)
    side = float(tf.sqrt(0.9))  # random resized crop of area 0.9, aspect 1, as the native augmentation

    def image_view(jpeg: Any) -> Any:
        image = tf.io.decode_jpeg(jpeg, channels=3)
        image = tf.image.resize(image, (image_size, image_size), method="lanczos3", antialias=True)
        image = tf.clip_by_value(tf.round(image), 0.0, 255.0) / 255.0
        if augment:
            corner = tf.random.uniform((2,)) * (1.0 - side)
            box = tf.concat([corner, corner + side], axis=0)[None]
            image = tf.image.crop_and_resize(image[None], box, [0], (image_size, image_size))[0]
            image = tf.clip_by_value(tf.image.random_brightness(image, 0.2), 0.0, 1.0)
            image = tf.clip_by_value(tf.image.random_contrast(image, 0.8, 1.2), 0.0, 1.0)
            image = tf.clip_by_value(tf.image.random_saturation(image, 0.8, 1.2), 0.0, 1.0)
            image = tf.clip_by_value(tf.image.random_hue(image, 0.05), 0.0, 1.0)
        return tf.cast(tf.round(image * 255.0), tf.uint8)

    def frame(step: dict) -> dict:
        images = tf.stack([image_view(step["observation"][camera]) for camera in CAMERAS])
        return {"images": images, "action": step["action"], "instruction": step["language_instruction"]}

    def planar(batch: dict) -> dict:  # the loader's batch layout: uint8 (B, N, 3, S, S), normalised on the device
        return {**batch, "images": tf.transpose(batch["images"], (0, 1, 4, 2, 3))}

    autotune = tf.data.AUTOTUNE
    return (frames.map(frame, num_parallel_calls=autotune, deterministic=False)
            .batch(batch_size, drop_remainder=True).map(planar, num_parallel_calls=autotune)
            .prefetch(autotune))


def measure_tf_data(pipeline: Any, num_batches: int = 30, warmup_batches: int = 3) -> dict[str, float]:
    """Frames/s and CPU ms/frame (the whole process: TensorFlow's threads) of a `make_tf_data_pipeline`."""
    iterator = iter(pipeline)
    for _ in range(warmup_batches):
        next(iterator)
    cpu0, start = time.process_time(), time.perf_counter()
    frames = 0
    for _ in range(num_batches):
        batch = next(iterator)
        frames += torch.from_numpy(batch["images"].numpy()).shape[0]
    elapsed = time.perf_counter() - start
    return {"fps": frames / elapsed, "cpu_ms_per_frame": (time.process_time() - cpu0) * 1000.0 / frames}


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
    parser.add_argument("--rounds", type=int, default=2, help="alternating loader / tf.data rounds; best is kept")
    parser.add_argument("--no_aug", action="store_true", help="disable training augmentation")
    parser.add_argument("--with_tf", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the tf.data pipeline over the same files and print the ratio")
    parser.add_argument("--with_model", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the tiny preset's training consumption and print the ratio")
    args = parser.parse_args(argv)
    if args.data_root_dir is not None and not args.data_root_dir.is_dir():
        raise UserError(f"--data_root_dir '{args.data_root_dir}' does not exist",
                        "pass the folder holding <dataset_name>/1.0.0/, or omit it to use synthetic data")
    for name in ("batch_size", "num_batches", "rounds"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}", f"pass a positive --{name}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}", "pass 0 or more workers")
    if args.with_tf:
        try:
            from prismatic.data.rlds_tf_backend import _import_tf

            _import_tf()
        except ImportError as err:
            raise UserError(f"--with_tf needs TensorFlow: {err}",
                            "install the `rlds-tf` extra or pass --no-with_tf") from None
    tokenizer = train_tiny_tokenizer()
    aug = not args.no_aug
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root_dir
        if root is None:
            root = Path(tmp)
            make_synthetic_libero_dataset(root, args.dataset_name, num_tasks=4, episodes_per_task=5, steps=60)
        with dataset_errors_as_user_errors(args):
            dataset = RLDSFrameDataset(root, args.dataset_name, tokenizer, num_images_in_input=2, use_proprio=True,
                                       image_aug=aug, seed=7)
        load_before = psutil.getloadavg()
        cpu_ms = measure_cpu_ms_per_frame(dataset)
        pipeline = make_tf_data_pipeline(root, args.dataset_name, args.batch_size, augment=aug) if args.with_tf \
            else None
        loader_rounds, tf_rounds = [], []
        for _ in range(args.rounds):
            loader_rounds.append(measure_loader(dataset, args.batch_size, args.num_workers, args.num_batches))
            if pipeline is not None:
                tf_rounds.append(measure_tf_data(pipeline, args.num_batches))
        tf_backend = None
        if args.with_tf:
            tf_dataset = RLDSFrameDataset(root, args.dataset_name, tokenizer, num_images_in_input=2, use_proprio=True,
                                          image_aug=aug, seed=7, backend="tf")
            tf_backend = measure_loader(tf_dataset, args.batch_size, 0, min(args.num_batches, 10), warmup_batches=1)
        load_after = psutil.getloadavg()
        consumed = measure_training_fps(root, args.dataset_name, Path(tmp) / "runs") if args.with_model else None
    best = max(loader_rounds, key=lambda r: r["fps"])
    loader_fps = ", ".join(f"{r['fps']:.1f}" for r in loader_rounds)
    tf_fps = ", ".join(f"{r['fps']:.1f}" for r in tf_rounds)
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; {psutil.cpu_count()} cores")
    print(f"loader: {best['fps']:.1f} frames/s (2 images/frame, 224 px, aug={'on' if aug else 'off'}, "
          f"batch {args.batch_size}, {args.num_workers} workers; rounds "
          f"{loader_fps}); CPU {best['cpu_ms_per_frame']:.2f} ms/frame "
          f"(main + workers)")
    print(f"loader CPU cost {cpu_ms:.2f} ms/frame on 1 thread, no workers "
          f"(= {2000.0 / cpu_ms:.0f} frames/s on 2 idle cores)")
    if tf_rounds:
        tf_best = max(tf_rounds, key=lambda r: r["fps"])
        print(f"tf.data: {tf_best['fps']:.1f} frames/s (same files, 2 images/frame, 224 px, aug="
              f"{'on' if aug else 'off'}, batch {args.batch_size}, num_parallel_calls=AUTOTUNE, torch num_workers 0;"
              f" rounds {tf_fps}); CPU {tf_best['cpu_ms_per_frame']:.2f} "
              f"ms/frame (= {2000.0 / tf_best['cpu_ms_per_frame']:.0f} frames/s on 2 idle cores)")
        print(f"loader / tf.data: {best['fps'] / tf_best['fps']:.2f}x frames/s, "
              f"{best['cpu_ms_per_frame'] / tf_best['cpu_ms_per_frame']:.2f}x CPU per frame")
        print(f"loader with backend='tf' (TF eager decode + lanczos3 per sample, num_workers 0): "
              f"{tf_backend['fps']:.1f} frames/s; CPU {tf_backend['cpu_ms_per_frame']:.2f} ms/frame")
    if consumed is not None:
        print(f"tiny preset training consumes {consumed:.1f} frames/s (LoRA rank 8, batch 8, 2 images); "
              f"loader / consumption = {best['fps'] / consumed:.1f}x (goal >= 5x: the loader is never the bottleneck)")


if __name__ == "__main__":
    main()
