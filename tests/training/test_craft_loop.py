"""CRaFT wired into `train(cfg)` (prismatic/training/craft_step.py) on the tiny preset and synthetic LIBERO data."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import seed_everything, train
from prismatic.training import checkpointing as ckpt
from prismatic.training import policy_setup
from prismatic.training.craft_cache import CacheManifestMismatch, CraftCacheReader, CraftCacheWriter
from prismatic.training.craft_step import CRaFTStep
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import init_distributed
from prismatic.training.finetune_config import ConfigError, validate_config
from prismatic.training.lr_schedule import build_lr_scheduler
from prismatic.training.metrics_log import read_metrics
from prismatic.training.train_step import plain_gradients

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "vla-scripts"))
from build_craft_cache import BuildCacheConfig, build_cache  # noqa: E402

RET, LAM = "CRaFT/Retention Loss", "CRaFT/Lambda"


def _perturb_(policy, seed: int, scale: float = 0.05) -> None:
    """Move every trainable tensor (simulated training) so that θ != θ0 and L_ret > 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _setup(cfg, name: str, start_step: int = 0):
    validate_config(cfg)
    env = init_distributed()
    seed_everything(cfg.seed)
    policy = policy_setup.build_policy(cfg, env)
    data = build_training_data(cfg, policy, env, run_dir=Path(cfg.run_root_dir) / name)
    return env, policy, data, data.train_stream(start_step)


def _grads(policy) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return out


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float64).unsqueeze(-1)
    return (hidden.double() * m).sum(1) / m.sum(1)


def _bridge_features(policy, batch, raw_layer: int, aq_layer: int) -> torch.Tensor:
    """Second code path: the mean of exactly what the head reads (the forward's own latents, no hooks), float64."""
    out = policy.vla(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"])
    return torch.cat([out.raw_latents[:, raw_layer].double().mean(1),
                      out.action_query_latents[:, aq_layer].double().mean(1)], dim=-1)


# ---- the plain path is untouched --------------------------------------------------------------------------------
def test_use_craft_false_is_bit_identical_to_a_hand_written_loop(make_cfg):
    """train() with --use_craft False == a minimal VLA-Adapter loop (forward, (L1 / k).backward, AdamW), bit for bit."""
    steps, k = 3, 2
    cfg = make_cfg(use_craft=False, max_steps=steps, batch_size=1, grad_accumulation_steps=k, run_id="plain")
    result = train(cfg)
    env, policy, _, stream = _setup(make_cfg(batch_size=1, grad_accumulation_steps=k, run_id="hand",
                                             max_steps=steps), "hand")
    policy.to(env.device).train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_warmup_steps, cfg.num_steps_before_decay)
    for _ in range(steps):
        for micro in next(stream):
            out = policy(micro.batch, noise=micro.noise)
            loss = (out.actions.float() - micro.batch["actions"].float()).abs().mean()
            (loss / k).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    got, want = policy_setup.trainable_state(result.policy), policy_setup.trainable_state(policy)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    state = ckpt.load_training_state(ckpt.checkpoint_dir(Path(cfg.run_root_dir), "plain", steps))
    assert state["craft"] is None and "related" not in state


# ---- the CRaFT gradient ----------------------------------------------------------------------------------------
def test_craft_gradient_matches_reference_and_accumulation(make_cfg):
    """g = g_act + (λ - c) g_ret from separate backward passes and hook-free θ0 features; k=2 x b=1 == k=1 x b=2;
    every parameter the plain step reaches gets a gradient (head / proprio: g_act)."""
    lam0 = 0.3
    results = {}
    for name, (b, k) in {"big": (2, 1), "accum": (1, 2)}.items():
        cfg = make_cfg(use_craft=True, batch_size=b, grad_accumulation_steps=k, craft_enable_dual=False,
                       craft_fixed_lambda=lam0, run_id=name)
        env, policy, data, stream = _setup(cfg, name, start_step=2)
        theta0 = copy.deepcopy(policy)
        craft = CRaFTStep(cfg, policy, env, data.train_set)
        _perturb_(policy, seed=1)
        micro = next(stream)
        out = craft.compute_gradients(policy, micro, env.device)
        results[name] = (_grads(policy), out, micro)
    (g_big, out_big, micro_big), (g_acc, out_acc, _) = results["big"], results["accum"]
    assert set(g_big) == set(g_acc)
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-6, msg=n)
    assert out_acc["metrics"][RET] == pytest.approx(out_big["metrics"][RET], rel=1e-5)

    # reference on the big batch: plain backward for g_act, hook-free features for L_ret, the rule in float64
    batch, noise = micro_big[0].batch, micro_big[0].noise
    plain_gradients(policy, micro_big, env.device)
    g_act = _grads(policy)
    L = policy.vla.get_base_model().config.num_llm_layers
    with torch.no_grad():
        anchors = _bridge_features(theta0, batch, L // 2, L)
    feats = _bridge_features(policy, batch, L // 2, L)
    l_ret = ((feats - anchors) ** 2).sum(-1).mean()
    l_ret.backward()
    g_ret = _grads(policy)
    assert float(l_ret) == pytest.approx(out_big["metrics"][RET], rel=1e-5)
    assert set(g_big) == set(g_act)  # every parameter the plain step reaches, no more
    assert {n for n in g_act if n.startswith(("action_head", "proprio_projector"))} <= set(g_big)
    assert not any(n.startswith(("action_head", "proprio_projector")) for n in g_ret)
    dot = sum(float((g_act[n].double() * g_ret[n].double()).sum()) for n in g_ret)
    nr2 = sum(float((g_ret[n].double() ** 2).sum()) for n in g_ret)
    c = min(0.0, dot) / (nr2 + cfg.craft_delta)
    assert out_big["metrics"]["CRaFT/Grad Dot"] == pytest.approx(dot, rel=1e-4)
    assert out_big["metrics"]["CRaFT/Projection Coef"] == pytest.approx(c, rel=1e-4)
    assert out_big["metrics"][LAM] == lam0
    for n in g_big:
        want = g_act[n].double() + (lam0 - c) * g_ret.get(n, torch.zeros_like(g_act[n])).double()
        torch.testing.assert_close(g_big[n].double(), want, rtol=1e-4, atol=1e-5, msg=n)
    del noise


@pytest.mark.parametrize("source", ["online", "offline"])
def test_dual_rule_from_metrics_and_resume_restores_lambda_exactly(make_cfg, tiny_data_root, tmp_path, source):
    n = 2
    common = dict(use_craft=True, max_steps=2 * n, save_freq=n, craft_retention_budget=1e-3, craft_dual_lr=0.05,
                  craft_init_lambda=0.01, craft_anchor_source=source,
                  craft_cache_dir=_cache(tmp_path, tiny_data_root) if source == "offline" else None)
    full = train(make_cfg(run_root_dir=tmp_path / "a", **common))
    records = read_metrics(full.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 2 * n + 1))
    lam = 0.01
    for r in records:  # the λ used at each step follows the rule from the previous step's logged L_ret
        assert r[LAM] == pytest.approx(lam, rel=1e-12, abs=1e-15)
        assert r["CRaFT/Constraint Slack"] == pytest.approx(r[RET] - 1e-3, rel=1e-12)
        lam = max(0.0, lam + 0.05 * (r[RET] - 1e-3))
    assert records[-1][RET] > 0 and lam > 0.01
    end_a = ckpt.checkpoint_dir(tmp_path / "a", "test", 2 * n)
    state_a = ckpt.load_training_state(end_a)
    assert state_a["craft"]["dual"]["lambda"] == pytest.approx(lam, rel=1e-12)
    assert state_a["craft"]["projector"]["steps"] == 2 * n

    first = ckpt.checkpoint_dir(tmp_path / "a", "test", n)
    resumed = train(make_cfg(run_root_dir=tmp_path / "b", resume=True, config_file_path=first, resume_step=n,
                             **common))
    end_b = ckpt.checkpoint_dir(tmp_path / "b", "test", 2 * n)
    a, b = policy_setup.trainable_state(full.policy), policy_setup.trainable_state(resumed.policy)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_b = ckpt.load_training_state(end_b)
    assert state_b["craft"]["dual"] == state_a["craft"]["dual"]
    assert state_b["craft"]["projector"] == state_a["craft"]["projector"]
    if source == "online":  # θ0 copies of the swapped tensors travel with the state (LoRA)
        assert set(state_a["craft"]["theta0"]) == {"action_queries.weight"}
        for name, t in state_a["craft"]["theta0"].items():
            assert torch.equal(t, state_b["craft"]["theta0"][name]), name
    else:  # the θ0 identity the cache was checked against
        assert state_b["craft"]["model_identity"] == state_a["craft"]["model_identity"] is not None
    assert [h[LAM] for h in resumed.history] == [h[LAM] for h in full.history[n:]]
    assert [h[RET] for h in resumed.history] == [h[RET] for h in full.history[n:]]


def test_pid_dual_from_metrics_and_resume_exact_through_training_state(make_cfg, tmp_path):
    """--craft_dual_mode pid in the loop: λ of each step follows the PID rule from the logged L_ret; resuming from the
    mid-run checkpoint restores the integral and the previous error (training_state.pt) and reproduces the run."""
    n, eps, ki, kp, kd = 2, 1e-3, 0.05, 0.02, 0.03
    common = dict(use_craft=True, max_steps=2 * n, save_freq=n, craft_retention_budget=eps, craft_dual_lr=ki,
                  craft_dual_mode="pid", craft_dual_kp=kp, craft_dual_kd=kd, craft_dual_normalize=True,
                  craft_max_lambda=50.0)
    full = train(make_cfg(run_root_dir=tmp_path / "a", **common))
    records = read_metrics(full.run_dir / "metrics.jsonl")
    integral, prev, lam = 0.0, None, 0.0
    for r in records:  # hand-written PID on the normalised error
        assert r[LAM] == pytest.approx(lam, rel=1e-12, abs=1e-15)
        e = r[RET] / eps - 1.0
        integral = min(50.0, max(0.0, integral + ki * e))
        lam = min(50.0, max(0.0, kp * e + integral + kd * (0.0 if prev is None else max(0.0, e - prev))))
        prev = e
    state_a = ckpt.load_training_state(ckpt.checkpoint_dir(tmp_path / "a", "test", 2 * n))["craft"]["dual"]
    assert state_a["mode"] == "pid" and state_a["lambda"] == pytest.approx(lam, rel=1e-12)
    assert state_a["integral"] == pytest.approx(integral, rel=1e-12) and state_a["prev_error"] == pytest.approx(prev)
    first = ckpt.checkpoint_dir(tmp_path / "a", "test", n)
    resumed = train(make_cfg(run_root_dir=tmp_path / "b", resume=True, config_file_path=first, resume_step=n,
                             **common))
    state_b = ckpt.load_training_state(ckpt.checkpoint_dir(tmp_path / "b", "test", 2 * n))["craft"]["dual"]
    assert state_b == state_a
    assert [h[LAM] for h in resumed.history] == [h[LAM] for h in full.history[n:]]
    # an explicitly different dual mode on resume is refused (not silently replaced by the run's)
    from prismatic.cli_errors import UserError

    with pytest.raises(UserError, match=r"--craft_dual_mode 'gradient' \(run: 'pid'\)"):
        train(make_cfg(run_root_dir=tmp_path / "c", resume=True, config_file_path=first, resume_step=n,
                       **{**common, "craft_dual_mode": "gradient", "craft_dual_kp": 0.0, "craft_dual_kd": 0.0}),
              given_flags={"craft_dual_mode", "craft_dual_kp", "craft_dual_kd", "resume", "config_file_path",
                           "resume_step", "run_root_dir"})


def test_nupi_dual_from_metrics_and_resume_exact_through_training_state(make_cfg, tmp_path):
    """--craft_dual_mode nupi in the loop: λ of each step follows νPI from the logged (rank-averaged) L_ret;
    resuming from the mid-run checkpoint restores ξ (training_state.pt) and reproduces the run exactly."""
    n, eps, ki, kp, nu = 2, 1e-3, 0.05, 0.4, 0.3
    common = dict(use_craft=True, max_steps=2 * n, save_freq=n, craft_retention_budget=eps, craft_dual_lr=ki,
                  craft_dual_mode="nupi", craft_dual_kp=kp, craft_dual_nu=nu, craft_dual_normalize=True,
                  craft_max_lambda=50.0)
    full = train(make_cfg(run_root_dir=tmp_path / "a", **common))
    records = read_metrics(full.run_dir / "metrics.jsonl")
    xi, lam = 0.0, 0.0
    for r in records:  # hand-written νPI on the normalised error
        assert r[LAM] == pytest.approx(lam, rel=1e-12, abs=1e-15)
        assert r["CRaFT/Dual Error EMA"] == pytest.approx(xi, rel=1e-12, abs=1e-15)
        e = r[RET] / eps - 1.0
        xi_new = nu * xi + (1.0 - nu) * e
        lam = min(50.0, max(0.0, lam + ki * e + kp * (xi_new - xi)))
        xi = xi_new
    state_a = ckpt.load_training_state(ckpt.checkpoint_dir(tmp_path / "a", "test", 2 * n))["craft"]["dual"]
    assert state_a["mode"] == "nupi" and state_a["lambda"] == pytest.approx(lam, rel=1e-12)
    assert state_a["xi"] == pytest.approx(xi, rel=1e-12) and state_a["nu"] == nu
    first = ckpt.checkpoint_dir(tmp_path / "a", "test", n)
    resumed = train(make_cfg(run_root_dir=tmp_path / "b", resume=True, config_file_path=first, resume_step=n,
                             **common))
    state_b = ckpt.load_training_state(ckpt.checkpoint_dir(tmp_path / "b", "test", 2 * n))["craft"]["dual"]
    assert state_b == state_a
    assert [h[LAM] for h in resumed.history] == [h[LAM] for h in full.history[n:]]
    assert [h[RET] for h in resumed.history] == [h[RET] for h in full.history[n:]]


# ---- anchors: online == offline ----------------------------------------------------------------------------------
def _cache(tmp_path, data_root, name="cache", **overrides) -> Path:
    values = dict(cache_dir=tmp_path / name, model_preset="tiny", seed=7, num_images_in_input=1,
                  data_root_dir=data_root, dataset_name="synthetic_libero_no_noops", image_aug=False, batch_size=4,
                  device="cpu")
    values.update(overrides)
    build_cache(BuildCacheConfig(**values))
    return values["cache_dir"]


def test_online_and_offline_anchors_agree(make_cfg, tiny_data_root, tmp_path):
    cache_dir = _cache(tmp_path, tiny_data_root)
    reader = CraftCacheReader(cache_dir)
    assert len(reader) == 20 and reader.manifest["image_transform"] == {"view": "unaugmented", "resize": 224,
                                                                      "center_crop": False, "num_images": 1}
    outs = {}
    for source in ("online", "offline"):
        cfg = make_cfg(use_craft=True, craft_anchor_source=source, craft_cache_dir=cache_dir, run_id=source)
        env, policy, data, stream = _setup(cfg, source)
        craft = CRaFTStep(cfg, policy, env, data.train_set)
        _perturb_(policy, seed=2)
        outs[source] = (craft.compute_gradients(policy, next(stream), env.device), _grads(policy))
    (on, g_on), (off, g_off) = outs["online"], outs["offline"]
    assert on["metrics"][RET] > 1.0
    assert off["metrics"][RET] == pytest.approx(on["metrics"][RET], rel=1e-5, abs=1e-5)
    for n in g_on:
        torch.testing.assert_close(g_off[n], g_on[n], rtol=1e-4, atol=1e-6, msg=n)
    # and whole runs through train(): same L_ret curve. Projection off here: at θ0 L_ret is ~0 and the cached anchors
    # differ from the online ones by float noise (~1e-7, other batch padding); the scale-invariant projection then
    # acts on the direction of that noise, which says nothing about the anchors (the step above checks it on a
    # perturbed model, where g_ret is real).
    runs = {s: train(make_cfg(use_craft=True, craft_anchor_source=s, craft_cache_dir=cache_dir, max_steps=3,
                              craft_enable_projection=False, run_id=f"run-{s}")) for s in ("online", "offline")}
    np.testing.assert_allclose([h[RET] for h in runs["offline"].history], [h[RET] for h in runs["online"].history],
                               rtol=1e-4, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_bad_craft_inputs_fail_clearly(make_cfg, tiny_data_root, tmp_path):
    with pytest.raises(ConfigError, match="craft_retention_budget"):
        train(make_cfg(use_craft=True, craft_retention_budget=-0.1))
    with pytest.raises(ConfigError, match="conflicts with --retention_method align"):
        train(make_cfg(use_craft=True, retention_method="align"))
    with pytest.raises(ConfigError, match="--retention_method must be one of"):
        train(make_cfg(retention_method="l2"))
    with pytest.raises(ConfigError, match=r"--craft_raw_layer 9 is outside the model's hidden states 0..4"):
        train(make_cfg(use_craft=True, craft_raw_layer=9))
    good = _cache(tmp_path, tiny_data_root)
    other_model = _cache(tmp_path, tiny_data_root, "other_model", seed=8)
    other_layer = _cache(tmp_path, tiny_data_root, "other_layer", craft_raw_layer=1)
    for cache, field in ((other_model, "model_identity.weights_sha256"), (other_layer, "raw_layer")):
        with pytest.raises(CacheManifestMismatch, match=field):
            train(make_cfg(use_craft=True, craft_anchor_source="offline", craft_cache_dir=cache))
    # a cache without one training sample: refused at start-up, naming it
    reader = CraftCacheReader(good)
    ids = sorted(reader._index)
    manifest = {k: v for k, v in reader.manifest.items() if k not in ("shards", "num_samples", "format_version")}
    holey = tmp_path / "holey"
    with CraftCacheWriter(holey, manifest) as writer:
        writer.add(ids[1:], [reader._index[i][2] for i in ids[1:]], reader.lookup(ids[1:]))
    with pytest.raises(KeyError, match=ids[0]):
        train(make_cfg(use_craft=True, craft_anchor_source="offline", craft_cache_dir=holey))
    # NaN in the features: an error at the step, naming the samples
    cfg = make_cfg(use_craft=True)
    env, policy, data, stream = _setup(cfg, "nan")
    craft = CRaFTStep(cfg, policy, env, data.train_set)
    with torch.no_grad():
        policy.vla.get_base_model().action_queries.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        craft.compute_gradients(policy, next(stream), env.device)


def test_retention_method_switch_resolves_and_freeze_lora_has_no_vision_adapters(make_cfg):
    cfg = make_cfg(retention_method="craft")
    validate_config(cfg)
    assert cfg.use_craft is True
    cfg = make_cfg(use_craft=True)
    validate_config(cfg)
    assert cfg.retention_method == "craft"
    env = init_distributed()
    policy = policy_setup.build_policy(make_cfg(freeze_vision_backbone=True), env)
    names = [n for n, _ in policy.named_parameters()]
    assert not any("vision_backbone" in n and "lora_" in n for n in names)
    assert any("language_model" in n and "lora_" in n for n in names)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if "vision_backbone" in n)


@pytest.mark.parametrize("chunk", [7, 1 << 24], ids=["many_groups", "one_group"])
def test_projector_vectorised_step_equals_per_tensor_combine(monkeypatch, chunk):
    """The flat-buffer statistics / combination of `CRaFTGradientProjector.step` == `combine_gradients` (per tensor)."""
    from prismatic.training import craft_utils

    monkeypatch.setattr(craft_utils, "FLAT_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2), (9,), (1,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    g_act = [torch.randn(s, generator=g) for s in shapes]
    g_ret = [torch.randn(s, generator=g) if i not in (1, 4) else None for i, s in enumerate(shapes)]
    projector = craft_utils.CRaFTGradientProjector(params, delta=1e-8)
    projector.add_grads(g_act, g_ret)
    # buffered: the tensors L_ret reaches (12, 8, 9 elements); the other two only hold g_act, kept in .grad
    assert len(projector._groups) == (3 if chunk == 7 else 1) and projector.buffered_elements() == 29
    stats = projector.step(0.25)
    want, want_stats = craft_utils.combine_gradients(g_act, g_ret, 0.25, 1e-8, True)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)
    for key in ("dot", "grad_norm_act", "grad_norm_ret", "projection_coef", "conflict_ratio_params",
                "conflict_ratio_tensors", "grad_norm_final"):
        assert stats[key] == pytest.approx(want_stats[key], rel=1e-12, abs=1e-15), key


def test_snapshot_path_is_theta0(make_cfg, tmp_path):
    """--craft_snapshot_path: the anchors are the snapshot's features (here a checkpoint of another short run)."""
    from prismatic.models.loaders import load_policy

    other = train(make_cfg(max_steps=2, save_freq=2, run_id="other", learning_rate=5e-3))
    snapshot = load_policy(other.last_checkpoint).train()
    cfg = make_cfg(use_craft=True, craft_snapshot_path=other.last_checkpoint, craft_enable_dual=False,
                   craft_fixed_lambda=0.0, run_id="snap")
    env, policy, data, stream = _setup(cfg, "snap")
    craft = CRaFTStep(cfg, policy, env, data.train_set)
    micro = next(stream)
    out = craft.compute_gradients(policy, micro, env.device)
    L = snapshot.vla.config.num_llm_layers
    with torch.no_grad():
        want = ((_bridge_features(policy, micro[0].batch, L // 2, L)
                 - _bridge_features(snapshot, micro[0].batch, L // 2, L)) ** 2).sum(-1).mean()
    assert float(want) > 1e-3
    assert out["metrics"][RET] == pytest.approx(float(want), rel=1e-4)
    assert craft.state_dict()["snapshot_sha256"] is not None and "theta0" not in craft.state_dict()
