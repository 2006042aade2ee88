"""CRaFT (Constrained Representation and Fine-Tuning) components. See docs/CRAFT.md for the method.

    min_θ L_act(θ)  s.t.  L_ret(θ) <= ε,    per optimizer step:  g = g_act + (λ - c) · g_ret,
    c = min(0, <g_act, g_ret>) / (||g_ret||² + δ)  (0 when projection is off),   λ <- max(0, λ + η (L_ret - ε))
    (the default `gradient` dual mode; `pid` and the normalised error: CRaFTDualOptimizer).

Components:
    combine_gradients / combine_gradients_sharded   the functional core (two global scalars, one all-reduce if sharded)
    CRaFTGradientProjector                          per-step accumulation buffers, rank all-reduce, writes `.grad`
    CRaFTDualOptimizer                              the dual variable λ
    CRaFTFeatureExtractor, retention_loss           bridge features f_θ = [Pool(C_R^(m)) ; Pool(C_AQ^(M))] and L_ret
    CRaFTWeightManager                              θ0 swapped in for online anchors

Per-step recipe for the training loop (k = grad_accumulation_steps; `model` may be DDP-wrapped):

    extractor = CRaFTFeatureExtractor(vla, raw_layer=m, aq_layer=M, anchor_type=...)
    projector = CRaFTGradientProjector(trainable_params, delta=δ, enable_projection=...)
    dual = CRaFTDualOptimizer(epsilon=ε, dual_lr=η, init_lambda=λ0, enable_dual=..., fixed_lambda=...)
    weights = CRaFTWeightManager(vla, ...)        # online anchors only

    for each micro-batch j = 1..k:
        if online anchors:                         # θ0 features of the same (augmented) batch, no grad
            with torch.no_grad(), weights.reference_weights(), extractor.capture():
                ref_out = vla_forward(batch)
            anchors = extractor.features(ref_out.layout)
        else:
            anchors = cache.lookup(batch["sample_ids"], batch["content_hashes"])
        with ddp_model.no_sync() (if DDP), extractor.capture():      # ONE forward of the trained model
            out = vla_forward(batch)
        feats = extractor.features(out.layout)
        loss_act = L1(action_head(out), actions)                     # unchanged VLA-Adapter loss
        loss_ret = retention_loss(feats, anchors)
        projector.accumulate(loss_act / k, loss_ret / k)             # CALLER divides by k (same as the baseline's
                                                                     # `(loss / k).backward()`); never .backward()
        ret_sum += loss_ret.detach() / k
    # optimizer step
    stats = projector.step(dual.lam)     # all-reduce (average over ranks) of both buffers in one flat all_reduce,
                                         # combine, write p.grad in place (copy_) / assign, reset buffers
    clip_grad_norm_(trainable_params, max_norm)   # optional, AFTER step() (it clips the combined gradient)
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
    l_ret = all_reduce_mean(ret_sum)     # rank-averaged mean-over-micro-batches L_ret, identical on every rank
    dual.step(l_ret)                     # λ update AFTER the optimizer step
    log: CRaFT/Retention Loss = l_ret, CRaFT/Lambda = stats['lambda'] (the λ used in this step; dual.lam is the
         next one), CRaFT/Conflict Ratio = stats['conflict_ratio_params'], ... (see CRaFTGradientProjector.step)

Reusing g_ret (--craft_retention_every k): set `projector.keep_ret = True` before the `step` whose g_ret the next
step reuses; that step calls `projector.accumulate_act(loss_act / k)` (FSDP2: `backward_act_and_capture`) per
micro-batch instead of `accumulate`.

Use non-reentrant gradient checkpointing (reentrant does not support autograd.grad) and never DDP static_graph=True.

FSDP2 (`fully_shard`): autograd.grad cannot reach sharded parameters, so per micro-batch run
    projector.backward_and_capture(loss_act / k, loss_ret / k)   # = loss_act.backward(retain_graph=True);
                                                                 #   capture_grads("act"); loss_ret.backward();
                                                                 #   capture_grads("ret")
(FSDP reduce-scatters and averages each backward); `projector.step` then detects DTensor parameters and uses the
sharded combine (one scalar all-reduce, no full gradient gathered). The capture path also works without FSDP.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from prismatic.training.fsdp import is_dtensor as _is_dtensor
from prismatic.training.fsdp import local_part as _local

ANCHOR_TYPES = ("concat", "raw_only", "aq_only")

# ---------------------------------------------------------------------------------------------------------------------
# Functional core
# ---------------------------------------------------------------------------------------------------------------------


def _check_pairs(g_act: Sequence[torch.Tensor], g_ret: Sequence[torch.Tensor | None]) -> None:
    if len(g_act) != len(g_ret):
        raise ValueError(f"g_act has {len(g_act)} tensors but g_ret has {len(g_ret)}; align them per parameter")
    for i, (a, r) in enumerate(zip(g_act, g_ret, strict=True)):
        if a is None:
            raise ValueError(f"g_act[{i}] is None: pass zeros for parameters L_act does not reach")
        if r is not None and r.shape != a.shape:
            raise ValueError(f"tensor {i}: g_act shape {tuple(a.shape)} != g_ret shape {tuple(r.shape)}")


def _partial_sums(g_act: Sequence[torch.Tensor], g_ret: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """float64 vector [dot, ||g_ret||², ||g_act||², per-tensor dot_0..dot_{n-1}] over the given (local) tensors."""
    n = len(g_act)
    device = g_act[0].device if n else torch.device("cpu")
    out = torch.zeros(3 + n, dtype=torch.float64, device=device)
    for i, (a, r) in enumerate(zip(g_act, g_ret, strict=True)):
        a64 = a.detach().to(torch.float64)
        out[2] += (a64 * a64).sum()
        if r is None:
            continue
        r64 = r.detach().to(torch.float64)
        d = (a64 * r64).sum()
        out[3 + i] = d
        out[0] += d
        out[1] += (r64 * r64).sum()
    return out


def _scalars_and_stats(
    sums: torch.Tensor,
    has_ret: Sequence[bool],
    numels: Sequence[int],
    lam: float,
    delta: float,
    enable_projection: bool,
) -> tuple[float, dict[str, float]]:
    """From the global sums, the coefficient a = λ - c applied to g_ret, and the statistics."""
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    vals = sums.cpu().tolist()
    dot, nr2, na2 = vals[0], vals[1], vals[2]
    per_tensor = vals[3:]
    if not all(math.isfinite(v) for v in (dot, nr2, na2)):
        raise FloatingPointError(
            f"non-finite gradient statistics: <g_act,g_ret>={dot}, ||g_ret||²={nr2}, ||g_act||²={na2}")
    denom = nr2 + delta
    c = min(0.0, dot) / denom if (enable_projection and denom > 0) else 0.0
    a = lam - c
    final_sq = max(0.0, na2 + 2.0 * a * dot + a * a * nr2)  # ||g_act + a g_ret||², exact algebra in float64
    shared = [i for i, h in enumerate(has_ret) if h]
    conflicting = [i for i in shared if per_tensor[i] < 0]
    shared_numel = sum(numels[i] for i in shared)
    conflict_numel = sum(numels[i] for i in conflicting)
    norm_act, norm_ret = math.sqrt(na2), math.sqrt(nr2)
    stats = {
        "dot": dot,
        "cosine": dot / (norm_act * norm_ret) if norm_act > 0 and norm_ret > 0 else 0.0,
        "grad_norm_act": norm_act,
        "grad_norm_ret": norm_ret,
        "projection_fired": float(enable_projection and dot < 0 and denom > 0),
        "projection_coef": c,
        "lambda": float(lam),
        "ret_coef": a,
        "conflict": float(dot < 0),
        "conflict_ratio_tensors": len(conflicting) / len(shared) if shared else 0.0,
        "conflict_ratio_params": conflict_numel / shared_numel if shared_numel else 0.0,
        "num_shared_tensors": float(len(shared)),
        "grad_norm_final": math.sqrt(final_sq),
    }
    return a, stats


def _apply(g_act: Sequence[torch.Tensor], g_ret: Sequence[torch.Tensor | None], a: float) -> list[torch.Tensor]:
    """Fresh tensors g_i = g_act_i + a g_ret_i (float32 arithmetic, cast to g_act's dtype); never aliases inputs."""
    out = []
    for ga, gr in zip(g_act, g_ret, strict=True):
        g = ga.detach().to(torch.float32, copy=True)
        if gr is not None and a != 0.0:
            g.add_(gr.detach().to(torch.float32), alpha=a)
        out.append(g if ga.dtype == torch.float32 else g.to(ga.dtype))
    return out


def _as_grad_of(p: nn.Parameter, g: torch.Tensor) -> torch.Tensor:
    """A local gradient (shard) as a tensor laid out like `p`: a DTensor with p's mesh and placements for an FSDP2
    parameter, else g itself."""
    if not _is_dtensor(p):
        return g
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(g.to(p.dtype), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def combine_gradients(
    g_act: Sequence[torch.Tensor],
    g_ret: Sequence[torch.Tensor | None],
    lam: float,
    delta: float,
    enable_projection: bool,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """g = g_act + (λ - c) g_ret over ONE global vector (all tensors), c = min(0,<g_act,g_ret>)/(||g_ret||²+δ).

    `g_ret[i]` may be None (a parameter only L_act reaches): it then contributes nothing and g_i = g_act_i.
    Statistics (float64 accumulators): dot, cosine, grad_norm_act, grad_norm_ret, projection_fired, projection_coef (c),
    lambda, ret_coef (λ - c), conflict (global dot < 0), conflict_ratio_tensors (share of tensors reached by both
    losses whose per-tensor dot is negative), conflict_ratio_params (same, weighted by parameter count),
    num_shared_tensors, grad_norm_final (||g||).
    """
    _check_pairs(g_act, g_ret)
    sums = _partial_sums(g_act, g_ret)
    numels = [a.numel() for a in g_act]
    a, stats = _scalars_and_stats(sums, [r is not None for r in g_ret], numels, lam, delta, enable_projection)
    return _apply(g_act, g_ret, a), stats


def combine_gradients_sharded(
    g_act_local: Sequence[torch.Tensor],
    g_ret_local: Sequence[torch.Tensor | None],
    global_numels: Sequence[int],
    lam: float,
    delta: float,
    enable_projection: bool,
    group: dist.ProcessGroup | None = None,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Sharded form (FSDP2): each rank holds a disjoint shard of every (already rank-averaged) gradient.

    Local partial [dot, ||g_ret||², ||g_act||², per-tensor dots] are summed with ONE all_reduce(SUM) of a small float64
    vector, then every rank applies g = g_act + (λ - c) g_ret to its own shard. No full gradient is gathered.
    `g_ret_local[i]` None means L_ret does not reach parameter i on ANY rank (must agree across ranks).
    """
    _check_pairs(g_act_local, g_ret_local)
    sums = _partial_sums(g_act_local, g_ret_local)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    a, stats = _scalars_and_stats(sums, [r is not None for r in g_ret_local], list(global_numels), lam, delta,
                                  enable_projection)
    return _apply(g_act_local, g_ret_local, a), stats


def all_reduce_mean(value: float | torch.Tensor, group: dist.ProcessGroup | None = None) -> float:
    """Rank average of a scalar (e.g. L_ret of the step) so λ is identical on every rank."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(()).cpu().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        backend = dist.get_backend(group)
        if backend == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t = t / dist.get_world_size(group)
    return float(t.item())


# ---------------------------------------------------------------------------------------------------------------------
# Gradient projector (stateful: buffers, all-reduce, .grad writing, running statistics)
# ---------------------------------------------------------------------------------------------------------------------


FLAT_CHUNK_ELEMENTS = 1 << 18  # float64 temporaries of the vectorised statistics: 3 x 2 MB per chunk


def _contiguous_groups(numels: Sequence[int], chunk: int) -> list[tuple[int, int, list[int]]]:
    """Consecutive tensors grouped so that a group spans <= chunk elements (a bigger tensor is alone):
    (index of the first tensor, offset in the flat buffer, numels of the group's tensors)."""
    groups: list[tuple[int, int, list[int]]] = []
    first = offset = size = 0
    lengths: list[int] = []
    for i, n in enumerate(numels):
        if lengths and size + n > chunk:
            groups.append((first, offset, lengths))
            offset += size
            first, lengths, size = i, [], 0
        lengths.append(int(n))
        size += int(n)
    if lengths:
        groups.append((first, offset, lengths))
    return groups


def _check_losses(loss_act: torch.Tensor, loss_ret: torch.Tensor | None = None) -> None:
    """The projection needs two finite scalar losses (the plain step would skip a non-finite one instead);
    `loss_ret` None: a step that reuses the kept g_ret has L_act only."""
    for name, loss in (("loss_act", loss_act), ("loss_ret", loss_ret)):
        if loss is None:
            continue
        if loss.dim() != 0:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(loss.shape)}")
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{name} is not finite: {loss.item()}")


class CRaFTGradientProjector:
    """Accumulates g_act and g_ret over the micro-batches of one optimizer step and writes the combined gradient.

    Memory follows what each loss reaches. On the first micro-batch the projector asks autograd once which
    parameters each loss reaches (`torch.autograd.grad(..., allow_unused=True)` over every trainable parameter:
    None = not reached; with several ranks, the union over ranks) and splits them into three sets, fixed from then on:

    - R, reached by L_ret (the feature path: vision/LLM LoRA, projector, action_queries). g_act and g_ret are
      buffered for R only, in one flat float32 tensor [g_act(R) | g_ret(R) | reached_act(R) | reached_ret(R) |
      written(A)].
    - A, reached by L_act only (action head, proprio projector). g_ret is 0 there, so their gradient is exactly
      g_act. It is summed straight into `.grad`, as a plain backward does, and never buffered.
    - Reached by neither (e.g. the last ViT block, SigLIP attn_pool, unused head layers). They are left out of the
      buffers, the surgery and the dot products. `.grad` is untouched (None stays None, AdamW skips them).

    The rule is unchanged: g = g_act + (λ - c) g_ret with the global scalars over all parameters (A adds to
    ||g_act||² only; an unreached parameter adds 0 everywhere). With world_size > 1 (unsharded parameters) the flat
    buffer and the `.grad` of A are averaged over ranks (all_reduce SUM / world, buckets of `bucket_cap_mb`)
    before the scalars are computed, so every rank computes identical scalars and identical `.grad`.
    A gradient that arrives later for a parameter the first micro-batch did not reach is an error, never dropped.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
        delta: float = 1e-8,
        enable_projection: bool = True,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 256.0,
    ) -> None:
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")
        items = list(params)
        if not items:
            raise ValueError("CRaFTGradientProjector needs at least one trainable parameter")
        if isinstance(items[0], tuple):
            self.names = [n for n, _ in items]
            self.params = [p for _, p in items]
        else:
            self.names = [f"param_{i}" for i in range(len(items))]
            self.params = list(items)
        for n, p in zip(self.names, self.params, strict=True):
            if not p.requires_grad:
                raise ValueError(f"parameter {n} does not require grad; pass only trainable parameters")
        self.delta = float(delta)
        self.enable_projection = bool(enable_projection)
        self.group = process_group
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.sharded = any(_is_dtensor(p) for p in self.params)
        if self.sharded and not all(_is_dtensor(p) for p in self.params):
            raise ValueError("mixed DTensor / plain parameters: shard every trainable parameter with fully_shard")
        devices = {_local(p).device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"all trainable parameters must live on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop()
        self._local_shapes = [_local(p).shape for p in self.params]
        self._numels_local = [int(math.prod(s)) for s in self._local_shapes]
        self._numels_global = [int(p.numel()) for p in self.params]
        # reachability sets and buffers: built on the first micro-batch (`_build_layout`)
        self.ret_index: list[int] | None = None
        self.act_only_index: list[int] = []
        self.unreached_index: list[int] = []
        self._flat = torch.zeros(0, dtype=torch.float32, device=self.device)
        self._pending_act: list[torch.Tensor | None] | None = None
        self._scratch = torch.empty(0, dtype=torch.float64, device=self.device)  # `_scratch_f64`
        self.num_micro_batches = 0
        self._stale = False  # the buffers still hold the last step (its combined gradient is what `.grad` of R views)
        # --craft_retention_every k > 1: `keep_ret` (set by the caller before `step`) keeps g_ret(R) and its flags when
        # the buffers are next cleared, so the following step(s) reuse it (`accumulate_act`); `_ret_kept`: they hold it
        self.keep_ret = False
        self._ret_kept = False
        # running statistics (restored on resume)
        self.steps = 0
        self.projection_fired_count = 0
        self.conflict_count = 0
        self.conflict_ratio_params_sum = 0.0
        self.conflict_ratio_tensors_sum = 0.0
        self.conflict_ratio_params_null_sum = 0.0
        # --craft_reuse coefficient: steps whose gradient bypassed the projector (`count_unmeasured_step`); they count
        # in `steps` (the refresh schedule) but not in the running means (no dot product was measured)
        self.unmeasured_steps = 0
        # --craft_adam_second_moment action: `step` also keeps the action part g_act - c g_ret (`action_grads`)
        self.keep_action_part = False
        self._action_flat = torch.zeros(0, dtype=torch.float32, device=self.device)
        self._action_grads: dict[nn.Parameter, torch.Tensor] = {}

    # -- reachability and buffers -------------------------------------------------------------------------------------
    @property
    def layout_ready(self) -> bool:
        return self.ret_index is not None

    def reach(self) -> dict[str, list[str]]:
        """Names per set: 'ret' (R, buffered), 'act_only' (A, in .grad), 'unreached'. Empty before the first batch."""
        if not self.layout_ready:
            return {"ret": [], "act_only": [], "unreached": []}
        return {"ret": [self.names[i] for i in self.ret_index],
                "act_only": [self.names[i] for i in self.act_only_index],
                "unreached": [self.names[i] for i in self.unreached_index]}

    def buffered_elements(self) -> int:
        """Elements (local) of each of the two gradient buffers: the parameters L_ret reaches."""
        return self._n_ret if self.layout_ready else 0

    def _build_layout(self, reach_act: Sequence[bool], reach_ret: Sequence[bool]) -> None:
        n_p = len(self.params)
        flags = torch.tensor([float(x) for x in (*reach_act, *reach_ret)], dtype=torch.float32, device=self.device)
        if self._world() > 1:  # every rank must lay out the same buffers: the union over ranks
            dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self.group)
        reached = (flags > 0).tolist()
        act, ret = reached[:n_p], reached[n_p:]
        self.ret_index = [i for i in range(n_p) if ret[i]]
        self.act_only_index = [i for i in range(n_p) if act[i] and not ret[i]]
        self.unreached_index = [i for i in range(n_p) if not (act[i] or ret[i])]
        self._ret_slot = {i: j for j, i in enumerate(self.ret_index)}
        self._act_slot = {i: k for k, i in enumerate(self.act_only_index)}
        self._grad_index = sorted(self.ret_index + self.act_only_index)  # inputs of autograd.grad(L_act)
        numels = [self._numels_local[i] for i in self.ret_index]
        n_r, n_rt, n_a = sum(numels), len(self.ret_index), len(self.act_only_index)
        self._flat = torch.zeros(2 * n_r + 2 * n_rt + n_a, dtype=torch.float32, device=self.device)
        self._act, self._ret = [], []
        off = 0
        for i, n in zip(self.ret_index, numels, strict=True):
            self._act.append(self._flat[off : off + n].view(self._local_shapes[i]))
            self._ret.append(self._flat[n_r + off : n_r + off + n].view(self._local_shapes[i]))
            off += n
        self._reached_act = self._flat[2 * n_r : 2 * n_r + n_rt]
        self._reached_ret = self._flat[2 * n_r + n_rt : 2 * n_r + 2 * n_rt]
        self._written = self._flat[2 * n_r + 2 * n_rt :]
        self._written_local = [False] * n_a  # A: has this rank's `.grad` received this step's first g_act yet?
        self._n_ret = n_r
        self._groups = [(first, start, lengths, torch.tensor(lengths, device=self.device))
                        for first, start, lengths in _contiguous_groups(numels, FLAT_CHUNK_ELEMENTS)]
        self._ret_index_t = torch.tensor(self.ret_index, dtype=torch.long)

    def _unexpected(self, i: int, which: str) -> RuntimeError:
        return RuntimeError(
            f"{which} gradient of {self.names[i]}, which the first micro-batch's loss did not reach: the reachable "
            "sets are found once, on the first micro-batch, and must not change with the data")

    # -- accumulation -------------------------------------------------------------------------------------------------
    def _add_ret(self, indices: Sequence[int], grads: Sequence[torch.Tensor | None]) -> None:
        for i, g in zip(indices, grads, strict=True):
            if g is None:
                continue
            j = self._ret_slot.get(i)
            if j is None:
                raise self._unexpected(i, "g_ret")
            self._add_buffer(self._ret[j], self._reached_ret, j, g, i, "g_ret")

    def _add_act(self, indices: Sequence[int], grads: Sequence[torch.Tensor | None], owned: bool) -> None:
        for i, g in zip(indices, grads, strict=True):
            if g is None:
                continue
            j = self._ret_slot.get(i)
            if j is not None:
                self._add_buffer(self._act[j], self._reached_act, j, g, i, "g_act")
                continue
            k = self._act_slot.get(i)
            if k is None:
                raise self._unexpected(i, "g_act")
            self._add_into_grad(i, k, g, owned)

    def _add_buffer(self, buf: torch.Tensor, flags: torch.Tensor, j: int, g: torch.Tensor, i: int,
                    which: str) -> None:
        g = _local(g)
        if g.shape != buf.shape:
            raise ValueError(f"{which} gradient of {self.names[i]}: shape {tuple(g.shape)} != {tuple(buf.shape)}")
        buf.add_(g.detach().to(torch.float32))
        flags[j] = 1.0

    def _add_into_grad(self, i: int, k: int, g: torch.Tensor, owned: bool) -> None:
        """A (L_act only): the step's gradient is g_act, summed in `.grad` like a plain backward. The first
        contribution of a step overwrites `.grad` (in place if it exists: DDP bucket views stay valid)."""
        p, g = self.params[i], g.detach()
        if g.shape != p.shape:
            raise ValueError(f"g_act gradient of {self.names[i]}: shape {tuple(g.shape)} != {tuple(p.shape)}")
        if self._written_local[k]:
            p.grad.add_(g)
        elif p.grad is not None:
            p.grad.copy_(g)
        else:  # our own autograd output can be kept as it is; a caller's tensor is copied
            # (autograd may return an expanded, stride-0 tensor: that one is copied too, `.grad` is summed in place)
            keep = owned and g.dtype == p.dtype and g.is_contiguous()
            p.grad = g if keep else g.to(dtype=p.dtype, memory_format=torch.contiguous_format, copy=True)
        self._written_local[k] = True

    def add_grads(self, g_act: Sequence[torch.Tensor | None], g_ret: Sequence[torch.Tensor | None]) -> None:
        """Add one micro-batch's gradients over every parameter (None = not reached). Sums, never overwrites.
        The first call fixes the reachable sets from which entries are None."""
        for which, grads in (("g_act", g_act), ("g_ret", g_ret)):
            if len(grads) != len(self.params):
                raise ValueError(f"{which}: got {len(grads)} gradients for {len(self.params)} parameters")
        self._begin_step()
        if not self.layout_ready:
            self._build_layout([g is not None for g in g_act], [g is not None for g in g_ret])
        every = range(len(self.params))
        self._add_ret(every, g_ret)
        self._add_act(every, g_act, owned=False)
        self.num_micro_batches += 1

    def accumulate(self, loss_act: torch.Tensor, loss_ret: torch.Tensor) -> None:
        """Per micro-batch: g_ret, then g_act, by torch.autograd.grad (no DDP hook fires, `.grad` only for A).

        The caller passes L_act / k and L_ret / k (k = accumulation steps), as the baseline divides before backward.
        g_ret is taken first (graph retained), then g_act frees the graph as it goes, like a plain backward. The
        first call probes every trainable parameter (allow_unused) and fixes the reachable sets; later calls ask
        autograd only for those.
        """
        if self.sharded:
            raise RuntimeError("sharded (FSDP2) parameters: use backward + capture_grads('act'/'ret') instead")
        _check_losses(loss_act, loss_ret)
        self._begin_step()
        if not self.layout_ready:
            ret_index = act_index = list(range(len(self.params)))
        else:
            ret_index, act_index = self.ret_index, self._grad_index
        g_ret: Sequence[torch.Tensor | None] = [None] * len(ret_index)
        if ret_index and loss_ret.requires_grad:
            g_ret = torch.autograd.grad(loss_ret, [self.params[i] for i in ret_index], retain_graph=True,
                                        allow_unused=True)
        g_act: Sequence[torch.Tensor | None] = [None] * len(act_index)
        if act_index and loss_act.requires_grad:
            g_act = torch.autograd.grad(loss_act, [self.params[i] for i in act_index], allow_unused=True)
        if not self.layout_ready:
            self._build_layout([g is not None for g in g_act], [g is not None for g in g_ret])
        self._add_ret(ret_index, g_ret)
        del g_ret
        self._add_act(act_index, g_act, owned=True)
        self.num_micro_batches += 1

    def backward_and_capture(self, loss_act: torch.Tensor, loss_ret: torch.Tensor) -> None:
        """Per micro-batch, for FSDP2 shards (autograd.grad cannot reach them): the two backward passes with a
        capture after each. Same inputs and checks as `accumulate` (the caller divides by k)."""
        _check_losses(loss_act, loss_ret)
        loss_act.backward(retain_graph=True)
        self.capture_grads("act")
        loss_ret.backward()
        self.capture_grads("ret")

    def accumulate_act(self, loss_act: torch.Tensor) -> None:
        """Per micro-batch of a step that reuses the kept g_ret (`keep_ret`): g_act only, by autograd.grad over R and A.
        The caller passes L_act / k. Needs the buffers to hold a kept g_ret (a previous step with `keep_ret` set)."""
        if self.sharded:
            raise RuntimeError("sharded (FSDP2) parameters: use backward_act_and_capture instead")
        _check_losses(loss_act)
        self._begin_step()
        self._require_kept_ret()
        g_act: Sequence[torch.Tensor | None] = [None] * len(self._grad_index)
        if self._grad_index and loss_act.requires_grad:
            g_act = torch.autograd.grad(loss_act, [self.params[i] for i in self._grad_index], allow_unused=True)
        self._add_act(self._grad_index, g_act, owned=True)
        self.num_micro_batches += 1

    def backward_act_and_capture(self, loss_act: torch.Tensor) -> None:
        """FSDP2 form of `accumulate_act`: one backward of L_act / k, then its capture (g_ret stays the kept shard)."""
        _check_losses(loss_act)
        self._begin_step()
        self._require_kept_ret()
        loss_act.backward()
        self.capture_grads("act")
        self.num_micro_batches += 1

    def _require_kept_ret(self) -> None:
        if not (self.layout_ready and self._ret_kept):
            raise RuntimeError("no kept g_ret to reuse: the step before must compute g_ret with keep_ret set "
                               "(--craft_retention_every refreshes it on steps where step % k == 0)")

    def kept_ret_state(self) -> dict[str, Any]:
        """The kept g_ret(R) per parameter name (rank-averaged, identical on every rank), its reached flags and the
        sets, for training_state.pt: a resume at a step that reuses g_ret continues exactly. Unsharded only."""
        if self.sharded:
            raise RuntimeError("kept_ret_state: FSDP2 shards are not saved (a resume must start at a refresh step)")
        if not (self.layout_ready and self.keep_ret):  # after `step`: the g_ret half holds what the next step reuses
            raise RuntimeError("kept_ret_state: no g_ret is kept for the next step (keep_ret is not set)")
        return {"ret": [self.names[i] for i in self.ret_index],
                "act_only": [self.names[i] for i in self.act_only_index],
                "g_ret": [r.detach().cpu().clone() for r in self._ret],
                "reached_ret": (self._reached_ret > 0).tolist()}

    def load_kept_ret(self, state: Mapping[str, Any]) -> None:
        """Rebuild the sets from their names and put the kept g_ret back (before the first micro-batch)."""
        if self.sharded or self.layout_ready:
            raise RuntimeError("load_kept_ret: only on an unsharded projector before its first micro-batch")
        index = {n: i for i, n in enumerate(self.names)}
        unknown = [n for n in (*state["ret"], *state["act_only"]) if n not in index]
        if unknown:
            raise KeyError(f"the saved g_ret names parameters this model does not train, e.g. {unknown[:3]}")
        ret = {index[n] for n in state["ret"]}
        act = ret | {index[n] for n in state["act_only"]}
        self._build_layout([i in act for i in range(len(self.params))], [i in ret for i in range(len(self.params))])
        if self.ret_index != sorted(ret):
            raise RuntimeError("the saved g_ret's parameter set differs from this run's (another rank's sets?)")
        for buf, g in zip(self._ret, state["g_ret"], strict=True):
            buf.copy_(g.to(device=buf.device, dtype=buf.dtype))
        self._reached_ret.copy_(torch.tensor([float(x) for x in state["reached_ret"]], dtype=torch.float32))
        self.keep_ret = self._ret_kept = True

    def capture_grads(self, which: str) -> None:
        """Move the current `p.grad` (local shard under FSDP2) of R into the `which` ('act'|'ret') buffer, set it None.

        For FSDP2 or `no_sync()` + two backward passes: `loss_act.backward(retain_graph=True); capture_grads('act');
        loss_ret.backward(); capture_grads('ret')`. Count a micro-batch once per 'ret' capture. The `.grad` of A
        (L_act only) stays where backward sums it; `.grad` must be None (or zero) before the step's first backward,
        as in any backward-based loop. The first 'act'/'ret' pair fixes the reachable sets from which `.grad` is set.
        """
        if which not in ("act", "ret"):
            raise ValueError(f"which must be 'act' or 'ret', got {which!r}")
        self._begin_step()
        grads = [p.grad for p in self.params]
        if not self.layout_ready:
            if which == "act":
                self._pending_act = grads  # held until 'ret' tells which parameters L_ret reaches
                for p in self.params:
                    p.grad = None
                return
            if self._pending_act is None:
                raise RuntimeError("capture_grads('ret') before capture_grads('act') on the first micro-batch")
            pending, self._pending_act = self._pending_act, None
            self._build_layout([g is not None for g in pending], [g is not None for g in grads])
            for i in self.ret_index:
                self.params[i].grad = None
            for k, i in enumerate(self.act_only_index):
                self.params[i].grad = pending[i]
                self._written_local[k] = pending[i] is not None
            every = range(len(self.params))
            self._add_act(self.ret_index, [pending[i] for i in self.ret_index], owned=True)
            self._add_ret(every, grads)
            self.num_micro_batches += 1
            return
        for j, i in enumerate(self.ret_index):
            g = grads[i]
            if g is not None:
                buf, flags = (self._act, self._reached_act) if which == "act" else (self._ret, self._reached_ret)
                self._add_buffer(buf[j], flags, j, g, i, f"g_{which}")
                self.params[i].grad = None
        if which == "act":
            for k, i in enumerate(self.act_only_index):
                self._written_local[k] = self._written_local[k] or grads[i] is not None
        else:
            self.num_micro_batches += 1

    def reset(self) -> None:
        """Drop what was accumulated. A `.grad` of R that still views the buffer (the caller kept the last step's
        gradients instead of zeroing them) is first given its own copy, so nothing the caller holds changes."""
        if self._stale and self.layout_ready:
            storage = self._flat.untyped_storage().data_ptr()
            for i in self.ret_index:
                g = self.params[i].grad
                if g is not None and g.untyped_storage().data_ptr() == storage:
                    self.params[i].grad = g.clone()
        self._stale = False
        if self.keep_ret and self.layout_ready:  # the next step reuses g_ret(R): clear everything else
            n, n_rt = self._n_ret, len(self.ret_index)
            self._flat[:n].zero_()
            self._flat[2 * n : 2 * n + n_rt].zero_()
            self._flat[2 * n + 2 * n_rt :].zero_()
            self._ret_kept = True
        else:
            self._flat.zero_()
            self._ret_kept = False
        if self.layout_ready:
            self._written_local = [False] * len(self.act_only_index)
        self._pending_act = None
        self.num_micro_batches = 0

    def _begin_step(self) -> None:
        if self._stale:  # the first micro-batch after a step
            self.reset()

    # -- optimizer step -----------------------------------------------------------------------------------------------
    def _world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group)
        return 1

    def _per_bucket(self) -> int:
        return max(1, int(self.bucket_cap_mb * 2**20 // 4))

    def _all_reduce_buffers(self) -> None:
        world = self._world()
        # Flags ride in the same flat tensor so "reached on any rank" is known after the same call(s).
        per_bucket = self._per_bucket()
        if self._ret_kept:  # the kept g_ret(R) and its flags are already the rank average: reduce only the rest
            n = self._n_ret
            kept_flags = self._reached_ret.clone()
            for part in (self._flat[:n], self._flat[2 * n :]):
                for start in range(0, part.numel(), per_bucket):
                    dist.all_reduce(part[start : start + per_bucket], op=dist.ReduceOp.SUM, group=self.group)
            self._reached_ret.copy_(kept_flags)
            self._flat[:n].div_(world)
            return
        for start in range(0, self._flat.numel(), per_bucket):
            dist.all_reduce(self._flat[start : start + per_bucket], op=dist.ReduceOp.SUM, group=self.group)
        self._flat[: 2 * self._n_ret].div_(world)

    def _all_reduce_act_only_grads(self) -> None:
        """Average the `.grad` of A over ranks (after the flat all-reduce, `written` says which are reached on any
        rank; a rank that did not reach one contributes zeros). Small tensors are coalesced into buckets."""
        world, written = self._world(), (self._written > 0).tolist()
        todo = []
        for k, i in enumerate(self.act_only_index):
            if not written[k]:
                continue
            p = self.params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif not self._written_local[k]:
                p.grad.zero_()  # stale: this rank's g_act is zero here
            todo.append(p.grad)
        for _, _, lengths in _contiguous_groups([g.numel() for g in todo], self._per_bucket()):
            grads, todo = todo[: len(lengths)], todo[len(lengths) :]
            if len(grads) == 1 and grads[0].is_contiguous():
                dist.all_reduce(grads[0], op=dist.ReduceOp.SUM, group=self.group)
                grads[0].div_(world)
                continue
            bucket = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=self.group)
            bucket.div_(world)
            off = 0
            for g in grads:
                g.copy_(bucket[off : off + g.numel()].view(g.shape))
                off += g.numel()

    def _act_only_sq_norm(self, written: Sequence[bool]) -> torch.Tensor:
        """||g_act||² over A (their `.grad`, local shards under FSDP2), float64. Small tensors: fused norms over groups
        of at most one chunk of elements; large ones (the head's): chunk by chunk through the reusable float64
        scratch. Never a float64 copy of a whole large tensor, never a float32 accumulation."""
        grads = [_local(self.params[i].grad).detach() for k, i in enumerate(self.act_only_index) if written[k]]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        small = [g for g in grads if g.numel() <= FLAT_CHUNK_ELEMENTS]
        for _, _, lengths in _contiguous_groups([g.numel() for g in small], FLAT_CHUNK_ELEMENTS):
            group, small = small[: len(lengths)], small[len(lengths) :]
            total += torch.stack(torch._foreach_norm(group, 2, dtype=torch.float64)).square().sum()
        for g in grads:
            if g.numel() <= FLAT_CHUNK_ELEMENTS:
                continue
            flat = g.reshape(-1)
            for start in range(0, flat.numel(), FLAT_CHUNK_ELEMENTS):
                part = flat[start : start + FLAT_CHUNK_ELEMENTS]
                g64 = self._scratch_f64()[: part.numel()].copy_(part)
                total += torch.dot(g64, g64)
        return total

    def _scratch_f64(self) -> torch.Tensor:
        """Three chunks of float64 temporaries (6 MB), reused every step: a fresh multi-MB tensor is mmapped and
        page-faulted each time it is allocated."""
        if self._scratch.numel() < 3 * FLAT_CHUNK_ELEMENTS:
            self._scratch = torch.empty(3 * FLAT_CHUNK_ELEMENTS, dtype=torch.float64, device=self.device)
        return self._scratch

    @torch.no_grad()
    def step(self, lam: float) -> dict[str, float]:
        """All-reduce (if needed), combine with λ, write every reached parameter's `.grad`, reset the buffers."""
        if self.num_micro_batches == 0 or not self.layout_ready:
            raise RuntimeError("CRaFTGradientProjector.step called with no accumulated micro-batch")
        n_p, n_rt = len(self.params), len(self.ret_index)
        if self._written.numel():
            self._written.copy_(torch.tensor(self._written_local, dtype=torch.float32))
        if self.sharded:
            # FSDP2 already reduce-scattered (averaged) each backward: ONE all_reduce(SUM) of the local partial sums
            # (over R, plus ||g_act||² over A) and the flags.
            local = _partial_sums(self._act, self._ret)
            local[2] += self._act_only_sq_norm(self._written_local)
            vec = torch.cat([local, self._flat[2 * self._n_ret :].to(torch.float64)])
            if self._world() > 1:
                dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.group)
            sums_r, flags = vec[: 3 + n_rt], (vec[3 + n_rt :] > 0).tolist()
            reached_act, reached_ret = flags[:n_rt], flags[n_rt : 2 * n_rt]
        else:
            if self._world() > 1:
                self._all_reduce_buffers()
                self._all_reduce_act_only_grads()
            reached_act, reached_ret = (self._reached_act > 0).tolist(), (self._reached_ret > 0).tolist()
            # vectorised over the flat buffer (a few ops per chunk, not several per tensor); the g_ret part of a
            # tensor not reached this step is zero in the buffer, so it adds nothing, exactly as skipping it
            sums_r = self._flat_partial_sums()
            sums_r[2] += self._act_only_sq_norm((self._written > 0).tolist())
        # the global sums over ALL parameters: A and unreached parameters add 0 to <g_act, g_ret> and ||g_ret||²
        sums = torch.zeros(3 + n_p, dtype=torch.float64, device=sums_r.device)
        sums[:3] = sums_r[:3]
        sums[3:].index_copy_(0, self._ret_index_t.to(sums.device), sums_r[3:])
        has_ret = [False] * n_p
        for j, i in enumerate(self.ret_index):
            has_ret[i] = reached_ret[j]
        a, stats = _scalars_and_stats(sums, has_ret, self._numels_global, lam, self.delta, self.enable_projection)
        if self.keep_action_part:
            self._keep_action_part(-stats["projection_coef"], reached_act, reached_ret)
        if self.sharded:
            combined = _apply(self._act, [r if reached_ret[j] else None for j, r in enumerate(self._ret)], a)
            for j, (i, g) in enumerate(zip(self.ret_index, combined, strict=True)):
                if reached_act[j] or reached_ret[j]:
                    self._write_grad(self.params[i], g)
        else:
            # In place: the g_act(R) half of the buffer becomes g_act + a g_ret, and the `.grad` of R are views of it
            # (fp32 parameters), so the step allocates no gradient memory for R. `reset` (at the next step's first
            # micro-batch, after the loop's zero_grad dropped the views) zeroes it again.
            n = self._n_ret
            self._flat[:n].add_(self._flat[n : 2 * n], alpha=a)  # in place: no transient
            for j, i in enumerate(self.ret_index):
                if reached_act[j] or reached_ret[j]:
                    self._write_grad(self.params[i], self._act[j])  # `_act[j]`: the buffer's view (`_build_layout`)
        stats["num_micro_batches"] = float(self.num_micro_batches)
        stats.update(self._null_conflict_stats(reached_ret))
        self._update_running(stats)
        if self.sharded:
            self.reset()
        else:  # the buffer now holds the `.grad` of R: zeroed when the next step starts
            self.num_micro_batches = 0
            self._stale = True
        return stats

    def _keep_action_part(self, coef: float, reached_act: Sequence[bool], reached_ret: Sequence[bool]) -> None:
        """The action part g_act - c g_ret of every R parameter, from the same (rank-averaged; under FSDP2: local
        shard) buffers as the combined gradient, before `step` overwrites the g_act half. The combined gradient is
        this plus λ g_ret. A (L_act only) is left out: its gradient is its action part."""
        self._action_grads = {}
        if self.sharded:
            action = _apply(self._act, [r if reached_ret[j] else None for j, r in enumerate(self._ret)], coef)
            for j, (i, g) in enumerate(zip(self.ret_index, action, strict=True)):
                if reached_act[j] or reached_ret[j]:
                    self._action_grads[self.params[i]] = _as_grad_of(self.params[i], g)
            return
        n = self._n_ret
        if self._action_flat.numel() != n:
            self._action_flat = torch.zeros(n, dtype=torch.float32, device=self.device)
        torch.add(self._flat[:n], self._flat[n : 2 * n], alpha=coef, out=self._action_flat)
        off = 0
        for j, i in enumerate(self.ret_index):
            m = self._numels_local[i]
            if reached_act[j] or reached_ret[j]:
                self._action_grads[self.params[i]] = self._action_flat[off : off + m].view(self._local_shapes[i])
            off += m

    def action_grads(self) -> dict[nn.Parameter, torch.Tensor]:
        """The last step's action part per R parameter (needs `keep_action_part = True`), for the optimizer's second
        moment (`SplitMomentAdamW.set_second_moment_grads`). Views of a buffer the next `step` overwrites."""
        if not self.keep_action_part:
            raise RuntimeError("action_grads() needs keep_action_part = True before step()")
        return dict(self._action_grads)

    def _flat_partial_sums(self) -> torch.Tensor:
        """[dot, ||g_ret||², ||g_act||², per-tensor dots over R] from the flat buffer, float64, in chunks of tensors.
        Keeps the per-tensor ||g_act||², ||g_ret||² over R (`_per_tensor_sq`) for the null conflict share. The
        float64 temporaries live in the reused scratch; a tensor larger than a chunk is summed piece by piece."""
        n, chunk = self._n_ret, FLAT_CHUNK_ELEMENTS
        out = torch.zeros(3 + len(self.ret_index), dtype=torch.float64, device=self.device)
        sq = torch.zeros(2, len(self.ret_index), dtype=torch.float64, device=self.device)  # act, ret
        scratch = self._scratch_f64()
        for first, start, lengths, lengths_t in self._groups:
            m = sum(lengths)
            if m > chunk:  # one tensor alone (groups never exceed a chunk otherwise)
                for off in range(0, m, chunk):
                    k = min(chunk, m - off)
                    a64, r64 = scratch[:k], scratch[chunk : chunk + k]
                    a64.copy_(self._flat[start + off : start + off + k])
                    r64.copy_(self._flat[n + start + off : n + start + off + k])
                    out[3 + first] += torch.dot(a64, r64)
                    sq[0, first] += torch.dot(a64, a64)
                    sq[1, first] += torch.dot(r64, r64)
                continue
            a64, r64, prod = (scratch[i * chunk : i * chunk + m] for i in range(3))
            a64.copy_(self._flat[start : start + m])
            r64.copy_(self._flat[n + start : n + start + m])
            span = slice(first, first + len(lengths))
            torch.mul(a64, r64, out=prod)
            out[3 + first : 3 + first + len(lengths)] = torch.segment_reduce(prod, "sum", lengths=lengths_t)
            torch.mul(a64, a64, out=prod)
            sq[0, span] = torch.segment_reduce(prod, "sum", lengths=lengths_t)
            torch.mul(r64, r64, out=prod)
            sq[1, span] = torch.segment_reduce(prod, "sum", lengths=lengths_t)
        out[0], out[1], out[2] = out[3:].sum(), sq[1].sum(), sq[0].sum()
        self._per_tensor_sq = (sq[0], sq[1])
        return out

    # seed of the null conflict statistics; set it to the run's seed (identical on all ranks)
    null_seed: int = 0

    def null_generator(self, step: int) -> torch.Generator:
        """The generator of the random g_ret of optimizer step `step` (a function of (null_seed, step) only)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(self.null_seed) * 1_000_003 + int(step))
        return gen

    def _null_conflict_stats(self, reached_ret: Sequence[bool]) -> dict[str, float]:
        """The per-tensor conflict shares of g_act against a random g_ret (i.i.d. Gaussian per tensor, scaled to the
        real g_ret's per-tensor norm): what `conflict_ratio_*` reads when the two gradients are unrelated.

        Only the sign of each per-tensor dot enters the shares. For z_i ~ N(0, I), <g_act_i, z_i> ~ N(0, ||g_act_i||²),
        so its sign is that of ||g_act_i|| · u_i with one u_i ~ N(0, 1) per tensor: drawn from
        `null_generator(self.steps)` (identical on every rank), no per-element draw. A tensor conflicts iff g_ret_i and
        g_act_i are non-zero and u_i < 0. Not computed for sharded (FSDP2) parameters (nan). `reached_ret[j]`: L_ret
        reached `ret_index[j]` this step. Uses the per-tensor squared norms of the last `_flat_partial_sums`.
        """
        if self.sharded:
            return {"conflict_ratio_params_null": math.nan, "conflict_ratio_tensors_null": math.nan}
        u = torch.randn(len(self.ret_index), generator=self.null_generator(self.steps), device=self.device,
                        dtype=torch.float32).cpu().tolist()
        act_sq, ret_sq = (t.cpu().tolist() for t in self._per_tensor_sq)
        shared = [j for j, h in enumerate(reached_ret) if h]
        conflicting = [j for j in shared if ret_sq[j] > 0 and act_sq[j] > 0 and u[j] < 0]
        numel = [self._numels_global[i] for i in self.ret_index]
        shared_numel = sum(numel[j] for j in shared)
        return {
            "conflict_ratio_tensors_null": len(conflicting) / len(shared) if shared else 0.0,
            "conflict_ratio_params_null": sum(numel[j] for j in conflicting) / shared_numel if shared_numel else 0.0,
        }

    @staticmethod
    def _write_grad(p: nn.Parameter, g: torch.Tensor) -> None:
        if p.grad is not None:
            _local(p.grad).copy_(g)  # in place: keeps DDP bucket views (gradient_as_bucket_view=True) valid
        elif _is_dtensor(p):
            p.grad = _as_grad_of(p, g)
        else:
            p.grad = g.to(p.dtype)  # fp32: a view of the buffer's combined half (see `step`); else a cast copy

    def _update_running(self, stats: Mapping[str, float]) -> None:
        self.steps += 1
        self.projection_fired_count += int(stats["projection_fired"])
        self.conflict_count += int(stats["conflict"])
        self.conflict_ratio_params_sum += stats["conflict_ratio_params"]
        self.conflict_ratio_tensors_sum += stats["conflict_ratio_tensors"]
        self.conflict_ratio_params_null_sum += stats.get("conflict_ratio_params_null", math.nan)

    def count_unmeasured_step(self) -> None:
        """An optimizer step whose gradient the caller formed without the projector (--craft_reuse coefficient: one
        backward of L_act + (λ - c_last) L_ret). It advances `steps`; the running means leave it out."""
        self.steps += 1
        self.unmeasured_steps += 1

    def running_stats(self) -> dict[str, float]:
        s = max(self.steps - self.unmeasured_steps, 1)
        return {
            "steps": float(self.steps),
            "projection_fired_rate": self.projection_fired_count / s,
            "conflict_indicator_mean": self.conflict_count / s,
            "conflict_ratio_params_mean": self.conflict_ratio_params_sum / s,
            "conflict_ratio_tensors_mean": self.conflict_ratio_tensors_sum / s,
            "conflict_ratio_params_null_mean": self.conflict_ratio_params_null_sum / s,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "projection_fired_count": self.projection_fired_count,
            "conflict_count": self.conflict_count,
            "conflict_ratio_params_sum": self.conflict_ratio_params_sum,
            "conflict_ratio_tensors_sum": self.conflict_ratio_tensors_sum,
            "conflict_ratio_params_null_sum": self.conflict_ratio_params_null_sum,
            "delta": self.delta,
            "enable_projection": self.enable_projection,
            "unmeasured_steps": self.unmeasured_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in ("steps", "projection_fired_count", "conflict_count", "conflict_ratio_params_sum",
                               "conflict_ratio_tensors_sum") if k not in state]
        if missing:
            raise KeyError(f"CRaFTGradientProjector state is missing {missing}")
        self.steps = int(state["steps"])
        self.projection_fired_count = int(state["projection_fired_count"])
        self.conflict_count = int(state["conflict_count"])
        self.conflict_ratio_params_sum = float(state["conflict_ratio_params_sum"])
        self.conflict_ratio_tensors_sum = float(state["conflict_ratio_tensors_sum"])
        self.conflict_ratio_params_null_sum = float(state.get("conflict_ratio_params_null_sum", 0.0))
        self.unmeasured_steps = int(state.get("unmeasured_steps", 0))


# ---------------------------------------------------------------------------------------------------------------------
# Dual variable
# ---------------------------------------------------------------------------------------------------------------------


DUAL_MODES = ("gradient", "pid", "nupi")
LOG_ERROR_FLOOR = 1e-3  # log_error: L_ret below 1e-3 of the target counts as 1e-3 (L_ret is exactly 0 at θ0)


class CRaFTDualOptimizer:
    """The dual variable λ, updated AFTER the optimizer step from the rank-averaged L_ret of that step.

    Error signal  e = L_ret - ε,  or  e = L_ret / ε - 1  with `normalize=True` (ε > 0),  or  e = ln(L_ret / ε)
    with `log_error=True` (ε > 0; L_ret floored at 1e-3 ε, so e >= ln 1e-3). With `setpoint` = ρ < 1 the controller
    aims at ρ ε instead of ε (ε replaced by ρ ε in the three errors): a margin for the batch-to-batch noise of L_ret.
    mode "gradient" (default, the paper's rule):  λ <- max(0, λ + η e)
    mode "pid" (PID Lagrangian, Stooke, Achiam & Abbeel 2020, Alg. 2, with K_I = η):
        I <- max(0, I + η e)                       (integral clamped at 0; starts at init_lambda)
        D  = max(0, e - e_prev)                    (only a rising violation adds; 0 at the first step)
        λ  = max(0, kp e + I + kd D)
    mode "nupi" (νPI, Sohrabi et al. 2024, recursive form with λ projected onto [0, max_lambda] every step, as the
    `cooper` library applies it to a multiplier; κ_I = η, κ_P = kp, EMA coefficient ν = nu; ξ starts at 0):
        ξ <- ν ξ_prev + (1 - ν) e
        λ <- clip(λ + η e + kp (ξ - ξ_prev), 0, max_lambda)
    The clip acts on λ itself, so there is no separate integral to wind up: when λ sits at 0 the history is gone.
    `max_lambda` (optional) caps λ (and, in pid mode, the integral too: no wind-up above the cap).
    With `enable_dual=False` λ is constant: `fixed_lambda` if given, else `init_lambda`.
    pid with kp = kd = 0 reproduces the gradient rule (I is then λ).
    """

    def __init__(
        self,
        epsilon: float,
        dual_lr: float,
        init_lambda: float = 0.0,
        enable_dual: bool = True,
        fixed_lambda: float | None = None,
        mode: str = "gradient",
        kp: float = 0.0,
        kd: float = 0.0,
        normalize: bool = False,
        max_lambda: float | None = None,
        nu: float = 0.0,
        log_error: bool = False,
        setpoint: float = 1.0,
    ) -> None:
        for name, v in (("epsilon (craft_retention_budget)", epsilon), ("dual_lr (craft_dual_lr)", dual_lr),
                        ("init_lambda (craft_init_lambda)", init_lambda), ("kp (craft_dual_kp)", kp),
                        ("kd (craft_dual_kd)", kd)):
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if fixed_lambda is not None and (not math.isfinite(fixed_lambda) or fixed_lambda < 0):
            raise ValueError(f"fixed_lambda (craft_fixed_lambda) must be >= 0, got {fixed_lambda}")
        if enable_dual and fixed_lambda is not None:
            raise ValueError("fixed_lambda is only meaningful with enable_dual=False (craft_enable_dual False)")
        if mode not in DUAL_MODES:
            raise ValueError(f"mode (craft_dual_mode) must be one of {DUAL_MODES}, got {mode!r}")
        if normalize and not epsilon > 0:
            raise ValueError("normalize (craft_dual_normalize) divides by epsilon: it needs epsilon > 0")
        if max_lambda is not None and (not math.isfinite(max_lambda) or max_lambda <= 0):
            raise ValueError(f"max_lambda (craft_max_lambda) must be a finite number > 0, got {max_lambda}")
        if not (math.isfinite(nu) and 0.0 <= nu < 1.0):
            raise ValueError(f"nu (craft_dual_nu) must be in [0, 1), got {nu}")
        if mode != "nupi" and nu != 0.0:
            raise ValueError("nu (craft_dual_nu) is the EMA coefficient of mode 'nupi'")
        if not (math.isfinite(setpoint) and 0.0 < setpoint <= 1.0):
            raise ValueError(f"setpoint (craft_dual_setpoint) must be in (0, 1], got {setpoint}")
        if log_error and normalize:
            raise ValueError("log_error (craft_dual_log_error) and normalize (craft_dual_normalize) are two error "
                             "signals: choose one")
        if log_error and not epsilon > 0:
            raise ValueError("log_error (craft_dual_log_error) divides by epsilon: it needs epsilon > 0")
        self.epsilon = float(epsilon)
        self.dual_lr = float(dual_lr)
        self.enable_dual = bool(enable_dual)
        self.mode = mode
        self.kp, self.kd = float(kp), float(kd)
        self.nu = float(nu)
        self.log_error = bool(log_error)
        self.setpoint = float(setpoint)
        self.normalize = bool(normalize)
        self.max_lambda = None if max_lambda is None else float(max_lambda)
        self.lam = float(fixed_lambda if (not enable_dual and fixed_lambda is not None) else init_lambda)
        if self.max_lambda is not None and enable_dual:
            self.lam = min(self.lam, self.max_lambda)
        self.integral = self.lam  # pid state
        self.prev_error: float | None = None  # pid state (None before the first step)
        self.xi = 0.0  # nupi state: the EMA of the error (ξ_{-1} = 0)
        self.steps = 0
        self.last_slack = 0.0

    def error(self, retention_loss: float) -> float:
        """The controller's error signal for this L_ret (see the class docstring)."""
        target = self.epsilon if self.setpoint == 1.0 else self.setpoint * self.epsilon
        if self.log_error:
            return math.log(max(retention_loss, LOG_ERROR_FLOOR * target) / target)
        return retention_loss / target - 1.0 if self.normalize else retention_loss - target

    def _cap(self, value: float) -> float:
        return value if self.max_lambda is None else min(value, self.max_lambda)

    def step(self, retention_loss: float | torch.Tensor) -> float:
        """Update λ from this step's (rank-averaged) L_ret; returns the new λ."""
        v = float(retention_loss.detach().item() if isinstance(retention_loss, torch.Tensor) else retention_loss)
        if not math.isfinite(v):
            raise FloatingPointError(f"retention loss is not finite ({v}); λ not updated")
        self.last_slack = v - self.epsilon
        if self.enable_dual:
            e = self.error(v)
            if self.mode == "gradient":
                self.lam = self._cap(max(0.0, self.lam + self.dual_lr * e))
            elif self.mode == "nupi":
                xi_prev = self.xi
                self.xi = self.nu * xi_prev + (1.0 - self.nu) * e
                self.lam = self._cap(max(0.0, self.lam + self.dual_lr * e + self.kp * (self.xi - xi_prev)))
            else:
                self.integral = self._cap(max(0.0, self.integral + self.dual_lr * e))
                derivative = 0.0 if self.prev_error is None else max(0.0, e - self.prev_error)
                self.lam = self._cap(max(0.0, self.kp * e + self.integral + self.kd * derivative))
                self.prev_error = e
        self.steps += 1
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam, "steps": self.steps, "last_slack": self.last_slack, "epsilon": self.epsilon,
                "dual_lr": self.dual_lr, "enable_dual": self.enable_dual, "mode": self.mode, "kp": self.kp,
                "kd": self.kd, "normalize": self.normalize, "max_lambda": self.max_lambda,
                "integral": self.integral, "prev_error": self.prev_error, "nu": self.nu, "xi": self.xi,
                "log_error": self.log_error, "setpoint": self.setpoint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "lambda" not in state or "steps" not in state:
            raise KeyError(f"CRaFTDualOptimizer state needs 'lambda' and 'steps', got keys {sorted(state)}")
        saved_mode = state.get("mode", "gradient")  # checkpoints before the pid mode were all gradient
        if self.enable_dual and saved_mode != self.mode:
            raise ValueError(f"the checkpoint's dual mode is {saved_mode!r}, the flags say {self.mode!r}: resume "
                             "with the same --craft_dual_mode")
        # flags added with the nupi mode (issue 26): absent in older checkpoints, whose values were the defaults
        saved = {"nu": float(state.get("nu", 0.0)), "log_error": bool(state.get("log_error", False)),
                 "setpoint": float(state.get("setpoint", 1.0))}
        diffs = [f"--craft_dual_{k} {v} (run) vs {getattr(self, k)} (flags)" for k, v in saved.items()
                 if v != getattr(self, k)]
        if self.enable_dual and diffs:
            raise ValueError("the checkpoint's dual controller differs from the flags: " + "; ".join(diffs) +
                             ": resume with the run's values")
        lam = float(state["lambda"])
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"restored lambda must be >= 0, got {lam}")
        if self.enable_dual:  # with a fixed λ the configured value wins
            self.lam = lam
            self.integral = float(state.get("integral", lam))
            prev = state.get("prev_error")
            self.prev_error = None if prev is None else float(prev)
            self.xi = float(state.get("xi", 0.0))  # absent before the nupi mode (then the mode was not nupi)
        self.steps = int(state["steps"])
        self.last_slack = float(state.get("last_slack", 0.0))


# ---------------------------------------------------------------------------------------------------------------------
# Bridge features
# ---------------------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP-style `.module` wrappers and peft's PeftModel, returning the base model."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "DistributedDataParallel", "DataParallel"):
            model = model.module
            continue
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
            continue
        break
    return model


def find_llm_core(model: nn.Module) -> nn.Module:
    """The Qwen2 `model` (with `.layers` and `.norm`) inside a VLA / causal LM, through DDP and peft wrappers."""
    base = unwrap_model(model)
    for candidate in (getattr(base, "language_model", None), base):
        if candidate is None:
            continue
        candidate = unwrap_model(candidate)
        core = getattr(candidate, "model", None)
        if core is not None and hasattr(core, "layers") and hasattr(core, "norm"):
            return core
        if hasattr(candidate, "layers") and hasattr(candidate, "norm"):
            return candidate
    raise ValueError(
        f"could not find the LLM decoder (`language_model.model.layers` / `.norm`) in {type(base).__name__}")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor, group: str) -> torch.Tensor:
    """Mean over the tokens where mask is True, per sample; (B, T, D), (B, T) -> (B, D) float32."""
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"{group}: hidden states {tuple(hidden.shape)} and mask {tuple(mask.shape)} do not match "
                         "(expected (B, T, D) and (B, T))")
    m = mask.to(device=hidden.device, dtype=torch.float32)
    counts = m.sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{group}: empty token group for samples {empty} (mask has no True entry); "
                         "refusing to take a mean over zero tokens")
    return (hidden.to(torch.float32) * m.unsqueeze(-1)).sum(dim=1) / counts.unsqueeze(-1)


class StopForward(Exception):
    """Raised by the extractor's hook of the deepest needed layer to end a reference forward early."""


class CRaFTFeatureExtractor:
    """Bridge features f = [Pool(C_R^(m)) ; Pool(C_AQ^(M))] captured with forward hooks during the normal forward.

    Layer l is `hidden_states[l]` of the Qwen2 LLM (`output_hidden_states=True` convention): l = 0 the input
    embedding sequence (captured by a forward pre-hook on decoder layer 0), 1 <= l < L the output of decoder layer
    l-1 (no norm), l = L the output of the final RMSNorm `language_model.model.norm`. Defaults m = L // 2, M = L.
    Pool = masked mean over the Raw Latent tokens (`layout.raw_latent_mask`) at layer m and the ActionQuery latent
    tokens (`layout.action_query_latent_mask`) at layer M, in float32: exactly the groups the action head reads.
    Output (B, F): F = 2D (concat) or D (raw_only / aq_only).
    """

    def __init__(self, vla: nn.Module, raw_layer: int | None = None, aq_layer: int | None = None,
                 anchor_type: str = "concat") -> None:
        if anchor_type not in ANCHOR_TYPES:
            raise ValueError(f"anchor_type must be one of {ANCHOR_TYPES}, got {anchor_type!r}")
        self.core = find_llm_core(vla)
        self.num_layers = len(self.core.layers)
        L = self.num_layers
        self.raw_layer = L // 2 if raw_layer is None else int(raw_layer)
        self.aq_layer = L if aq_layer is None else int(aq_layer)
        for name, v in (("raw_layer (craft_raw_layer)", self.raw_layer), ("aq_layer (craft_aq_layer)", self.aq_layer)):
            if not 0 <= v <= L:
                raise ValueError(f"{name}={v} out of range: valid layers are 0..{L} (0 = embeddings, {L} = after the "
                                 "final norm)")
        self.anchor_type = anchor_type
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    @property
    def needed_layers(self) -> list[int]:
        layers = []
        if self.anchor_type in ("concat", "raw_only"):
            layers.append(self.raw_layer)
        if self.anchor_type in ("concat", "aq_only"):
            layers.append(self.aq_layer)
        return sorted(set(layers))

    def feature_dim(self, hidden_size: int) -> int:
        return hidden_size * (2 if self.anchor_type == "concat" else 1)

    def _store(self, layer: int, value: Any) -> None:
        t = value[0] if isinstance(value, (tuple, list)) else value
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layer {layer}: hooked module produced {type(t).__name__}, expected a tensor")
        self._captured[layer] = t

    def _register(self, stop_after_deepest: bool = False) -> None:
        L = self.num_layers
        deepest = max(self.needed_layers)

        def store(layer: int, value: Any) -> None:
            self._store(layer, value)
            if stop_after_deepest and layer == deepest:
                raise StopForward  # nothing after this layer is needed: caught by the caller's forward

        for layer in self.needed_layers:
            if layer == 0:
                def pre_hook(_m, args, kwargs, layer=layer):
                    store(layer, args[0] if args else kwargs["hidden_states"])
                self._handles.append(self.core.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            elif layer < L:
                self._handles.append(self.core.layers[layer - 1].register_forward_hook(
                    lambda _m, _a, out, layer=layer: store(layer, out)))
            else:
                self._handles.append(self.core.norm.register_forward_hook(
                    lambda _m, _a, out, layer=layer: store(layer, out)))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def capture(self, stop_after_deepest: bool = False) -> Iterator[CRaFTFeatureExtractor]:
        """Hooks live only inside this block (so gradient-checkpoint recomputation in backward is not captured).

        `stop_after_deepest`: the hook of the deepest needed layer raises `StopForward` once it has stored its
        tensor (a no-grad reference forward needs nothing after it); the caller catches it (`reference_features`).
        """
        if self._handles:
            raise RuntimeError("CRaFTFeatureExtractor.capture() is already active (nested capture)")
        self._captured = {}
        self._register(stop_after_deepest)
        try:
            yield self
        finally:
            self._remove()

    def features(self, layout: Any = None, *, raw_mask: torch.Tensor | None = None,
                 aq_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool the captured hidden states over the head's groups (the layout of the VLA forward, `out.layout`)."""
        if layout is not None:
            raw_mask, aq_mask = layout.raw_latent_mask, layout.action_query_latent_mask
        missing = [layer for layer in self.needed_layers if layer not in self._captured]
        if missing:
            raise RuntimeError(f"no hidden states captured for layers {missing}: run the forward inside capture()")
        parts = []
        if self.anchor_type in ("concat", "raw_only"):
            if raw_mask is None:
                raise ValueError("raw_mask is required for anchor_type " + self.anchor_type)
            parts.append(masked_mean(self._captured[self.raw_layer], raw_mask,
                                     f"Raw Latent (layer {self.raw_layer})"))
        if self.anchor_type in ("concat", "aq_only"):
            if aq_mask is None:
                raise ValueError("aq_mask is required for anchor_type " + self.anchor_type)
            parts.append(masked_mean(self._captured[self.aq_layer], aq_mask, f"ActionQuery (layer {self.aq_layer})"))
        self._captured = {}
        feats = torch.cat(parts, dim=-1)
        if not torch.isfinite(feats).all():
            bad = (~torch.isfinite(feats)).any(dim=-1).nonzero().flatten().tolist()
            raise FloatingPointError(f"non-finite (NaN/Inf) bridge features for samples {bad} "
                                     f"(layers {self.needed_layers}, anchor_type {self.anchor_type})")
        return feats


def retention_loss(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """L_ret = mean over samples of Σ_dims (f - f̃)² (sum over feature dims, mean over the batch; ε is in these units).

    Anchors are treated as constants (detached). Computed in float32.
    """
    if features.dim() != 2 or features.shape != anchors.shape:
        raise ValueError(f"features {tuple(features.shape)} and anchors {tuple(anchors.shape)} must both be (B, F) "
                         "with the same shape (same anchor_type / layers / model width?)")
    if not torch.isfinite(anchors).all():
        raise FloatingPointError("anchors contain NaN/Inf")
    diff = features.to(torch.float32) - anchors.detach().to(device=features.device, dtype=torch.float32)
    return diff.pow(2).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------------------------------
# θ0 weights for online anchors
# ---------------------------------------------------------------------------------------------------------------------


def canonical_param_name(name: str) -> str:
    """Parameter name in the plain VLA's state_dict naming (strip DDP `module.`, peft `base_model.model.`,
    `.base_layer`)."""
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


def _is_lora_name(name: str) -> bool:
    return ".lora_" in name or "lora_embedding" in name or ".lora_magnitude" in name


def _plain_train(module: nn.Module) -> bool:
    """True when `module.train(False)` only sets `training` on the module itself and its children."""
    if type(module).train is nn.Module.train:
        return True
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, PreTrainedModel) and not getattr(module, "use_kernels", False) \
        and type(module).train is PreTrainedModel.train


class CRaFTWeightManager:
    """Holds θ0 and swaps it into the live model for the no-grad reference forward (`reference_weights()`).

    LoRA (peft model): the reference is the model with adapters disabled (`disable_adapter()`) plus θ0 copies of the
    trainable non-LoRA tensors (e.g. `action_queries`, a trained projector) -- or only the names in `swap_names`.
    Full fine-tuning: θ0 of every parameter of the given module (pass the VLA: vision backbone, projector, LLM,
    action_queries; the action head / proprio projector are separate modules and not part of the features).
    `storage`: "copy" keeps θ0 as a frozen detached copy on the parameters' device (fast, +1× feature-path memory
    on the device); "cpu_swap" keeps θ0 on CPU (pinned when CUDA is available) and moves it in on entry.
    The swap rebinds `param.data` (no in-place write), so the trained tensors are restored exactly, by identity.
    `snapshot_state`: θ0 from another checkpoint (state_dict in the plain VLA naming); with LoRA its tensors are also
    swapped in on top of the disabled-adapter base model.
    """

    def __init__(self, model: nn.Module, storage: str = "copy", swap_names: Sequence[str] | None = None,
                 snapshot_state: Mapping[str, torch.Tensor] | None = None, eval_mode: bool = True) -> None:
        if storage not in ("copy", "cpu_swap"):
            raise ValueError(f"storage must be 'copy' or 'cpu_swap', got {storage!r}")
        self.model = model
        self.storage = storage
        self.eval_mode = eval_mode
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.peft_model = inner if hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config") else None
        self.is_lora = self.peft_model is not None
        named = {canonical_param_name(n): p for n, p in inner.named_parameters() if not _is_lora_name(n)}
        if swap_names is not None:
            unknown = [n for n in swap_names if n not in named]
            if unknown:
                raise KeyError(f"swap_names not found among the model's parameters: {unknown[:5]}")
            selected = list(swap_names)
        elif self.is_lora:
            selected = [n for n, p in named.items() if p.requires_grad]
        else:
            selected = list(named)
        if snapshot_state is not None:
            extra = [n for n in snapshot_state if n in named and n not in selected]
            selected += extra if self.is_lora else []
            missing = [n for n in selected if n not in snapshot_state]
            if missing:
                raise KeyError(f"snapshot_state lacks {len(missing)} parameters needed for θ0, e.g. {missing[:5]}")
        self._params = {n: named[n] for n in selected}
        self._theta0: dict[str, torch.Tensor] = {}
        # FSDP2 shards: FSDP gathers from its own storage, so θ0 is exchanged in place (local shards), not rebound
        self.in_place = any(_is_dtensor(p) for p in self._params.values())
        pin = storage == "cpu_swap" and torch.cuda.is_available()
        for n, p in self._params.items():
            src = snapshot_state[n] if snapshot_state is not None else p.detach()
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"θ0 tensor {n}: snapshot shape {tuple(src.shape)} != model shape {tuple(p.shape)}")
            if self.in_place:
                from prismatic.training.fsdp import shard_like

                shard = shard_like(src.detach(), p) if not _is_dtensor(src) else src.detach()
                local = _local(shard).detach().clone()
                if storage == "cpu_swap":
                    local = local.to("cpu").pin_memory() if pin else local.to("cpu")
                self._theta0[n] = local
                continue
            if storage == "copy":
                t = src.detach().to(device=p.device, dtype=p.dtype).clone()
            else:
                t = src.detach().to(device="cpu", dtype=p.dtype).clone()
                if pin:
                    t = t.pin_memory()
            self._theta0[n] = t
        self._active = False
        # modes saved / restored per reference forward: walk the tree once; eval() of each module is a flag write
        # unless its class does more in train() (transformers' PreTrainedModel only with kernels)
        self._modules = list(model.modules())
        self._modules_plain_train = [(m, _plain_train(m)) for m in self._modules]
        self._tuner_layers = self._plain_lora_layers(inner) if self.is_lora else None

    @staticmethod
    def _plain_lora_layers(peft_model: nn.Module) -> list[nn.Module] | None:
        """The adapter layers whose `_disable_adapters` flag alone switches them to the base layer (peft's LoRA
        `forward`), when that is all `disable_adapter()` would change; else None (peft's own context is used).

        peft's `disable_adapter()` also walks the model twice (status check, then requires_grad of every adapter
        tensor on exit): ~0.1 s per micro-batch on the tiny preset, a third of the reference forward. Under
        torch.no_grad the requires_grad toggling is irrelevant, so flipping the flags is the same computation.
        """
        try:
            from peft.tuners.lora import LoraLayer
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper
        except ImportError:  # pragma: no cover - other peft layouts: keep peft's context
            return None
        cfg = peft_model.peft_config.get(getattr(peft_model, "active_adapter", "default"))
        if cfg is None or cfg.is_prompt_learning or getattr(cfg, "is_adaption_prompt", False):
            return None
        layers = []
        for m in peft_model.modules():
            if isinstance(m, AuxiliaryTrainingWrapper):
                return None  # modules_to_save / trainable tokens: peft swaps whole modules
            if isinstance(m, BaseTunerLayer):
                if not isinstance(m, LoraLayer) or m.merged or m.disable_adapters:
                    return None
                layers.append(m)
        return layers

    @property
    def swapped_names(self) -> list[str]:
        return list(self._params)

    def theta0_state(self) -> dict[str, torch.Tensor]:
        """θ0 per name; under FSDP2 as DTensors laid out like the parameters (whole: `fsdp.full_tensor`)."""
        if not self.in_place:
            return dict(self._theta0)
        from torch.distributed.tensor import DTensor

        return {n: DTensor.from_local(t.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride()) for (n, t), p in zip(self._theta0.items(),
                                                                             self._params.values(), strict=True)}

    def _exchange(self, names: Sequence[str]) -> None:
        """Swap live and θ0 values of the local shards in place (exact copies; one tensor of transient memory)."""
        for n in names:
            live = _local(self._params[n].data)
            held = self._theta0[n]
            tmp = live.clone()
            live.copy_(held)
            held.copy_(tmp)

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[nn.Module]:
        """Inside: the live model computes with θ0 (adapters disabled under LoRA). Use with torch.no_grad()."""
        if self._active:
            raise RuntimeError("reference_weights() is already active")
        self._active = True
        saved = {}
        modes = {m: m.training for m in self._modules} if self.eval_mode else {}
        if not self.is_lora:
            adapter_ctx = contextlib.nullcontext()
        elif self._tuner_layers is not None:
            adapter_ctx = self._flags_disabled()
        else:
            adapter_ctx = self.peft_model.disable_adapter()
        exchanged: list[str] = []
        try:
            with torch.no_grad():
                for n, p in self._params.items():
                    if self.in_place:
                        self._exchange([n])
                        exchanged.append(n)
                        continue
                    saved[n] = p.data
                    p.data = self._theta0[n].to(device=p.device, non_blocking=True) if self.storage == "cpu_swap" \
                        else self._theta0[n]
            if self.eval_mode:
                for m, plain in self._modules_plain_train:
                    if plain:
                        m.__dict__["training"] = False  # what eval() does, without nn.Module.__setattr__'s checks
                    else:
                        m.train(False)
            with adapter_ctx:
                yield self.model
        finally:
            with torch.no_grad():
                self._exchange(exchanged)
                for n, data in saved.items():
                    self._params[n].data = data
            for m, training in modes.items():
                m.__dict__["training"] = training
            self._active = False

    @contextlib.contextmanager
    def _flags_disabled(self) -> Iterator[None]:
        try:
            for m in self._tuner_layers:
                m.__dict__["_disable_adapters"] = True  # a plain attribute (peft's `disable_adapters` reads it)
            yield
        finally:
            for m in self._tuner_layers:
                m.__dict__["_disable_adapters"] = False
