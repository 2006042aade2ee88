"""Process-group set-up for 1 process or torchrun (nccl on GPU, gloo on CPU) and the few collectives training uses."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(require_group: bool = False) -> DistEnv:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1), else a single process.

    require_group: a process group even for one process (FSDP needs one): torchrun's, or a world of one on a local
    TCP store when not launched by torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if world_size > 1 or (require_group and "WORLD_SIZE" in os.environ):
            dist.init_process_group(backend=backend)
        elif require_group:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks of a tensor (a copy; the input is untouched). Identity in a single process."""
    out = values.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= env.world_size
    return out


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True if `flag` is True on any rank (used so that every rank takes the same branch)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# what gloo / NCCL / the TCP store raise when another rank's process is gone
LOST_PEER_TEXTS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
                   "NCCL communicator was aborted", "remote process exited or there was a network error")


def is_lost_peer(exc: BaseException) -> bool:
    """True when `exc` (or its cause) is a collective failing because another rank died."""
    seen = exc
    while seen is not None:
        if (hasattr(dist, "DistNetworkError") and isinstance(seen, dist.DistNetworkError)) \
                or any(text in str(seen) for text in LOST_PEER_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj` as a list indexed by rank (picklable objects; small payloads such as RNG states)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
