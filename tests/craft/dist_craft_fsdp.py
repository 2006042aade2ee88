"""torchrun worker: CRaFT projector on FSDP2 (`fully_shard`) parameters, 2 ranks (gloo), 2 micro-batches each.

Per micro-batch: L_act.backward(retain_graph=True) -> capture 'act'; L_ret.backward() -> capture 'ret' (FSDP
reduce-scatters and averages). projector.step uses the sharded combine (one small all-reduce, shards only).
Only for checking, the resulting gradient shards are gathered after the step and saved; rank 0 also saves the
unsharded single-process reference (full batch, autograd + combine_gradients).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from craft_toy_models import ToyPolicy, toy_data, toy_losses
from torch.distributed.fsdp import fully_shard

from prismatic.training.craft_utils import CRaFTGradientProjector, combine_gradients

K, B, LAM = 2, 2, 0.3


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model0 = ToyPolicy(d_in=6, d_hidden=8, d_feat=4, d_out=3)
    ref_model = copy.deepcopy(model0)
    params = list(ref_model.parameters())
    for seed in range(100):  # deterministic search for a batch whose gradients conflict (exercises the projection)
        x, y, a = toy_data(world * K * B, seed=seed, d_feat=4)
        la, lr = toy_losses(ref_model, x, y, a)
        ga = torch.autograd.grad(la, params, retain_graph=True, allow_unused=True)
        gr = torch.autograd.grad(lr, params, allow_unused=True)
        ga = [torch.zeros_like(p) if g is None else g for p, g in zip(params, ga, strict=True)]
        g, stats = combine_gradients(ga, list(gr), LAM, 1e-8, True)
        if stats["projection_fired"]:
            break
    if rank == 0:
        names = [n for n, _ in ref_model.named_parameters()]
        torch.save({"grads": {n: gi for n, gi in zip(names, g, strict=True) if not n.startswith("unused")},
                    "stats": stats}, out_dir / "ref.pt")
    model = copy.deepcopy(model0)
    fully_shard(model.trunk1)
    fully_shard(model)
    proj = CRaFTGradientProjector(list(model.named_parameters()), delta=1e-8, enable_projection=True)
    assert proj.sharded
    xs, ys, as_ = (t.chunk(world)[rank] for t in (x, y, a))
    for xb, yb, ab in zip(xs.chunk(K), ys.chunk(K), as_.chunk(K), strict=True):
        la, lr = toy_losses(model, xb, yb, ab)
        (la / K).backward(retain_graph=True)
        proj.capture_grads("act")
        (lr / K).backward()
        proj.capture_grads("ret")
    stats = proj.step(LAM)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    assert not any(n.startswith("unused") for n in grads), "a parameter no loss reaches got a gradient"
    torch.save({"grads": grads, "stats": stats}, out_dir / f"rank{rank}.pt")
    # orderly teardown, as dist_craft_ddp.py: both ranks leave together (rank 0 once aborted at exit, "terminate
    # called without an active exception", when it destroyed the group while its peer was still in a collective)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
