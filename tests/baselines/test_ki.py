"""Knowledge insulation (`--retention_method ki`): binning, token CE, what the head sees and where gradients go,
each against an independent computation (numpy, a hand computation, plain autograd on an un-insulated forward)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from baseline_helpers import tiny_batch

from prismatic.models.action_tokens import ACTION_TOKEN_BINS, action_bins, action_token_ids
from prismatic.models.modeling_vla import apply_lora
from prismatic.training.knowledge_insulation import check_action_vocabulary, ki_gradients, token_cross_entropy
from prismatic.training.train_step import MicroBatch, action_l1_losses

CPU = torch.device("cpu")


# ---- binning -----------------------------------------------------------------------------------------------------
def test_bins_match_numpy_digitize_on_256_uniform_bins():
    g = np.random.default_rng(0)
    edges = np.linspace(-1.0, 1.0, ACTION_TOKEN_BINS + 1)  # 256 equal-width bins
    values = np.concatenate([g.uniform(-1.3, 1.3, 5000), edges, edges + 1e-7, edges - 1e-7, [-5.0, 5.0]])
    x = torch.from_numpy(values.astype(np.float32))
    want = np.digitize(np.clip(x.double().numpy(), -1, 1), edges[1:-1])  # interior edges: indices 0..255
    assert torch.equal(action_bins(x), torch.from_numpy(want))
    assert action_bins(torch.tensor([-1.0, -0.9999, 0.0, 0.9999, 1.0])).tolist() == [0, 0, 128, 255, 255]
    assert np.bincount(want[:5000][np.abs(values[:5000]) < 1], minlength=256).min() > 0  # every bin is reachable


def test_token_ids_are_the_last_256_of_the_vocabulary_lowest_bin_last_time_major():
    vocab = 1000
    actions = torch.tensor([[[-1.0, 1.0], [0.0, 0.5]]])  # (B=1, K=2, A=2)
    ids = action_token_ids(actions, vocab)
    # OpenVLA: id = V - k with k = 1 for the lowest bin; flattened step 0 then step 1
    assert ids.tolist() == [[999, 744, 871, 807]]
    assert ids.min() >= vocab - 256 and ids.max() <= vocab - 1
    with pytest.raises(ValueError, match="NaN"):
        action_token_ids(torch.full((1, 1, 1), float("nan")), vocab)
    with pytest.raises(ValueError, match="cannot hold"):
        action_token_ids(actions, 100)


def test_vocabulary_check():
    check_action_vocabulary(151643, 151936, 151643)  # Qwen2.5: tokenizer vocab, LM-head rows, <|endoftext|>
    with pytest.raises(ValueError, match="rows"):
        check_action_vocabulary(151936, 151643, None)
    with pytest.raises(ValueError, match="stop token"):
        check_action_vocabulary(512, 512, 400)


# ---- the token loss ----------------------------------------------------------------------------------------------
def test_token_cross_entropy_equals_a_hand_computation_on_a_tiny_vocabulary():
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 3.0]],
                           [[1.0, 1.0, 1.0, 1.0], [-2.0, 4.0, 0.0, 1.0]]])  # (B=2, N=2, V=4)
    targets = torch.tensor([[0, 1], [2, 1]])
    by_hand = []
    for b in range(2):
        for n in range(2):
            row = logits[b, n].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            by_hand.append(log_z - row[int(targets[b, n])])
    ce, accuracy = token_cross_entropy(logits, targets)
    assert float(ce) == pytest.approx(sum(by_hand) / 4, rel=1e-6)
    # argmax hits: (0,0) yes, (0,1) no (3.0 at id 3), (1,0) tie -> id 0 != 2, (1,1) yes
    assert float(accuracy) == pytest.approx(0.5)


# ---- what the head sees and where the gradients go -------------------------------------------------------------
def _batch(n: int = 3, seed: int = 0) -> MicroBatch:
    pixel_values, ids, mask = tiny_batch(n, seed=seed)  # right padding on the last sample
    g = torch.Generator().manual_seed(seed + 1)
    batch = {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask,
             "proprio": torch.randn(n, 8, generator=g), "actions": torch.rand(n, 8, 7, generator=g) * 2 - 1}
    return MicroBatch(batch=batch, noise=0.02 * torch.randn(8, 7 * 64, generator=g))


def _vocab(policy) -> int:
    return int(policy.processor.tokenizer.vocab_size)


def test_the_head_does_not_see_the_action_tokens(tiny_policy_factory):
    """Latents and actions do not depend on the appended ground-truth tokens, and equal the inference forward's."""
    policy = tiny_policy_factory(0, num_images=1)
    micro = _batch()
    ids = action_token_ids(micro.batch["actions"], _vocab(policy))
    with torch.no_grad():
        inference = policy(micro.batch, noise=micro.noise)
        first = policy(micro.batch, noise=micro.noise, action_token_ids=ids, insulate=True)
        other = policy(micro.batch, noise=micro.noise, action_token_ids=ids.flip(1), insulate=True)
    assert inference.vla_output.action_token_logits is None
    for a, b in ((first, other), (first, inference)):
        torch.testing.assert_close(a.vla_output.raw_latents, b.vla_output.raw_latents, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.vla_output.action_query_latents, b.vla_output.action_query_latents,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.actions, b.actions, rtol=1e-5, atol=1e-6)
    # the tokens do reach the positions after them: the logits change with them (the check above is not vacuous)
    assert (first.vla_output.action_token_logits - other.vla_output.action_token_logits).abs().max() > 1e-3
    assert first.vla_output.action_token_logits.shape == (3, 56, policy.vla.config.text_config.vocab_size)


def _policy(factory, lora: bool):
    policy = factory(0, num_images=1).train()
    if lora:
        policy.vla = apply_lora(policy.vla, rank=4)
    return policy


def _grads(policy) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return out


def _reference_grads(policy, micro: MicroBatch, weight: float) -> tuple[dict, dict]:
    """Second code path, no insulation anywhere: grad of L1 (inference forward, no action tokens) w.r.t. the head and
    proprio projector; grad of w * CE (forward with tokens, un-detached) w.r.t. the VLA."""
    named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    head = {n: p for n, p in named.items() if not n.startswith("vla.")}
    vla = {n: p for n, p in named.items() if n.startswith("vla.")}
    out = policy(micro.batch, noise=micro.noise)
    l1 = action_l1_losses(out.actions, micro.batch["actions"])[0]
    grads = torch.autograd.grad(l1, list(head.values()), allow_unused=True)  # film_gen is unused (upstream)
    g_head = {n: g for n, g in zip(head, grads, strict=True) if g is not None}
    ids = action_token_ids(micro.batch["actions"], _vocab(policy))
    logits = policy(micro.batch, noise=micro.noise, action_token_ids=ids).vla_output.action_token_logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), ids.reshape(-1))
    grads = torch.autograd.grad(weight * ce, list(vla.values()), allow_unused=True)
    g_vla = {n: g for n, g in zip(vla, grads, strict=True) if g is not None}
    return g_head, g_vla


@pytest.mark.parametrize("lora", [True, False])
def test_vla_gets_the_token_loss_gradient_only_and_the_head_the_l1_gradient_only(tiny_policy_factory, lora):
    policy = _policy(tiny_policy_factory, lora)
    micro = _batch()
    weight = 0.7
    stats = ki_gradients(policy, [micro], CPU, weight, _vocab(policy))
    got = _grads(policy)
    g_head, g_vla = _reference_grads(policy, micro, weight)
    assert set(got) == set(g_head) | set(g_vla)
    assert any("lora_" in n for n in g_vla) == lora and any(n.endswith("action_queries.weight") for n in g_vla)
    for name, want in {**g_head, **g_vla}.items():
        torch.testing.assert_close(got[name], want.to(got[name].dtype), rtol=1e-4, atol=1e-7, msg=name)
    assert max(float(g.abs().max()) for g in g_vla.values()) > 1e-4  # the VLA does learn from the tokens
    assert float(stats["total_loss"]) == pytest.approx(float(stats["loss"]) + weight * float(stats["token_ce"]))


def test_weight_zero_leaves_the_vla_without_gradient(tiny_policy_factory):
    policy = _policy(tiny_policy_factory, lora=True)
    micro = _batch()
    stats = ki_gradients(policy, [micro], CPU, 0.0, _vocab(policy))
    got = _grads(policy)
    g_head, _ = _reference_grads(policy, micro, 1.0)
    assert set(got) == set(g_head)  # no VLA parameter holds a gradient (not even zeros: AdamW would decay it)
    for name, want in g_head.items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-7, msg=name)
    assert float(stats["token_ce"]) > 0 and float(stats["total_loss"]) == pytest.approx(float(stats["loss"]))


def test_two_micro_batches_equal_one_batch(tiny_policy_factory):
    policy = _policy(tiny_policy_factory, lora=False)
    whole = _batch(4, seed=3)
    halves = [MicroBatch({k: v[i:i + 2] for k, v in whole.batch.items()}, whole.noise) for i in (0, 2)]
    # equal prompt lengths: the two halves pad like the whole batch
    for micro in [whole, *halves]:
        micro.batch["attention_mask"] = torch.ones_like(micro.batch["attention_mask"])
    one = ki_gradients(policy, [whole], CPU, 1.0, _vocab(policy))
    g_one = _grads(policy)
    two = ki_gradients(policy, halves, CPU, 1.0, _vocab(policy))
    g_two = _grads(policy)
    assert g_one.keys() == g_two.keys()
    for name in g_one:
        torch.testing.assert_close(g_two[name], g_one[name], rtol=1e-4, atol=1e-7, msg=name)
    for key in ("loss", "token_ce", "token_accuracy"):
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5)
