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
