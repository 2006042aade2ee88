"""--retention_monitor: CRaFT's L_ret against θ0 without gradient, any method (training/retention_monitor.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import seed_everything, train
from prismatic.training import checkpointing as ckpt
from prismatic.training import policy_setup
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import init_distributed
from prismatic.training.finetune_config import ConfigError, validate_config
from prismatic.training.metrics_log import read_metrics
from prismatic.training.retention_monitor import MONITOR_KEY_UNDER_CRAFT, RETENTION_KEY

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "vla-scripts"))


def _pooled_numpy(policy, batch, raw_layer: int, aq_layer: int) -> np.ndarray:
    """Hand path: hidden_states of a plain forward (no hooks), masked means in numpy float64."""
    with torch.no_grad():
        out = policy.vla(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"])
    parts = []
    for layer, mask in ((raw_layer, out.layout.vision_mask), (aq_layer, out.layout.query_mask)):
        h = out.hidden_states[layer].double().numpy()
        m = mask.numpy().astype(np.float64)[..., None]
        parts.append((h * m).sum(axis=1) / m.sum(axis=1))
    return np.concatenate(parts, axis=-1)


def test_monitor_equals_craft_logged_retention_loss(make_cfg):
    """CRaFT (online anchors) with the monitor every step: the monitor's independent no-grad path gives the L_ret
    CRaFT logged for the same step, batch and weights."""
    result = train(make_cfg(use_craft=True, max_steps=3, retention_monitor=True, retention_monitor_freq=1,
                            craft_init_lambda=0.5))
    records = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0][RETENTION_KEY] == pytest.approx(0.0, abs=1e-9)  # step 1 still sees θ0
    for r in records[1:]:
        assert r[RETENTION_KEY] > 1e-8
        assert r[MONITOR_KEY_UNDER_CRAFT] == pytest.approx(r[RETENTION_KEY], rel=1e-4)


def test_monitor_value_is_mean_over_batch_of_sum_of_squares_and_training_is_unchanged(make_cfg, tmp_path):
    """Plain SFT: monitor at steps 2 and 3 (freq 2 + the last step). Step 3's value == numpy on θ0 vs the weights
    after 2 steps, on step 3's batch; parameters after training are bit-identical with the monitor off."""
    on = train(make_cfg(max_steps=3, retention_monitor=True, retention_monitor_freq=2, run_root_dir=tmp_path / "on"))
    off = train(make_cfg(max_steps=3, retention_monitor=False, run_root_dir=tmp_path / "off"))
    a, b = policy_setup.trainable_state(on.policy), policy_setup.trainable_state(off.policy)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = read_metrics(on.run_dir / "metrics.jsonl")
    assert [RETENTION_KEY in r for r in records] == [False, True, True]
    assert not any(RETENTION_KEY in r for r in read_metrics(off.run_dir / "metrics.jsonl"))
    assert [r["VLA Train/Loss"] for r in records] == [r["VLA Train/Loss"] for r in off.history]

    before_step3 = train(make_cfg(max_steps=2, run_root_dir=tmp_path / "two"))
    cfg = make_cfg(max_steps=3, run_root_dir=tmp_path / "ref")
    validate_config(cfg)
    env = init_distributed()
    seed_everything(cfg.seed)
    theta0 = policy_setup.build_policy(cfg, env)
    data = build_training_data(cfg, theta0, env, run_dir=tmp_path / "ref" / "x")
    (micro,) = next(data.train_stream(2))  # the micro-batch of step 3
    L = theta0.vla.get_base_model().config.num_llm_layers
    theta0.eval(), before_step3.policy.eval()
    f0 = _pooled_numpy(theta0, micro.batch, L // 2, L)
    f = _pooled_numpy(before_step3.policy, micro.batch, L // 2, L)
    want = float(((f - f0) ** 2).sum(axis=-1).mean())
    assert want > 1e-8
    assert records[2][RETENTION_KEY] == pytest.approx(want, rel=1e-4)


def test_monitor_state_travels_with_the_checkpoint_and_resume_continues_the_curve(make_cfg, tmp_path):
    common = dict(max_steps=4, save_freq=2, retention_monitor=True, retention_monitor_freq=1)
    full = train(make_cfg(run_root_dir=tmp_path / "a", **common))
    first = ckpt.checkpoint_dir(tmp_path / "a", "test", 2)
    assert set(ckpt.load_training_state(first)["retention_monitor"]["theta0"]) == {"action_queries.weight"}
    resumed = train(make_cfg(run_root_dir=tmp_path / "b", resume=True, config_file_path=first, resume_step=2,
                             **common))
    assert [h[RETENTION_KEY] for h in resumed.history] == pytest.approx([h[RETENTION_KEY] for h in full.history[2:]],
                                                                        rel=1e-6)


def test_monitor_freq_must_be_positive(make_cfg):
    with pytest.raises(ConfigError, match="retention_monitor_freq"):
        validate_config(make_cfg(retention_monitor=True, retention_monitor_freq=0))
    validate_config(make_cfg(retention_monitor=False, retention_monitor_freq=0))  # unused when off
