"""Sequence assembly: hand-built masks on a ragged batch, embeddings at the right places, bad inputs."""

from __future__ import annotations

import pytest
import torch

from prismatic.models.sequence_layout import build_sequence_layout, llm_attention_kwargs

P, Q, D = 3, 2, 4


def _inputs():
    torch.manual_seed(0)
    lengths = [4, 2]  # prompt lengths (token 0 = <|im_start|> included)
    prompt = torch.randn(2, 4, D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    return prompt, mask, torch.randn(2, P, D), torch.randn(Q, D), torch.randn(D), lengths


def test_ragged_batch_masks_and_embeddings():
    prompt, mask, patches, queries, stop, _ = _inputs()
    layout = build_sequence_layout(prompt, mask, patches, queries, stop)
    # T = 1 + P + (4 - 1) + Q + 1 = 10. Rows written out by hand:
    # row 0: B V V V p p p Q Q S ; row 1: B V V V p Q Q S . .
    rows = ["BVVVpppQQS", "BVVVpQQS__"]
    expected = {name: torch.tensor([[c in chars for c in row] for row in rows])
                for name, chars in (("vision_mask", "V"), ("prompt_mask", "Bp"), ("query_mask", "Q"),
                                    ("stop_mask", "S"), ("padding_mask", "_"))}
    for name, value in expected.items():
        assert torch.equal(getattr(layout, name), value), name
    assert torch.equal(layout.attention_mask, ~expected["padding_mask"])
    first = layout.first_token_mask
    assert torch.equal(first[:, 0], torch.tensor([True, True])) and first[:, 1:].sum() == 0
    # What the head reads (upstream's slices): raw = positions 0..P-1, ActionQuery = q0-1 .. q0+Q-2.
    raw_rows, aq_rows = ["RRR_______", "RRR_______"], ["______AA__", "____AA____"]
    assert torch.equal(layout.raw_latent_mask, torch.tensor([[c == "R" for c in r] for r in raw_rows]))
    assert torch.equal(layout.action_query_latent_mask, torch.tensor([[c == "A" for c in r] for r in aq_rows]))
    assert layout.vision_mask.sum(1).tolist() == [P, P] and layout.query_mask.sum(1).tolist() == [Q, Q]
    emb = layout.inputs_embeds
    assert emb.shape == (2, 10, D)
    for b, row in enumerate(rows):
        v = q = 0
        p = 1
        for t, c in enumerate(row):
            want = {"B": prompt[b, 0], "S": stop, "_": torch.zeros(D)}.get(c)
            if c == "V":
                want, v = patches[b, v], v + 1
            elif c == "p":
                want, p = prompt[b, p], p + 1
            elif c == "Q":
                want, q = queries[q], q + 1
            assert torch.equal(emb[b, t], want), (b, t, c)
    assert torch.equal(layout.gather(emb, layout.query_mask), queries.expand(2, Q, D))
    assert torch.equal(llm_attention_kwargs(layout)["attention_mask"], (~expected["padding_mask"]).long())


def test_gradients_flow_to_every_source():
    prompt, mask, patches, queries, stop, _ = _inputs()
    for tensor in (prompt, patches, queries, stop):
        tensor.requires_grad_(True)
    layout = build_sequence_layout(prompt, mask, patches, queries, stop)
    layout.inputs_embeds.sum().backward()
    assert patches.grad.eq(1).all() and queries.grad.eq(2).all() and stop.grad.eq(2).all()
    assert torch.equal(prompt.grad[..., 0], mask.float())  # padded prompt slots unused


def test_left_padding_rejected():
    prompt, _, patches, queries, stop, _ = _inputs()
    with pytest.raises(ValueError, match="right-padded"):
        build_sequence_layout(prompt, torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool), patches,
                              queries, stop)
    with pytest.raises(ValueError, match="first token"):
        build_sequence_layout(prompt, torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool), patches,
                              queries, stop)
    with pytest.raises(ValueError, match="patch_embeds"):
        build_sequence_layout(prompt, torch.ones(2, 4, dtype=torch.bool), patches[:1], queries, stop)


def test_action_tokens_follow_the_stop_token_with_their_prediction_positions():
    """Knowledge insulation's layout, written out by hand: N action tokens after the stop token, then padding; the
    logits of the stop token and action tokens 0..N-2 predict them; everything up to the stop token is the inference
    sequence."""
    prompt, mask, patches, queries, stop, _ = _inputs()
    actions = torch.randn(2, 3, D)
    layout = build_sequence_layout(prompt, mask, patches, queries, stop, action_token_embeds=actions)
    rows = ["BVVVpppQQSaaa", "BVVVpQQSaaa__"]
    expected = {name: torch.tensor([[c in chars for c in row] for row in rows])
                for name, chars in (("vision_mask", "V"), ("prompt_mask", "Bp"), ("query_mask", "Q"),
                                    ("stop_mask", "S"), ("action_token_mask", "a"), ("padding_mask", "_"))}
    for name, value in expected.items():
        assert torch.equal(getattr(layout, name), value), name
    predicting = torch.tensor([[c in "Sa" and row[t + 1:t + 2] == "a" for t, c in enumerate(row)] for row in rows])
    assert torch.equal(layout.action_prediction_mask, predicting)
    assert layout.num_action_tokens == 3
    assert torch.equal(layout.gather(layout.inputs_embeds, layout.action_token_mask), actions)
    inference = build_sequence_layout(prompt, mask, patches, queries, stop)
    assert inference.action_token_mask is None and inference.num_action_tokens == 0
    for b, n in enumerate((10, 8)):  # real tokens of the inference sequence: the same prefix
        assert torch.equal(layout.inputs_embeds[b, :n], inference.inputs_embeds[b, :n])
        assert torch.equal(layout.raw_latent_mask[b, :n], inference.raw_latent_mask[b, :n])
        assert torch.equal(layout.action_query_latent_mask[b, :n], inference.action_query_latent_mask[b, :n])
    with pytest.raises(ValueError, match="action_token_embeds"):
        build_sequence_layout(prompt, mask, patches, queries, stop, action_token_embeds=torch.randn(1, 3, D))
