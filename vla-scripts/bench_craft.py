"""Side-by-side cost of CRaFT against the plain VLA-Adapter step (same config, same samples), printed as ratios.

    python vla-scripts/bench_craft.py --work_dir /tmp/bench_craft [--data_root_dir <rlds root>] [--steps 30] \
        [--warmup 3] [--batch_size 2] [--model_preset tiny] [--use_lora True] [--threads 1]
    python vla-scripts/bench_craft.py --model_preset real --random_init True --batch_size 1 --lora_rank 8 \
        --num_images_in_input 1 --steps 2 --warmup 1 --threads 2           # real size, random weights
    python vla-scripts/bench_craft.py --model_preset real --vlm_path <base VLM> [--config_file_path <tokenizer>] ...

Modes: `baseline` (plain step), `craft_offline` (anchors from a cache built here with
vla-scripts/build_craft_cache.py's code) and `craft_online` (θ0 forward per micro-batch; LoRA: adapters disabled +
swapped non-LoRA tensors). A step is `compute_gradients` + `apply_update` (+ the dual update for CRaFT), exactly what
the training loop runs; data loading is outside the timed region. The model: the tiny preset built from scratch,
`--vlm_path` / `--config_file_path` (as finetune.py), or `--random_init True`: the preset with random weights written
to a folder of the work dir with the tiny in-process tokenizer (prismatic/training/random_init_vla.py).

Two ways to run the modes (`--isolation`, default `auto`: interleaved for a tiny model built from scratch,
sequential otherwise):

- `interleaved`: three trainers in ONE process, steps round-robin (baseline, offline, online, baseline, ...), so
  background load hits all three alike; the first `warmup` rounds are discarded. Memory: resident tensors owned by
  the trainer (parameters, gradients, AdamW moments, projector buffers, θ0 copies, the loaded cache) + the transient
  peak of a step (max RSS sampled every 0.5 ms during the step minus the RSS before it; glibc's mmap threshold is
  lowered and `malloc_trim(0)` runs before each step so that RSS follows live memory).
- `sequential`: one fresh process per mode, one after another (three real-size trainers do not fit in 24 GiB
  together). Each builds its trainer, runs `warmup` steps, resets the kernel's peak-RSS counter
  (/proc/self/clear_refs), runs `steps` steps and reports the process's peak RSS over them (VmHWM: whole process,
  model included) and its CPU time (`time.process_time`: all threads, less sensitive than wall time to other
  processes on the machine). The offline cache is built in its own process first.

Reported per mode: median wall time and CPU time of a step, their ratios to the baseline; for CRaFT the share of the
step spent in the gradient surgery (`CRaFTGradientProjector.step`: rank all-reduce, scalars, writing .grad) and the
projector's buffer size; peak memory and its ratio. On CUDA use torch.cuda.max_memory_allocated instead. With
`--count_flops True` (default) one more step per mode, after the measurement, runs under torch's FlopCounterMode:
the FLOPs of its matmuls, convolutions and attention (forward and backward; the CPU flash-attention kernels are
added with torch's formulas for the CUDA ones) and their ratio to the baseline, i.e. the work ratio, which no load
on the machine moves. Elementwise work (the surgery, AdamW, norms) is not counted.
With `--retention_every k > 1` four more modes: `craft_{offline,online}_reuse` (`--craft_retention_every k`, the kept
g_ret) and `craft_{offline,online}_coef` (`--craft_reuse coefficient`: one backward of L_act + (λ − c_last) L_ret);
their counted step is a step between refreshes. `--modes a,b` runs only baseline and the named modes.
Bad flags: one line `error: ... — ...` on stderr, exit 2, before anything is built.
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

from prismatic.cli_errors import UserError, cli_entry, parse_config

MODES = ("baseline", "craft_offline", "craft_online")
ISOLATIONS = ("auto", "interleaved", "sequential")


@dataclass
class BenchConfig:
    # fmt: off
    work_dir: Path | None = None          # runs, cache, data, random-init model go here (default: a temporary folder)
    data_root_dir: Path | None = None     # RLDS root; None: a synthetic LIBERO-like dataset is written to work_dir
    dataset_name: str = "synthetic_libero_no_noops"
    model_preset: str = "tiny"
    vlm_path: Path | None = None          # as finetune.py: the base VLM (real size)
    config_file_path: Path | None = None  # as finetune.py: a policy / HF VLA folder (or the tokenizer with vlm_path)
    random_init: bool = False             # build the preset with random weights in work_dir (tiny tokenizer)
    isolation: str = "auto"               # interleaved (one process) | sequential (one process per mode) | auto
    batch_size: int = 2
    num_images_in_input: int = 1
    use_lora: bool = True
    lora_rank: int = 4
    use_pro_version: bool = True
    freeze_vision_backbone: bool = False  # as finetune.py: no update (nor LoRA) in the ViTs; θ0 then reuses them
    steps: int = 30                       # measured steps per mode (interleaved: rounds of one step per mode)
    warmup: int = 3                       # steps (rounds) discarded
    memory_steps: int = 10                # interleaved only: rounds of the memory measurement, after the timing
    threads: int = 1
    count_flops: bool = True              # one more step per mode under torch's FlopCounterMode: the work ratio
    retention_every: int = 1              # > 1: four more modes, CRaFT with --craft_retention_every k (cheaper
    #                                       step): *_reuse (--craft_reuse gradient) and *_coef (coefficient)
    modes: str = ""                       # comma list of the modes to run besides baseline ("": all of them)
    seed: int = 7
    # fmt: on


class BenchError(UserError, ValueError):
    """A bad flag: reported as one line `error: <what> — <how to fix>`, exit 2 (through prismatic.cli_errors)."""


def validate(cfg: BenchConfig) -> str:
    """Check every flag before anything is built; returns the resolved isolation."""
    from prismatic.training.finetune_config import PRESETS

    if cfg.model_preset not in PRESETS:
        raise BenchError(f"--model_preset {cfg.model_preset!r} is not a preset — use one of {', '.join(PRESETS)}")
    if cfg.isolation not in ISOLATIONS:
        raise BenchError(f"--isolation {cfg.isolation!r} is unknown — use one of {', '.join(ISOLATIONS)}")
    for name in ("batch_size", "steps", "threads", "num_images_in_input", "lora_rank", "memory_steps",
                 "retention_every"):
        if getattr(cfg, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(cfg, name)} — pass a positive integer")
    if cfg.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {cfg.warmup} — pass 0 or more")
    known = _mode_flags(Path("."), max(2, cfg.retention_every))
    unknown = [m for m in _selected(cfg) if m not in known]
    if unknown:
        raise BenchError(f"--modes names unknown modes {unknown} — use some of {', '.join(known)}")
    extra = [m for m in _selected(cfg) if m not in MODES]
    if extra and cfg.retention_every == 1:
        raise BenchError(f"--modes {','.join(extra)} need --retention_every k > 1 — pass e.g. --retention_every 4")
    for name in ("vlm_path", "config_file_path", "data_root_dir"):
        value = getattr(cfg, name)
        if value is not None and not Path(value).exists():
            raise BenchError(f"--{name} {value} does not exist — pass an existing folder")
    if cfg.random_init and (cfg.vlm_path or cfg.config_file_path):
        raise BenchError("--random_init True builds its own model — drop --vlm_path / --config_file_path, or "
                         "--random_init")
    if cfg.model_preset != "tiny" and not (cfg.random_init or cfg.vlm_path or cfg.config_file_path):
        raise BenchError(f"--model_preset {cfg.model_preset} has no scratch build here — pass --random_init True "
                         "or the model with --vlm_path / --config_file_path")
    if cfg.work_dir is not None and Path(cfg.work_dir).exists() and not Path(cfg.work_dir).is_dir():
        raise BenchError(f"--work_dir {cfg.work_dir} is a file — pass a folder")
    if cfg.isolation != "auto":
        return cfg.isolation
    scratch_tiny = cfg.model_preset == "tiny" and not (cfg.random_init or cfg.vlm_path or cfg.config_file_path)
    return "interleaved" if scratch_tiny else "sequential"


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


def _flop_mapping() -> dict:
    """torch's FLOP table lacks the CPU flash-attention kernels SDPA dispatches to here; count them with torch's own
    formulas for the CUDA kernels (QKᵀ and PV forward; backward with the recomputation of P, GQA by query heads)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_flops(fn) -> tuple[int, object]:
    """(FLOPs of the matmuls, convolutions and attention that fn() runs, forward and backward; fn's result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        result = fn()
    return counter.get_total_flops(), result


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
        self.surgery_s = self.surgery_cpu_s = 0.0
        if cfg.use_craft:
            from prismatic.training.craft_step import CRaFTStep

            self.craft = CRaFTStep(cfg, self.policy, env, data.train_set)
            self.compute = self.craft.compute_gradients
            step = self.craft.projector.step

            def timed(lam, step=step):
                t0, c0 = time.perf_counter(), time.process_time()
                out = step(lam)
                self.surgery_s += time.perf_counter() - t0
                self.surgery_cpu_s += time.process_time() - c0
                return out

            self.craft.projector.step = timed

    def step(self, micro=None) -> tuple[float, float]:
        """One optimizer step (on the next micro-batches, or `micro`); returns (wall seconds, process CPU seconds)."""
        from prismatic.training.train_step import apply_update, global_step_stats

        micro = next(self.stream) if micro is None else micro  # data loading is outside the timed region
        t0, c0 = time.perf_counter(), time.process_time()
        local = self.compute(self.policy, micro, self.env.device)
        stats = global_step_stats(local, self.env)
        apply_update(self.optimizer, self.scheduler, self.params, stats)
        if self.craft is not None:
            self.craft.finish_step()
        return time.perf_counter() - t0, time.process_time() - c0

    def step_flops(self) -> int:
        """FLOPs of one more optimizer step (matmul-like ops; the surgery and AdamW are elementwise and not counted).
        With --craft_retention_every k > 1 the counted step is one that reuses g_ret (the refresh step is the exact
        step's, counted by the plain CRaFT modes): an uncounted step first if needed, on the same micro-batches, so
        that every mode counts the same samples."""
        micro = next(self.stream)
        if self.craft is not None and self.craft.retention_every > 1:
            if self.craft.projector.steps % self.craft.retention_every == 0:
                self.step(micro)
        return count_flops(lambda: self.step(micro))[0]

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

    def sizes(self) -> dict:
        out = {"trainable_params": sum(p.numel() for p in self.params)}
        if self.craft is not None:
            proj = self.craft.projector
            reach = proj.reach()
            out.update(buffer_mb=proj._flat.numel() * proj._flat.element_size() / 2**20,
                       ret_params=proj.buffered_elements(), n_ret=len(reach["ret"]),
                       n_act_only=len(reach["act_only"]), n_unreached=len(reach["unreached"]),
                       unreached_params=sum(proj.params[i].numel() for i in proj.unreached_index))
        return out


# ---- shared set-up -------------------------------------------------------------------------------------------
def _prepare(cfg: BenchConfig, isolation: str) -> tuple[dict, Path]:
    """Work dir, data, model source and offline cache; returns the FinetuneConfig fields common to the modes."""
    from build_craft_cache import BuildCacheConfig

    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="bench_craft_"))
    work.mkdir(parents=True, exist_ok=True)
    data_root = cfg.data_root_dir
    if data_root is None:
        from prismatic.data.synthetic_libero import make_synthetic_libero_dataset

        data_root = work / "rlds"
        if not (data_root / cfg.dataset_name).is_dir():
            if isolation == "sequential":  # real size: every frame costs a θ0 forward in the cache: only what is used
                frames = max(4, cfg.batch_size * (cfg.warmup + cfg.steps))  # the last 7 steps hold no full chunk
                make_synthetic_libero_dataset(data_root, cfg.dataset_name, num_tasks=1, episodes_per_task=1,
                                              steps=frames + 7)
            else:
                make_synthetic_libero_dataset(data_root, cfg.dataset_name, num_tasks=2, episodes_per_task=3,
                                              steps=20)
    config_file_path, vlm_path = cfg.config_file_path, cfg.vlm_path
    if cfg.random_init:
        config_file_path = work / f"random_init_{cfg.model_preset}_seed{cfg.seed}"
        if not (config_file_path / "config.json").exists():
            _in_child(_write_random_init, str(config_file_path), cfg.model_preset, cfg.seed)
    model = dict(model_preset=cfg.model_preset, vlm_path=vlm_path, config_file_path=config_file_path,
                 seed=cfg.seed, num_images_in_input=cfg.num_images_in_input, use_pro_version=cfg.use_pro_version)
    cache_dir = work / "cache"
    cache_cfg = BuildCacheConfig(cache_dir=cache_dir, data_root_dir=data_root, dataset_name=cfg.dataset_name,
                                 image_aug=False, device="cuda" if torch.cuda.is_available() else "cpu",
                                 overwrite=True, **model)
    if isolation == "sequential":
        _in_child(_build_cache, cache_cfg)  # the θ0 model's memory goes with the process
    else:
        _build_cache(cache_cfg)
    return dict(data_root_dir=data_root, dataset_name=cfg.dataset_name, run_root_dir=work / "runs",
                batch_size=cfg.batch_size, max_steps=10**6, learning_rate=1e-4, wandb_mode="disabled",
                image_aug=False, use_lora=cfg.use_lora, lora_rank=cfg.lora_rank,
                freeze_vision_backbone=cfg.freeze_vision_backbone, **model), cache_dir


def _write_random_init(folder: str, preset: str, seed: int) -> None:
    from prismatic.training.random_init_vla import write_random_init_vla

    write_random_init_vla(folder, preset, seed)


def _build_cache(cache_cfg) -> None:
    from build_craft_cache import build_cache

    build_cache(cache_cfg)


def _child_entry(queue, fn, args) -> None:
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as exc:  # reported by the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _in_child(fn, *args):
    """fn(*args) in a fresh (spawned) process; its return value comes back through a queue."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_entry, args=(queue, fn, args))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed in its process: {value}")
    return value


REUSE_MODES = ("craft_offline_reuse", "craft_online_reuse")  # --retention_every k > 1: a step reusing g_ret
COEF_MODES = ("craft_offline_coef", "craft_online_coef")  # ... --craft_reuse coefficient: a step reusing c only


def _mode_flags(cache_dir: Path, retention_every: int = 1) -> dict:
    modes = {"baseline": dict(use_craft=False),
             "craft_offline": dict(use_craft=True, craft_anchor_source="offline", craft_cache_dir=cache_dir),
             "craft_online": dict(use_craft=True, craft_anchor_source="online")}
    if retention_every > 1:
        for mode, exact in zip(REUSE_MODES, ("craft_offline", "craft_online"), strict=True):
            modes[mode] = dict(modes[exact], craft_retention_every=retention_every)
        for mode, exact in zip(COEF_MODES, ("craft_offline", "craft_online"), strict=True):
            modes[mode] = dict(modes[exact], craft_retention_every=retention_every, craft_reuse="coefficient")
    return modes


def _selected(cfg: BenchConfig) -> list[str]:
    return [m.strip() for m in cfg.modes.split(",") if m.strip()]


def _run_modes(cfg: BenchConfig, cache_dir: Path) -> dict:
    """The modes this run measures: all of them, or baseline + --modes."""
    modes = _mode_flags(cache_dir, cfg.retention_every)
    chosen = _selected(cfg)
    return modes if not chosen else {m: f for m, f in modes.items() if m == "baseline" or m in chosen}


def cycle_work_ratios(rows: dict, ks: tuple[int, ...] = (2, 4, 8)) -> dict:
    """Work ratio of --craft_retention_every k per anchor source and reuse, from the counted steps: one refresh
    step (the exact step's FLOPs) and k - 1 steps in between, over k plain steps. {source or source_coef: {k: ratio}}:
    `offline` / `online` reuse g_ret (*_reuse rows), `offline_coef` / `online_coef` the coefficient (*_coef rows)."""
    out = {}
    for source in ("offline", "online"):
        exact = rows.get(f"craft_{source}")
        for suffix, key in (("reuse", source), ("coef", f"{source}_coef")):
            between = rows.get(f"craft_{source}_{suffix}")
            if exact is None or between is None or "flop_ratio" not in between or "flop_ratio" not in exact:
                continue
            out[key] = {k: (exact["flop_ratio"] + (k - 1) * between["flop_ratio"]) / k for k in ks}
    return out


# ---- sequential: one process per mode ------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _run_mode(mode: str, common: dict, flags: dict, warmup: int, steps: int, threads: int, flops: bool) -> dict:
    from prismatic.training.distributed import init_distributed
    from prismatic.training.finetune_config import FinetuneConfig

    torch.set_num_threads(threads)
    _malloc_returns_memory()  # freed blocks go back to the OS: RSS follows live memory
    trainer = Trainer(mode, FinetuneConfig(run_id=mode, **common, **flags), init_distributed())
    for _ in range(warmup):
        trainer.step()
    trainer.surgery_s = trainer.surgery_cpu_s = 0.0
    _trim()
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): sequential mode needs Linux")
    walls, cpus, loads = [], [], []
    for _ in range(steps):
        wall, cpu = trainer.step()
        walls.append(wall)
        cpus.append(cpu)
        loads.append(psutil.getloadavg()[0])
    out = {"walls": walls, "cpus": cpus, "surgery_s": trainer.surgery_s, "surgery_cpu_s": trainer.surgery_cpu_s,
           "peak_bytes": _peak_rss_bytes(), "static_bytes": trainer.static_bytes(), "load": statistics.mean(loads),
           **trainer.sizes()}
    if flops:  # after the measurement: the counter's dispatch overhead stays out of the times
        out["flops"] = trainer.step_flops()
    return out


def run_sequential(cfg: BenchConfig, common: dict, cache_dir: Path) -> dict:
    raw = {}
    for mode, flags in _run_modes(cfg, cache_dir).items():
        raw[mode] = _in_child(_run_mode, mode, common, flags, cfg.warmup, cfg.steps, cfg.threads,
                              cfg.count_flops)
    return _rows(raw, "peak RSS of the mode's own process over the measured steps (VmHWM, model included)")


# ---- interleaved: one process, round-robin -------------------------------------------------------------------
def run_interleaved(cfg: BenchConfig, common: dict, cache_dir: Path) -> dict:
    from prismatic.training.distributed import init_distributed
    from prismatic.training.finetune_config import FinetuneConfig

    torch.set_num_threads(cfg.threads)
    env = init_distributed()
    trainers = {m: Trainer(m, FinetuneConfig(run_id=m, **common, **flags), env)
                for m, flags in _run_modes(cfg, cache_dir).items()}
    raw = {m: {"walls": [], "cpus": [], "loads": []} for m in trainers}
    for r in range(cfg.warmup + cfg.steps):  # timing: the default allocator, as training runs
        for m, tr in trainers.items():
            if r == cfg.warmup:
                tr.surgery_s = tr.surgery_cpu_s = 0.0
            wall, cpu = tr.step()
            if r >= cfg.warmup:
                raw[m]["walls"].append(wall)
                raw[m]["cpus"].append(cpu)
                raw[m]["loads"].append(psutil.getloadavg()[0])
    for m, tr in trainers.items():  # the surgery of the timed steps only (the rounds below run it too)
        raw[m].update(surgery_s=tr.surgery_s, surgery_cpu_s=tr.surgery_cpu_s)
    transient = dict.fromkeys(trainers, 0)
    _malloc_returns_memory()  # memory: freed blocks go back to the OS so that RSS follows live memory
    for _ in range(cfg.memory_steps):
        for m, tr in trainers.items():
            with RssPeak() as peak:
                tr.step()
            transient[m] = max(transient[m], peak.peak - peak.start)
    if cfg.count_flops:
        for m, tr in trainers.items():
            raw[m]["flops"] = tr.step_flops()
    for m, tr in trainers.items():
        raw[m].update(static_bytes=tr.static_bytes(), peak_bytes=tr.static_bytes() + transient[m],
                      load=statistics.mean(raw[m].pop("loads")),
                      **tr.sizes())
    return _rows(raw, "tensors owned by the trainer + transient RSS peak of a step")


def _rows(raw: dict, memory_method: str) -> dict:
    base = raw["baseline"]
    base_t, base_c = statistics.median(base["walls"]), statistics.median(base["cpus"])
    rows = {}
    for m, r in raw.items():
        wall, cpu = statistics.median(r["walls"]), statistics.median(r["cpus"])
        rows[m] = {"step_s": wall, "time_ratio": wall / base_t, "cpu_s": cpu, "cpu_ratio": cpu / base_c,
                   "surgery_share": r["surgery_s"] / sum(r["walls"]),
                   "surgery_cpu_share": r["surgery_cpu_s"] / max(sum(r["cpus"]), 1e-12),
                   "peak_mb": r["peak_bytes"] / 2**20, "static_mb": r["static_bytes"] / 2**20,
                   "memory_ratio": r["peak_bytes"] / base["peak_bytes"], "load": r["load"],
                   **({"gflops": r["flops"] / 1e9, "flop_ratio": r["flops"] / base["flops"]} if "flops" in r else {}),
                   **{k: v for k, v in r.items() if k in ("trainable_params", "buffer_mb", "ret_params", "n_ret",
                                                          "n_act_only", "n_unreached", "unreached_params")}}
    return {"rows": rows, "memory_method": memory_method}


def run(cfg: BenchConfig) -> dict:
    isolation = validate(cfg)
    common, cache_dir = _prepare(cfg, isolation)
    result = (run_sequential if isolation == "sequential" else run_interleaved)(cfg, common, cache_dir)
    result.update(isolation=isolation, cpu_count=psutil.cpu_count(), threads=cfg.threads, steps=cfg.steps,
                  warmup=cfg.warmup, batch_size=cfg.batch_size, use_lora=cfg.use_lora, lora_rank=cfg.lora_rank,
                  freeze_vision_backbone=cfg.freeze_vision_backbone, model_preset=cfg.model_preset,
                  num_images=cfg.num_images_in_input, retention_every=cfg.retention_every,
                  model=("random init" if cfg.random_init else str(cfg.vlm_path or cfg.config_file_path or "scratch")),
                  memory_total_gib=psutil.virtual_memory().total / 2**30)
    return result


def print_table(result: dict) -> None:
    rows = result["rows"]
    print(f"preset {result['model_preset']} ({result['model']}), {rows['baseline']['trainable_params'] / 1e6:.1f}M "
          f"trainable, batch {result['batch_size']}, {result['num_images']} camera(s), LoRA {result['use_lora']} "
          f"(rank {result['lora_rank']}), {'frozen' if result['freeze_vision_backbone'] else 'trained'} ViTs, fp32; "
          f"{result['isolation']}, {result['steps']} measured steps per mode "
          f"after {result['warmup']} warm-up; torch threads {result['threads']} on {result['cpu_count']} CPUs "
          f"({result['memory_total_gib']:.0f} GiB)")
    print(f"memory: {result['memory_method']}; CPU: process CPU time of the step (all threads)")
    print(f"{'mode':<14}{'step s':>9}{'x base':>8}{'CPU s':>9}{'x base':>8}{'surgery':>9}{'(CPU)':>7}"
          f"{'peak MiB':>10}{'mem x':>7}{'buffers MiB':>13}{'load':>6}"
          + (f"{'GFLOP':>10}{'x base':>8}" if "gflops" in rows["baseline"] else ""))
    for m, r in rows.items():
        surgery = f"{100 * r['surgery_share']:>8.1f}%{100 * r['surgery_cpu_share']:>6.1f}%" if m != "baseline" \
            else f"{'-':>9}{'-':>7}"
        buffers = f"{r['buffer_mb']:>13.1f}" if "buffer_mb" in r else f"{'-':>13}"
        print(f"{m:<14}{r['step_s']:>9.3f}{r['time_ratio']:>8.2f}{r['cpu_s']:>9.3f}{r['cpu_ratio']:>8.2f}{surgery}"
              f"{r['peak_mb']:>10.0f}{r['memory_ratio']:>7.2f}{buffers}{r['load']:>6.1f}"
              + (f"{r['gflops']:>10.2f}{r['flop_ratio']:>8.2f}" if "gflops" in r else ""))
    cycles = cycle_work_ratios(rows)
    if cycles:
        print(f"--craft_retention_every k: work of k steps (1 refresh + k-1 in between) / k plain steps; the "
              f"*_reuse / *_coef rows ran k = {result['retention_every']} and their GFLOP is one step in between "
              "(reusing g_ret / reusing only c: *_coef lines below)")
        for source, ratios in cycles.items():
            print(f"  {source:<13}" + "".join(f"  k={k}: {r:.3f}" for k, r in ratios.items()))
    online = rows.get("craft_online", {})
    if "n_ret" in online:
        print(f"projector: g_act/g_ret buffered for {online['n_ret']} tensors ({online['ret_params'] / 1e6:.2f}M "
              f"params) reached by L_ret; {online['n_act_only']} tensors reached by L_act only keep g_act in .grad; "
              f"{online['n_unreached']} tensors ({online['unreached_params'] / 1e6:.2f}M params) reached by neither")


@cli_entry("bench_craft")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchConfig, argv)
    validate(cfg)
    print_table(run(cfg))


if __name__ == "__main__":
    main()
