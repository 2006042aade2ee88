"""combine_gradients against an independent numpy computation on one concatenated vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prismatic.training.craft_utils import combine_gradients

SHAPES = [(3, 4), (7,), (2, 2, 2), (5,)]


def _random_grads(seed: int, conflicting: bool):
    rng = np.random.default_rng(seed)
    act = [rng.standard_normal(s) for s in SHAPES]
    ret = [rng.standard_normal(s) for s in SHAPES]
    flat_a, flat_r = np.concatenate([a.ravel() for a in act]), np.concatenate([r.ravel() for r in ret])
    dot = flat_a @ flat_r
    if (dot < 0) != conflicting:  # flip g_ret to get the wanted sign of the global inner product
        ret = [-r for r in ret]
    return act, ret


def _numpy_reference(act, ret, lam, delta, projection):
    a = np.concatenate([x.ravel() for x in act])
    r = np.concatenate([np.zeros(x.size) if y is None else y.ravel() for x, y in zip(act, ret, strict=True)])
    dot = float(a @ r)
    if projection and dot < 0:
        a_t = a - dot / (r @ r + delta) * r
    else:
        a_t = a
    g = a_t + lam * r
    shared = [i for i, y in enumerate(ret) if y is not None]
    per = {i: float(act[i].ravel() @ ret[i].ravel()) for i in shared}
    conf = [i for i in shared if per[i] < 0]
    return g, a_t, dot, {
        "cos": dot / (np.linalg.norm(a) * np.linalg.norm(r)),
        "ratio_t": len(conf) / len(shared),
        "ratio_p": sum(act[i].size for i in conf) / sum(act[i].size for i in shared),
        "norm": np.linalg.norm(g),
    }


@pytest.mark.parametrize("conflicting", [True, False])
@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_matches_numpy(conflicting, projection, lam):
    act, ret = _random_grads(3, conflicting)
    delta = 1e-3
    g, stats = combine_gradients([torch.tensor(x, dtype=torch.float32) for x in act],
                                 [torch.tensor(x, dtype=torch.float32) for x in ret], lam, delta, projection)
    g_ref, _, dot, ref = _numpy_reference(act, ret, lam, delta, projection)
    flat = torch.cat([t.reshape(-1) for t in g]).double().numpy()
    np.testing.assert_allclose(flat, g_ref, rtol=1e-5, atol=1e-6)
    assert [tuple(t.shape) for t in g] == SHAPES
    assert stats["dot"] == pytest.approx(dot, rel=1e-6)
    assert stats["cosine"] == pytest.approx(ref["cos"], rel=1e-6)
    assert stats["projection_fired"] == float(projection and conflicting)
    assert stats["conflict"] == float(conflicting)
    assert stats["conflict_ratio_tensors"] == pytest.approx(ref["ratio_t"])
    assert stats["conflict_ratio_params"] == pytest.approx(ref["ratio_p"])
    assert stats["grad_norm_final"] == pytest.approx(ref["norm"], rel=1e-5)
    if projection and conflicting:
        r = np.concatenate([x.ravel() for x in ret])
        assert stats["projection_coef"] == pytest.approx(dot / (r @ r + delta), rel=1e-6)
    else:
        assert stats["projection_coef"] == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_projected_action_gradient_no_longer_conflicts(seed):
    act, ret = _random_grads(seed, conflicting=True)
    ga = [torch.tensor(x, dtype=torch.float32) for x in act]
    gr = [torch.tensor(x, dtype=torch.float32) for x in ret]
    g_tilde, stats = combine_gradients(ga, gr, lam=0.0, delta=1e-8, enable_projection=True)
    assert stats["dot"] < 0 and stats["projection_fired"] == 1.0
    dot_after = sum(float((a.double() * r.double()).sum()) for a, r in zip(g_tilde, gr, strict=True))
    assert dot_after >= -1e-6


def test_none_retention_entries_pass_action_gradient_through():
    act, ret = _random_grads(1, conflicting=True)
    ret_none = [ret[0], None, ret[2], None]
    ga = [torch.tensor(x, dtype=torch.float32) for x in act]
    gr = [None if x is None else torch.tensor(x, dtype=torch.float32) for x in ret_none]
    g, stats = combine_gradients(ga, gr, lam=0.3, delta=0.0, enable_projection=True)
    g_ref, _, _, ref = _numpy_reference(act, ret_none, 0.3, 0.0, True)
    np.testing.assert_allclose(torch.cat([t.reshape(-1) for t in g]).double().numpy(), g_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[1], ga[1], rtol=0, atol=0)  # only L_act reaches it: exactly g_act
    assert stats["num_shared_tensors"] == 2.0
    assert stats["conflict_ratio_params"] == pytest.approx(ref["ratio_p"])


def test_zero_retention_gradient_is_safe():
    ga = [torch.randn(4), torch.randn(3)]
    g, stats = combine_gradients(ga, [torch.zeros(4), torch.zeros(3)], lam=1.0, delta=0.0, enable_projection=True)
    for a, b in zip(g, ga, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert stats["projection_fired"] == 0.0 and stats["cosine"] == 0.0


def test_bf16_inputs_use_float32_arithmetic():
    torch.manual_seed(0)
    ga32, gr32 = [torch.randn(64)], [torch.randn(64)]
    g, _ = combine_gradients([ga32[0].bfloat16()], [gr32[0].bfloat16()], 0.5, 1e-8, True)
    assert g[0].dtype == torch.bfloat16
    ref, _ = combine_gradients([ga32[0].bfloat16().float()], [gr32[0].bfloat16().float()], 0.5, 1e-8, True)
    torch.testing.assert_close(g[0].float(), ref[0].bfloat16().float(), rtol=0, atol=0)


def test_output_never_aliases_input():
    ga = [torch.randn(5)]
    g, _ = combine_gradients(ga, [None], 0.0, 0.0, True)
    g[0].add_(1.0)
    assert not torch.equal(g[0], ga[0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        combine_gradients([torch.zeros(3)], [torch.zeros(4)], 0.0, 0.0, True)
    with pytest.raises(ValueError, match="tensors"):
        combine_gradients([torch.zeros(3)], [], 0.0, 0.0, True)
    with pytest.raises(ValueError, match="delta"):
        combine_gradients([torch.zeros(3)], [torch.zeros(3)], 0.0, -1.0, True)
    with pytest.raises(ValueError, match="lambda"):
        combine_gradients([torch.zeros(3)], [torch.zeros(3)], -0.1, 0.0, True)
    with pytest.raises(FloatingPointError, match="non-finite"):
        combine_gradients([torch.tensor([float("nan")])], [torch.ones(1)], 0.0, 0.0, True)
