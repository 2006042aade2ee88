"""--craft_adam_second_moment {combined, action} in `train(cfg)` (tiny preset, synthetic LIBERO): validation, that v
sees only the action part, resume through training_state.pt, and the default path (torch's AdamW)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from finetune import train
from prismatic.cli_errors import UserError
from prismatic.training import checkpointing as ckpt
from prismatic.training.finetune_config import ConfigError, validate_config
from prismatic.training.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "vla-scripts"))

RET, LAM = "CRaFT/Retention Loss", "CRaFT/Lambda"


def _optimizer_state(root: Path, step: int) -> dict:
    return ckpt.load_training_state(ckpt.checkpoint_dir(root, "test", step))["optimizer"]


def test_flag_is_validated_in_one_line(make_cfg):
    with pytest.raises(ConfigError, match=r"--craft_adam_second_moment action needs --use_craft True"):
        validate_config(make_cfg(craft_adam_second_moment="action"))
    with pytest.raises(ConfigError, match=r"--craft_adam_second_moment must be one of \('combined', 'action'\), "
                                          r"got 'both'"):
        validate_config(make_cfg(use_craft=True, craft_adam_second_moment="both"))
    validate_config(make_cfg(use_craft=True, craft_adam_second_moment="action"))


def test_v_sees_only_the_action_part(make_cfg, tmp_path):
    """Fixed λ, 2 steps. Step 1 runs at θ0 (LoRA B = 0: L_ret = 0, g_ret = 0), so every run reaches step 2 with the
    same weights and the same g_act, g_ret there. Then: m of `action` at λ = 0.5 equals m of `combined` at λ = 0.5
    (both take the combined gradient), and v of `action` at λ = 0.5 equals v of the λ = 0 run (the action part
    g_act - c g_ret does not depend on λ), while `combined`'s v at λ = 0.5 is larger (λ g_ret inflates it)."""
    common = dict(use_craft=True, craft_enable_dual=False, max_steps=2, save_freq=2, craft_retention_budget=1e-3)
    runs = {"action": ("action", 0.5), "combined": ("combined", 0.5), "zero": ("combined", 0.0)}
    states = {}
    for name, (mode, lam) in runs.items():
        result = train(make_cfg(run_root_dir=tmp_path / name, craft_adam_second_moment=mode, craft_fixed_lambda=lam,
                                **common))
        assert [h[LAM] for h in result.history] == [lam, lam]
        states[name] = _optimizer_state(tmp_path / name, 2)["state"]
    rets = [r[RET] for r in read_metrics(tmp_path / "action" / "test" / "metrics.jsonl")]
    assert rets[0] == 0.0 and rets[1] > 0.0  # g_ret is 0 at step 1, not at step 2
    inflated = 0
    for index, action in states["action"].items():
        combined, zero = states["combined"][index], states["zero"][index]
        assert float(action["step"]) == 2.0
        torch.testing.assert_close(action["exp_avg"], combined["exp_avg"], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(action["exp_avg_sq"], zero["exp_avg_sq"], rtol=1e-5, atol=1e-18)
        inflated += int((combined["exp_avg_sq"] > 1.5 * zero["exp_avg_sq"] + 1e-20).any())
    assert inflated > 0  # the test can fail: λ g_ret does reach v under `combined`


def test_resume_is_exact_through_training_state_and_the_flag_defines_the_run(make_cfg, tmp_path):
    n = 2
    common = dict(use_craft=True, max_steps=2 * n, save_freq=n, craft_retention_budget=1e-3, craft_dual_lr=0.5,
                  craft_max_lambda=0.2, craft_adam_second_moment="action")
    full = train(make_cfg(run_root_dir=tmp_path / "a", **common))
    assert max(h[LAM] for h in full.history) > 0  # λ g_ret enters the last steps
    first = ckpt.checkpoint_dir(tmp_path / "a", "test", n)
    resumed = train(make_cfg(run_root_dir=tmp_path / "b", resume=True, config_file_path=first, resume_step=n,
                             **common))
    assert [h[LAM] for h in resumed.history] == [h[LAM] for h in full.history[n:]]
    assert [h[RET] for h in resumed.history] == [h[RET] for h in full.history[n:]]
    state_a, state_b = _optimizer_state(tmp_path / "a", 2 * n), _optimizer_state(tmp_path / "b", 2 * n)
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, a in state_a["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[key], state_b["state"][index][key]), (index, key)
    # a resume must not switch the optimizer: the run folder refuses it, naming both values
    plain = dict(common, craft_adam_second_moment="combined")
    train(make_cfg(run_root_dir=tmp_path / "c", **plain))
    with pytest.raises(UserError, match=r"--craft_adam_second_moment 'action' \(run: 'combined'\)"):
        train(make_cfg(run_root_dir=tmp_path / "c", resume=True, resume_step=n,
                       config_file_path=ckpt.checkpoint_dir(tmp_path / "c", "test", n), **common))


def test_default_runs_torch_adamw(make_cfg, monkeypatch, tmp_path):
    """The default (`combined`) builds torch.optim.AdamW itself; `action` builds SplitMomentAdamW."""
    built = []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, *args, **kwargs):
            built.append(type(self))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    train(make_cfg(run_root_dir=tmp_path / "a", use_craft=True, max_steps=1))
    assert built == [Recording]
    from prismatic.training.split_moment_adamw import SplitMomentAdamW

    seen = []
    monkeypatch.setattr(SplitMomentAdamW, "set_second_moment_grads",
                        lambda self, grads: seen.append(len(grads)) or self.__dict__.update(
                            _second_moment_grads={id(p): g for p, g in grads.items()}))
    train(make_cfg(run_root_dir=tmp_path / "b", use_craft=True, max_steps=1, craft_adam_second_moment="action"))
    assert built == [Recording] and seen and seen[0] > 0
