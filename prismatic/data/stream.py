"""The deterministic sample stream shared by all ranks, and the per-rank batch sampler that cuts it.

Stream: position p (0, 1, 2, ...) belongs to epoch e = p // F (F = frames per epoch) and names frame
`order_e[p % F]`, where `order_e` is a permutation drawn from (seed, e) (for a mixture: a weighted interleave of
per-dataset permutations, also drawn from (seed, e)).

Cutting: global batch G = b * W * k (per-rank batch b, world size W, accumulation steps k). Optimizer step s uses
positions [s*G, (s+1)*G); its micro-batch j (0..k-1) on rank r is s*G + j*b*W + r*b + [0, b). So the set of samples
of a step depends only on G, a resumed run starting at step s sees exactly the positions an uninterrupted run would,
and the step number is the whole loader state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

MIXTURE_TAG = 0x4D4958  # separates the dataset-choice stream from per-dataset permutations


def micro_batch_positions(step: int, micro_index: int, per_rank_batch: int, rank: int, world_size: int,
                          grad_accumulation_steps: int) -> np.ndarray:
    """Stream positions of micro-batch `micro_index` of optimizer step `step` on `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if not 0 <= micro_index < grad_accumulation_steps:
        raise ValueError(f"micro_index {micro_index} outside [0, {grad_accumulation_steps})")
    global_batch = per_rank_batch * world_size * grad_accumulation_steps
    start = step * global_batch + micro_index * per_rank_batch * world_size + rank * per_rank_batch
    return np.arange(start, start + per_rank_batch, dtype=np.int64)


class StreamBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of stream positions) from `start_step` on.

    `num_steps=None` streams forever; otherwise exactly `num_steps * grad_accumulation_steps` micro-batches.
    """

    def __init__(self, per_rank_batch: int, rank: int = 0, world_size: int = 1, grad_accumulation_steps: int = 1,
                 start_step: int = 0, num_steps: int | None = None) -> None:
        checks = (("per_rank_batch", per_rank_batch, 1), ("world_size", world_size, 1),
                  ("grad_accumulation_steps", grad_accumulation_steps, 1), ("start_step", start_step, 0))
        for name, value, low in checks:
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}")
        self.per_rank_batch, self.rank, self.world_size = per_rank_batch, rank, world_size
        self.grad_accumulation_steps, self.start_step, self.num_steps = grad_accumulation_steps, start_step, num_steps

    @property
    def global_batch(self) -> int:
        return self.per_rank_batch * self.world_size * self.grad_accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            for j in range(self.grad_accumulation_steps):
                yield micro_batch_positions(step, j, self.per_rank_batch, self.rank, self.world_size,
                                            self.grad_accumulation_steps).tolist()
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StreamBatchSampler has no length (pass num_steps)")
        return self.num_steps * self.grad_accumulation_steps


class EpochOrder:
    """Maps stream positions to (dataset index, local frame index) for one dataset or a weighted mixture."""

    def __init__(self, frame_counts: Sequence[int], weights: Sequence[float], seed: int) -> None:
        if len(frame_counts) != len(weights) or not frame_counts:
            raise ValueError("frame_counts and weights must be non-empty and of equal length")
        if any(n <= 0 for n in frame_counts):
            raise ValueError(f"every dataset of the stream needs at least one frame, got counts {list(frame_counts)}")
        self.counts = np.asarray(frame_counts, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.seed = int(seed)
        self.epoch_length = int(self.counts.sum())
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        if len(self.counts) == 1:
            which = np.zeros(self.epoch_length, dtype=np.int64)
            local = np.random.default_rng([self.seed, epoch]).permutation(self.epoch_length)
        else:
            rng = np.random.default_rng([self.seed, epoch, MIXTURE_TAG])
            which = rng.choice(len(self.counts), size=self.epoch_length, p=self.probs)
            local = np.empty(self.epoch_length, dtype=np.int64)
            for d, count in enumerate(self.counts):
                slots = np.flatnonzero(which == d)
                perm = np.random.default_rng([self.seed, epoch, d]).permutation(count)
                local[slots] = perm[np.arange(len(slots)) % count]  # k-th draw of dataset d -> perm[k mod F_d]
        if len(self._cache) >= 2:
            self._cache.pop(min(self._cache))
        self._cache[epoch] = (which, local)
        return which, local

    def lookup(self, position: int) -> tuple[int, int, int]:
        """(epoch, dataset index, local frame index) of a stream position."""
        if position < 0:
            raise IndexError(f"stream positions are >= 0, got {position}")
        epoch, offset = divmod(int(position), self.epoch_length)
        which, local = self._epoch(epoch)
        return epoch, int(which[offset]), int(local[offset])
