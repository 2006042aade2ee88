"""metrics.jsonl: one record per logged step, non-finite values kept readable, truncation on resume."""

from __future__ import annotations

import json

from prismatic.training.metrics_log import MetricsLogger, read_metrics


def _logger(tmp_path, resume_step=None, enabled=True):
    return MetricsLogger(tmp_path, "run", {}, enabled=enabled, wandb_mode="disabled", wandb_project="p",
                         wandb_entity=None, resume_step=resume_step)


def test_records_truncation_and_nonfinite(tmp_path):
    log = _logger(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"VLA Train/Loss": 0.5 / step, "VLA Train/Gradient Norm": float("nan") if step == 2 else 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert json.loads(lines[1])["VLA Train/Gradient Norm"] == "nan"
    assert json.loads(lines[2])["VLA Train/Loss"] == 0.5 / 3
    _logger(tmp_path, resume_step=2).log(3, {"VLA Train/Loss": 9.0})  # resumed at 2: the old step 3 is replaced
    assert [(r["step"], r["VLA Train/Loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 0.5), (2, 0.25), (3, 9.0)]
    _logger(tmp_path, resume_step=0)  # a fresh run under the same id starts an empty file
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_disabled_rank_writes_nothing(tmp_path):
    _logger(tmp_path / "r1", enabled=False).log(1, {"VLA Train/Loss": 1.0})
    assert not (tmp_path / "r1").exists()
