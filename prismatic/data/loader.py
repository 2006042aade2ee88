"""DataLoader factories: the sharded, resumable training stream and an ordered evaluation pass."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from prismatic.data.collator import VLACollator
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.data.stream import StreamBatchSampler


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers run numpy/PIL per sample; intra-op threads would only oversubscribe the cores


def make_train_loader(dataset: RLDSFrameDataset, per_rank_batch: int, rank: int = 0,
                      world_size: int = 1, grad_accumulation_steps: int = 1, start_step: int = 0,
                      num_steps: int | None = None, num_workers: int = 0, prefetch_factor: int = 2) -> DataLoader:
    """Loader of this rank's micro-batches, optimizer step `start_step` onwards.

    Yields `grad_accumulation_steps` consecutive micro-batches per optimizer step (see `stream.py` for which stream
    positions they hold). Endless unless `num_steps` is given. Workers receive whole micro-batches, so every rank and
    worker reads a disjoint share; output order is the sampler's order.
    """
    sampler = StreamBatchSampler(per_rank_batch, rank, world_size, grad_accumulation_steps, start_step, num_steps)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=VLACollator(dataset.pad_token_id),
                      num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
                      prefetch_factor=prefetch_factor if num_workers else None,
                      persistent_workers=False)


class _FrameView(Dataset):
    """Frames in file order (evaluation view), restricted to one rank's share."""

    def __init__(self, dataset: RLDSFrameDataset, frames: list[int]) -> None:
        self.dataset, self.frames = dataset, frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset.get_frame(self.frames[i])


def make_eval_loader(dataset: RLDSFrameDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                     num_workers: int = 0, max_frames: int | None = None) -> DataLoader:
    """Ordered pass over frames (rank r takes frames r, r + W, ...), no shuffling, no random augmentation."""
    total = dataset.num_frames if max_frames is None else min(max_frames, dataset.num_frames)
    frames = list(range(rank, total, world_size))
    return DataLoader(_FrameView(dataset, frames), batch_size=batch_size, shuffle=False,
                      collate_fn=VLACollator(dataset.pad_token_id), num_workers=num_workers,
                      worker_init_fn=_worker_init if num_workers else None)
