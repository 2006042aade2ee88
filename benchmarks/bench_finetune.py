"""Step time and peak memory of fine-tuning (default: the tiny preset on a synthetic LIBERO-schema dataset, CPU).

The baseline the CRaFT overhead is measured against: run it twice, with and without CRaFT, in separate processes
(peak RSS is a per-process high-water mark):

    python benchmarks/bench_finetune.py --steps 20 --warmup 3
    python benchmarks/bench_finetune.py --steps 20 --warmup 3 --finetune.use_craft True
    python benchmarks/bench_finetune.py --synthetic False --finetune.data_root_dir <rlds> \
        --finetune.dataset_name libero_spatial_no_noops --finetune.model_preset real --finetune.vlm_path <base VLM>

From Python: `measure_finetune(cfg, warmup)` returns the numbers for one configuration.
"""

import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vla-scripts"))  # `from finetune import train`

import numpy as np
import torch

from finetune import TrainHooks, train
from prismatic.cli_errors import cli_entry, parse_config
from prismatic.training.finetune_config import FinetuneConfig


def _tiny_defaults() -> FinetuneConfig:
    return FinetuneConfig(model_preset="tiny", dataset_name="synthetic_libero_no_noops", batch_size=2,
                          image_aug=False, use_lora=True, lora_rank=8, wandb_mode="disabled", save_freq=10**9,
                          run_id="bench_finetune")


@dataclass
class BenchConfig:
    finetune: FinetuneConfig = field(default_factory=_tiny_defaults)
    steps: int = 20                 # optimizer steps measured (after the warm-up)
    warmup: int = 3                 # first steps excluded (allocator, caches, lazy init)
    synthetic: bool = True          # write a synthetic dataset in a temp dir and train on it
    threads: int | None = None      # torch intra-op threads (None: torch default)
    output_json: Path | None = None


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch; CPU: the process's peak resident set size (Linux ru_maxrss is in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_finetune(cfg: FinetuneConfig, warmup: int) -> dict:
    """Train `cfg.max_steps` steps; step time = interval between consecutive step ends (data, forward, backward,
    update, logging; checkpoint writes excluded), statistics over the steps after `warmup`."""
    if cfg.max_steps <= warmup + 1:
        raise ValueError(f"max_steps ({cfg.max_steps}) must exceed warmup + 1 ({warmup + 1})")
    stamps: list[float] = []
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = train(cfg, TrainHooks(on_step_end=lambda step, metrics: stamps.append(time.perf_counter())))
    total = time.perf_counter() - t0
    step_times = np.diff(np.asarray(stamps))[warmup:] * 1e3
    return {
        "use_craft": cfg.use_craft, "use_lora": cfg.use_lora, "model_preset": cfg.model_preset,
        "batch_size": cfg.batch_size, "grad_accumulation_steps": cfg.grad_accumulation_steps,
        "num_images_in_input": cfg.num_images_in_input, "device": str(device), "threads": torch.get_num_threads(),
        "measured_steps": int(step_times.size), "step_ms_mean": float(step_times.mean()),
        "step_ms_median": float(np.median(step_times)), "step_ms_std": float(step_times.std()),
        "peak_memory_mb": peak_memory_mb(device), "total_s": total,
        "trainable_params": sum(p.numel() for p in result.policy.parameters() if p.requires_grad),
        "final_loss": result.history[-1]["VLA Train/Loss"],
    }


@cli_entry("bench_finetune")
def main(argv: list[str] | None = None) -> None:
    bench = parse_config(BenchConfig, argv)
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        cfg = replace(bench.finetune, max_steps=bench.steps + bench.warmup + 1)
        if bench.synthetic:
            from prismatic.data.synthetic_libero import make_synthetic_libero_dataset

            make_synthetic_libero_dataset(Path(tmp) / "data", cfg.dataset_name, num_tasks=2, episodes_per_task=2,
                                          steps=16, seed=0)
            cfg = replace(cfg, data_root_dir=Path(tmp) / "data", run_root_dir=Path(tmp) / "runs")
        numbers = measure_finetune(cfg, bench.warmup)
    print(json.dumps(numbers, indent=2))
    if bench.output_json is not None:
        Path(bench.output_json).write_text(json.dumps({"config": asdict(bench.finetune) | {"max_steps": cfg.max_steps},
                                                       "result": numbers}, indent=2, default=str))


if __name__ == "__main__":
    main()
