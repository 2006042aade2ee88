"""Side-by-side cost of CRaFT against the plain VLA-Adapter step, in ONE process (same config, same samples).

    python vla-scripts/bench_craft.py --work_dir /tmp/bench_craft [--data_root_dir <rlds root>] [--steps 30] \
        [--warmup 3] [--batch_size 2] [--model_preset tiny] [--use_lora True] [--threads 1]

Three trainers are built from the same flags and seed: `baseline` (plain step), `craft_offline` (anchors from a cache
built here with vla-scripts/build_craft_cache.py's code) and `craft_online` (θ0 forward per micro-batch; LoRA:
adapters disabled + swapped non-LoRA tensors). Their steps are interleaved round-robin (baseline, offline, online,
baseline, ...), so background load hits all three alike; the first `warmup` rounds are discarded. A step is
`compute_gradients` + `apply_update` (+ the dual update for CRaFT), exactly what the training loop runs; data loading
is outside the timed region. Timing uses the default allocator; `memory_steps` further rounds measure memory.

Reported per mode: median step time and its ratio to the baseline; for CRaFT the share of the step spent in the
gradient surgery (`CRaFTGradientProjector.step`: rank all-reduce, scalars, writing .grad); and peak memory.
Memory method (CPU): peak = resident tensors owned by the trainer (parameters, gradients, AdamW moments, projector
buffers, θ0 copies, the loaded cache) + the transient peak of a step, measured as the maximum RSS sampled every
0.5 ms by a thread during the step minus the RSS just before it. For these rounds (after the timing rounds) glibc's
mmap threshold is lowered and `malloc_trim(0)` runs before each step, so that freed memory returns to the OS and RSS
follows live memory. RSS is per process, so the three trainers' static
tensors are counted separately rather than read from RSS. On CUDA use torch.cuda.max_memory_allocated instead.
"""

import ctypes
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
import torch

from prismatic.cli_errors import cli_entry, parse_config


@dataclass
class BenchConfig:
    # fmt: off
    work_dir: Path | None = None          # runs, cache and synthetic data go here (default: a temporary folder)
    data_root_dir: Path | None = None     # RLDS root; None: a synthetic LIBERO-like dataset is written to work_dir
    dataset_name: str = "synthetic_libero_no_noops"
    model_preset: str = "tiny"
    batch_size: int = 2
    num_images_in_input: int = 1
    use_lora: bool = True
    lora_rank: int = 4
    steps: int = 30                       # measured rounds (one step of every mode per round)
    warmup: int = 3                       # rounds discarded
    memory_steps: int = 10                # rounds of the memory measurement (after the timing rounds)
    threads: int = 1
    seed: int = 7
    # fmt: on


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: RSS then over-states the transient peak less precisely
        return None


def _malloc_returns_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: allocations >= 64 KB are mmapped, freed straight to the OS
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


def _trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)  # hand free heap pages back, so RSS before a step is the live memory


class RssPeak:
    """Max RSS sampled by a thread while active (bytes)."""

    def __init__(self, period_s: float = 5e-4) -> None:
        self.proc, self.period = psutil.Process(), period_s
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        _trim()
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += key[1]
    return total


class Trainer:
    def __init__(self, name: str, cfg, env) -> None:
        from finetune import seed_everything
        from prismatic.training import policy_setup
        from prismatic.training.data_setup import build_training_data
        from prismatic.training.finetune_config import validate_config
        from prismatic.training.lr_schedule import build_lr_scheduler
        from prismatic.training.train_step import plain_gradients

        validate_config(cfg)
        seed_everything(cfg.seed)
        self.name, self.env = name, env
        self.policy = policy_setup.build_policy(cfg, env).to(env.device).train()
        data = build_training_data(cfg, self.policy, env, run_dir=Path(cfg.run_root_dir) / name)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.lr_warmup_steps, cfg.num_steps_before_decay)
        self.stream = data.train_stream(0)
        self.craft = None
        self.compute = plain_gradients
        self.surgery_s = 0.0
        if cfg.use_craft:
            from prismatic.training.craft_step import CRaFTStep

            self.craft = CRaFTStep(cfg, self.policy, env, data.train_set)
            self.compute = self.craft.compute_gradients
            step = self.craft.projector.step

            def timed(lam, step=step):
                t0 = time.perf_counter()
                out = step(lam)
                self.surgery_s += time.perf_counter() - t0
                return out

            self.craft.projector.step = timed

    def step(self) -> float:
        from prismatic.training.train_step import apply_update, global_step_stats

        micro = next(self.stream)  # data loading is outside the timed region
        t0 = time.perf_counter()
        local = self.compute(self.policy, micro, self.env.device)
        stats = global_step_stats(local, self.env)
        apply_update(self.optimizer, self.scheduler, self.params, stats)
        if self.craft is not None:
            self.craft.finish_step()
        return time.perf_counter() - t0

    def static_bytes(self) -> int:
        tensors = [p for p in self.policy.parameters()] + [p.grad for p in self.policy.parameters()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        if self.craft is not None:
            tensors.append(self.craft.projector._flat)
            if self.craft.weights is not None:
                tensors += list(self.craft.weights.theta0_state().values())
            if self.craft.cache is not None:
                tensors += list(self.craft.cache._loaded.values())
        return _tensor_bytes(tensors)


def run(cfg: BenchConfig) -> dict:
    from build_craft_cache import BuildCacheConfig, build_cache

    from prismatic.training.distributed import init_distributed
    from prismatic.training.finetune_config import FinetuneConfig

    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="bench_craft_"))
    data_root = cfg.data_root_dir
    if data_root is None:
        from prismatic.data.synthetic_libero import make_synthetic_libero_dataset

        data_root = work / "rlds"
        if not (data_root / cfg.dataset_name).is_dir():
            make_synthetic_libero_dataset(data_root, cfg.dataset_name, num_tasks=2, episodes_per_task=3, steps=20)
    cache_dir = work / "cache"
    build_cache(BuildCacheConfig(cache_dir=cache_dir, model_preset=cfg.model_preset, seed=cfg.seed,
                                 num_images_in_input=cfg.num_images_in_input, data_root_dir=data_root,
                                 dataset_name=cfg.dataset_name, image_aug=False, device="cpu", overwrite=True))
    common = dict(data_root_dir=data_root, dataset_name=cfg.dataset_name, run_root_dir=work / "runs",
                  model_preset=cfg.model_preset, batch_size=cfg.batch_size, max_steps=10**6, learning_rate=1e-4,
                  wandb_mode="disabled", image_aug=False, num_images_in_input=cfg.num_images_in_input,
                  use_lora=cfg.use_lora, lora_rank=cfg.lora_rank, seed=cfg.seed)
    modes = {"baseline": dict(use_craft=False),
             "craft_offline": dict(use_craft=True, craft_anchor_source="offline", craft_cache_dir=cache_dir),
             "craft_online": dict(use_craft=True, craft_anchor_source="online")}
    env = init_distributed()
    trainers = {m: Trainer(m, FinetuneConfig(run_id=m, **common, **flags), env) for m, flags in modes.items()}
    times = {m: [] for m in modes}
    transient = dict.fromkeys(modes, 0)
    load = []
    for r in range(cfg.warmup + cfg.steps):  # timing: the default allocator, as training runs
        for m, tr in trainers.items():
            if r == cfg.warmup:
                tr.surgery_s = 0.0
            dt = tr.step()
            if r >= cfg.warmup:
                times[m].append(dt)
        load.append(psutil.getloadavg()[0])
    surgery = {m: tr.surgery_s for m, tr in trainers.items()}
    _malloc_returns_memory()  # memory: freed blocks go back to the OS so that RSS follows live memory
    for _ in range(cfg.memory_steps):
        for m, tr in trainers.items():
            with RssPeak() as peak:
                tr.step()
            transient[m] = max(transient[m], peak.peak - peak.start)
    base_t = statistics.median(times["baseline"])
    base_mem = trainers["baseline"].static_bytes() + transient["baseline"]
    rows = {}
    for m, tr in trainers.items():
        med = statistics.median(times[m])
        mem = tr.static_bytes() + transient[m]
        rows[m] = {"step_ms": 1e3 * med, "time_ratio": med / base_t,
                   "surgery_share": surgery[m] / sum(times[m]) if tr.craft is not None else 0.0,
                   "static_mb": tr.static_bytes() / 2**20, "transient_mb": transient[m] / 2**20,
                   "peak_mb": mem / 2**20, "memory_ratio": mem / base_mem}
    return {"rows": rows, "load_avg_1min": statistics.mean(load), "cpu_count": psutil.cpu_count(),
            "steps": cfg.steps, "batch_size": cfg.batch_size, "use_lora": cfg.use_lora,
            "model_preset": cfg.model_preset}


def print_table(result: dict) -> None:
    print(f"preset {result['model_preset']}, batch {result['batch_size']}, LoRA {result['use_lora']}, "
          f"{result['steps']} measured steps per mode, load average {result['load_avg_1min']:.2f} on "
          f"{result['cpu_count']} CPUs")
    print(f"{'mode':<14}{'step ms':>9}{'x base':>8}{'surgery':>9}{'static MB':>11}{'transient MB':>14}"
          f"{'peak MB':>9}{'mem x':>7}")
    for m, r in result["rows"].items():
        print(f"{m:<14}{r['step_ms']:>9.1f}{r['time_ratio']:>8.2f}{100 * r['surgery_share']:>8.1f}%"
              f"{r['static_mb']:>11.1f}{r['transient_mb']:>14.1f}{r['peak_mb']:>9.1f}{r['memory_ratio']:>7.2f}")


@cli_entry("bench_craft")
def main(argv: list[str] | None = None) -> None:
    print_table(run(parse_config(BenchConfig, argv)))


if __name__ == "__main__":
    main()
