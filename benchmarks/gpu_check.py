"""Helpers of benchmarks/gpu_check.sh (the one-shot GPU check): the three training modes, and the summary table.

    python benchmarks/gpu_check.py modes --work_dir W --preset real --batch_size 8 --num_images 2 --steps 5 --warmup 2
    python benchmarks/gpu_check.py summary --work_dir W

`modes`: synthetic LIBERO data, the preset with random weights (tiny in-process tokenizer: no network) and the
offline cache are prepared by vla-scripts/bench_craft.py's code; then plain, CRaFT offline and CRaFT online run one
after another, each in a fresh process (its own CUDA peak): step time (median), peak
`torch.cuda.max_memory_allocated` (CPU: peak RSS of the process), tokens/s = non-padding LLM positions of the live
forward per step / step time. Precision: on CUDA the training path's bf16 autocast (fp32 master weights, as
upstream); on CPU fp32. Writes W/modes.json.
`summary`: one table from W/modes.json, W/ddp.json, W/fsdp.json (written by gpu_check.sh from the torchrun run) and
W/libero.json (the LIBERO episode's result file), whichever exist.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "vla-scripts"))

MODES = ("baseline", "craft_offline", "craft_online")


def _peak_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tokens_per_step(trainer) -> int:
    """Non-padding LLM positions of the live forward(s) of one step (counted by a hook on the first call only)."""
    from prismatic.models.modeling_vla import unwrap_vla

    counts: list[int] = []
    core = unwrap_vla(trainer.policy.vla).language_model.model

    def hook(_m, _args, kwargs):
        counts.append(int(kwargs["attention_mask"].sum()))

    handle = core.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        trainer.step()
    finally:
        handle.remove()
    return counts[0]  # one micro-batch per step (no accumulation); under online anchors θ0's forward comes second


def _run_mode(mode: str, common: dict, flags: dict, warmup: int, steps: int) -> dict:
    import torch
    from bench_craft import Trainer

    from prismatic.training.distributed import init_distributed
    from prismatic.training.finetune_config import FinetuneConfig

    env = init_distributed()
    if env.device.type == "cpu" and os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    trainer = Trainer(mode, FinetuneConfig(run_id=mode, **common, **flags), env)
    tokens = _tokens_per_step(trainer)  # also the first warm-up step
    for _ in range(warmup - 1):
        trainer.step()
    if env.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(env.device)
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    step_s = statistics.median(walls)
    return {"mode": mode, "device": str(env.device), "step_s": step_s, "peak_bytes": _peak_bytes(env.device),
            "tokens_per_step": tokens, "tokens_per_s": tokens / step_s}


def run_modes(args: argparse.Namespace) -> dict:
    import bench_craft

    cfg = bench_craft.BenchConfig(work_dir=Path(args.work_dir) / "bench", model_preset=args.preset,
                                  random_init=True, batch_size=args.batch_size,
                                  num_images_in_input=args.num_images, use_lora=args.use_lora,
                                  lora_rank=args.lora_rank, steps=args.steps, warmup=args.warmup)
    common, cache_dir = bench_craft._prepare(cfg, "sequential")
    rows = {}
    for mode, flags in bench_craft._mode_flags(cache_dir).items():
        rows[mode] = bench_craft._in_child(_run_mode, mode, common, flags, args.warmup, args.steps)
    result = {"preset": args.preset, "batch_size": args.batch_size, "num_images": args.num_images,
              "use_lora": args.use_lora, "steps": args.steps, "warmup": args.warmup, "rows": rows,
              "model_dir": str(common["config_file_path"]), "data_root_dir": str(common["data_root_dir"])}
    (Path(args.work_dir) / "modes.json").write_text(json.dumps(result, indent=1))
    return result


def summary(work_dir: Path) -> list[str]:
    from prismatic.training.metrics_log import read_metrics

    lines = []
    modes_file = work_dir / "modes.json"
    if modes_file.exists():
        res = json.loads(modes_file.read_text())
        rows = res["rows"]
        base = rows["baseline"]
        lines.append(f"preset {res['preset']} (random init), batch {res['batch_size']}, {res['num_images']} images, "
                     f"LoRA {res['use_lora']}, {res['steps']} steps after {res['warmup']} warm-up, "
                     f"device {base['device']}")
        lines.append(f"{'check':<24}{'step s':>9}{'x plain':>9}{'peak MiB':>10}{'x plain':>9}{'tokens/s':>10}")
        for mode in MODES:
            r = rows[mode]
            lines.append(f"{mode:<24}{r['step_s']:>9.3f}{r['step_s'] / base['step_s']:>9.2f}"
                         f"{r['peak_bytes'] / 2**20:>10.0f}{r['peak_bytes'] / base['peak_bytes']:>9.2f}"
                         f"{r['tokens_per_s']:>10.0f}")
    else:
        lines.append("training modes: not run (no modes.json)")
    last = {}
    for strategy, run_id in (("ddp", "gpu_check"), ("fsdp", "gpu_check_fsdp")):
        file = work_dir / f"{strategy}.json"
        if file.exists():
            rec = json.loads(file.read_text())
            lines.append(f"{'torchrun ' + strategy.upper() + ', 1 rank':<24}{'ok' if rec['ok'] else 'FAILED':>9}  "
                         f"{rec['detail']}")
        records = read_metrics(work_dir / "runs" / run_id / "metrics.jsonl")
        if records:
            last[strategy] = records[-1]
    if len(last) == 2:  # the same run under both strategies: equal up to float summation order
        keys = [k for k in ("VLA Train/Loss", "CRaFT/Lambda", "CRaFT/Retention Loss") if k in last["ddp"]]
        gaps = ", ".join(f"{k.split('/')[-1]} {last['ddp'][k]:.6g} vs {last['fsdp'].get(k, float('nan')):.6g}"
                         for k in keys)
        lines.append(f"{'FSDP vs DDP, last step':<24}{'':>9}  {gaps}")
    libero_file = work_dir / "libero.json"
    if libero_file.exists():
        lib = json.loads(libero_file.read_text())
        lines.append(f"{'LIBERO episode (EGL)':<24}{'ok' if lib['ok'] else 'FAILED':>9}  {lib['detail']}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("modes")
    m.add_argument("--work_dir", required=True)
    m.add_argument("--preset", default="real", choices=("real", "tiny"))
    m.add_argument("--batch_size", type=int, default=8)
    m.add_argument("--num_images", type=int, default=2, choices=(1, 2))
    m.add_argument("--use_lora", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    m.add_argument("--lora_rank", type=int, default=32)
    m.add_argument("--steps", type=int, default=5)
    m.add_argument("--warmup", type=int, default=2)
    s = sub.add_parser("summary")
    s.add_argument("--work_dir", required=True)
    args = parser.parse_args(argv)
    if args.command == "modes":
        if args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
            print("error: --steps, --warmup and --batch_size must be >= 1 — pass positive integers", file=sys.stderr)
            raise SystemExit(2)
        run_modes(args)
    for line in summary(Path(args.work_dir)):
        print(line)


if __name__ == "__main__":
    main()
