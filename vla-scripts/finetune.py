"""Fine-tune a VLA-Adapter policy on LIBERO RLDS data (1 process or torchrun; LoRA or full; optional CRaFT).

    python vla-scripts/finetune.py --config_file_path <model or checkpoint dir> --dataset_name libero_spatial_no_noops \
        --batch_size 8 --learning_rate 5e-4 --max_steps 5000 --use_l1_regression True --use_craft False
    torchrun --standalone --nproc_per_node 2 vla-scripts/finetune.py ...          # DDP (nccl on GPU, gloo on CPU)
    python vla-scripts/finetune.py --config_file_path runs/<run id>--10000_chkpt --resume True --resume_step 10000 ...
    python vla-scripts/finetune.py --config_path my_run.yaml                     # flags from YAML (CLI overrides)

Flags: prismatic/training/finetune_config.py (FinetuneConfig, with start-up validation). SIGTERM / SIGINT: the current
step finishes, a checkpoint is saved, exit code 0. `train(cfg)` below is the whole loop (importable: tests, demo and
benchmarks call it with `from finetune import train`, `vla-scripts/` on sys.path).

Per optimizer step s (G = batch_size * world_size * grad_accumulation_steps samples, stream positions
[s*G, (s+1)*G), micro-batch j of rank r = s*G + j*b*W + r*b + [0, b)):

    micro_batches = next(stream)                        # k micro-batches + per-sample head noise
    local = compute_gradients(model, micro_batches)     # plain_gradients; CRaFT swaps in its own (`if cfg.use_craft:`,
                                                        # prismatic/training/craft_step.py), Align / ConSFT / KI theirs
    stats = global_step_stats(local)                    # rank-averaged loss numbers
    applied, grad_norm = apply_update(optimizer, ...)   # skip on non-finite loss/grad; scheduler always steps
    craft.finish_step()                                 # CRaFT only: dual update of lambda after the step
    log / validate / checkpoint                         # rank 0 writes; SIGTERM/SIGINT -> save and return

Everything that decides the result (data order, augmentation, head noise) is a function of (seed, stream
position), so 1 rank x batch 2b and 2 ranks x batch b see the same samples with the same noise.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

if __name__ == "__main__":  # bad flags fail in a second, before torch / transformers are imported
    from prismatic.training.finetune_config import preflight_main

    preflight_main()

import draccus
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from prismatic.cli_errors import DiskFullError, UserError, cli_entry, one_line, parse_config
from prismatic.run_lock import FolderInUseError, acquire_folder_lock
from prismatic.training import checkpointing as ckpt
from prismatic.training import fsdp as fsdp_lib
from prismatic.training import policy_setup, run_folder
from prismatic.training.data_setup import TrainStream, build_training_data
from prismatic.training.distributed import DistEnv, any_rank, barrier, gather_objects, init_distributed, is_lost_peer
from prismatic.training.finetune_config import (
    RAW_STRING_FLAGS,
    FinetuneConfig,
    global_batch_size,
    make_run_id,
    parse_checkpoint_dir,
    validate_config,
    validate_resume_target,
)
from prismatic.training.lr_schedule import build_lr_scheduler
from prismatic.training.metrics_log import MetricsLogger
from prismatic.training.train_step import (
    TRAIN_KEYS,
    VAL_KEYS,
    apply_update,
    autocast_dtype,
    global_step_stats,
    plain_gradients,
    validation_losses,
)
from prismatic.training.update_norms import UpdateNormMeter

CONFIG_FILE = "config.yaml"
HISTORY_LENGTH = 10_000  # steps of metrics kept in memory for the caller (the file keeps all)


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient, or a run none of whose steps was
    applied: an expected outcome of bad data or a too high learning rate (one line, exit 2), not a bug."""


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    final_step: int
    last_checkpoint: Path | None
    stopped_by_signal: bool = False
    history: list[dict] = field(default_factory=list)  # metrics of the last HISTORY_LENGTH steps (all in metrics.jsonl)
    policy: object = None  # the trained VLAPolicy of this rank (LoRA unmerged), for tests and benchmarks


@dataclass
class TrainHooks:
    """Test/benchmark hooks. `on_step_end(step, metrics)` runs after every step on every rank."""

    on_step_end: Callable[[int, dict], None] | None = None


class StopRequest:
    """The first SIGTERM/SIGINT sets a flag: the loop finishes the current step, saves a checkpoint and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, _frame) -> None:
        self.requested = True
        for sig, handler in self._previous.items():  # a second signal acts as usual (e.g. Ctrl-C interrupts)
            signal.signal(sig, handler)

    def __enter__(self) -> StopRequest:
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def save_resolved_config(cfg: FinetuneConfig, run_dir: Path) -> None:
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    with open(tmp, "w") as f:
        draccus.dump(cfg, f)
    os.replace(tmp, run_dir / CONFIG_FILE)


def train(cfg: FinetuneConfig, hooks: TrainHooks | None = None, given_flags: set[str] | None = None) -> TrainResult:
    """Run fine-tuning as configured; returns where things were written. Raises ConfigError on bad flags.

    given_flags: the flags the user set (command line / YAML); on resume the others take the run's values. In-process
    callers may omit it: flags that differ from their defaults count as given.
    """
    if cfg.resume:
        validate_resume_target(cfg)  # the checkpoint exists, is complete and matches --resume_step
        # every file against the sha256 in COMPLETE before any of it is read (a damaged marker is corruption too):
        # nothing is trained, let alone re-sealed into a new checkpoint, from inputs that fail verification
        ckpt.verify_checkpoint(Path(cfg.config_file_path))
        given = run_folder.given_flags_from_defaults(cfg) if given_flags is None else set(given_flags)
        cfg = run_folder.resolve_resume_config(cfg, policy_setup.recorded_run_config(Path(cfg.config_file_path),
                                                                                     cfg.run_root_dir), given)
    warnings = validate_config(cfg)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    env = init_distributed(require_group=cfg.distributed_strategy == "fsdp")  # FSDP needs one, even for 1 process
    if env.is_main:
        for message in warnings:
            print(f"[finetune] warning: {message}")
    try:
        with autocast_dtype(cfg.dtype):  # precision of every forward of the run (issue 16)
            return _train(cfg, env, hooks or TrainHooks())
    finally:
        if owns_group and torch.distributed.is_initialized():  # a caller's process group stays the caller's
            torch.distributed.destroy_process_group()


def _train(cfg: FinetuneConfig, env: DistEnv, hooks: TrainHooks) -> TrainResult:
    # ---- run identity, resume state ---------------------------------------------------------------------------
    seed_everything(cfg.seed)
    run_id = parse_checkpoint_dir(Path(cfg.config_file_path))[0] if cfg.resume else make_run_id(cfg, env.world_size)
    run_dir = Path(cfg.run_root_dir) / run_id
    created_root = env.is_main and not Path(cfg.run_root_dir).exists()
    lock = _lock_run_folder(run_dir, env)  # before anything is written; held until the run ends in any way
    try:
        return _train_owned(cfg, env, hooks, run_id, run_dir)
    except DiskFullError as err:  # "run the same command again" would be refused as an existing run
        raise err.with_fix(_continue_advice(Path(cfg.run_root_dir), run_id)) from err
    except Exception as exc:
        if env.distributed and is_lost_peer(exc):  # gloo / NCCL noticed that another rank died
            others = [r for r in range(env.world_size) if r != env.rank]
            lost = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
            raise UserError(f"rank {env.rank} lost {lost}: that process died or was killed mid-step "
                            f"({one_line(str(exc))[:160]})",
                            _continue_advice(Path(cfg.run_root_dir), run_id,
                                             first="find why it died (its log; the OOM killer in dmesg)")) from exc
        raise
    finally:
        if lock is not None:
            lock.release()
        if created_root and Path(cfg.run_root_dir).is_dir() and not any(Path(cfg.run_root_dir).iterdir()):
            Path(cfg.run_root_dir).rmdir()  # a failure before anything was written leaves no empty root behind


def _continue_advice(run_root_dir: Path, run_id: str, first: str = "free disk space") -> str:
    """How to go on after a failure (a full disk, a lost rank): resume from the newest complete checkpoint (which
    is intact: checkpoints are renamed into place only when whole), or start over when there is none."""
    saved = ckpt.list_checkpoints(run_root_dir, run_id)
    if saved:
        step, path = saved[-1]
        return (f"{first}, then continue the run from its last intact checkpoint with --resume True "
                f"--config_file_path {path} --resume_step {step}")
    if run_folder.run_artefacts(run_root_dir, run_id):
        return f"{first}, then start the run again with --overwrite True (it has no complete checkpoint)"
    return f"{first} and run the same command again"


def _lock_run_folder(run_dir: Path, env: DistEnv):
    """Rank 0 locks the run folder (prismatic/run_lock.py); a refusal stops every rank with rank 0's line."""
    lock, refusal = None, None
    if env.is_main:
        try:
            lock = acquire_folder_lock(run_dir, "finetune", fix="wait for that run to end (or stop it); to train "
                                       "another run at the same time pick another --run_id / --seed")
        except FolderInUseError as err:
            refusal = str(err)
    refusal = gather_objects(refusal, env)[0]
    if refusal is not None:
        raise FolderInUseError(refusal)
    return lock


def _train_owned(cfg: FinetuneConfig, env: DistEnv, hooks: TrainHooks, run_id: str, run_dir: Path) -> TrainResult:
    resume_state = None
    if not cfg.resume:  # every rank refuses alike (no rank waits at a barrier for one that failed)
        run_folder.claim_run_folder(Path(cfg.run_root_dir), run_id, cfg.overwrite, delete=env.is_main)
    barrier(env)
    if env.is_main:
        for note in run_folder.recover_interrupted_saves(Path(cfg.run_root_dir), run_id):
            print(f"[finetune] {note}")
    barrier(env)
    if cfg.resume:
        resume_state = ckpt.load_training_state(Path(cfg.config_file_path))
        if resume_state["step"] != cfg.resume_step:
            raise UserError(f"{cfg.config_file_path}: training_state step {resume_state['step']} != --resume_step "
                            f"{cfg.resume_step}", "pass the step the checkpoint folder was saved at")
        saved_strategy = resume_state.get("distributed_strategy", "ddp")
        if saved_strategy != cfg.distributed_strategy:
            raise UserError(f"{cfg.config_file_path} was saved by a --distributed_strategy {saved_strategy} run; its "
                            f"optimizer state cannot be resumed under {cfg.distributed_strategy}",
                            f"resume with --distributed_strategy {saved_strategy} (the saved policy folder itself "
                            "loads under either)")
    G = global_batch_size(cfg, env.world_size)
    created_run_dir = env.is_main and not run_dir.exists()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (cfg.resume and (run_dir / CONFIG_FILE).is_file()):  # a resumed run keeps the config it started with
            save_resolved_config(cfg, run_dir)
    try:
        return _train_in_run_dir(cfg, env, hooks, run_id, run_dir, resume_state, G)
    except BaseException:
        # a failure before the run logged anything must not leave a folder that passes for a run
        if created_run_dir and not run_folder.run_artefacts(Path(cfg.run_root_dir), run_id):
            ckpt.remove_tree(run_dir)  # (an empty run root is removed once the lock file is gone)
        raise


def _train_in_run_dir(cfg: FinetuneConfig, env: DistEnv, hooks: TrainHooks, run_id: str, run_dir: Path,
                      resume_state: dict | None, G: int) -> TrainResult:
    # ---- model, data ------------------------------------------------------------------------------------------
    policy = policy_setup.build_policy(cfg, env)          # LoRA applied; on resume the checkpoint's weights
    start_step = resume_state["step"] if resume_state else 0
    data = build_training_data(cfg, policy, env, run_dir=run_dir,
                               resume_from=Path(cfg.config_file_path) if cfg.resume else None)
    policy.norm_stats = dict(data.dataset_statistics)
    policy.to(env.device).train()
    fsdp = cfg.distributed_strategy == "fsdp"
    save_template = None
    if fsdp:
        # the plain module tree rank 0 fills with the gathered weights to save (parameters on the meta device)
        save_template = fsdp_lib.meta_template(policy) if env.is_main else None
        fsdp_lib.shard_policy(policy, env.device, cfg.dtype)  # in place: `policy` is now the FSDP root
    params = [p for p in policy.parameters() if p.requires_grad]
    model = policy
    if env.distributed and not fsdp:
        # ONE DDP module around vla + head + proprio projector. Unused parameters exist (last ViT block, SigLIP
        # attn_pool, final ViT norms), hence find_unused_parameters; no buffers need broadcasting.
        model = DDP(policy, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                    find_unused_parameters=True, **_no_buffer_sync_kwargs())

    if cfg.craft_adam_second_moment == "action":  # AdamW's v sees only CRaFT's action part (docs/CRAFT.md)
        from prismatic.training.split_moment_adamw import SplitMomentAdamW

        optimizer = SplitMomentAdamW(params, lr=cfg.learning_rate)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    update_meter = UpdateNormMeter(policy.named_parameters()) if cfg.log_update_norms else None
    scheduler = build_lr_scheduler(optimizer, cfg.lr_warmup_steps, cfg.num_steps_before_decay)
    # The loader iterator draws its base seed from the global RNG: create it before the RNG state is restored.
    stream: TrainStream = data.train_stream(start_step)

    # ---- gradient rule ----------------------------------------------------------------------------------------
    # compute_gradients(model, micro_batches, device) -> {"loss", "curr_l1", "next_l1": this rank's means,
    # optional "metrics": {wandb key: already-global value}} and leaves the step's gradient in p.grad.
    # Plain VLA-Adapter: one backward per micro-batch. CRaFT replaces it here (two autograd.grad + projection) and
    # keeps its state (lambda, statistics) in `craft`: any object with state_dict() / load_state_dict().
    craft = None
    related = None  # --retention_method align | consft | ki: another drop-in with its own state
    compute_gradients = plain_gradients
    if cfg.use_craft:
        from prismatic.training.craft_step import CRaFTStep

        craft = CRaFTStep(cfg, policy, env, data.train_set,
                          saved_state=resume_state.get("craft") if resume_state is not None else None)
        compute_gradients = craft.compute_gradients
    elif cfg.retention_method in ("align", "consft"):
        from prismatic.training.related_methods import AlignMethod, ConSFTMethod

        saved = resume_state.get("related") if resume_state is not None else None
        related = AlignMethod(cfg, policy, env, saved) if cfg.retention_method == "align" else ConSFTMethod(cfg, env)
        compute_gradients = related.compute_gradients
    elif cfg.retention_method == "ki":
        from prismatic.training.related_methods import KIMethod

        related = KIMethod(cfg, policy, env, resume_state.get("related") if resume_state is not None else None)
        compute_gradients = related.compute_gradients

    monitor = None
    if cfg.retention_monitor:  # built before any update: θ0 = the weights as loaded (or the saved / snapshot θ0)
        from prismatic.training.retention_monitor import RetentionMonitor

        monitor = RetentionMonitor(cfg, policy, saved_state=(resume_state or {}).get("retention_monitor"),
                                   craft_state=(resume_state or {}).get("craft"))

    consecutive_nonfinite = total_nonfinite = 0
    if resume_state is not None:
        if resume_state["data"]["global_batch_size"] != G and env.is_main:
            print(f"[finetune] warning: global batch {G} differs from the checkpoint's "
                  f"{resume_state['data']['global_batch_size']}: the stream continues at position {start_step * G}, "
                  "not where the interrupted run would have")
        saved_schedule = resume_state["scheduler"]["lr_lambdas"][0]
        if saved_schedule != {"warmup_steps": cfg.lr_warmup_steps, "decay_step": cfg.num_steps_before_decay} \
                and env.is_main:
            print(f"[finetune] warning: the checkpoint's lr schedule {saved_schedule} is kept; --lr_warmup_steps / "
                  "--num_steps_before_decay / --learning_rate given now do not change a resumed run")
        if fsdp:
            fsdp_lib.load_full_optimizer_state(policy, optimizer, resume_state["optimizer"])
        else:
            optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        consecutive_nonfinite = resume_state["nonfinite"]["consecutive"]
        total_nonfinite = resume_state["nonfinite"]["total"]
        ranks_rng = resume_state["rng"]
        ckpt.restore_rng_state(ranks_rng[env.rank] if env.rank < len(ranks_rng) else ranks_rng[0])
        if craft is not None and resume_state.get("craft") is not None:
            craft.load_state_dict(resume_state["craft"])

    logger = MetricsLogger(run_dir, run_id, asdict(cfg) | {"world_size": env.world_size, "global_batch_size": G},
                           enabled=env.is_main, wandb_mode=cfg.wandb_mode, wandb_project=cfg.wandb_project,
                           wandb_entity=cfg.wandb_entity, resume_step=start_step)  # drops records past start

    def save(step: int) -> Path:
        rng = ckpt.capture_rng_state()
        state = {
            "step": step,
            # FSDP: the full, name-keyed state on rank 0 (collective); DDP: the usual index-keyed one
            "optimizer": fsdp_lib.full_optimizer_state(policy, optimizer) if fsdp else optimizer.state_dict(),
            "distributed_strategy": cfg.distributed_strategy,
            "scheduler": scheduler.state_dict(),
            "rng": gather_objects(rng, env),
            "data": data.position_state(step),
            "nonfinite": {"consecutive": consecutive_nonfinite, "total": total_nonfinite},
            "world_size": env.world_size,
            "craft": craft.state_dict() if craft is not None else None,
            **({"related": related.state_dict()} if related is not None else {}),
            **({"retention_monitor": monitor.state_dict()} if monitor is not None else {}),
        }
        # checked on every rank, so a diverged run stops everywhere before writing
        policy_setup.check_finite_weights(policy, Path(cfg.run_root_dir), run_id, step, across_ranks=fsdp)
        # FSDP: rank 0 gets a plain copy with the full weights, written by the same code as under DDP
        to_save = fsdp_lib.gathered_policy(policy, save_template) if fsdp else policy
        failure = None
        if env.is_main:
            try:
                policy_setup.save_training_checkpoint(cfg, to_save, run_root_dir=Path(cfg.run_root_dir),
                                                      run_id=run_id, step=step, training_state=state)
            except UserError as err:  # e.g. a full disk: every rank must stop, not wait for rank 0 at a barrier
                failure = err
        del to_save
        if any_rank(failure is not None, env):  # also the barrier: no rank goes on before the folder exists
            raise failure or UserError(f"rank 0 could not write the checkpoint of step {step} (its error line "
                                       "says why)", "fix what rank 0 reports, then continue with --resume True "
                                       "from the run's newest checkpoint")
        path = ckpt.checkpoint_dir(Path(cfg.run_root_dir), run_id, step)  # the same answer on every rank
        ckpt.restore_rng_state(rng)  # writing (e.g. building the merged VLA) must not shift the training RNG
        return path

    # ---- loop -------------------------------------------------------------------------------------------------
    history: deque[dict] = deque(maxlen=HISTORY_LENGTH)
    last_checkpoint = None
    stopped = False
    progress = _progress_bar(env, start_step, cfg.max_steps)
    t_last = time.perf_counter()
    with StopRequest() as stop, _closed_at_exit(progress):  # an error line must not land on the bar's line
        for step in range(start_step, cfg.max_steps):
            micro_batches = next(stream)
            # drift with the weights before this step's update (the ones CRaFT's L_ret of this step sees)
            monitored = monitor.metrics(micro_batches, env.device) if monitor is not None and monitor.due(step + 1) \
                else {}
            local = compute_gradients(model, micro_batches, env.device)
            stats = global_step_stats(local, env)
            lr = optimizer.param_groups[0]["lr"]
            if update_meter is not None:
                update_meter.before()
            if craft is not None and cfg.craft_adam_second_moment == "action":
                optimizer.set_second_moment_grads(craft.action_grads())
            applied, grad_norm = apply_update(optimizer, scheduler, params, stats)
            update_norms = update_meter.after(optimizer) if update_meter is not None else {}
            if craft is not None:
                craft.finish_step()  # λ update AFTER the optimizer step, from the rank-averaged L_ret
            done = step + 1  # optimizer steps taken (checkpoint / metrics index)
            if applied:
                consecutive_nonfinite = 0
            else:
                consecutive_nonfinite += 1
                total_nonfinite += 1
            metrics = {TRAIN_KEYS["loss"]: stats["loss"], TRAIN_KEYS["curr_l1"]: stats["curr_l1"],
                       TRAIN_KEYS["next_l1"]: stats["next_l1"], TRAIN_KEYS["lr"]: lr,
                       TRAIN_KEYS["grad_norm"]: grad_norm, "VLA Train/Non-finite Steps": total_nonfinite,
                       **local.get("metrics", {}), **monitored, **update_norms}
            if cfg.use_val_set and done % cfg.val_freq == 0:
                val = validation_losses(policy, data.val_batches(), env.device, env)
                metrics.update({VAL_KEYS[k]: v for k, v in val.items()})
            logger.log(done, metrics)
            history.append({"step": done, **metrics})
            if progress is not None:
                now = time.perf_counter()
                progress.set_postfix(loss=f"{stats['loss']:.4f}", steps_per_s=f"{1.0 / max(now - t_last, 1e-9):.2f}")
                t_last = now
                progress.update(1)
            if hooks.on_step_end is not None:
                hooks.on_step_end(done, metrics)
            since = f"resume from {last_checkpoint or cfg.config_file_path}" if (last_checkpoint or cfg.resume) \
                else "start again"
            if consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{consecutive_nonfinite} consecutive optimizer steps had a non-finite loss or gradient (last "
                    f"at step {done}, loss {stats['loss']}, grad norm {grad_norm}); each was skipped, the run stops",
                    f"lower --learning_rate, check the data for NaN/inf, or raise --max_consecutive_nonfinite; then "
                    f"{since}")
            stop_now = any_rank(stop.requested, env)
            save_due = done % cfg.save_freq == 0 or done == cfg.max_steps or stop_now
            if save_due and done == total_nonfinite:
                # every step of the run so far was skipped: the weights are the initial ones, not a trained
                # checkpoint. Not saved; a run that ends so never exits 0.
                if done == cfg.max_steps or stop_now:
                    raise NonFiniteLossError(
                        f"all {done} optimizer steps of this run had a non-finite loss or gradient and were "
                        "skipped: nothing was trained, no checkpoint is written",
                        "check the data for NaN/inf and lower --learning_rate, then start the run again")
                if env.is_main:
                    print(f"[finetune] warning: no checkpoint at step {done}: every step so far had a non-finite "
                          "loss or gradient and was skipped")
            elif save_due:
                last_checkpoint = save(done)
            if stop_now:
                stopped = True
                if env.is_main:
                    print(f"[finetune] stop requested: saved step {done} to {last_checkpoint}; exiting")
                break
    logger.close()
    final = history[-1]["step"] if history else start_step
    return TrainResult(run_id=run_id, run_dir=run_dir, final_step=final, last_checkpoint=last_checkpoint,
                       stopped_by_signal=stopped, history=list(history), policy=policy)


def _no_buffer_sync_kwargs() -> dict:
    # torch >= 2.14 renames broadcast_buffers to forward_sync_buffers (buffers here are constants, e.g. RoPE tables)
    import inspect

    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


@contextmanager
def _closed_at_exit(progress):
    try:
        yield progress
    finally:
        if progress is not None:
            progress.close()


def _progress_bar(env: DistEnv, start: int, total: int):
    if not env.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="finetune", dynamic_ncols=True, leave=False)


@cli_entry("finetune")
def main(argv: list[str] | None = None) -> None:
    """Expected errors (bad flags, data, a full disk, a refused run folder): one `error:` line, exit 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    # also reads --config_path x.yaml (CLI flags override it)
    cfg = parse_config(FinetuneConfig, args, raw_string_fields=RAW_STRING_FLAGS)
    result = train(cfg, given_flags=given_flag_names(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[finetune] run {result.run_id}: finished at step {result.final_step}; last checkpoint "
              f"{result.last_checkpoint}{' (stopped by signal)' if result.stopped_by_signal else ''}")


def given_flag_names(args: list[str]) -> set[str]:
    """Flags set on the command line or in the --config_path YAML (what a resume must not silently override)."""
    names = {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config_path" and i + 1 < len(args) else \
            arg.split("=", 1)[1] if arg.startswith("--config_path=") else None
        if path is not None and Path(path).is_file():
            import yaml

            loaded = yaml.safe_load(Path(path).read_text()) or {}
            names |= set(loaded) if isinstance(loaded, dict) else set()
    return names - {"config_path"}


if __name__ == "__main__":
    main()
