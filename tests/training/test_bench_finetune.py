"""benchmarks/bench_finetune.py: the numbers it reports are consistent with the run it measured."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_finetune.py"


def test_measure_finetune_reports_consistent_numbers(make_cfg):
    spec = importlib.util.spec_from_file_location("bench_finetune", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    numbers = bench.measure_finetune(make_cfg(max_steps=5), warmup=1)
    assert numbers["measured_steps"] == 3  # 5 step ends -> 4 intervals, minus 1 warm-up
    assert 0 < numbers["step_ms_median"] and numbers["step_ms_mean"] * 3 < numbers["total_s"] * 1e3
    assert numbers["peak_memory_mb"] > 50 and numbers["use_craft"] is False
    assert numbers["trainable_params"] > 0
