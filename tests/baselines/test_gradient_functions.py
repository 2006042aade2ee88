"""align_gradients / consft_gradients (drop-ins for train_step.plain_gradients) against second code paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from baseline_helpers import tiny_batch

from prismatic.training.align_loss import AlignRetention, align_gradients
from prismatic.training.consft import consft_gradients
from prismatic.training.train_step import MicroBatch, plain_gradients


def _samples(n: int, seed: int = 0) -> dict:
    pixel_values, ids, _ = tiny_batch(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "proprio": torch.randn(n, 8, generator=g), "actions": torch.rand(n, 8, 7, generator=g) * 2 - 1,
            "noise": 0.02 * torch.randn(n, 8, 7 * 64, generator=g)}


def _micro(samples: dict, sizes: list[int]) -> list[MicroBatch]:
    out, start = [], 0
    for size in sizes:
        part = {k: v[start:start + size] for k, v in samples.items()}
        noise = part.pop("noise")
        out.append(MicroBatch(batch=part, noise=noise))
        start += size
    return out


def _grads(policy) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return grads


def _assert_same(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def test_consft_rho_zero_equals_plain_and_weighted_matches_numpy(tiny_policy_factory):
    policy = tiny_policy_factory(0, num_images=1).train()
    samples = _samples(4)
    cpu = torch.device("cpu")
    plain = plain_gradients(policy, _micro(samples, [2, 2]), cpu)
    g_plain = _grads(policy)
    stats = consft_gradients(policy, _micro(samples, [2, 2]), cpu, tau=0.1, clip=0.0)
    _assert_same(_grads(policy), g_plain, rtol=1e-5, atol=1e-8)
    assert float(stats["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-6)
    assert float(stats["weight_min"]) == float(stats["weight_max"]) == 1.0

    tau, rho = 0.05, 0.4
    stats = consft_gradients(policy, _micro(samples, [2, 2]), cpu, tau=tau, clip=rho)
    g_consft = _grads(policy)
    # second path: per-sample L1 from one forward per micro-batch, numpy weights, sum_i w_i l_i / (b k)
    weights_seen = []
    for micro in _micro(samples, [2, 2]):
        pred = policy(micro.batch, noise=micro.noise).actions
        per = (pred - micro.batch["actions"]).abs().flatten(1).mean(1)
        e = np.exp(-per.detach().double().numpy() / tau)
        w = np.clip(e / e.mean(), 1 - rho, 1 + rho)
        weights_seen.extend(w.tolist())
        ((torch.tensor(w, dtype=torch.float32) * per).mean() / 2).backward()
    _assert_same(g_consft, _grads(policy), rtol=1e-5, atol=1e-8)
    assert float(stats["weight_min"]) == pytest.approx(min(weights_seen), rel=1e-6)
    assert float(stats["weight_max"]) == pytest.approx(max(weights_seen), rel=1e-6)


def test_align_gradients_accumulation_and_zero_weight(tiny_policy_factory):
    policy = tiny_policy_factory(0, num_images=1).train()
    align = AlignRetention(policy.vla, weight=0.2, seed=1)
    samples = _samples(2, seed=3)
    cpu = torch.device("cpu")
    one = align_gradients(policy, _micro(samples, [2]), cpu, align)
    g_one = _grads(policy)
    two = align_gradients(policy, _micro(samples, [1, 1]), cpu, align)  # 2 micro-batches of 1 = 1 batch of 2
    _assert_same(_grads(policy), g_one, rtol=1e-4, atol=1e-7)
    for key in ("loss", "align_loss", "total_loss"):
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5)
    assert float(one["total_loss"]) == pytest.approx(float(one["loss"]) + 0.2 * float(one["align_loss"]), rel=1e-6)
    assert g_one["vla.vision_backbone.featurizer.blocks.0.attn.qkv.weight"].abs().sum() > 0

    plain_gradients(policy, _micro(samples, [2]), cpu)
    g_plain = _grads(policy)
    align.weight = 0.0  # w = 0: exactly the baseline's gradient
    align_gradients(policy, _micro(samples, [2]), cpu, align)
    _assert_same(_grads(policy), g_plain, rtol=0, atol=0)
    assert not any(p.grad is not None for p in align.parameters())
