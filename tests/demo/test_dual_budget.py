"""vla-scripts/dual_budget.py (issue 26): the two budget numbers against a hand count, its one-line refusals, and a
CLI's refusal (the runs themselves are the documented experiment, docs/CRAFT.md "Dual modes")."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    sys.path.insert(0, str(REPO / "vla-scripts"))
    spec = importlib.util.spec_from_file_location("dual_budget_script", REPO / "vla-scripts/dual_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dual_budget_script"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_budget_metrics_equal_a_hand_count():
    db = _load()
    eps = 0.02
    # 20 steps: k = 2. Last 2 steps 0.010, 0.014 -> mean 0.012 = 0.6 eps. After the first 2 steps, 3 of 18 exceed eps
    l_ret = np.array([0.0, 0.5, 0.03, 0.021, 0.02, 0.019] + [0.005] * 11 + [0.025, 0.010, 0.014])
    got = db.budget_metrics(l_ret, eps)
    assert got["last10_over_eps"] == pytest.approx(0.6)
    assert got["share_above_eps"] == pytest.approx(3 / 18)  # 0.03, 0.021, 0.025 (0.02 itself is not above)
    # fewer than 10 steps: the last step alone, the share over the rest
    assert db.budget_metrics(np.array([0.04, 0.01, 0.03]), eps) == pytest.approx(
        {"last10_over_eps": 1.5, "share_above_eps": 0.5})


def test_bad_arguments_fail_in_one_line(tmp_path):
    db = _load()
    from prismatic.cli_errors import UserError

    for call, needle in ((lambda: db.parse_seeds("7,7"), "each once"), (lambda: db.parse_seeds(""), "at least one"),
                         (lambda: db.parse_rules("gradient,pi"), "--rules must be a comma-separated subset of")):
        with pytest.raises(UserError, match=needle):
            call()
    # the CLI: one line, exit 2, nothing written
    proc = subprocess.run([sys.executable, str(REPO / "vla-scripts/dual_budget.py"), "--output_dir",
                           str(tmp_path / "out"), "--seeds", "7,x"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--seeds must be comma-separated integers, got '7,x'" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_rules_map_to_their_flags_and_the_presets_are_valid_flags():
    """Each rule's overrides; the presets the study scripts import are FinetuneConfig flags that pass validation."""
    from dataclasses import fields, replace

    from prismatic.training.dual_presets import NEW_RULE_FLAGS, NUPI_FLAGS
    from prismatic.training.finetune_config import FinetuneConfig, _craft_dual_errors

    db = _load()
    cfg = db.DualBudgetConfig()
    assert db.parse_rules("gradient,nupi,gradient-actv,new,plain") == list(db.RULES)
    assert db.rule_overrides(cfg, "gradient") == {} and db.rule_overrides(cfg, "plain") == {}
    assert db.rule_overrides(cfg, "gradient-actv") == {"craft_adam_second_moment": "action"}
    assert db.rule_overrides(cfg, "new") == NEW_RULE_FLAGS
    assert db.rule_overrides(cfg, "nupi") == NUPI_FLAGS  # the script's defaults are the documented nupi flags
    names = {f.name for f in fields(FinetuneConfig)}
    for preset in (NUPI_FLAGS, NEW_RULE_FLAGS):
        assert set(preset) <= names
        run = replace(FinetuneConfig(use_craft=True, craft_retention_budget=0.02), **preset)
        assert _craft_dual_errors(run) == []
