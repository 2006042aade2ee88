"""FSDP2 (`fully_shard`) for the fine-tuning loop: the sharding plan and the few sharded-aware helpers it needs.

    --distributed_strategy fsdp   (torchrun; nccl on GPU, gloo on CPU; also a world of one process)

Plan: one FSDP unit per LLM decoder layer and per ViT block (DINOv2 and SigLIP), then the policy as the root (vision
projector, embeddings, ActionQuery tokens, final norms, action head, proprio projector). Mixed precision on CUDA:
bf16 parameters and compute, fp32 gradient reduction (upstream trains under bf16 autocast); on CPU fp32 (no policy),
`--dtype bfloat16` then autocasts as under DDP.

What changes for the rest of the loop, and where it is handled:
- parameters are DTensor shards: the gradient norm, the finite-weights check and CRaFT's scalars sum local shards and
  all-reduce a few numbers (`local_sq_norm`, `all_local_finite`, `CRaFTGradientProjector`); no full gradient is
  gathered;
- checkpoints: `gathered_policy` assembles the full fp32 weights on rank 0 (one tensor at a time, offloaded to CPU) into
  a plain copy of the policy, which the unchanged DDP writer saves: the folder format does not depend on the strategy;
  the optimizer state is saved as a full, name-keyed state dict (`full_optimizer_state` / `load_full_optimizer_state`)
  so a resume re-shards it exactly (any world size);
- every forward through the root module is collective: ranks must run the same number of forwards (validation pads).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def sharding_units(policy: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: every LLM decoder layer and every ViT block, in forward order."""
    from prismatic.models.modeling_vla import unwrap_vla

    base = unwrap_vla(policy.vla)  # an OpenVLAForActionPrediction: its decoder is `language_model.model`
    backbone = base.vision_backbone
    return [*backbone.featurizer.blocks, *backbone.fused_featurizer.blocks, *base.language_model.model.layers]


def shard_policy(policy: nn.Module, device: torch.device, dtype: str) -> nn.Module:
    """`fully_shard` per unit, then the root; returns the same module object, now an FSDP module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The policy returns latents that are slices of the hidden states; FSDP warns about any view it returns, in case
    # the caller edits it in place (which would skip its backward hook). Nothing here edits outputs in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if device.type == "cuda" and dtype != "float32":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in sharding_units(policy):
        fully_shard(unit, **kwargs)
    fully_shard(policy, **kwargs)
    return policy


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard_root(model: nn.Module) -> None:
    """Free the root's gathered parameters. FSDP keeps the root's gathered after a forward (for the backward); a
    forward that ran with swapped weights (CRaFT's θ0) must not leave them to the next forward."""
    if is_sharded(model):
        model.reshard()


# ---- sums over shards ------------------------------------------------------------------------------------------
def local_sq_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ ||t||² over this rank's parts (local shards of DTensors), float64 on the tensors' device."""
    total = None
    for t in tensors:
        part = local_part(t).detach()
        value = torch.linalg.vector_norm(part.to(torch.float64)) ** 2 if part.numel() else part.new_zeros(
            (), dtype=torch.float64)
        total = value if total is None else total + value
    return torch.zeros((), dtype=torch.float64) if total is None else total


def sharded_global_norm(grads: list[torch.Tensor]) -> float:
    """L2 norm of gradients that are DTensor shards: local sums of squares, one all-reduce."""
    sq = local_sq_norm(grads)
    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    return float(sq.sqrt())


def all_local_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names whose local part holds NaN / inf on ANY rank (an all-reduce of flags; every rank gets the same list)."""
    items = list(tensors)
    flags = torch.tensor([0.0 if torch.isfinite(local_part(t).detach()).all() else 1.0 for _, t in items],
                         dtype=torch.float32)
    if dist.is_initialized() and items:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [name for (name, _), bad in zip(items, flags.tolist(), strict=True) if bad > 0]


# ---- checkpoints ------------------------------------------------------------------------------------------------
def meta_template(policy: nn.Module) -> nn.Module:
    """A plain (unsharded) copy of `policy` whose parameters are on the meta device: the module tree the saver fills.

    Made before `fully_shard` (which changes the modules' classes); costs no parameter memory. Buffers are copied
    (small: RoPE tables, constants) since non-persistent ones are not in any state dict.
    """
    memo: dict[int, Any] = {}
    for p in policy.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(policy, memo)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full state dict on rank 0 (CPU, one tensor gathered at a time), {} on the other ranks."""
    keep = dist.get_rank() == 0
    out = {}
    for name, value in model.state_dict().items():
        whole = full_tensor(value.detach())
        if keep:
            out[name] = whole.cpu()
    return out


def gathered_policy(model: nn.Module, template: nn.Module | None) -> nn.Module | None:
    """Collective: on rank 0 a plain CPU copy of the sharded policy with its full weights; None on other ranks."""
    state = full_model_state(model)
    if dist.get_rank() != 0:
        return None
    from prismatic.models.modeling_vla import unwrap_vla

    plain = copy.deepcopy(template)
    plain.load_state_dict(state, strict=True, assign=True)
    vla = unwrap_vla(plain.vla)
    if getattr(vla.config, "tie_word_embeddings", False):
        vla.tie_weights()  # assign=True gave the tied LM head its own tensor; share it again as the live model does
    return plain


def _indexed_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: the optimizer state keyed by parameter name with whole tensors (CPU) on rank 0, {} elsewhere.
    {"state": {name: {key: value}}, "param_groups": [{..., "params": [name, ...]}]}: independent of the world size."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = _indexed_params(optimizer)
    saved = optimizer.state_dict()
    keep = dist.get_rank() == 0
    state = {}
    for index in sorted(saved["state"]):  # the same order on every rank: the gathers are collective
        entry = {}
        for key, value in saved["state"][index].items():
            whole = full_tensor(value) if isinstance(value, torch.Tensor) else value
            entry[key] = whole.cpu() if isinstance(whole, torch.Tensor) else whole
        if keep:
            state[names[id(params[index])]] = entry
    if not keep:
        return {}
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [names[id(params[i])] for i in group["params"]]} for group in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping) -> None:
    """Every rank passes the same full state (read from training_state.pt) and keeps its own shard of it.
    Parameters no loss reaches have no AdamW state (as under DDP)."""
    by_name = dict(model.named_parameters())
    index = {id(p): i for i, p in enumerate(_indexed_params(optimizer))}
    unknown = [n for n in saved["state"] if n not in by_name]
    if unknown:
        raise ValueError(f"the checkpoint's optimizer state names parameters this model lacks, e.g. {unknown[:3]}")
    state = {}
    for name, entry in saved["state"].items():
        p = by_name[name]
        state[index[id(p)]] = {
            key: shard_like(value, p) if isinstance(value, torch.Tensor) and is_dtensor(p)
            and tuple(value.shape) == tuple(p.shape) else value
            for key, value in entry.items()}
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [index[id(by_name[n])] for n in group["params"]]} for group in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Collective for DTensors sharded on one dim of a 1-D mesh (FSDP2): the whole tensor on every rank, by one
    synchronous all_gather of equal-size padded pieces (torch.chunk's layout); the tensor itself otherwise.

    Not DTensor.full_tensor(): on gloo its asynchronous gather of a padded temporary was seen to crash (a segfault
    reading freed memory in gloo's thread, under load); a synchronous call holds its buffers to the end."""
    if not is_dtensor(t):
        return t
    local = t.to_local()
    placement = t.placements[0]
    if t.device_mesh.ndim != 1:
        raise NotImplementedError("full_tensor: only 1-D device meshes (FSDP2 without HSDP)")
    if placement.is_replicate():
        return local
    if not placement.is_shard():
        raise NotImplementedError(f"full_tensor: placement {placement} is not supported")
    dim, group = placement.dim, t.device_mesh.get_group()
    world, length = dist.get_world_size(group), t.shape[placement.dim]
    piece = -(-length // world)
    sizes = [max(0, min(piece, length - r * piece)) for r in range(world)]
    shape = list(local.shape)
    shape[dim] = piece
    send = local.new_zeros(shape)
    send.narrow(dim, 0, local.shape[dim]).copy_(local)
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=group)
    return torch.cat([r.narrow(dim, 0, n) for r, n in zip(received, sizes, strict=True)], dim=dim)


def trainable_full_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every trainable tensor, whole, on CPU, under the plain (unsharded) names."""
    return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in policy.named_parameters() if p.requires_grad}


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole tensor, laid out as the DTensor `param` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)
