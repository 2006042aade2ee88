"""The deterministic stream: ranks, accumulation, resume, epochs, mixtures, augmentation seeding."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from prismatic.data.loader import make_eval_loader, make_train_loader
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.data.stream import EpochOrder, StreamBatchSampler, micro_batch_positions

NAME = "libero_10_no_noops"


@pytest.fixture(scope="module")
def aug_dataset(libero_root, tokenizer):
    root, _ = libero_root
    return RLDSFrameDataset(root, NAME, tokenizer, num_images_in_input=2, use_proprio=True, image_aug=True, seed=13)


def _steps(loader, k: int, num_steps: int):
    """Group a loader's micro-batches into optimizer steps."""
    it = iter(loader)
    return [[next(it) for _ in range(k)] for _ in range(num_steps)]


def _step_content(micro_batches) -> dict[str, np.ndarray]:
    """sample_id -> pixel bytes of one optimizer step (all ranks/micro-batches merged)."""
    out = {}
    for batch in micro_batches:
        for i, sid in enumerate(batch["sample_ids"]):
            out.setdefault(sid, []).append(batch["images"][i].numpy())
    return out


def test_positions_formula_partitions_each_step():
    b, w, k = 3, 4, 2
    g = b * w * k
    for step in (0, 5):
        got = np.concatenate([micro_batch_positions(step, j, b, r, w, k) for j in range(k) for r in range(w)])
        np.testing.assert_array_equal(np.sort(got), np.arange(step * g, (step + 1) * g))
    assert micro_batch_positions(2, 1, b, 3, w, k).tolist() == [2 * g + 1 * b * w + 3 * b + i for i in range(b)]


def test_one_rank_vs_two_ranks_same_samples_and_pixels(aug_dataset, tokenizer):
    steps = 3
    single = _steps(make_train_loader(aug_dataset, per_rank_batch=4, num_steps=steps), 1, steps)
    ranks = [_steps(make_train_loader(aug_dataset, per_rank_batch=2, rank=r, world_size=2,
                                      num_steps=steps), 1, steps) for r in range(2)]
    for s in range(steps):
        a = _step_content(single[s])
        b = _step_content(ranks[0][s] + ranks[1][s])
        assert sorted(a) == sorted(b)
        assert not set(ranks[0][s][0]["sample_ids"]) & set(ranks[1][s][0]["sample_ids"])  # disjoint shares
        for sid in a:
            np.testing.assert_array_equal(np.stack(a[sid]), np.stack(b[sid]))  # identical augmented pixels


def test_accumulation_equivalence(aug_dataset, tokenizer):
    steps = 2
    big = _steps(make_train_loader(aug_dataset, per_rank_batch=4, num_steps=steps), 1, steps)
    acc = _steps(make_train_loader(aug_dataset, per_rank_batch=2, grad_accumulation_steps=2,
                                   num_steps=steps), 2, steps)
    mixed = [_steps(make_train_loader(aug_dataset, per_rank_batch=1, rank=r, world_size=2,
                                      grad_accumulation_steps=2, num_steps=steps), 2, steps) for r in range(2)]
    for s in range(steps):
        ids = [sid for mb in big[s] for sid in mb["sample_ids"]]
        assert [sid for mb in acc[s] for sid in mb["sample_ids"]] == ids
        merged = [sid for j in range(2) for r in range(2) for sid in mixed[r][s][j]["sample_ids"]]
        assert merged == ids
        torch.testing.assert_close(torch.cat([mb["actions"] for mb in acc[s]]), big[s][0]["actions"],
                                   rtol=0, atol=0)


def test_resume_continues_exact_stream(aug_dataset, tokenizer):
    full = list(make_train_loader(aug_dataset, per_rank_batch=2, grad_accumulation_steps=2,
                                  num_steps=4))
    resumed = list(make_train_loader(aug_dataset, per_rank_batch=2, grad_accumulation_steps=2,
                                     start_step=2, num_steps=2))
    assert len(full) == 8 and len(resumed) == 4
    for a, b in zip(full[4:], resumed, strict=True):
        assert a["sample_ids"] == b["sample_ids"]
        assert torch.equal(a["images"], b["images"])


def test_workers_give_the_same_stream(aug_dataset, tokenizer):
    plain = list(make_train_loader(aug_dataset, per_rank_batch=2, num_steps=4))
    workers = list(make_train_loader(aug_dataset, per_rank_batch=2, num_steps=4, num_workers=2))
    for a, b in zip(plain, workers, strict=True):
        assert a["sample_ids"] == b["sample_ids"]
        assert torch.equal(a["images"], b["images"])


def test_epochs_are_seeded_permutations(aug_dataset, libero_root, tokenizer):
    n = len(aug_dataset)
    order = aug_dataset.order
    epoch0 = [order.lookup(p)[2] for p in range(n)]
    epoch1 = [order.lookup(p)[2] for p in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))  # every frame exactly once per epoch
    assert epoch0 != epoch1
    np.testing.assert_array_equal(epoch0, np.random.default_rng([13, 0]).permutation(n))
    other_seed = RLDSFrameDataset(libero_root[0], NAME, tokenizer, seed=14)
    assert [other_seed.order.lookup(p)[2] for p in range(n)] != epoch0
    with pytest.raises(TypeError, match="endless"):
        len(StreamBatchSampler(2))


def test_augmentation_depends_on_position_only(aug_dataset):
    a, b = aug_dataset[7], aug_dataset[7]
    np.testing.assert_array_equal(a["images"], b["images"])
    n = len(aug_dataset)
    later = aug_dataset[7 + 10 * n]  # a later epoch: other order, other augmentation draw
    same_frame = [p for p in range(10 * n, 11 * n) if aug_dataset[p]["sample_id"] == a["sample_id"]][0]
    assert not np.array_equal(aug_dataset[same_frame]["images"], a["images"])
    assert later["images"].shape == (2, 224, 224, 3)
    eval_view = aug_dataset.get_frame(0)
    assert np.array_equal(eval_view["images"], aug_dataset.get_frame(0)["images"])


def test_mixture_weights_and_per_dataset_normalisation(libero_root, tokenizer):
    root, _ = libero_root
    mix = RLDSFrameDataset(root, "libero_10_no_noops:3,libero_goal_no_noops:1", tokenizer, seed=1)
    assert [s.name for s in mix.sources] == ["libero_10_no_noops", "libero_goal_no_noops"]
    assert set(mix.dataset_statistics) == {"libero_10_no_noops", "libero_goal_no_noops"}
    counts = Counter(mix.order.lookup(p)[1] for p in range(4000))
    assert abs(counts[0] / 4000 - 0.75) < 0.03
    single = RLDSFrameDataset(root, "libero_goal_no_noops", tokenizer, seed=1)
    goal = next(p for p in itertools.count() if mix[p]["dataset_name"] == "libero_goal_no_noops")
    sample = mix[goal]
    frame = [single.get_frame(i) for i in range(single.num_frames)]
    match = [f for f in frame if f["sample_id"] == sample["sample_id"]][0]
    np.testing.assert_array_equal(sample["actions"], match["actions"])  # normalised with its own statistics
    with pytest.raises(ValueError, match="weights must be > 0"):
        RLDSFrameDataset(root, "libero_10_no_noops:0,libero_goal_no_noops:1", tokenizer)
    order = EpochOrder([5, 3], [1.0, 1.0], seed=0)
    assert order.epoch_length == 8


def test_eval_loader_covers_frames_in_order(aug_dataset, tokenizer):
    shards = [list(make_eval_loader(aug_dataset, batch_size=4, rank=r, world_size=2)) for r in range(2)]
    ids = [[sid for b in shard for sid in b["sample_ids"]] for shard in shards]
    src = aug_dataset.sources[0]
    expected = [f"{NAME}/{e:06d}/{t:04d}" for e, t in zip(src.frame_episode, src.frame_step, strict=True)]
    assert ids[0] == expected[0::2] and ids[1] == expected[1::2]
