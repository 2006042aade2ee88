"""One optimizer step of VLA-Adapter fine-tuning, nanoGPT style: loss, gradients, update.

The step is split so that the gradient computation is a single replaceable function:

    stats = plain_gradients(model, micro_batches, ...)   # fills p.grad; CRaFT swaps in its own function here
    update = apply_update(...)                           # finite check, grad norm, optimizer + scheduler step

`plain_gradients` runs one forward/backward per micro-batch with the loss divided by the number of micro-batches
(so k micro-batches of b equal one batch of k*b) and DDP's all-reduce only on the last one (`no_sync` before).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from prismatic.models.image_transform import batch_pixel_values
from prismatic.training.distributed import DistEnv, all_reduce_mean

TRAIN_KEYS = {
    "loss": "VLA Train/Loss",
    "curr_l1": "VLA Train/Curr Action L1 Loss",
    "next_l1": "VLA Train/Next Actions L1 Loss",
    "lr": "VLA Train/Learning Rate",
    "grad_norm": "VLA Train/Gradient Norm",
}
VAL_KEYS = {"loss": "VLA Val/Loss", "curr_l1": "VLA Val/Curr Action L1 Loss", "next_l1": "VLA Val/Next Actions L1 Loss"}
MODEL_INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "proprio")


def action_l1_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, current-action L1, next-actions L1) for chunks (B, K, A); loss = mean L1 over the whole chunk."""
    if pred.shape != target.shape:
        raise ValueError(f"predicted actions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()).abs()
    return err.mean(), err[:, 0].mean(), err[:, 1:].mean()


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for the sample at global stream `position` (independent of world size)."""
    return int(np.random.SeedSequence([seed, position]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 1 << 31], dtype=np.uint64)))


HEAD_NOISE_STREAM = 0x4E4F495345  # separates the head-noise seeds from the data stream's seeds


def head_noise(seed: int, step: int, shape: tuple[int, ...], std: float, device: torch.device) -> torch.Tensor:
    """N(0, std) start noise of the action head for optimizer step `step`: ONE draw of `shape` (chunk, 7 * D) shared
    by every sample, micro-batch and rank of the step (upstream draws one per forward, shared by the batch; tying it
    to the step keeps 1 rank x 2b == 2 ranks x b and accumulation exact)."""
    gen = torch.Generator().manual_seed(sample_seed(seed, HEAD_NOISE_STREAM + int(step)))
    return torch.empty(*shape).normal_(0.0, std, generator=gen).to(device)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; a loader batch's uint8 `images` are normalised there into `pixel_values`."""
    moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if "images" in moved:
        moved["pixel_values"] = batch_pixel_values(moved, device)
    return moved


AUTOCAST_DTYPES = ("auto", "float32", "bfloat16")
_autocast_dtype = "auto"  # set for the duration of a run by finetune.py's --dtype (`autocast_dtype`)


@contextlib.contextmanager
def autocast_dtype(name: str):
    """Inside: `autocast_context` follows --dtype `name` (auto | float32 | bfloat16)."""
    global _autocast_dtype
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {AUTOCAST_DTYPES}, got {name!r}")
    previous, _autocast_dtype = _autocast_dtype, name
    try:
        yield
    finally:
        _autocast_dtype = previous


def autocast_context(device: torch.device):
    """bf16 autocast on GPU (upstream), plain fp32 on CPU; `--dtype bfloat16` autocasts on CPU too (same path, fp32
    master weights and fp32 losses), `--dtype float32` nowhere."""
    if _autocast_dtype == "float32":
        return contextlib.nullcontext()
    if device.type == "cuda" or _autocast_dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class MicroBatch:
    """A collated micro-batch on the device plus the head's start noise (None: no noise, e.g. validation)."""

    batch: dict
    noise: torch.Tensor | None


def forward_losses(model: torch.nn.Module, micro: MicroBatch, device: torch.device, **forward_kwargs):
    """Forward (under autocast) and the three L1 numbers; returns (loss, curr_l1, next_l1, policy_output).
    `forward_kwargs` go to the policy's forward (knowledge insulation's action tokens)."""
    with autocast_context(device):
        out = model(micro.batch, noise=micro.noise, **forward_kwargs)
    loss, curr, nxt = action_l1_losses(out.actions, micro.batch["actions"])
    return loss, curr, nxt, out


Objective = Callable[[torch.Tensor, Any, "MicroBatch"], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def plain_gradients(model: torch.nn.Module, micro_batches: Sequence[MicroBatch], device: torch.device,
                    objective: Objective | None = None,
                    forward_kwargs: Callable[[MicroBatch], dict] | None = None) -> dict:
    """VLA-Adapter's gradient: backward of mean L1 / k per micro-batch, DDP sync on the last one only.

    Returns the local (this rank's) mean over micro-batches of loss / curr_l1 / next_l1 as float tensors.
    `objective(l1_loss, policy_output, micro) -> (loss to back-propagate, extras)` replaces what is back-propagated
    (the related-work baselines Align, ConSFT, KI); its scalar extras are averaged over micro-batches and returned too.
    `forward_kwargs(micro)`: extra keyword arguments of the policy forward for that micro-batch (KI).
    """
    k = len(micro_batches)
    sums = torch.zeros(3, dtype=torch.float64)
    extra_sums: dict[str, torch.Tensor] = {}
    for j, micro in enumerate(micro_batches):
        with gradient_sync(model, j == k - 1):
            kwargs = {} if forward_kwargs is None else forward_kwargs(micro)
            loss, curr, nxt, out = forward_losses(model, micro, device, **kwargs)
            target, extras = (loss, {}) if objective is None else objective(loss, out, micro)
            (target / k).backward()
        sums += torch.stack([loss.detach(), curr.detach(), nxt.detach()]).double().cpu()
        for key, value in extras.items():
            extra_sums[key] = extra_sums.get(key, 0.0) + torch.as_tensor(value).detach().double().cpu()
    return {"loss": sums[0] / k, "curr_l1": sums[1] / k, "next_l1": sums[2] / k,
            **{key: value / k for key, value in extra_sums.items()}}


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool):
    """Inside: gradients are reduced over ranks by this backward only if `sync` (DDP `no_sync`, FSDP2
    `set_requires_gradient_sync`); micro-batches before the last accumulate locally."""
    from prismatic.training.fsdp import is_sharded

    if sync:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def grad_global_norm(params: Sequence[torch.nn.Parameter]) -> float:
    """L2 norm over all gradients (already rank-averaged by DDP / FSDP); params without a grad count as zero.
    FSDP2 shards: local sums of squares and one all-reduce."""
    from prismatic.training.fsdp import is_dtensor, sharded_global_norm

    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if any(is_dtensor(g) for g in grads):
        return sharded_global_norm(grads)
    grads = [g.float() for g in grads]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def global_step_stats(local: dict, env: DistEnv) -> dict:
    """Rank-average the per-step loss numbers (identical on every rank afterwards)."""
    stacked = torch.stack([torch.as_tensor(local[k], dtype=torch.float64) for k in ("loss", "curr_l1", "next_l1")])
    mean = all_reduce_mean(stacked.to(env.device if env.device.type == "cuda" else "cpu"), env).cpu()
    return {"loss": float(mean[0]), "curr_l1": float(mean[1]), "next_l1": float(mean[2])}


def apply_update(optimizer: torch.optim.Optimizer, scheduler, params: Sequence[torch.nn.Parameter],
                 stats: dict) -> tuple[bool, float]:
    """Optimizer + scheduler step unless the loss or the gradient is non-finite (then the update is skipped).

    The check uses rank-averaged numbers, so every rank takes the same branch. Returns (applied, grad_norm).
    The scheduler always steps: the lr follows the step index, skipped steps included.
    """
    grad_norm = grad_global_norm(params)
    finite = math.isfinite(stats["loss"]) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first update makes torch warn about the call order: intended here
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        scheduler.step()
    return finite, grad_norm


@torch.no_grad()
def validation_losses(policy: torch.nn.Module, batches, device: torch.device, env: DistEnv) -> dict:
    """Sample-weighted mean loss numbers over this rank's validation batches, summed over ranks (eval mode, no noise).

    Runs the bare policy (not the DDP wrapper): ranks may hold different numbers of batches. Under FSDP every
    forward is collective, so a rank with fewer batches repeats its last one with weight 0.
    """
    from prismatic.training.fsdp import is_sharded, reshard_root

    sharded = is_sharded(policy)
    was_training = policy.training
    policy.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, curr, next (sample-weighted), samples
    batches = list(batches) if sharded else batches
    extra = 0
    if sharded and env.distributed:
        count = torch.tensor([len(batches)], dtype=torch.int64)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        extra = int(count) - len(batches)
        if extra and not batches:
            raise ValueError(f"rank {env.rank} has no validation batch while others have some: with "
                             "--distributed_strategy fsdp every rank needs one (lower the batch size)")
    try:
        for batch in batches:
            loss, curr, nxt, _ = forward_losses(policy, MicroBatch(to_device(batch, device), None), device)
            n = batch["actions"].shape[0]
            sums += torch.tensor([loss.item() * n, curr.item() * n, nxt.item() * n, n], dtype=torch.float64)
        for _ in range(extra):  # collective forwards only; nothing added
            forward_losses(policy, MicroBatch(to_device(batches[-1], device), None), device)
    finally:
        policy.train(was_training)
        reshard_root(policy)  # FSDP keeps the root gathered after a forward that no backward follows
    if env.distributed:
        sums = sums.to(env.device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    if sums[3] == 0:
        raise ValueError("the validation set produced no sample")
    return {"loss": float(sums[0] / sums[3]), "curr_l1": float(sums[1] / sums[3]), "next_l1": float(sums[2] / sums[3])}
