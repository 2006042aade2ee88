"""torchrun worker: CRaFT projector + dual under DDP (gloo), 2 ranks x 2 micro-batches x 2 samples.

Each rank writes {params, grads, lambdas, stats, grad_is_bucket_view} to <out_dir>/rank{r}.pt; rank 0 also writes the
single-process reference (full batch of 8, plain autograd + combine_gradients + hand-written dual rule) to ref.pt.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from craft_toy_models import ToyPolicy, toy_data, toy_losses
from torch.nn.parallel import DistributedDataParallel as DDP

from prismatic.training.craft_utils import (
    CRaFTDualOptimizer,
    CRaFTGradientProjector,
    all_reduce_mean,
    combine_gradients,
)

STEPS, K, B, LR, EPS, ETA = 3, 2, 2, 0.1, 0.05, 0.5


def batches(step: int):
    return toy_data(2 * K * B, seed=100 + step)  # the global batch of this step, same on every rank


def reference(model0: torch.nn.Module):
    model = copy.deepcopy(model0)
    params = list(model.parameters())
    lam, lams = 0.0, []
    for s in range(STEPS):
        x, y, a = batches(s)
        la, lr = toy_losses(model, x, y, a)
        ga = torch.autograd.grad(la, params, retain_graph=True, allow_unused=True)
        gr = torch.autograd.grad(lr, params, allow_unused=True)
        ga = [torch.zeros_like(p) if g is None else g for p, g in zip(params, ga, strict=True)]
        g, _ = combine_gradients(ga, list(gr), lam, 1e-8, True)
        with torch.no_grad():
            for p, gi, reached in zip(params, g, [x is not None for x in gr], strict=True):
                if reached or p is not model.unused.weight and p is not model.unused.bias:
                    p -= LR * gi
        lam = max(0.0, lam + ETA * (float(lr) - EPS))
        lams.append(lam)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "lambdas": lams}


def main(out_dir: Path, use_no_sync: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model0 = ToyPolicy()
    if rank == 0:
        torch.save(reference(model0), out_dir / "ref.pt")
    model = copy.deepcopy(model0)
    # no_sync mode also turns on find_unused_parameters (the toy has a parameter no loss reaches, like the last ViT
    # block): the reducer is never engaged, so neither the flag nor the unused parameter can break it.
    ddp = DDP(model, gradient_as_bucket_view=True, find_unused_parameters=use_no_sync)
    opt = torch.optim.SGD([p for p in model.parameters()], lr=LR)
    proj = CRaFTGradientProjector(list(model.named_parameters()), delta=1e-8, enable_projection=True)
    dual = CRaFTDualOptimizer(epsilon=EPS, dual_lr=ETA)
    lams, stats_all, bucket_view = [], [], []
    shared_storage = False
    if use_no_sync:
        # warm-up plain DDP backward (no step): makes every reached .grad a view into DDP's flat buckets
        la, _ = toy_losses(ddp, *batches(99))
        la.backward()
        opt.zero_grad(set_to_none=False)
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
        shared_storage = len(storages) < sum(p.grad is not None for p in model.parameters())
    for s in range(STEPS):
        x, y, a = batches(s)
        xs, ys, as_ = (t.chunk(world)[rank] for t in (x, y, a))  # this rank's share
        ret_sum = 0.0
        for xb, yb, ab in zip(xs.chunk(K), ys.chunk(K), as_.chunk(K), strict=True):
            if use_no_sync:
                with ddp.no_sync():
                    la, lr = toy_losses(ddp, xb, yb, ab)
            else:
                la, lr = toy_losses(ddp, xb, yb, ab)
            proj.accumulate(la / K, lr / K)
            ret_sum += float(lr) / K
        grads_before = {n: p.grad for n, p in model.named_parameters()}
        stats_all.append(proj.step(dual.lam))
        bucket_view.append(all(p.grad is grads_before[n] for n, p in model.named_parameters()
                               if grads_before[n] is not None))
        opt.step()
        opt.zero_grad(set_to_none=False)
        lams.append(dual.step(all_reduce_mean(ret_sum)))
    torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "lambdas": lams,
                "stats": stats_all, "bucket_view": bucket_view,
                "shared_storage": shared_storage}, out_dir / f"rank{rank}.pt")
    # orderly teardown: the reducer (never engaged in `plain` mode's autograd.grad steps) goes before the group,
    # and both ranks leave together (an abort at exit was seen once under heavy load)
    del ddp
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "no_sync")
