"""Start-up validation of the fine-tuning flags: every bad flag is named in the error."""

from __future__ import annotations

from pathlib import Path

import draccus
import pytest

from prismatic.training.finetune_config import (
    ConfigError,
    FinetuneConfig,
    global_batch_size,
    make_run_id,
    parse_checkpoint_dir,
    validate_config,
)

DATASET = "synthetic_libero_no_noops"  # written by the tiny_data_root fixture (conftest.py)


@pytest.fixture()
def data_root(tiny_data_root: Path) -> Path:
    return tiny_data_root


def _cfg(data_root: Path, **kw) -> FinetuneConfig:
    return FinetuneConfig(data_root_dir=data_root, **{"model_preset": "tiny", "dataset_name": DATASET, **kw})


def test_valid_config_passes(data_root):
    assert validate_config(_cfg(data_root)) == []


@pytest.mark.parametrize("kw, needle", [
    ({"batch_size": 0}, "--batch_size must be > 0, got 0"),
    ({"grad_accumulation_steps": -1}, "--grad_accumulation_steps"),
    ({"learning_rate": float("nan")}, "--learning_rate"),
    ({"max_steps": 0}, "--max_steps"),
    ({"lr_warmup_steps": -3}, "--lr_warmup_steps must be >= 0"),
    ({"model_preset": "huge"}, "--model_preset must be one of ('real', 'tiny'), got 'huge'"),
    ({"wandb_mode": "cloud"}, "--wandb_mode"),
    ({"use_l1_regression": False}, "--use_l1_regression False is not supported"),
    ({"lora_dropout": 1.0}, "--lora_dropout"),
    ({"num_demos_per_task": 0}, "--num_demos_per_task"),
    ({"vlm_path": Path("/nonexistent/vlm")}, "--vlm_path '/nonexistent/vlm' does not exist"),
    ({"dataset_name": "libero_goal_no_noops"}, "--dataset_name 'libero_goal_no_noops' under --data_root_dir"),
    ({"dataset_name": "a:0.5,a:0.5"}, "must be unique"),
    ({"resume": True}, "--resume True needs --config_file_path"),
    ({"use_craft": True, "craft_anchor_source": "offline"}, "--craft_anchor_source offline needs --craft_cache_dir"),
    ({"use_craft": True, "craft_anchor_type": "mean"}, "--craft_anchor_type"),
    ({"use_craft": True, "craft_fixed_lambda": 0.5}, "--craft_fixed_lambda is set but --craft_enable_dual is True"),
    ({"use_craft": True, "craft_delta": 0.0}, "--craft_delta must be > 0"),
    ({"use_craft": True, "craft_dual_mode": "pi"}, "--craft_dual_mode must be one of ('gradient', 'pid', 'nupi')"),
    ({"use_craft": True, "craft_dual_kp": 1.0}, "--craft_dual_kp needs --craft_dual_mode pid or nupi"),
    ({"use_craft": True, "craft_dual_mode": "nupi", "craft_dual_kd": 1.0}, "nupi has no derivative term"),
    ({"use_craft": True, "craft_dual_mode": "nupi", "craft_dual_nu": 1.0}, "--craft_dual_nu must be in [0, 1)"),
    ({"use_craft": True, "craft_dual_mode": "nupi", "craft_dual_nu": -0.1}, "--craft_dual_nu must be in [0, 1)"),
    ({"use_craft": True, "craft_dual_nu": 0.5}, "--craft_dual_nu needs --craft_dual_mode nupi"),
    ({"use_craft": True, "craft_dual_setpoint": 0.0}, "--craft_dual_setpoint must be in (0, 1]"),
    ({"use_craft": True, "craft_dual_setpoint": 1.2}, "--craft_dual_setpoint must be in (0, 1]"),
    ({"use_craft": True, "craft_dual_log_error": True, "craft_dual_normalize": True}, "two error signals"),
    ({"use_craft": True, "craft_dual_log_error": True, "craft_retention_budget": 0.0},
     "--craft_dual_log_error True divides by epsilon"),
    ({"use_craft": True, "craft_dual_mode": "pid", "craft_dual_kd": -1.0}, "--craft_dual_kd must be a finite"),
    ({"use_craft": True, "craft_dual_normalize": True, "craft_retention_budget": 0.0}, "divides by epsilon"),
    ({"use_craft": True, "craft_max_lambda": 0.0}, "--craft_max_lambda must be a finite number > 0"),
])
def test_bad_flags_fail_with_named_message(data_root, kw, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(data_root, **kw))
    assert needle in str(err.value)


def test_missing_data_root(tmp_path):
    with pytest.raises(ConfigError, match="--data_root_dir .* does not exist"):
        validate_config(FinetuneConfig(data_root_dir=tmp_path / "nope"))


def test_all_problems_listed_at_once(data_root):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(data_root, batch_size=0, max_steps=0, model_preset="x"))
    assert str(err.value).count("\n  - ") == 3


def test_resume_checks_checkpoint(data_root, tmp_path):
    chkpt = tmp_path / "runs" / "myrun--20_chkpt"
    chkpt.mkdir(parents=True)
    with pytest.raises(ConfigError, match="no COMPLETE marker"):
        validate_config(_cfg(data_root, resume=True, config_file_path=chkpt, resume_step=20))
    (chkpt / "COMPLETE").write_text("{}")
    (chkpt / "training_state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="--resume_step 10 does not match"):
        validate_config(_cfg(data_root, resume=True, config_file_path=chkpt, resume_step=10))
    with pytest.raises(ConfigError, match="needs --resume_step"):
        validate_config(_cfg(data_root, resume=True, config_file_path=chkpt))
    with pytest.raises(ConfigError, match=">= --max_steps"):
        validate_config(_cfg(data_root, resume=True, config_file_path=chkpt, resume_step=20, max_steps=20))
    assert validate_config(_cfg(data_root, resume=True, config_file_path=chkpt, resume_step=20, max_steps=40)) == []
    bad_name = tmp_path / "runs" / "not_a_checkpoint"
    bad_name.mkdir()
    with pytest.raises(ConfigError, match="expected a name like"):
        validate_config(_cfg(data_root, resume=True, config_file_path=bad_name, resume_step=20))


def test_offline_anchors_with_augmentation_warns(data_root, tmp_path):
    warnings = validate_config(_cfg(data_root, use_craft=True, craft_anchor_source="offline",
                                    craft_cache_dir=tmp_path, image_aug=True))
    assert any("un-augmented view" in w for w in warnings)


def test_draccus_cli_and_yaml_round_trip(tmp_path):
    cfg = draccus.parse(FinetuneConfig, args=["--batch_size", "3", "--use_craft", "True", "--craft_retention_budget",
                                              "0.2", "--vlm_path", str(tmp_path), "--resume_step", "7"])
    assert (cfg.batch_size, cfg.use_craft, cfg.craft_retention_budget, cfg.resume_step) == (3, True, 0.2, 7)
    assert cfg.vlm_path == tmp_path and cfg.craft_fixed_lambda is None
    with open(tmp_path / "c.yaml", "w") as f:
        draccus.dump(cfg, f)
    again = draccus.parse(FinetuneConfig, config_path=str(tmp_path / "c.yaml"), args=["--seed", "3"])
    assert again.seed == 3 and again.batch_size == 3 and again.vlm_path == tmp_path and again.use_craft


def test_run_id_and_checkpoint_names():
    cfg = FinetuneConfig(batch_size=4, grad_accumulation_steps=2, learning_rate=5e-4, lora_rank=32, run_id_note="x")
    assert global_batch_size(cfg, 2) == 16
    expected = "scratch-real+libero_spatial_no_noops+b16+lr-0.0005+seed-7+lora-r32+dropout-0.0--image_aug--x"
    assert make_run_id(cfg, 2) == expected
    assert parse_checkpoint_dir(Path("/r/a+b--c--120_chkpt")) == ("a+b--c", 120)
    with pytest.raises(ValueError):
        parse_checkpoint_dir(Path("/r/.a--120_chkpt.tmp-5"))


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        draccus.parse(FinetuneConfig, args=["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name in FinetuneConfig.__dataclass_fields__:
        assert f"--{name}" in text, name
