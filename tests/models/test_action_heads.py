"""Bridge-attention head: shapes, a hand-written float64 reference, layer wiring, gating, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prismatic.models.action_heads import L1RegressionActionHead

D, L, NV, Q, HEADS = 32, 3, 10, 5, 4


def _head(pro: bool, seed: int = 0, gate: float = 0.6) -> L1RegressionActionHead:
    torch.manual_seed(seed)
    head = L1RegressionActionHead(D, D, num_blocks=L, use_pro_version=pro, num_heads=HEADS).eval()
    with torch.no_grad():
        for i, block in enumerate(head.model.mlp_resnet_blocks):
            block.gating_factor.fill_(gate * (i + 1))
    return head


def _latents(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, L + 1, NV, D, generator=g), torch.randn(batch, L + 1, Q, D, generator=g),
            torch.randn(batch, 1, D, generator=g))


# ---------- independent float64 reference (numpy, explicit per-head loops, pairwise RoPE) ----------
def _lin(module, x):
    return x @ module.weight.detach().double().numpy().T + module.bias.detach().double().numpy()


def _ln(module, x):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + module.eps) * module.weight.detach().double().numpy() + \
        module.bias.detach().double().numpy()


def _rope(x):  # x (N, hd): upstream's mixed RoPE (facts sheet §2): dim i uses angle pos * 10000^(-2 (i mod hd/2) / hd)
    n, hd = x.shape  # (half-split table) and is rotated with its interleaved pair partner: (x0, x1) -> (-x1, x0)
    out = np.empty_like(x)
    for pos in range(n):
        for i in range(hd):
            theta = pos * 10000.0 ** (-2.0 * (i % (hd // 2)) / hd)
            partner = -x[pos, i + 1] if i % 2 == 0 else x[pos, i - 1]
            out[pos, i] = x[pos, i] * math.cos(theta) + partner * math.sin(theta)
    return out


def _ref_block(block, pro, x, h_t, h_a, p):
    adapter = np.concatenate([h_a, p], axis=0) if p is not None else h_a
    if pro:
        q, ks, vs = _lin(block.q_proj, x), _lin(block.k_self, x), _lin(block.v_self, x)
        ka, va = _lin(block.k_adapter, adapter), _lin(block.v_adapter, adapter)
        kt, vt = _lin(block.k_task, h_t), _lin(block.v_task, h_t)
    else:
        q = _lin(block.q_proj, x)
        ks, ka, kt = (_lin(block.k_proj, t) for t in (x, adapter, h_t))
        vs, va, vt = (_lin(block.v_proj, t) for t in (x, adapter, h_t))
    hd = D // HEADS
    gate = math.tanh(float(block.gating_factor))
    out = np.zeros_like(x)
    for h in range(HEADS):
        sl = slice(h * hd, (h + 1) * hd)
        qh, ksh, kah, kth = q[:, sl], ks[:, sl], ka[:, sl], kt[:, sl]
        if pro:
            qh, ksh, kah, kth = _rope(qh), _rope(ksh), _rope(kah), _rope(kth)
        logits = np.concatenate([qh @ ksh.T, qh @ kah.T, gate * (qh @ kth.T)], axis=1) / math.sqrt(hd)
        w = np.exp(logits - logits.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        out[:, sl] = w @ np.concatenate([vs[:, sl], va[:, sl], vt[:, sl]], axis=0)
    y = _lin(block.o_proj, out) + x
    return np.maximum(_lin(block.ffn[1], _ln(block.ffn[0], y)), 0.0)


def _ref_head(head, raw, aq, proprio, noise=None):
    m = head.model
    outs = []
    for b in range(raw.shape[0]):
        x = np.zeros((8, 7 * D)) if noise is None else noise[b].double().numpy()
        x = np.maximum(_lin(m.fc1, _ln(m.layer_norm1, x)), 0.0)
        for i, block in enumerate(m.mlp_resnet_blocks):
            p = None if proprio is None else proprio[b].double().numpy()
            x = _ref_block(block, head.use_pro_version, x, raw[b, i + 1].double().numpy(),
                           aq[b, i + 1].double().numpy(), p)
        outs.append(_lin(m.fc2, _ln(m.layer_norm2, x)))
    return np.stack(outs)


@pytest.mark.parametrize("pro", [True, False])
@pytest.mark.parametrize("with_proprio", [True, False])
@torch.no_grad()
def test_head_matches_reference(pro, with_proprio):
    head = _head(pro)
    raw, aq, proprio = _latents()
    proprio = proprio if with_proprio else None
    noise = 0.3 * torch.randn(2, 8, 7 * D, generator=torch.Generator().manual_seed(5))
    for n in (None, noise):
        out = head(raw, aq, proprio, noise=n)
        assert out.shape == (2, 8, 7)
        np.testing.assert_allclose(out.double().numpy(), _ref_head(head, raw, aq, proprio, n), rtol=1e-4,
                                   atol=1e-5)


@torch.no_grad()
def test_block_i_reads_layer_i_plus_1():
    head = _head(True)
    raw, aq, proprio = _latents()
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["h_t"], kw["h_a"])), with_kwargs=True)
             for blk in head.model.mlp_resnet_blocks]
    base = head(raw, aq, proprio)
    for h in hooks:
        h.remove()
    for i, (h_t, h_a) in enumerate(seen):
        assert torch.equal(h_t, raw[:, i + 1]) and torch.equal(h_a, aq[:, i + 1])
    # layer 0 (embeddings) is never read; every layer 1..L is
    raw0, aq0 = raw.clone(), aq.clone()
    raw0[:, 0] += 5.0
    aq0[:, 0] += 5.0
    assert torch.equal(head(raw0, aq0, proprio), base)
    for layer in range(1, L + 1):
        bumped = raw.clone()
        bumped[:, layer] += 1.0
        assert not torch.allclose(head(bumped, aq, proprio), base)


@torch.no_grad()
def test_zero_gate_zeroes_raw_latent_scores():
    """With gating_factor 0 the raw-latent (task) group's scores are tanh(0) * q.k = 0 before the softmax."""
    for pro in (True, False):
        head = _head(pro, gate=0.0)
        raw, aq, proprio = _latents()
        block = head.model.mlp_resnet_blocks[0]
        block.record_logits = True
        head(raw, aq, proprio)
        logits = block.last_logits  # (B, H, 8, 8 + (Q + 1) + NV)
        assert logits.shape == (2, HEADS, 8, 8 + Q + 1 + NV)
        assert torch.count_nonzero(logits[..., 8 + Q + 1:]) == 0
        assert torch.count_nonzero(logits[..., : 8 + Q + 1]) > 0
        # (a zero logit is not -inf: the raw-latent values still get softmax weight; the property is on the scores)
        with torch.no_grad():
            block.gating_factor.fill_(0.8)
        head(raw, aq, proprio)
        assert torch.count_nonzero(block.last_logits[..., 8 + Q + 1:]) > 0


def test_noise_handling():
    head = _head(True)
    raw, aq, proprio = _latents()
    with torch.no_grad():
        eval_a, eval_b = head(raw, aq, proprio), head(raw, aq, proprio)
        assert torch.equal(eval_a, eval_b)
        noise = torch.randn(2, 8, 7 * D)
        head.train()
        torch.manual_seed(0)
        given_a = head(raw, aq, proprio, noise=noise)
        torch.manual_seed(1)
        given_b = head(raw, aq, proprio, noise=noise)
        assert torch.equal(given_a, given_b)  # explicit noise: no RNG draw
        torch.manual_seed(0)
        drawn = head(raw, aq, proprio)
        torch.manual_seed(0)
        expected_noise = head.noise_std * torch.randn(8, 7 * D)  # one draw shared by the batch, as upstream
        torch.testing.assert_close(drawn, head(raw, aq, proprio, noise=expected_noise))
        torch.testing.assert_close(drawn, head(raw, aq, proprio, noise=expected_noise.expand(2, 8, 7 * D)))
    with pytest.raises(ValueError, match=r"noise must be \(8, 224\)"):
        head(raw, aq, proprio, noise=torch.zeros(2, 8, 7))
    with pytest.raises(ValueError, match="layers"):
        head(raw[:, :L], aq[:, :L], proprio)
    with pytest.raises(ValueError, match="proprio_features"):
        head(raw, aq, proprio[:, 0])
