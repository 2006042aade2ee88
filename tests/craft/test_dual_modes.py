"""CRaFTDualOptimizer's modes (issue 15): the default `gradient` rule bit-identical to the implementation before the
pid mode existed, the pid rule against a hand computation, normalisation, the λ cap, and exact resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from craft_toy_models import ToyPolicy, toy_data, toy_losses

from prismatic.training.craft_utils import CRaFTDualOptimizer, CRaFTGradientProjector

# Recorded from the gradient rule as implemented before the pid mode was added (commit 7e9c61c):
# CRaFTDualOptimizer(epsilon=0.5, dual_lr=0.7, init_lambda=0.25).step(v) for v in SEQ. Hex floats: exact bits.
SEQ = ['0x1.ee3437cd5fef1p+0', '0x1.7de6a85750600p-6', '0x1.78d3e4c250b70p+0', '0x1.439c2ce9bb464p-2',
       '0x1.f9017c0f4af4dp+0', '0x1.1492987088b00p-5', '0x1.c24cadf3830fcp+0', '0x1.5cd9fe896c845p+0',
       '0x1.076026011456ap-2', '0x1.3324bf814dd51p-2', '0x1.268fe04530eebp-4', '0x1.9f6e11146da1fp-4',
       '0x1.b31d564e8551bp-3', '0x1.58c75dd5da819p-4', '0x1.438f80ce7d98ep-4', '0x1.18ea66c2d24b2p-4',
       '0x1.07870dee53118p-2', '0x1.0ca80ae73d0b0p-2', '0x1.ea0e25e4ddebap-3', '0x1.1280cc2ef231ap-4',
       '0x1.1c1c3de8b3cc4p-2', '0x1.3a2f89b9e452bp-3', '0x1.1c53b358a6718p-4', '0x1.17e1bec090628p-3',
       '0x1.01f8adbf33f2ap-3', '0x1.8419c781b43c9p-6', '0x1.211f41732374fp+0', '0x1.709a85383b100p-1',
       '0x1.23a4ab942b805p+0', '0x1.1dc345410cf37p-2', '0x1.8ca393ef67b9bp-3', '0x1.f1c99344214f4p-4',
       '0x1.094a38d24a23cp-2', '0x1.31b7950f54061p-2', '0x1.2d36af1677a7bp-3', '0x1.224fc66d02ae0p-2',
       '0x1.70a4184760da6p-8', '0x1.58d88770d35a3p-5', '0x1.a72f6abca2ba6p-5', '0x1.202c6ab7be356p-2']
OUT = ['0x1.4057c0a95cc0fp+0', '0x1.d5d6f367d5aa6p-1', '0x1.991966a256888p+0', '0x1.782188180a81ap+0',
       '0x1.40047c4492b02p+1', '0x1.163e16bc342eep+1', '0x1.870c206b08746p+1', '0x1.d4586cb4bb3c4p+1',
       '0x1.be973cd4d36a4p+1', '0x1.acaa73fcf0a02p+1', '0x1.864f334b40e56p+1', '0x1.6298cede19b1cp+1',
       '0x1.48d54aa4bc53cp+1', '0x1.239340b236b50p+1', '0x1.fbb4c8a0a94f2p+0', '0x1.ae657052c8e8dp+0',
       '0x1.82e9df8fb10bep+0', '0x1.585414ab5bbaap+0', '0x1.299bb7fc2f25ap+0', '0x1.b8091b6fad160p-1',
       '0x1.6846311ab8d0bp-1', '0x1.d81d059ce7f19p-2', '0x1.46f0f065a3be2p-3', '0x0.0p+0', '0x0.0p+0', '0x0.0p+0',
       '0x1.c32450dbfce10p-2', '0x1.3064b8e227c88p-1', '0x1.0abf3af2658aep+0', '0x1.c64f9aeec2d16p-1',
       '0x1.5885d4d241c52p-1', '0x1.a1c2236a095e9p-2', '0x1.ea1f632dadbc0p-3', '0x1.92a7348646bc4p-4', '0x0.0p+0',
       '0x0.0p+0', '0x0.0p+0', '0x0.0p+0', '0x0.0p+0', '0x0.0p+0']
LOSSES = [float.fromhex(h) for h in SEQ]


def test_default_gradient_mode_is_bit_identical_to_the_recorded_rule():
    dual = CRaFTDualOptimizer(epsilon=0.5, dual_lr=0.7, init_lambda=0.25)
    assert dual.mode == "gradient"
    assert [dual.step(v).hex() for v in LOSSES] == OUT
    explicit = CRaFTDualOptimizer(epsilon=0.5, dual_lr=0.7, init_lambda=0.25, mode="gradient")
    assert [explicit.step(v).hex() for v in LOSSES] == OUT


def _pid_by_hand(losses, eps, kp, ki, kd, lam0=0.0, normalize=False, cap=None):
    """Stooke, Achiam & Abbeel 2020 (Alg. 2) by hand: I <- (I + ki e)+, D = (e - e_prev)+, λ = (kp e + I + kd D)+."""
    integral, prev, out = lam0, None, []
    for v in losses:
        e = v / eps - 1.0 if normalize else v - eps
        integral = max(0.0, integral + ki * e)
        if cap is not None:
            integral = min(integral, cap)
        d = 0.0 if prev is None else max(0.0, e - prev)
        lam = max(0.0, kp * e + integral + kd * d)
        out.append(lam if cap is None else min(lam, cap))
        prev = e
    return out


def test_pid_rule_equals_a_hand_computation_over_20_steps():
    losses = LOSSES[:20]
    dual = CRaFTDualOptimizer(epsilon=0.5, dual_lr=0.3, mode="pid", kp=0.8, kd=1.5)
    got = [dual.step(v) for v in losses]
    want = _pid_by_hand(losses, 0.5, kp=0.8, ki=0.3, kd=1.5)
    assert got == pytest.approx(want, rel=1e-14, abs=1e-15)
    # the hand-computed trajectory exercises every branch: P pulling below the integral, D firing, λ clamped at 0
    assert any(w == 0.0 for w in want) and any(w > 0 for w in want)
    # a few values written out for step 1-2: e1 = L1 - ε, I1 = max(0, 0.3 e1), λ1 = max(0, 0.8 e1 + I1) (no D yet)
    e1, e2 = losses[0] - 0.5, losses[1] - 0.5
    i1 = max(0.0, 0.3 * e1)
    assert got[0] == pytest.approx(max(0.0, 0.8 * e1 + i1))
    assert got[1] == pytest.approx(max(0.0, 0.8 * e2 + max(0.0, i1 + 0.3 * e2) + 1.5 * max(0.0, e2 - e1)))


def test_pid_with_only_integral_gain_is_the_gradient_rule():
    a = CRaFTDualOptimizer(epsilon=0.5, dual_lr=0.7, init_lambda=0.25, mode="pid")
    assert [a.step(v).hex() for v in LOSSES] == OUT


def test_normalised_error_and_lambda_cap():
    eps, eta = 0.02, 0.4
    dual = CRaFTDualOptimizer(epsilon=eps, dual_lr=eta, normalize=True, max_lambda=1.5)
    lam = 0.0
    for v in LOSSES:
        lam = min(1.5, max(0.0, lam + eta * (v / eps - 1.0)))
        assert dual.step(v) == pytest.approx(lam, rel=1e-14, abs=1e-15)
    assert dual.lam == 1.5  # the losses are >> ε: the cap binds
    pid = CRaFTDualOptimizer(epsilon=eps, dual_lr=eta, normalize=True, max_lambda=2.0, mode="pid", kp=0.1, kd=0.2)
    got = [pid.step(v) for v in LOSSES]
    assert got == pytest.approx(_pid_by_hand(LOSSES, eps, 0.1, eta, 0.2, normalize=True, cap=2.0), rel=1e-14)


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as training_state.pt stores it
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("mode", ["gradient", "pid"])
def test_resume_mid_run_is_exact(mode):
    kwargs = dict(epsilon=0.5, dual_lr=0.3, mode=mode, normalize=mode == "pid",
                  **({"kp": 0.8, "kd": 1.5} if mode == "pid" else {}))
    full = CRaFTDualOptimizer(**kwargs)
    want = [full.step(v) for v in LOSSES]
    first = CRaFTDualOptimizer(**kwargs)
    for v in LOSSES[:13]:
        first.step(v)
    resumed = CRaFTDualOptimizer(**kwargs)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    assert [resumed.step(v) for v in LOSSES[13:]] == want[13:]  # exact, not approx: D needs e_prev, I the integral
    assert resumed.state_dict() == full.state_dict()


def test_bad_dual_settings():
    with pytest.raises(ValueError, match="craft_dual_mode"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, mode="pi")
    with pytest.raises(ValueError, match="kp"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, mode="pid", kp=-1.0)
    with pytest.raises(ValueError, match="epsilon > 0"):
        CRaFTDualOptimizer(epsilon=0.0, dual_lr=0.1, normalize=True)
    with pytest.raises(ValueError, match="max_lambda"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, max_lambda=0.0)
    state = CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1).state_dict()
    with pytest.raises(ValueError, match="same --craft_dual_mode"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, mode="pid").load_state_dict(state)


# ---- the null conflict share ------------------------------------------------------------------------------------
def test_null_conflict_share_equals_numpy_reference_and_is_seeded():
    torch.manual_seed(0)
    model = ToyPolicy()
    x, y, anchors = toy_data(6, seed=1)
    named = list(model.named_parameters())

    def one_step(seed):
        proj = CRaFTGradientProjector(named, delta=1e-8)
        proj.null_seed = seed
        la, lr = toy_losses(model, x, y, anchors)
        proj.accumulate(la, lr)
        g_act = [b.detach().double().numpy().ravel().copy() for b in proj._act]
        g_ret = [b.detach().double().numpy().ravel().copy() for b in proj._ret]
        reached = proj._reached_ret.tolist()
        return proj, proj.step(lam=0.0), g_act, g_ret, reached

    proj, stats, g_act, g_ret, reached = one_step(seed=5)
    # reference: one N(0, 1) draw per tensor of R from the documented generator; <g_act_i, z_i> for z_i ~ N(0, I) has
    # the sign of ||g_act_i|| u_i (checked by sampling below), so tensor i conflicts iff both gradients are non-zero
    # and u_i < 0 (numpy norms)
    u = torch.randn(len(g_act), generator=proj.null_generator(0), dtype=torch.float32).double().numpy()
    shared, conflicting = [], []
    for i, (a, r) in enumerate(zip(g_act, g_ret, strict=True)):
        if not reached[i]:
            continue
        shared.append(i)
        if np.linalg.norm(r) > 0 and np.linalg.norm(a) > 0 and u[i] < 0:
            conflicting.append(i)
    numel = [a.size for a in g_act]
    assert stats["conflict_ratio_tensors_null"] == pytest.approx(len(conflicting) / len(shared))
    assert stats["conflict_ratio_params_null"] == pytest.approx(
        sum(numel[i] for i in conflicting) / sum(numel[i] for i in shared))
    # the claim behind the per-tensor draw: a Gaussian direction's dot with a fixed g_act is negative half the time
    rng = np.random.default_rng(0)
    a = max(g_act, key=lambda t: t.size)
    negative = (rng.standard_normal((4000, a.size)) @ a < 0).mean()
    assert abs(negative - 0.5) < 0.03
    assert 0 < len(shared)
    # deterministic in the seed (every rank draws the same numbers)
    assert one_step(seed=5)[1]["conflict_ratio_params_null"] == stats["conflict_ratio_params_null"]
    assert proj.running_stats()["conflict_ratio_params_null_mean"] == stats["conflict_ratio_params_null"]


def test_null_share_and_dots_over_tensors_larger_than_a_chunk(monkeypatch):
    """A tensor larger than a chunk is summed over sub-chunks (chunk-sized temporaries): the dot products and norms
    equal the float64 reference, and the null share uses one draw per tensor."""
    from prismatic.training import craft_utils

    monkeypatch.setattr(craft_utils, "FLAT_CHUNK_ELEMENTS", 5)
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (5,), (2, 2, 2), (2,), (3,)]  # groups: [12] in 5+5+2, [5], [8] in 5+3, [2, 3]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    g_act = [torch.randn(s, generator=gen) for s in shapes]
    g_ret = [torch.randn(s, generator=gen) for s in shapes]
    proj = craft_utils.CRaFTGradientProjector(params, delta=1e-8)
    proj.null_seed = 11
    proj.add_grads(g_act, g_ret)
    draws = proj.null_generator(0)
    stats = proj.step(0.0)
    a = [t.double().numpy().ravel() for t in g_act]
    r = [t.double().numpy().ravel() for t in g_ret]
    dots = [float(np.dot(x, y)) for x, y in zip(a, r, strict=True)]
    assert stats["dot"] == pytest.approx(sum(dots), rel=1e-12)
    assert stats["grad_norm_ret"] == pytest.approx(np.sqrt(sum(float(np.dot(y, y)) for y in r)), rel=1e-12)
    assert stats["conflict_ratio_tensors"] == pytest.approx(sum(d < 0 for d in dots) / len(dots))
    assert stats["grad_norm_act"] == pytest.approx(np.sqrt(sum(float(np.dot(x, x)) for x in a)), rel=1e-12)
    u = torch.randn(len(a), generator=draws, dtype=torch.float32).double().numpy()  # one draw per tensor
    null = [i for i in range(len(a)) if np.dot(a[i], a[i]) > 0 and np.dot(r[i], r[i]) > 0 and u[i] < 0]
    assert stats["conflict_ratio_tensors_null"] == pytest.approx(len(null) / len(a))
    want = sum(a[i].size for i in null) / sum(x.size for x in a)
    assert stats["conflict_ratio_params_null"] == pytest.approx(want)


# ---- nupi (νPI, Sohrabi et al. 2024; issue 26) ----------------------------------------------------------------------
def _nupi_by_hand(losses, eps, kp, ki, nu, lam0=0.0, normalize=False, cap=None):
    """νPI in numpy float64, written from the paper's recursion: ξ_t = ν ξ_{t-1} + (1 - ν) e_t with ξ_{-1} = 0,
    λ_{t+1} = clip(λ_t + κ_I e_t + κ_P (ξ_t - ξ_{t-1}), 0, cap)."""
    e = np.asarray(losses, dtype=np.float64)
    e = e / eps - 1.0 if normalize else e - eps
    xi = np.zeros(len(e) + 1)  # xi[t + 1] is ξ_t; xi[0] is ξ_{-1}
    for t in range(len(e)):
        xi[t + 1] = nu * xi[t] + (1.0 - nu) * e[t]
    lam, out = np.float64(lam0), []
    for t in range(len(e)):
        lam = np.clip(lam + ki * e[t] + kp * (xi[t + 1] - xi[t]), 0.0, np.inf if cap is None else cap)
        out.append(float(lam))
    return out


@pytest.mark.parametrize("nu", [0.0, 0.6])
def test_nupi_equals_a_hand_computation_over_40_steps(nu):
    dual = CRaFTDualOptimizer(epsilon=0.5, dual_lr=0.3, mode="nupi", kp=0.8, nu=nu, init_lambda=0.1)
    got = [dual.step(v) for v in LOSSES]
    want = _nupi_by_hand(LOSSES, 0.5, kp=0.8, ki=0.3, nu=nu, lam0=0.1)
    assert got == pytest.approx(want, rel=1e-13, abs=1e-15)
    assert any(w == 0.0 for w in want) and max(want) > 0.5  # both the clip at 0 and real motion are exercised
    # steps 1-2 written out (ν = 0: ξ is the error itself, ξ_{-1} = 0)
    if nu == 0.0:
        e1, e2 = LOSSES[0] - 0.5, LOSSES[1] - 0.5
        lam1 = max(0.0, 0.1 + 0.3 * e1 + 0.8 * e1)
        assert got[0] == pytest.approx(lam1)
        assert got[1] == pytest.approx(max(0.0, lam1 + 0.3 * e2 + 0.8 * (e2 - e1)))


def test_nupi_clips_at_zero_and_at_the_cap_without_windup():
    eps = 0.02
    dual = CRaFTDualOptimizer(epsilon=eps, dual_lr=0.05, mode="nupi", kp=0.5, nu=0.3, normalize=True, max_lambda=1.2)
    big, small = [0.5] * 6, [0.0] * 6  # L_ret 25 ε (the cap binds), then 0 (λ falls to 0 and stays)
    got = [dual.step(v) for v in big + small]
    assert got == pytest.approx(_nupi_by_hand(big + small, eps, 0.5, 0.05, 0.3, normalize=True, cap=1.2), rel=1e-13)
    assert got[len(big) - 1] == 1.2 and got[-1] == 0.0
    # the clip acts on λ itself: one step at L_ret = 2 ε after sitting at 0 moves λ by κ_I e + κ_P Δξ from 0, not
    # from a negative wound-up value
    xi_before = dual.xi
    lam = dual.step(2 * eps)
    xi_after = 0.3 * xi_before + 0.7 * 1.0
    assert lam == pytest.approx(max(0.0, 0.05 * 1.0 + 0.5 * (xi_after - xi_before)))


def test_nupi_with_kp_zero_is_the_gradient_rule_bit_for_bit():
    dual = CRaFTDualOptimizer(epsilon=0.5, dual_lr=0.7, init_lambda=0.25, mode="nupi")
    assert [dual.step(v).hex() for v in LOSSES] == OUT


@pytest.mark.parametrize("kwargs", [dict(kp=0.8, nu=0.0), dict(kp=0.8, nu=0.6, max_lambda=1.0)])
def test_nupi_resume_mid_run_is_exact(kwargs):
    common = dict(epsilon=0.5, dual_lr=0.3, mode="nupi", **kwargs)
    full = CRaFTDualOptimizer(**common)
    want = [full.step(v) for v in LOSSES]
    first = CRaFTDualOptimizer(**common)
    for v in LOSSES[:17]:
        first.step(v)
    resumed = CRaFTDualOptimizer(**common)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    assert [resumed.step(v) for v in LOSSES[17:]] == want[17:]  # exact: ξ is part of the state
    assert resumed.state_dict() == full.state_dict()
    # without ξ the continuation differs: the test can see a lost state
    lossy = CRaFTDualOptimizer(**common)
    state = first.state_dict()
    state.pop("xi")
    lossy.load_state_dict(state)
    assert [lossy.step(v) for v in LOSSES[17:]] != want[17:]


def test_old_checkpoints_load_and_nupi_refusals():
    # a state written before the modes existed: lambda and steps only -> loads as gradient, refused by nupi
    old = {"lambda": 0.75, "steps": 12, "last_slack": -0.1}
    dual = CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1)
    dual.load_state_dict(old)
    assert (dual.lam, dual.steps, dual.xi) == (0.75, 12, 0.0)
    with pytest.raises(ValueError, match="same --craft_dual_mode"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, mode="nupi").load_state_dict(old)
    with pytest.raises(ValueError, match="same --craft_dual_mode"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, mode="pid").load_state_dict(
            CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, mode="nupi").state_dict())
    for nu in (1.0, -0.2, float("nan")):
        with pytest.raises(ValueError, match=r"nu \(craft_dual_nu\) must be in \[0, 1\)"):
            CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, mode="nupi", nu=nu)
    with pytest.raises(ValueError, match="EMA coefficient of mode 'nupi'"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, mode="gradient", nu=0.5)


def test_log_error_and_setpoint_equal_a_hand_computation():
    """e = ln(max(L_ret, 1e-3 ρε) / (ρε)) with ρ = setpoint, fed to νPI; numpy float64 reference."""
    eps, rho, ki, kp, nu = 0.02, 0.7, 0.1, 0.5, 0.4
    losses = [0.0, 0.3, 0.05, 0.013, 1e-9, 0.0151, 0.002, 0.02, 0.0139, 0.4]  # includes 0 (θ0) and far below ρε
    target = rho * eps
    ratios = np.maximum(np.asarray(losses), 1e-3 * target) / target
    logs = np.log(ratios)  # the error as the documented formula, vectorised
    assert logs.min() == pytest.approx(np.log(1e-3))  # the floor binds at L_ret = 0
    dual = CRaFTDualOptimizer(epsilon=eps, dual_lr=ki, mode="nupi", kp=kp, nu=nu, log_error=True, setpoint=rho)
    got = [dual.step(v) for v in losses]
    # _nupi_by_hand with the raw difference error on pre-transformed inputs: feed e + ε as the "loss"
    want = _nupi_by_hand(list(logs + eps), eps, kp=kp, ki=ki, nu=nu)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert any(w == 0.0 for w in want) and max(want) > 0.3
    # the setpoint moves the gradient rule's target too: λ = max(0, η (L_ret - ρ ε))
    grad = CRaFTDualOptimizer(epsilon=eps, dual_lr=3.0, setpoint=rho)
    assert grad.step(0.016) == pytest.approx(3.0 * (0.016 - rho * eps))
    assert grad.last_slack == pytest.approx(0.016 - eps)  # the logged slack stays against ε itself


def test_log_error_and_setpoint_refusals_and_resume_guard():
    with pytest.raises(ValueError, match=r"setpoint \(craft_dual_setpoint\) must be in \(0, 1\]"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, setpoint=1.5)
    with pytest.raises(ValueError, match="choose one"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.1, log_error=True, normalize=True)
    with pytest.raises(ValueError, match="needs epsilon > 0"):
        CRaFTDualOptimizer(epsilon=0.0, dual_lr=0.1, log_error=True)
    kwargs = dict(epsilon=0.1, dual_lr=0.1, mode="nupi", kp=0.2, nu=0.5, log_error=True, setpoint=0.7)
    state = CRaFTDualOptimizer(**kwargs).state_dict()
    for change in (dict(nu=0.6), dict(setpoint=0.8), dict(log_error=False)):
        with pytest.raises(ValueError, match="resume with the run's values"):
            CRaFTDualOptimizer(**{**kwargs, **change}).load_state_dict(state)
