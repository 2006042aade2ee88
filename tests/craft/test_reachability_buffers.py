"""CRaFTGradientProjector sizes its buffers to what each loss reaches (LoRA tiny VLA + a stand-in action head).

Independent computations: which parameters each loss reaches, found by walking the autograd graph from the loss to
its leaves (the projector asks `autograd.grad(allow_unused=True)` instead), and the combined gradient
g = g_act + (λ - c) g_ret computed by hand in float64 numpy from per-loss gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_weight_manager_tiny_vla import _batch, _perturb_, _tiny_vla

from prismatic.models.modeling_vla import apply_lora
from prismatic.training.craft_utils import (
    CRaFTFeatureExtractor,
    CRaFTGradientProjector,
    CRaFTWeightManager,
    combine_gradients,
    retention_loss,
)

DELTA = 1e-8


class _Setup:
    """LoRA tiny VLA + a linear head that reads the last layer's ActionQuery latents (only L_act reaches it) +
    a parameter no loss uses; online θ0 anchors. `losses(seed, push)` gives (L_act - push * L_ret, L_ret)."""

    def __init__(self) -> None:
        vla = _tiny_vla()
        self.model = apply_lora(vla, rank=2)
        torch.manual_seed(1)
        self.head = torch.nn.Linear(vla.config.hidden_size, 7)
        self.spare = torch.nn.Parameter(torch.ones(3))  # trainable, never used
        self.named = ([(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
                      + [(f"head.{n}", p) for n, p in self.head.named_parameters()] + [("spare", self.spare)])
        self.params = [p for _, p in self.named]
        _perturb_([p for n, p in self.named if "lora_B" in n or "action_queries" in n], seed=9)
        self.weights = CRaFTWeightManager(self.model)
        self.extractor = CRaFTFeatureExtractor(self.model, anchor_type="concat")

    def losses(self, seed: int, push: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _batch(seed, b=1)
        with torch.no_grad(), self.weights.reference_weights(), self.extractor.capture():
            ref = self.model(*batch)
        anchors = self.extractor.features(ref.layout)
        with self.extractor.capture():
            out = self.model(*batch)
        loss_ret = retention_loss(self.extractor.features(out.layout), anchors)
        loss_act = self.head(out.action_query_latents[:, -1].mean(1)).abs().mean()
        # push > 0 turns g_act against g_ret (g_act - push g_ret), so the projection branch is exercised too
        return loss_act - push * loss_ret, loss_ret


@pytest.fixture(scope="module")
def setup() -> _Setup:
    return _Setup()


def _reach_by_graph_walk(loss: torch.Tensor, params) -> list[bool]:
    """Second code path: walk the autograd graph from the loss to its leaves (AccumulateGrad nodes)."""
    leaves, seen, todo = set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        todo.extend(nxt for nxt, _ in node.next_functions)
    return [id(p) in leaves for p in params]


def test_buffers_hold_exactly_the_parameters_each_loss_reaches(setup):
    loss_act, loss_ret = setup.losses(seed=3)
    want_act = _reach_by_graph_walk(loss_act, setup.params)
    want_ret = _reach_by_graph_walk(loss_ret, setup.params)
    names = [n for n, _ in setup.named]
    proj = CRaFTGradientProjector(setup.named, delta=DELTA)
    assert proj.reach() == {"ret": [], "act_only": [], "unreached": []} and proj.buffered_elements() == 0
    proj.accumulate(loss_act, loss_ret)
    reach = proj.reach()
    assert reach["ret"] == [n for n, r in zip(names, want_ret, strict=True) if r]
    assert reach["act_only"] == [n for n, a, r in zip(names, want_act, want_ret, strict=True) if a and not r]
    assert reach["unreached"] == [n for n, a, r in zip(names, want_act, want_ret, strict=True) if not (a or r)]
    # the model has all three kinds: the head (L_act only), the feature path, unused ViT blocks and `spare`
    assert "head.weight" in reach["act_only"] and "spare" in reach["unreached"]
    assert any("lora_A" in n for n in reach["ret"]) and any("action_queries" in n for n in reach["ret"])
    assert any("vision_backbone" in n for n in reach["unreached"])
    ret_numel = sum(p.numel() for p, r in zip(setup.params, want_ret, strict=True) if r)
    assert proj.buffered_elements() == ret_numel
    # the whole flat buffer: g_act and g_ret over R, two flags per tensor of R, one per tensor of A
    assert proj._flat.numel() == 2 * ret_numel + 2 * len(reach["ret"]) + len(reach["act_only"])
    assert ret_numel < sum(p.numel() for p in setup.params)
    proj.step(lam=0.1)
    for (n, p), a, r in zip(setup.named, want_act, want_ret, strict=True):
        assert (p.grad is not None) == (a or r), n
    for p in setup.params:
        p.grad = None


@pytest.mark.parametrize("push,lam", [(0.0, 0.3), (50.0, 0.0)], ids=["aligned", "conflict"])
def test_step_equals_the_rule_computed_by_hand(setup, push, lam):
    """Two micro-batches (k = 2): `.grad` == g_act + (λ - c) g_ret over the sums, in float64 numpy."""
    k, seeds = 2, (4, 5)
    ga32 = [torch.zeros_like(p) for p in setup.params]
    gr32: list = [None] * len(setup.params)
    for seed in seeds:  # reference gradients: one loss at a time, plain autograd over every parameter
        loss_act, loss_ret = setup.losses(seed, push)
        for i, g in enumerate(torch.autograd.grad(loss_act / k, setup.params, retain_graph=True, allow_unused=True)):
            if g is not None:
                ga32[i] += g
        for i, g in enumerate(torch.autograd.grad(loss_ret / k, setup.params, allow_unused=True)):
            if g is not None:
                gr32[i] = g if gr32[i] is None else gr32[i] + g
    # by hand, float64 numpy: the rule over ONE vector of all parameters
    ga = [g.double().numpy() for g in ga32]
    gr = [np.zeros(g.shape) if r is None else r.double().numpy() for g, r in zip(ga32, gr32, strict=True)]
    dot = sum(float((a * r).sum()) for a, r in zip(ga, gr, strict=True))
    nr2 = sum(float((r * r).sum()) for r in gr)
    c = min(0.0, dot) / (nr2 + DELTA)
    want = [a + (lam - c) * r for a, r in zip(ga, gr, strict=True)]
    # the previous implementation's arithmetic (full-size per-tensor combine, float32), on the same gradients
    previous, _ = combine_gradients(ga32, gr32, lam, DELTA, True)

    proj = CRaFTGradientProjector(setup.named, delta=DELTA, enable_projection=True)
    for seed in seeds:
        loss_act, loss_ret = setup.losses(seed, push)
        proj.accumulate(loss_act / k, loss_ret / k)
    stats = proj.step(lam)
    assert stats["projection_fired"] == float(dot < 0) and (dot < 0) == (push > 0)
    assert stats["dot"] == pytest.approx(dot, rel=1e-6)
    assert stats["projection_coef"] == pytest.approx(c, rel=1e-6, abs=1e-12)
    unreached = set(proj.reach()["unreached"])
    for i, ((n, p), w) in enumerate(zip(setup.named, want, strict=True)):
        if n in unreached:
            assert p.grad is None, n
            continue
        torch.testing.assert_close(p.grad, previous[i], rtol=1e-6, atol=1e-9, msg=n)
        # float32 against float64: the tolerance follows the size of the two terms (they cancel when c ~ -push)
        scale = np.abs(ga[i]).max() + abs(lam - c) * np.abs(gr[i]).max()
        np.testing.assert_allclose(p.grad.double().numpy(), w, rtol=1e-5, atol=1e-5 * scale, err_msg=n)
    if dot < 0 and lam == 0:  # g is the projected g_act: no component against g_ret left
        got = sum(float((p.grad.double().numpy() * r).sum()) for p, r in zip(setup.params, gr, strict=True)
                  if p.grad is not None)
        assert abs(got) <= 1e-4 * abs(dot)
    for p in setup.params:
        p.grad = None


def test_capture_path_finds_the_same_sets_and_gradients(setup):
    """backward + capture_grads from the very first micro-batch: same reachable sets and `.grad` as autograd.grad."""
    first = CRaFTGradientProjector(setup.named)
    first.accumulate(*setup.losses(seed=6, push=50.0))
    first.step(lam=0.2)
    want = {n: p.grad.clone() for n, p in setup.named if p.grad is not None}
    for p in setup.params:
        p.grad = None
    second = CRaFTGradientProjector(setup.named)
    loss_act, loss_ret = setup.losses(seed=6, push=50.0)
    loss_act.backward(retain_graph=True)
    second.capture_grads("act")
    loss_ret.backward()
    second.capture_grads("ret")
    second.step(lam=0.2)
    assert second.reach() == first.reach()
    assert {n for n, p in setup.named if p.grad is not None} == set(want)
    for n, p in setup.named:
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)
    for p in setup.params:
        p.grad = None


def test_a_gradient_outside_the_first_batch_sets_is_refused():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    proj = CRaFTGradientProjector([("a", a), ("b", b)])
    proj.add_grads([torch.ones(2), None], [None, None])  # first micro-batch: only `a`, by L_act
    with pytest.raises(RuntimeError, match="b, which the first micro-batch's loss did not reach"):
        proj.add_grads([torch.ones(2), torch.ones(2)], [None, None])


def test_grads_of_r_view_the_buffer_and_a_kept_grad_survives_the_next_step(setup):
    """The step allocates no gradient memory for R: their `.grad` view the buffer's combined half. A caller that
    keeps those gradients past the next step's first micro-batch keeps exactly what it had (copied out first)."""
    proj = CRaFTGradientProjector(setup.named, delta=DELTA, enable_projection=True)
    proj.accumulate(*setup.losses(4))
    proj.step(0.3)
    ret_names = set(proj.reach()["ret"])
    storage = proj._flat.untyped_storage().data_ptr()
    grads = {n: p.grad for n, p in setup.named if p.grad is not None}
    assert ret_names and all(grads[n].untyped_storage().data_ptr() == storage for n in ret_names)
    assert all(grads[n].untyped_storage().data_ptr() != storage for n in grads if n not in ret_names)
    kept = {n: g.clone() for n, g in grads.items()}
    # next step without zeroing: `.grad` of R no longer views the buffer and still holds the last step's values
    proj.accumulate(*setup.losses(5))
    for n, p in setup.named:
        if n in ret_names:
            assert p.grad.untyped_storage().data_ptr() != storage and torch.equal(p.grad, kept[n]), n
    # the second step's result is the rule on the second batch alone (the buffer was zeroed first): as a fresh
    # projector's, bit for bit
    stats = proj.step(0.3)
    got = {n: p.grad.clone() for n, p in setup.named if p.grad is not None}
    for p in setup.params:
        p.grad = None
    fresh = CRaFTGradientProjector(setup.named, delta=DELTA, enable_projection=True)
    fresh.accumulate(*setup.losses(5))
    assert fresh.step(0.3)["dot"] == stats["dot"]
    want = {n: p.grad.clone() for n, p in setup.named if p.grad is not None}
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    for p in setup.params:
        p.grad = None
