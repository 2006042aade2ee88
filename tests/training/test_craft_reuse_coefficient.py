"""--craft_reuse coefficient (docs/CRAFT.md, "Cheaper step"): a step between g_ret refreshes is ONE backward of
L_act + (λ_t - c_last) L_ret. Checked against g_act and g_ret captured separately by autograd at the same weights and
micro-batches and combined in float64 numpy; the loop's schedule, the exact resume at a step in between, and the
flag's validation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finetune import seed_everything, train
from prismatic.cli_errors import UserError
from prismatic.training import checkpointing as ckpt
from prismatic.training import policy_setup
from prismatic.training.craft_step import CRaFTStep
from prismatic.training.craft_utils import retention_loss
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import init_distributed
from prismatic.training.finetune_config import ConfigError, make_run_id, validate_config
from prismatic.training.metrics_log import read_metrics
from prismatic.training.train_step import forward_losses

RET, LAM, FRESH, COEF = "CRaFT/Retention Loss", "CRaFT/Lambda", "CRaFT/Retention Refresh", "CRaFT/Projection Coef"
EPS, ETA, LAM0 = 1e-3, 0.05, 0.3


def _common(**extra) -> dict:
    return dict(use_craft=True, craft_retention_budget=EPS, craft_dual_lr=ETA, craft_init_lambda=LAM0, **extra)


def _fresh_grads(craft: CRaFTStep, policy, micro_batches, device, names):
    """g_act and g_ret of the mean loss over the micro-batches, each by its own autograd.grad (float64 numpy)."""
    params = dict(policy.named_parameters())
    k = len(micro_batches)
    g_act = {n: np.zeros(params[n].shape) for n in names}
    g_ret = {n: np.zeros(params[n].shape) for n in names}
    for micro in micro_batches:
        for which, acc in (("act", g_act), ("ret", g_ret)):
            with craft.extractor.capture():
                loss, _, _, out = forward_losses(policy, micro, device)
            loss_ret = retention_loss(craft.extractor.features(out.vla_output.layout), craft._anchors(micro, device))
            target = loss if which == "act" else loss_ret
            grads = torch.autograd.grad(target / k, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    acc[n] += g.detach().double().numpy()
    return g_act, g_ret


@pytest.mark.parametrize("forced_coef", [None, -0.7])  # None: c of the refresh step; -0.7: a conflict, by hand
def test_step_in_between_is_g_act_plus_lambda_minus_c_last_times_g_ret(make_cfg, forced_coef):
    cfg = make_cfg(grad_accumulation_steps=2, craft_retention_every=2, craft_reuse="coefficient", **_common())
    validate_config(cfg)
    env = init_distributed()
    seed_everything(cfg.seed)
    policy = policy_setup.build_policy(cfg, env)
    data = build_training_data(cfg, policy, env, run_dir=Path(cfg.run_root_dir) / "coef")
    craft = CRaFTStep(cfg, policy, env, data.train_set)
    assert craft.reuse_coefficient
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # θ != θ0, so L_ret and g_ret are not zero
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    policy.train()
    stream = data.train_stream(0)
    refresh = craft.compute_gradients(policy, next(stream), env.device)  # step 0: the exact step, records c
    assert refresh["metrics"][FRESH] == 1.0
    assert craft._coef_last == refresh["metrics"][COEF]
    craft.finish_step()
    for p in policy.parameters():
        p.grad = None
    if forced_coef is not None:
        craft._coef_last = forced_coef
    lam, c_last = craft.dual.lam, craft._coef_last
    assert lam > 0

    micro = next(stream)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    g_act, g_ret = _fresh_grads(craft, policy, micro, env.device, names)
    out = craft.compute_gradients(policy, micro, env.device)
    assert out["metrics"][FRESH] == 0.0 and out["metrics"][LAM] == lam and out["metrics"][COEF] == c_last
    assert "CRaFT/Grad Dot" not in out["metrics"]  # not measured on this step
    grads = dict(policy.named_parameters())
    a = lam - c_last
    ret_norm = np.sqrt(sum((g_ret[n] ** 2).sum() for n in names))
    assert ret_norm > 0
    expected = {n: g_act[n] + a * g_ret[n] for n in names}
    scale = max(np.abs(e).max() for e in expected.values())
    err_sq = 0.0
    for n in names:
        got = grads[n].grad
        if got is None:
            assert not expected[n].any(), n
            continue
        # float32 sums in another order than float64: tolerance relative to the largest entry
        np.testing.assert_allclose(got.double().numpy(), expected[n], rtol=1e-4, atol=1e-5 * scale, err_msg=n)
        err_sq += ((got.double().numpy() - expected[n]) ** 2).sum()
    # the L_ret part is far above the float error: without it (or with another a) the check would fail
    part = np.sqrt(sum(((a * g_ret[n]) ** 2).sum() for n in names))
    assert part > 100 * np.sqrt(err_sq)
    assert part > 1e-3 * np.sqrt(sum((g_act[n] ** 2).sum() for n in names))
    # L_ret of this step, measured on the live forward: the dual updates from it
    assert out["metrics"][RET] > 0
    assert craft.projector.steps == 2 and craft.projector.unmeasured_steps == 1


def test_k2_schedule_dual_every_step_first_step_exact_and_resume_across_a_step_in_between(make_cfg, tmp_path):
    n, k = 3, 2  # the checkpoint after step 3: the next step (index 3) is in between
    common = _common(max_steps=2 * n, save_freq=n, craft_retention_every=k, craft_reuse="coefficient")
    full = train(make_cfg(run_root_dir=tmp_path / "a", **common))
    records = read_metrics(full.run_dir / "metrics.jsonl")
    assert [r[FRESH] for r in records] == [1.0, 0.0] * n
    lam, coef = LAM0, None
    for r in records:  # online anchors too: θ0's forward runs every step, so L_ret is measured and λ moves each step
        assert r[LAM] == pytest.approx(lam, rel=1e-12, abs=1e-15)
        if r[FRESH]:
            coef = r[COEF]
        else:
            assert r[COEF] == coef  # the last refresh's c
        lam = max(0.0, lam + ETA * (r[RET] - EPS))
    assert all(r[RET] > 0 for r in records[1:])
    exact = train(make_cfg(run_root_dir=tmp_path / "k1", **_common(max_steps=1)))
    first = read_metrics(exact.run_dir / "metrics.jsonl")[0]
    assert records[0] == {**first, FRESH: 1.0}  # the refresh step is the exact step, bit for bit
    mid = ckpt.load_training_state(ckpt.checkpoint_dir(tmp_path / "a", "test", n))["craft"]["retention_every"]
    assert mid["reuse"] == "coefficient" and mid["coef_last"] == records[n - 1][COEF] and mid["kept"] is None

    resumed = train(make_cfg(run_root_dir=tmp_path / "b", resume=True, config_file_path=ckpt.checkpoint_dir(
        tmp_path / "a", "test", n), resume_step=n, **common))
    a, b = policy_setup.trainable_state(full.policy), policy_setup.trainable_state(resumed.policy)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for key in (LAM, RET, FRESH, COEF, "VLA Train/Loss", "VLA Train/Gradient Norm"):
        assert [h[key] for h in resumed.history] == [h[key] for h in full.history[n:]], key


def test_gradient_reuse_and_coefficient_reuse_differ_only_between_refreshes(make_cfg, tmp_path):
    common = _common(max_steps=2, craft_retention_every=2)
    coef = train(make_cfg(run_root_dir=tmp_path / "c", craft_reuse="coefficient", **common))
    grad = train(make_cfg(run_root_dir=tmp_path / "g", **common))  # the default: --craft_reuse gradient
    rc, rg = read_metrics(coef.run_dir / "metrics.jsonl"), read_metrics(grad.run_dir / "metrics.jsonl")
    assert rc[0] == rg[0]
    assert rc[1]["VLA Train/Gradient Norm"] != rg[1]["VLA Train/Gradient Norm"]


def test_resume_refusals_name_the_fix():
    step = SimpleNamespace(retention_every=2, projector=SimpleNamespace(steps=3), _last_ret=None,
                           reuse_coefficient=True, _coef_last=None)
    with pytest.raises(UserError, match="used --craft_reuse gradient, this one coefficient"):
        CRaFTStep._load_retention_every(step, {"every": 2, "last_ret": 0.5, "sharded": False, "kept": None})
    with pytest.raises(UserError, match="resume from a checkpoint at a step that is a multiple of 2"):
        CRaFTStep._load_retention_every(step, {"every": 2, "last_ret": 0.5, "reuse": "coefficient",
                                               "coef_last": None})
    CRaFTStep._load_retention_every(step, {"every": 2, "last_ret": 0.5, "reuse": "coefficient", "coef_last": -0.25})
    assert step._coef_last == -0.25


@pytest.mark.parametrize("flags,message", [
    (dict(craft_retention_every=2, craft_reuse="scalar"),
     "--craft_reuse must be one of ('gradient', 'coefficient'), got 'scalar'"),
    (dict(craft_reuse="coefficient"),
     "--craft_reuse coefficient has no effect with --craft_retention_every 1 (every step is exact); set "
     "--craft_retention_every k > 1 or drop --craft_reuse"),
    (dict(craft_retention_every=2, craft_reuse="coefficient", distributed_strategy="fsdp"),
     "--craft_reuse coefficient is not supported with --distributed_strategy fsdp"),
    (dict(craft_retention_every=2, craft_reuse="coefficient", craft_adam_second_moment="action"),
     "--craft_reuse coefficient cannot hand AdamW the action part (--craft_adam_second_moment action)"),
])
def test_bad_craft_reuse_is_one_line(make_cfg, flags, message):
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(use_craft=True, **flags))
    lines = [line for line in str(err.value).splitlines() if "craft_reuse" in line]
    assert len(lines) == 1 and message in lines[0], str(err.value)


def test_run_id_names_the_reuse(make_cfg):
    cfg = make_cfg(use_craft=True, craft_retention_every=4, craft_reuse="coefficient", run_id=None)
    assert make_run_id(cfg, 1).endswith("+ret-every4-coef")
    assert make_run_id(make_cfg(use_craft=True, craft_retention_every=4, run_id=None), 1).endswith("+ret-every4")


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_coefficient_reuse_equals_one_rank(tiny_data_root, tmp_path):
    """torchrun, 2 ranks x b=1 == 1 rank x b=2 with --craft_retention_every 2 --craft_reuse coefficient over 4
    steps: the steps in between (2 and 4) go through DDP's gradient all-reduce with the same a = λ - c_last on
    every rank. LoRA + online anchors (1 micro-batch) and full fine-tuning (unused ViT parameters) + cache anchors
    with 2 accumulation steps (no_sync on the first)."""
    import sys

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from craft_ddp_worker import CRAFT_FLAGS, VARIANTS
    from ddp_worker import worker_config
    from test_craft_loop import _cache
    from test_distributed import assert_params_close
    from two_ranks import run_two_ranks

    steps, runs = 4, [("lora-every2-coef", 1), ("full-offline-every2-coef", 2)]
    cache_dir = _cache(tmp_path, tiny_data_root)
    run_two_ranks(here / "craft_ddp_worker.py", tiny_data_root, tmp_path / "ddp_runs", tmp_path, 1, steps,
                  ",".join(f"{v}:{k}" for v, k in runs), cache_dir, timeout=900)
    for variant, k in runs:
        ranks = [torch.load(tmp_path / f"craft_{variant}_k{k}_rank{r}.pt", weights_only=True) for r in range(2)]
        assert torch.equal(ranks[0]["per_step"], ranks[1]["per_step"]), variant
        for key in (LAM, RET):
            assert torch.equal(ranks[0]["metrics"][key], ranks[1]["metrics"][key]), (variant, key)
        single = train(worker_config(tiny_data_root, tmp_path / f"single_{variant}", batch_size=2, max_steps=steps,
                                     grad_accumulation_steps=k, run_id="craft-single", craft_cache_dir=cache_dir,
                                     **CRAFT_FLAGS, **VARIANTS[variant]))
        reference = policy_setup.trainable_state(single.policy)
        if variant.startswith("lora"):
            assert_params_close(ranks[0]["params"], reference)
        else:
            # Full fine-tuning with λ ~ 3 from step 3 on: coordinates whose true gradient is exactly 0 (the key third of
            # the ViTs' qkv bias: softmax ignores a key bias) get pure rounding noise, which AdamW normalises into
            # lr-sized steps (measured: up to 2.2e-3 there, < 1e-6 in the q and v thirds). Mean over all coordinates.
            diffs = torch.cat([(ranks[0]["params"][n].double() - reference[n].double()).abs().flatten()
                               for n in reference])
            assert float(diffs.mean()) <= 2e-6, float(diffs.mean())
        for key in (LAM, RET):
            expected = torch.tensor([h[key] for h in single.history], dtype=torch.float64)
            torch.testing.assert_close(ranks[0]["metrics"][key], expected, rtol=1e-5, atol=1e-9, msg=key)
        assert [h[FRESH] for h in single.history] == [1.0, 0.0, 1.0, 0.0]
        assert float(ranks[0]["metrics"][RET][-1]) > 0


def test_the_coefficient_variant_is_valid_and_the_smallest_k_within_the_cost_goal(make_cfg):
    from prismatic.training.craft_variants import COEFFICIENT_VARIANT_FLAGS, COEFFICIENT_WORK_RATIOS

    validate_config(make_cfg(use_craft=True, **COEFFICIENT_VARIANT_FLAGS))
    within = [k for k, ratio in COEFFICIENT_WORK_RATIOS["offline"].items() if ratio <= 1.15]
    assert min(within) == COEFFICIENT_VARIANT_FLAGS["craft_retention_every"]
    assert all(ratio > 1.15 for ratio in COEFFICIENT_WORK_RATIOS["online"].values())
