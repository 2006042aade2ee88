"""Evaluation device / dtype / center crop defaults, and the checkpoint identity recorded in summary.json."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from libero_fakes import FakeEnv, SpyPolicy, needs_libero

from LIBERO.libero_env import EpisodeRunner
from LIBERO.run_libero_eval import default_wandb_group, resolve_center_crop, resolve_device, resolve_dtype
from prismatic.cli_errors import UserError
from prismatic.training.checkpoint_identity import checkpoint_identity, checkpoint_step, same_weights, weights_sha256


def test_device_and_dtype_defaults():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda but CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="is not a device"):
        resolve_device("gpu")
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(UserError, match="--dtype 'half'"):
        resolve_dtype("half", "cpu")


def test_center_crop_follows_the_checkpoint_and_refuses_contradictions():
    class P:
        class processor:  # noqa: N801
            center_crop = True

    assert resolve_center_crop(None, P) is True and resolve_center_crop(True, P) is True
    with pytest.raises(UserError, match="--center_crop False contradicts the checkpoint"):
        resolve_center_crop(False, P)
    assert resolve_center_crop(None, object()) is None  # no recorded setting: the policy's own default applies
    assert resolve_center_crop(False, object()) is False


def _reference_hash(folder) -> str:
    """Independent statement of the documented definition."""
    names = sorted(p.name for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".pt", ".bin", ".pth") and p.name != "training_state.pt")
    lines = "".join(f"{n} {hashlib.sha256((folder / n).read_bytes()).hexdigest()}\n" for n in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def test_checkpoint_identity(tmp_path):
    ckpt = tmp_path / "run-x--1200_chkpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights" * 100)
    (ckpt / "action_head--1200_checkpoint.pt").write_bytes(b"head")
    (ckpt / "config.json").write_text("{}")
    identity = checkpoint_identity(ckpt)
    assert identity == {"path": str(ckpt.resolve()), "step": 1200, "weights_sha256": _reference_hash(ckpt),
                        "weight_files": ["action_head--1200_checkpoint.pt", "model.safetensors"]}
    (ckpt / "config.json").write_text('{"changed": 1}')  # not a weight file
    (ckpt / "training_state.pt").write_bytes(b"optimizer")  # neither
    assert same_weights(identity, ckpt)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[3] ^= 1
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    assert not same_weights(identity, ckpt) and weights_sha256(ckpt) == _reference_hash(ckpt)
    upstream = tmp_path / "LIBERO-Spatial-Pro"  # released folders: the step comes from the head file
    upstream.mkdir()
    (upstream / "action_head--150000_checkpoint.pt").write_bytes(b"h")
    assert checkpoint_step(upstream) == 150000
    (upstream / "action_head--latest_checkpoint.pt").write_bytes(b"h")
    assert checkpoint_step(tmp_path / "LIBERO-Spatial-Pro") == 150000
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no weight files"):
        weights_sha256(empty)


def test_default_wandb_group_is_the_run_id():
    from LIBERO.run_libero_eval import EvalConfig

    assert default_wandb_group(EvalConfig(pretrained_checkpoint="runs/spatial--craft--s7--20000_chkpt")) \
        == "spatial--craft--s7"
    assert default_wandb_group(EvalConfig(pretrained_checkpoint="ckpts/LIBERO-Spatial-Pro")) == "LIBERO-Spatial-Pro"


@pytest.mark.libero
@needs_libero
def test_checkpoint_eval_loads_dtype_uses_recorded_crop_and_records_identity(tmp_path, monkeypatch,
                                                                             tiny_policy_factory):
    import LIBERO.run_libero_eval as run_mod
    from LIBERO.run_libero_eval import EvalConfig, run_evaluation

    ckpt = tmp_path / "tiny--7_chkpt"
    policy = tiny_policy_factory(0)
    policy.processor.center_crop = True  # as a model trained with crop augmentation records it
    policy.save_pretrained(ckpt, step=7)
    loaded = []
    real_loader = run_mod.load_policy_checkpoint

    def spy_loader(path, device, dtype):
        loaded.append((device, dtype))
        spy = SpyPolicy(real_loader(path, device=device, dtype=dtype))
        loaded.append(spy)
        return spy

    monkeypatch.setattr(run_mod, "load_policy_checkpoint", spy_loader)

    def factory(settings):
        return EpisodeRunner(settings, env_factory=lambda t, s: FakeEnv(seed=s.env_seed),
                             init_states_loader=lambda t: np.zeros((50, 1)))

    cfg = EvalConfig(pretrained_checkpoint=str(ckpt), task_suite_name="libero_spatial", task_ids=[0],
                     num_trials_per_task=1, max_steps_override=8, num_settle_steps=0, num_envs=0,
                     dtype="bfloat16", local_log_dir=str(tmp_path / "eval"), progress=False)
    summary = run_evaluation(cfg, runner_factory=factory)
    (device, dtype), spy = loaded
    assert device == resolve_device("auto") and dtype == torch.bfloat16
    assert {p.dtype for p in spy.policy.parameters()} == {torch.bfloat16}
    assert [c["center_crop"] for c in spy.calls] == [True]  # the checkpoint's recorded setting
    assert summary["num_errors"] == 0 and summary["dtype"] == "bfloat16" and summary["center_crop"] is True
    on_disk = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert on_disk["checkpoint"]["path"] == str(ckpt.resolve()) and on_disk["checkpoint"]["step"] == 7
    assert on_disk["checkpoint"]["weights_sha256"] == _reference_hash(ckpt)

    # A retrained checkpoint at the same path: its evaluation is stale, resuming into the old folder is refused.
    retrained = tiny_policy_factory(1)
    retrained.processor.center_crop = True
    retrained.save_pretrained(ckpt, step=7)
    assert not same_weights(on_disk["checkpoint"], ckpt)
    with pytest.raises(UserError, match="weights_sha256"):
        run_evaluation(cfg, runner_factory=factory)
