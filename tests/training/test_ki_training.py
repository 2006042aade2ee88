"""--retention_method ki through train(): the logged token loss against numpy, w = 0 keeps the VLA at θ0 (and the
retention monitor then reads exactly 0), refusals in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_craft_loop import _setup

from finetune import train
from prismatic.cli_errors import UserError
from prismatic.models.image_transform import batch_pixel_values
from prismatic.models.modeling_vla import merged_vla_state_dict, unwrap_vla
from prismatic.training import checkpointing as ckpt
from prismatic.training.finetune_config import ConfigError, make_run_id, validate_config
from prismatic.training.retention_monitor import RETENTION_KEY

REPO = Path(__file__).resolve().parents[2]
CE, ACC = "KI/Token CE", "KI/Token Accuracy"


def _numpy_token_loss(policy, batch) -> tuple[float, float]:
    """CE / accuracy of step 1 from the last hidden state, positions counted by hand, the tied embedding as LM head
    and numpy's log-sum-exp; targets binned with np.digitize."""
    vla = unwrap_vla(policy.vla)
    vocab = int(policy.processor.tokenizer.vocab_size)
    actions = batch["actions"].double().numpy()
    bins = np.digitize(np.clip(actions, -1, 1), np.linspace(-1, 1, 257)[1:-1])
    targets = (vocab - 1 - bins).reshape(len(actions), -1)
    with torch.no_grad():
        out = policy.vla(pixel_values=batch_pixel_values(batch, torch.device("cpu")), input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"], action_token_ids=torch.from_numpy(targets))
    hidden = out.hidden_states[-1].double().numpy()
    weight = vla.get_input_embeddings().weight.detach().double().numpy()
    patches, queries, n_tokens = vla.num_patches_per_image, vla.config.num_action_queries, targets.shape[1]
    ces, hits = [], []
    for b, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        stop = patches + length + queries  # [tok0][P patches][tokens 1..n-1][Q queries][stop][actions]
        logits = hidden[b, stop:stop + n_tokens] @ weight.T
        top = logits.max(1, keepdims=True)
        log_z = (top + np.log(np.exp(logits - top).sum(1, keepdims=True)))[:, 0]
        ces.extend(log_z - logits[np.arange(n_tokens), targets[b]])
        hits.extend(logits.argmax(1) == targets[b])
    return float(np.mean(ces)), float(np.mean(hits))


def test_logged_token_loss_equals_numpy_and_the_run_id_names_the_weight(make_cfg):
    cfg = make_cfg(retention_method="ki", ki_action_loss_weight=0.5, max_steps=1, batch_size=2, run_id=None)
    result = train(cfg)
    rec = result.history[0]
    assert "+ki-w0.5" in result.run_id
    env, policy, _, stream = _setup(make_cfg(retention_method="ki", run_id="ref"), "ref")
    micro = next(stream)[0]
    batch = micro.batch
    ce, accuracy = _numpy_token_loss(policy, batch)
    with torch.no_grad():  # the head's loss is the one of the plain (inference) forward: same features
        plain = policy.train()(batch, noise=micro.noise)
    l1 = (plain.actions.double() - batch["actions"].double()).abs().mean()
    assert rec["VLA Train/Loss"] == pytest.approx(float(l1), rel=1e-5)
    assert rec[CE] == pytest.approx(ce, rel=1e-5)
    assert rec[ACC] == pytest.approx(accuracy, abs=1e-9)
    assert rec["KI/Total Loss"] == pytest.approx(rec["VLA Train/Loss"] + 0.5 * ce, rel=1e-5)
    vocab = int(policy.processor.tokenizer.vocab_size)
    assert 0.5 * np.log(vocab) < ce < 2 * np.log(vocab)  # ~log(vocab) at θ0: a real CE over the whole vocabulary
    state = ckpt.load_training_state(result.last_checkpoint)
    assert state["related"] == {"method": "ki", "weight": 0.5, "vocab_size": vocab}


def test_weight_zero_keeps_the_vla_at_theta0(make_cfg):
    """Full fine-tuning (every VLA weight trainable, AdamW weight decay on): after 3 steps at w = 0 the VLA equals
    θ0 bit for bit, the head moved, and the retention monitor reads exactly 0; at w = 1 the VLA moves."""
    common = dict(retention_method="ki", use_lora=False, max_steps=3, retention_monitor=True,
                  retention_monitor_freq=1)
    frozen = train(make_cfg(ki_action_loss_weight=0.0, run_id="w0", **common))
    _, theta0, _, _ = _setup(make_cfg(run_id="theta0", **common), "theta0")
    before, after = merged_vla_state_dict(theta0.vla), merged_vla_state_dict(frozen.policy.vla)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    head_moved = max(float((a - b).abs().max()) for a, b in zip(frozen.policy.action_head.state_dict().values(),
                                                                 theta0.action_head.state_dict().values(),
                                                                 strict=True))
    assert head_moved > 1e-4
    assert [h[RETENTION_KEY] for h in frozen.history] == [0.0, 0.0, 0.0]
    moving = train(make_cfg(ki_action_loss_weight=1.0, run_id="w1", **common))
    assert max(float((a - before[n]).abs().max()) for n, a in merged_vla_state_dict(moving.policy.vla).items()) > 1e-4
    assert moving.history[-1][RETENTION_KEY] > 0


@pytest.mark.parametrize("flags, needle", [
    (dict(use_craft=True, retention_method="ki"), "--use_craft True conflicts with --retention_method ki"),
    (dict(retention_method="ki", ki_action_loss_weight=-1.0), "--ki_action_loss_weight must be a finite number"),
    (dict(retention_method="ki", ki_action_loss_weight=float("nan")), "--ki_action_loss_weight must be a finite"),
    (dict(ki_action_loss_weight=0.0), "has no effect without --retention_method ki"),
])
def test_refusals(make_cfg, flags, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate_config(make_cfg(**flags))


def test_run_ids_of_the_weights_differ(make_cfg):
    ids = {make_run_id(make_cfg(retention_method="ki", ki_action_loss_weight=w, run_id=None), 1) for w in (0, 1)}
    assert len(ids) == 2 and all("+ki-w" in i for i in ids)


def test_cli_refuses_ki_with_craft_in_one_line(tiny_data_root, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "vla-scripts" / "finetune.py"), "--data_root_dir",
                           str(tiny_data_root), "--dataset_name", "synthetic_libero_no_noops", "--run_root_dir",
                           str(tmp_path / "runs"), "--model_preset", "tiny", "--use_craft", "True",
                           "--retention_method", "ki"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "--use_craft True conflicts with --retention_method ki" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_resume_with_another_weight_is_refused(make_cfg, tmp_path):
    common = dict(retention_method="ki", max_steps=3, save_freq=2)
    train(make_cfg(run_root_dir=tmp_path / "a", ki_action_loss_weight=0.5, **common))
    first = ckpt.checkpoint_dir(tmp_path / "a", "test", 2)
    # the run folder defines the weight: refused before anything is built, naming both values
    with pytest.raises(UserError, match=r"--ki_action_loss_weight 0\.3 \(run: 0\.5\)"):
        train(make_cfg(run_root_dir=tmp_path / "a", resume=True, config_file_path=first, resume_step=2,
                       ki_action_loss_weight=0.3, **common))


def test_measure_drift_reports_a_ki_run(make_cfg, tmp_path):
    """measure_drift.py reads a KI checkpoint like any other: w = 0 (full fine-tuning) has drift exactly 0 on every
    layer, w = 1 a positive one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("measure_drift_ki", REPO / "vla-scripts" / "measure_drift.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(script)
    common = dict(retention_method="ki", use_lora=False, max_steps=2, save_freq=2)
    _, theta0, data, _ = _setup(make_cfg(run_id="theta0", **common), "theta0")
    theta0.norm_stats = dict(data.dataset_statistics)
    theta0.save_pretrained(tmp_path / "theta0", step=0)
    reports = {}
    for weight in (0.0, 1.0):
        result = train(make_cfg(ki_action_loss_weight=weight, run_id=f"w{weight:g}", **common))
        cfg = script.DriftConfig(reference_path=tmp_path / "theta0", finetuned_path=result.last_checkpoint,
                                 data_root_dir=make_cfg().data_root_dir, dataset_name=make_cfg().dataset_name,
                                 output_dir=tmp_path / f"drift{weight:g}", num_samples=8, batch_size=4, device="cpu")
        reports[weight] = script.measure_drift(cfg)
    for group in ("raw", "aq"):
        assert reports[0.0]["groups"][group]["retention"] == [0.0] * len(reports[0.0]["layers"])
    assert reports[1.0]["craft_default_anchor"]["L_ret_concat"] > 0


def test_wandb_groups_tell_the_weights_apart():
    from prismatic.training.method_label import method_label
    from prismatic.training.metrics_log import wandb_labels

    assert method_label({"retention_method": "ki", "ki_action_loss_weight": 1.0}) == "ki"
    assert method_label({"retention_method": "ki", "ki_action_loss_weight": 0.0}) == "ki-w0"
    assert method_label({"retention_method": "ki", "ki_action_loss_weight": 0.0, "freeze_vision_backbone": True}) \
        == "ki-w0+freeze"
    groups = {wandb_labels({"retention_method": "ki", "ki_action_loss_weight": w, "dataset_name": "libero_spatial",
                            "run_root_dir": "runs/table1"})["group"] for w in (1.0, 0.0)}
    assert len(groups) == 2
