"""End-to-end fine-tuning on the tiny preset (CPU, synthetic LIBERO-schema data), in-process `train(cfg)` calls."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import draccus
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune import NonFiniteLossError, TrainHooks, train
from prismatic.data.collator import VLACollator
from prismatic.data.loader import make_eval_loader
from prismatic.models.loaders import load_policy
from prismatic.training import checkpointing as ckpt
from prismatic.training import policy_setup
from prismatic.training import train_step as train_step_module
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import init_distributed
from prismatic.training.finetune_config import ConfigError, FinetuneConfig
from prismatic.training.metrics_log import read_metrics
from prismatic.training.train_step import plain_gradients, validation_losses

LOSS = "VLA Train/Loss"


def _eval_loss(policy, cfg: FinetuneConfig, tmp_path: Path) -> float:
    """Mean L1 over every frame of the dataset (eval view, no noise)."""
    env = init_distributed()
    data = build_training_data(cfg, policy, env, run_dir=tmp_path / "eval_stats")
    loader = make_eval_loader(data.train_set, batch_size=8)
    return validation_losses(policy, loader, env.device, env)["loss"]


def _median_baseline(policy, cfg: FinetuneConfig, tmp_path: Path) -> float:
    """L1 of the best constant predictor (per chunk-step and dim median of the targets), computed with numpy."""
    env = init_distributed()
    data = build_training_data(cfg, policy, env, run_dir=tmp_path / "eval_stats")
    targets = np.stack([data.train_set.get_frame(i)["actions"] for i in range(data.train_set.num_frames)])
    return float(np.abs(targets - np.median(targets, axis=0, keepdims=True)).mean())


def test_loss_falls_on_learnable_data(make_cfg, tmp_path):
    cfg = make_cfg(use_lora=False, batch_size=4, max_steps=15, learning_rate=1e-3)
    initial = policy_setup.build_policy(cfg, init_distributed())  # same seed -> the weights train() starts from
    start = _eval_loss(initial, cfg, tmp_path)
    result = train(cfg)
    end = _eval_loss(result.policy, cfg, tmp_path)
    baseline = _median_baseline(initial, cfg, tmp_path)
    assert end < 0.7 * start, (start, end)
    assert end < baseline + 0.05, (end, baseline)  # at least as good as the best constant chunk (about)
    # metrics.jsonl holds the same numbers as the returned history, one record per step
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 16))
    assert [r[LOSS] for r in records] == pytest.approx([h[LOSS] for h in result.history], rel=1e-12)
    assert all(r["VLA Train/Learning Rate"] == pytest.approx(1e-3) for r in records)


def test_config_yaml_reproduces_the_run_config(make_cfg):
    cfg = make_cfg(max_steps=1, craft_retention_budget=0.3)
    result = train(cfg)
    again = draccus.parse(FinetuneConfig, config_path=str(result.run_dir / "config.yaml"), args=[])
    assert again == cfg
    assert (result.run_dir / "dataset_statistics.json").is_file()


def test_accumulation_equals_big_batch(make_cfg):
    """k=2 micro-batches of 1 sample give the gradient of one batch of 2 (same samples, same noise)."""
    env = init_distributed()
    grads = {}
    for name, (b, k) in {"big": (2, 1), "accum": (1, 2)}.items():
        cfg = make_cfg(batch_size=b, grad_accumulation_steps=k)
        policy = policy_setup.build_policy(cfg, env)
        data = build_training_data(cfg, policy, env, run_dir=Path(cfg.run_root_dir) / name)
        stream = data.train_stream(start_step=3)
        micro = next(stream)
        assert len(micro) == k
        stats = plain_gradients(policy, micro, env.device)
        grads[name] = ({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, stats,
                       sorted(sid for m in micro for sid in m.batch["sample_ids"]))
    (g_big, s_big, ids_big), (g_acc, s_acc, ids_acc) = grads["big"], grads["accum"]
    assert ids_big == ids_acc and len(ids_big) == 2
    assert set(g_big) == set(g_acc) and len(g_big) > 10
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-7, msg=n)
    assert float(s_acc["loss"]) == pytest.approx(float(s_big["loss"]), rel=1e-5)
    # and whole runs: 2 optimizer steps end with the same parameters (tolerance: float summation order)
    runs = [train(make_cfg(batch_size=b, grad_accumulation_steps=k, run_id=f"acc{k}")) for b, k in ((2, 1), (1, 2))]
    a, c = (policy_setup.trainable_state(r.policy) for r in runs)
    diffs = torch.cat([(c[n] - a[n]).abs().flatten() for n in a])  # tolerance: see test_distributed.py
    assert float(diffs.max()) <= 2e-4 and float(diffs.mean()) <= 2e-6, (float(diffs.max()), float(diffs.mean()))


def _checkpoint_tensors(chkpt: Path) -> dict[str, torch.Tensor]:
    lora = chkpt / policy_setup.LORA_DIR / policy_setup.TRAINABLE_STATE_FILE
    return load_file(str(lora)) if lora.is_file() else load_file(str(chkpt / "model.safetensors"))


def _assert_same_state(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_resume_is_bit_exact(make_cfg, tmp_path, use_lora):
    n = 2
    full = train(make_cfg(use_lora=use_lora, max_steps=2 * n, save_freq=n, run_root_dir=tmp_path / "a",
                          lr_warmup_steps=3, num_steps_before_decay=3))
    first = ckpt.checkpoint_dir(tmp_path / "a", "test", n)
    assert ckpt.is_complete_checkpoint(first)
    resumed = train(make_cfg(use_lora=use_lora, max_steps=2 * n, save_freq=n, run_root_dir=tmp_path / "b",
                             lr_warmup_steps=3, num_steps_before_decay=3, resume=True, config_file_path=first,
                             resume_step=n))
    end_a = ckpt.checkpoint_dir(tmp_path / "a", "test", 2 * n)
    end_b = ckpt.checkpoint_dir(tmp_path / "b", "test", 2 * n)
    assert resumed.final_step == 2 * n and resumed.last_checkpoint == end_b
    _assert_same_state(_checkpoint_tensors(end_a), _checkpoint_tensors(end_b), "params")
    state_a, state_b = ckpt.load_training_state(end_a), ckpt.load_training_state(end_b)
    for key in ("step", "optimizer", "scheduler", "rng", "data", "nonfinite", "craft"):
        _assert_same_state(state_a[key], state_b[key], key)
    assert state_b["step"] == 2 * n and state_b["data"]["next_position"] == 2 * n * 2 and state_b["craft"] is None
    assert len(state_b["optimizer"]["state"]) > 0
    # the resumed steps saw the same data with the same noise: identical losses and learning rates
    assert [h[LOSS] for h in resumed.history] == [h[LOSS] for h in full.history[n:]]
    lrs = [h["VLA Train/Learning Rate"] for h in full.history]
    assert lrs == pytest.approx([1e-3 * (0.1 + 0.9 * min((s + 1) / 3, 1)) * (0.1 if s >= 3 else 1) for s in range(4)])
    assert [h["VLA Train/Learning Rate"] for h in resumed.history] == lrs[n:]


def _predict(policy, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    proprio = rng.normal(size=8).astype(np.float32)
    return policy.predict_action([image], "push the block to the center of the table", proprio=proprio)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora_merged", "full"])
def test_checkpoint_reloads_with_same_predictions(make_cfg, use_lora):
    result = train(make_cfg(use_lora=use_lora, max_steps=2))
    expected = _predict(result.policy)
    reloaded = load_policy(result.last_checkpoint)
    got = _predict(reloaded)
    if use_lora:  # merged weights W + s*B@A round differently from the unmerged forward
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, expected)
    # the training-time (unmerged) policy of the checkpoint reproduces the predictions exactly
    np.testing.assert_array_equal(_predict(policy_setup.load_training_checkpoint_policy(result.last_checkpoint)),
                                  expected)


def test_merge_script_on_adapter_only_checkpoint(make_cfg, tmp_path):
    import importlib.util

    result = train(make_cfg(max_steps=2, merge_lora_during_training=False))
    chkpt = result.last_checkpoint
    assert not (chkpt / "model.safetensors").exists()
    assert (chkpt / "lora_adapter" / "adapter_model.safetensors").is_file()
    spec = importlib.util.spec_from_file_location(
        "merge_script", Path(__file__).resolve().parents[2] / "vla-scripts" / "merge_lora_weights_and_save.py")
    merge_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_script)
    out = merge_script.merge_lora_checkpoint(chkpt, tmp_path / "merged")
    merged = load_policy(out)
    np.testing.assert_allclose(_predict(merged), _predict(result.policy), rtol=1e-4, atol=1e-5)
    # the merged linear weights are W + (alpha / r) * B @ A, checked against the adapter tensors by hand
    state = load_file(str(chkpt / "lora_adapter" / "trainable_state.safetensors"))
    key = next(k for k in state if k.endswith("lora_A.default.weight") and "language_model" in k)
    prefix = key[: -len(".lora_A.default.weight")]
    module_name = prefix.split("base_model.model.", 1)[1]
    a, b = state[key], state[f"{prefix}.lora_B.default.weight"]
    base = policy_setup.build_base_policy(json.loads((chkpt / "lora_adapter" / "lora_base.json").read_text())["base"])
    w0 = dict(base.vla.named_parameters())[f"{module_name}.weight"].detach()
    w = dict(merged.vla.named_parameters())[f"{module_name}.weight"].detach()
    torch.testing.assert_close(w, w0 + (2 * 4 / 4) * (b @ a), rtol=1e-5, atol=1e-6)


def test_bad_flags_fail_before_anything_is_written(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="--batch_size must be > 0"):
        train(make_cfg(batch_size=0))
    with pytest.raises(ConfigError, match="--use_l1_regression False is not supported"):
        train(make_cfg(use_l1_regression=False))
    with pytest.raises(ConfigError, match="--resume True needs --config_file_path"):
        train(make_cfg(resume=True))
    assert not (tmp_path / "runs").exists()


def test_interrupted_save_never_looks_complete(make_cfg, tmp_path, monkeypatch):
    original = ckpt.save_training_state

    def dying_save(path, state):
        original(path, state)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt, "save_training_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(max_steps=1))
    runs = tmp_path / "runs"
    assert ckpt.list_checkpoints(runs, "test") == []
    assert not ckpt.checkpoint_dir(runs, "test", 1).exists()
    assert sorted(p.name for p in runs.iterdir()) == ["test"]  # no stray temp folder either


def test_sigterm_saves_and_returns(make_cfg):
    def send_sigterm(step, _metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result = train(make_cfg(max_steps=50, save_freq=1000), TrainHooks(on_step_end=send_sigterm))
    assert result.stopped_by_signal and result.final_step == 2
    assert result.last_checkpoint == ckpt.checkpoint_dir(result.run_dir.parent, "test", 2)
    assert ckpt.is_complete_checkpoint(result.last_checkpoint)
    assert ckpt.load_training_state(result.last_checkpoint)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored


def test_nonfinite_steps_are_skipped_then_stop(make_cfg, monkeypatch):
    original = train_step_module.action_l1_losses
    calls = {"n": 0}

    def sometimes_nan(pred, target):
        calls["n"] += 1
        loss, curr, nxt = original(pred, target)
        if calls["n"] == 2:  # step 2 only
            return loss * float("nan"), curr, nxt
        return loss, curr, nxt

    monkeypatch.setattr(train_step_module, "action_l1_losses", sometimes_nan)
    result = train(make_cfg(max_steps=3, use_lora=False))
    skipped = [h["VLA Train/Non-finite Steps"] for h in result.history]
    assert skipped == [0, 1, 1]
    assert np.isnan(result.history[1][LOSS]) and np.isfinite(result.history[2][LOSS])
    # the skipped step changed nothing: no Adam moments were updated on it (step counter == 2 applied updates)
    state = ckpt.load_training_state(result.last_checkpoint)
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())
    assert state["nonfinite"] == {"consecutive": 0, "total": 1}

    monkeypatch.setattr(train_step_module, "action_l1_losses",
                        lambda p, t: tuple(x * float("nan") for x in original(p, t)))
    with pytest.raises(NonFiniteLossError, match="2 consecutive optimizer steps had a non-finite loss"):
        train(make_cfg(max_steps=5, max_consecutive_nonfinite=2, run_id="nan"))


def test_validation_metrics(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=2, use_val_set=True, val_freq=2)
    result = train(cfg)
    assert "VLA Val/Loss" not in result.history[0]
    # independent computation: every held-out frame through the final policy, L1 averaged with numpy
    env = init_distributed()
    data = build_training_data(cfg, result.policy, env, run_dir=tmp_path / "val")
    policy = result.policy.eval()
    errors = []
    with torch.no_grad():
        for i in range(data.val_set.num_frames):
            batch = VLACollator(data.val_set.pad_token_id)([data.val_set.get_frame(i)])
            pred = policy(batch).actions.numpy()
            errors.append(np.abs(pred - batch["actions"].numpy()))
    errors = np.concatenate(errors)
    assert result.history[1]["VLA Val/Loss"] == pytest.approx(float(errors.mean()), rel=1e-5)
    assert result.history[1]["VLA Val/Curr Action L1 Loss"] == pytest.approx(float(errors[:, 0].mean()), rel=1e-5)


def test_latest_only_checkpoints_and_eval_crop(make_cfg, tmp_path):
    result = train(make_cfg(max_steps=3, save_freq=1, save_latest_checkpoint_only=True, image_aug=True))
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path / "runs", "test")] == [3]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["test", "test--3_chkpt"]
    # trained with crop augmentation -> the saved processor applies the eval center crop
    assert load_policy(result.last_checkpoint).processor.center_crop is True


def test_freeze_vision_backbone_and_resume(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=2, save_freq=1, freeze_vision_backbone=True)
    initial = {n: p.detach().clone() for n, p in policy_setup.build_policy(cfg, init_distributed()).named_parameters()}
    result = train(cfg)
    after = dict(result.policy.named_parameters())
    vision = [n for n in after if "vision_backbone." in n]
    assert vision and all(not after[n].requires_grad for n in vision)
    assert all(torch.equal(after[n].detach(), initial[n]) for n in vision)
    assert any(not torch.equal(after[n].detach(), initial[n]) for n in after if "lora_" in n)
    first = ckpt.checkpoint_dir(tmp_path / "runs", "test", 1)
    resumed = train(make_cfg(max_steps=2, save_freq=1, freeze_vision_backbone=True, run_root_dir=tmp_path / "b",
                             resume=True, config_file_path=first, resume_step=1))
    assert resumed.history[0][LOSS] == result.history[1][LOSS]
