"""`make study` (vla-scripts/study.py): the reduced study end to end (one seed, the demo's quick steps) checks the
outputs' structure; its numbers are checked against a second path (each run's metrics.jsonl and study_eval.json,
recomputed with numpy), its determinism against a run with another worker count, and its resume by a re-run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "vla-scripts"))

import study  # noqa: E402

from prismatic.training.metrics_log import read_metrics  # noqa: E402


def _rows(n_seeds: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for method, value in (("a", None), ("b", 0.1), ("b", 0.4)):
        for seed in range(n_seeds):
            row = {"method": method, "title": method.upper(), "knob": None if value is None else "k", "value": value,
                   "default": value in (None, 0.1), "seed": seed, "epsilon": 0.02, "diverged": False}
            row.update({key: float(rng.normal()) for key, _, _ in study.METRICS})
            rows.append(row)
    return rows


def test_aggregate_is_mean_and_sample_std_over_seeds_per_setting():
    rows = _rows()
    cells = study.aggregate(rows)
    assert [(c["method"], c["value"], c["n"]) for c in cells] == [("a", None, 3), ("b", 0.1, 3), ("b", 0.4, 3)]
    for cell in cells:
        members = [r for r in rows if (r["method"], r["value"]) == (cell["method"], cell["value"])]
        for key, _, _ in study.METRICS:
            values = [r[key] for r in members]
            assert cell[key] == pytest.approx(sum(values) / 3, rel=1e-12)
            mean = sum(values) / 3
            assert cell[f"{key}_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2), rel=1e-12)


def test_a_diverged_run_is_counted_apart_and_left_out_of_the_means():
    rows = _rows()
    rows[1] = {**rows[1], "diverged": True, **{key: math.nan for key, _, _ in study.METRICS}}
    cell = study.aggregate(rows)[0]
    assert (cell["n"], cell["diverged"], cell["seeds"]) == (2, 1, [0, 2])
    kept = [rows[0], rows[2]]
    for key, _, _ in study.METRICS:
        assert cell[key] == pytest.approx((kept[0][key] + kept[1][key]) / 2, rel=1e-12)
        assert cell[f"{key}_std"] == pytest.approx(abs(kept[0][key] - kept[1][key]) / math.sqrt(2), rel=1e-12)
    line = study.markdown([cell], {}).splitlines()[3]
    assert line.split("|")[3].strip() == "2 (+1 diverged)"


def test_single_seed_cells_print_no_plus_minus_and_every_cell_has_n():
    cells = study.aggregate(_rows(n_seeds=1))
    assert all(c["n"] == 1 and math.isnan(c["probe_task_std"]) for c in cells)
    table = study.markdown(cells, {"heldout_l1_target": 0.3})
    assert "±" not in table
    two = study.markdown(study.aggregate(_rows(n_seeds=2)), {})
    body = [line for line in two.splitlines()[3:]]
    assert all(line.count("±") == len(study.METRICS) for line in body)
    assert all(line.split("|")[3].strip() == "2" for line in body)


@pytest.mark.parametrize("argv, needle", [(["--methods", "plain,bogus"], "--methods must be"),
                                          (["--workers", "0"], "--workers"),
                                          (["--seeds", "7,7"], "--seeds"),
                                          (["--fixed_lambda", "-1"], "--fixed_lambda")])
def test_bad_arguments_are_one_line_exit_2_before_anything_is_written(tmp_path, capsys, argv, needle):
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as exit_info:
        study.cli_main(["--output_dir", str(out)] + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as buffer:
        result = fn(*args)
    return result, buffer.getvalue()


def _numbers(run: dict) -> str:
    """Every number of a run but its speed, as JSON (NaN compares equal to NaN there)."""
    return json.dumps({k: v for k, v in run.items() if k != "seconds_per_step"}, sort_keys=True)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    record, stdout = _quiet(study.main, study.StudyConfig(output_dir=out, quick=True, workers=2))
    return out, record, stdout


@pytest.mark.slow
def test_reduced_study_writes_every_setting_table_and_figure(quick_study):
    out, record, stdout = quick_study
    table = study.methods(study.StudyConfig())
    expected = {(name, None) for name, m in table.items() if m.sweep is None}
    for name, m in table.items():
        if m.sweep is not None:
            expected |= {(name, v) for v in m.sweep[1]}
    cells = record["cells"]
    assert {(c["method"], c["value"]) for c in cells} == expected
    assert all(c["n"] == 1 for c in cells) and len(record["runs"]) == len(expected)
    assert sum(c["default"] for c in cells) == len(table)  # one default row per method
    for name in ("front", "retention_curves", "epsilon_sweep", "lambda_curves"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    md = (out / "results.md").read_text()
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == len(expected) + 2  # header + θ0
    env = record["environment"]
    assert env["torch"] and env["numpy"] and env["threads_per_worker"] == 1 and env["workers"] == 2
    lines = [line for line in stdout.splitlines() if line.startswith("[study] [")]
    assert len(lines) == len(expected) and all("ETA" in line for line in lines)
    assert lines[-1].startswith(f"[study] [{len(expected)}/{len(expected)}]")


@pytest.mark.slow
def test_reduced_study_numbers_follow_from_each_runs_own_files(quick_study):
    out, record, _ = quick_study
    eps = record["epsilon"]
    for run in record["runs"]:
        run_dir = out / "runs" / run["run_id"]
        saved = json.loads((run_dir / study.EVAL_FILE).read_text())
        assert json.dumps({k: run[k] for k in saved}) == json.dumps(saved)  # the record holds what the run measured
        metrics = read_metrics(run_dir / "metrics.jsonl")
        l_ret = np.array([m["CRaFT/Retention Loss"] for m in metrics if "CRaFT/Retention Loss" in m])
        assert len(l_ret) == len(metrics) > 0  # every run logs L_ret every step (CRaFT's own or the monitor's)
        k = max(1, len(l_ret) // 10)
        run_eps = run["epsilon"]
        assert run["last10_over_eps"] == pytest.approx(l_ret[-k:].mean() / run_eps, rel=1e-12)
        assert run["share_above_eps"] == pytest.approx(np.mean(l_ret[k:] > run_eps), abs=0)
        assert run["final_l_ret_over_eps"] == pytest.approx(run["final_l_ret"] / run_eps, rel=1e-12)
        if run["method"] == "craft_new":
            assert run_eps == run["value"]
        else:
            assert run_eps == eps == 0.02  # the demo's ε, also the yardstick of the methods without a budget
        lam = [m["CRaFT/Lambda"] for m in metrics if "CRaFT/Lambda" in m]
        assert (run["max_lambda"] == max(lam)) if lam else math.isnan(run["max_lambda"])
    fixed = [r for r in record["runs"] if r["method"] == "craft_fixed_lambda"]
    assert fixed and all(set(r["curve_lambda"]) == {1.0} for r in fixed)


@pytest.mark.slow
def test_reduced_study_is_deterministic_across_worker_counts_and_resumes(quick_study, tmp_path):
    out, record, _ = quick_study
    chosen = "plain,craft_new"
    again, _ = _quiet(study.main, study.StudyConfig(output_dir=tmp_path / "one", quick=True, workers=1,
                                                    methods=chosen))
    first = {r["run_id"]: r for r in record["runs"]}
    assert again["runs"] and all(_numbers(r) == _numbers(first[r["run_id"]]) for r in again["runs"])
    resumed, stdout = _quiet(study.main, study.StudyConfig(output_dir=tmp_path / "one", quick=True, workers=2,
                                                           methods=chosen))
    assert f"({len(again['runs'])} already done, reused)" in stdout
    assert "[study] [" not in stdout  # nothing retrained
    assert json.dumps(resumed["cells"]) == json.dumps(again["cells"])
