"""log_parser: aggregation checked against numpy on run directories written here with known numbers; CSV, Markdown
and LaTeX contents; plots that decode and are not blank; bad input reported, never averaged; wandb source."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
import log_parser as lp  # noqa: E402

SEEDS = (7, 42, 123)
MAX_STEPS = 100
LOG_STEPS = list(range(0, MAX_STEPS + 1, 10))


def make_config(run_root: Path, run_id: str, suite: str, seed: int, use_craft: bool, **extra) -> dict:
    config = {"run_root_dir": str(run_root), "run_id": run_id, "dataset_name": f"{suite}_no_noops", "seed": seed,
              "max_steps": MAX_STEPS, "model_preset": "real", "use_craft": use_craft, "num_demos_per_task": None,
              "craft_retention_budget": 0.1, "craft_dual_lr": 0.01, "craft_enable_projection": True,
              "craft_enable_dual": True, "craft_fixed_lambda": None, "craft_init_lambda": 0.0, "craft_raw_layer": None,
              "craft_aq_layer": None, "craft_anchor_type": "concat", "craft_anchor_source": "online"}
    config.update(extra)
    return config


def write_run(run_root: Path, run_id: str, config: dict | None, metrics: list[dict] | None, success: tuple | None,
              checkpoint: bool = True, raw_metrics: str | None = None) -> Path:
    run_dir = run_root / run_id
    run_dir.mkdir(parents=True)
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if raw_metrics is not None:
        (run_dir / "metrics.jsonl").write_text(raw_metrics)
    elif metrics is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if success is not None:
        suite, successes, episodes = success
        (run_dir / "eval").mkdir()
        (run_dir / "eval" / "summary.json").write_text(json.dumps(
            {"task_suite_name": suite, "num_episodes": episodes, "num_successes": successes,
             "success_rate": successes / episodes, "per_task": {},
             "pretrained_checkpoint": str(run_root / f"{run_id}--{MAX_STEPS}_chkpt")}))
    if checkpoint:
        chkpt = run_root / f"{run_id}--{MAX_STEPS}_chkpt"
        chkpt.mkdir()
        (chkpt / "COMPLETE").write_text("{}")
    return run_dir


def metric_series(rng: np.random.Generator, craft: bool) -> list[dict]:
    records = []
    for step in LOG_STEPS:
        record = {"step": step, "VLA Train/Loss": float(rng.uniform(0.01, 1.0)),
                  "VLA Train/Learning Rate": 5e-4}
        if craft:
            record.update({"CRaFT/Retention Loss": float(rng.uniform(0.0, 0.3)),
                           "CRaFT/Lambda": float(rng.uniform(0.0, 2.0)),
                           "CRaFT/Conflict Ratio": float(rng.uniform(0.0, 0.6))})
        records.append(record)
    return records


@pytest.fixture
def grid(tmp_path):
    """2 suites x {baseline, craft} x 3 seeds, numbers drawn at random; returns (runs_dir, expected per group)."""
    rng = np.random.default_rng(0)
    run_root = tmp_path / "runs" / "table1"
    expected: dict[tuple, dict[str, list[float]]] = {}
    for suite in ("libero_goal", "libero_spatial"):
        for method in ("baseline", "craft"):
            for seed in SEEDS:
                craft = method == "craft"
                run_id = f"t1-{suite}-{method}-s{seed}"
                metrics = metric_series(rng, craft)
                episodes = 500
                successes = int(rng.integers(300, 500))
                write_run(run_root, run_id, make_config(run_root, run_id, suite, seed, craft), metrics,
                          (suite, successes, episodes))
                exp = expected.setdefault((method, suite), {k: [] for k in lp.METRIC_KEYS})
                exp["success_pct"].append(100.0 * successes / episodes)
                exp["final_action_loss"].append(metrics[-1]["VLA Train/Loss"])
                if craft:
                    exp["final_retention_loss"].append(metrics[-1]["CRaFT/Retention Loss"])
                    exp["final_lambda"].append(metrics[-1]["CRaFT/Lambda"])
                    exp["mean_conflict_ratio"].append(np.mean([r["CRaFT/Conflict Ratio"] for r in metrics]))
    return run_root, expected


def read_summary_csv(path: Path) -> dict[tuple, dict[str, str]]:
    with open(path) as f:
        return {(row["method"], row["suite"]): row for row in csv.DictReader(f)}


@pytest.mark.parametrize("ddof", [0, 1])
def test_aggregates_match_numpy_in_csv_and_latex(grid, tmp_path, ddof):
    run_root, expected = grid
    out = tmp_path / f"results{ddof}"
    code = lp.main(["--runs_dir", str(run_root), "--output_dir", str(out), "--generate_latex_table",
                    "--ddof", str(ddof), "--no_plots"])
    assert code == 0
    rows = read_summary_csv(out / "summary.csv")
    assert set(rows) == set(expected)
    latex = (out / "table_metrics_table1.tex").read_text()
    success_tex = (out / "table_success_table1.tex").read_text()
    assert "\\label{tab:table1-metrics}" in latex and "\\label{tab:table1-success}" in success_tex
    for key, exp in expected.items():
        row = rows[key]
        assert row["experiment"] == "table1" and row["runs"] == "3" and row["seeds"] == "123 42 7"
        for metric in lp.METRICS:
            values = np.array(exp[metric.key])
            assert int(row[f"{metric.key}_n"]) == values.size
            if values.size == 0:
                assert row[f"{metric.key}_mean"] == "" and row[f"{metric.key}_std"] == ""
                continue
            mean, std = values.mean(), values.std(ddof=ddof)
            assert float(row[f"{metric.key}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(row[f"{metric.key}_std"]) == pytest.approx(std, rel=1e-12)
            cell = f"{format(mean, metric.fmt)} $\\pm$ {format(std, metric.fmt)}"
            assert cell in latex
            if metric.key == "success_pct":
                assert cell in success_tex
    # LaTeX is booktabs and escapes underscores
    for tex in (latex, success_tex):
        assert tex.count("\\toprule") == tex.count("\\midrule") == tex.count("\\bottomrule") == 1
        assert "libero\\_goal" in tex or "Goal" in tex
    assert "libero_goal" not in latex.replace("libero\\_goal", "")
    # the Table-1 row of each method: suites in canonical order (Spatial before Goal) and their average
    for method in ("baseline", "craft"):
        line = next(ln for ln in success_tex.splitlines() if ln.startswith(f"{method} & all &"))
        spatial = np.mean(expected[(method, "libero_spatial")]["success_pct"])
        goal = np.mean(expected[(method, "libero_goal")]["success_pct"])
        assert line.index(format(spatial, ".1f")) < line.index(format(goal, ".1f"))
        assert line.rstrip(" \\").endswith(format((spatial + goal) / 2, ".1f"))
    md = (out / "summary.md").read_text()
    craft_goal = np.mean(expected[("craft", "libero_goal")]["success_pct"])
    assert f"| table1 | real | craft | libero_goal | all | 3 | 500 | {craft_goal:.1f}" in md
    # per-run CSV: one row per run with its own numbers
    with open(out / "runs.csv") as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == 12


def test_final_window_averages_the_last_values(grid, tmp_path):
    run_root, _ = grid
    results = lp.collect([run_root], final_window=3)
    run_dir = run_root / "t1-libero_goal-craft-s42"
    records = lp.read_metrics_jsonl(run_dir / "metrics.jsonl")
    row = next(r for r in results.run_rows if r["run"] == run_dir.name)
    assert row["final_retention_loss"] == pytest.approx(np.mean([r["CRaFT/Retention Loss"] for r in records[-3:]]))
    assert row["final_action_loss"] == pytest.approx(np.mean([r["VLA Train/Loss"] for r in records[-3:]]))


def test_plots_are_written_and_not_blank(grid, tmp_path):
    run_root, _ = grid
    results = lp.collect([run_root])
    paths = lp.plot_training_curves(results.records, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["table1_libero_goal.pdf", "table1_libero_goal.png",
                                             "table1_libero_spatial.pdf", "table1_libero_spatial.png"]
    import matplotlib.image as mpimg

    assert all(p.read_bytes()[:5] == b"%PDF-" for p in paths if p.suffix == ".pdf")
    for path in (p for p in paths if p.suffix == ".png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        colours = np.unique(image[..., :3].reshape(-1, 3), axis=0)
        assert len(colours) > 50, "a plot with almost no colours drew nothing"


def test_plot_draws_epsilon_line(tmp_path):
    run_root = tmp_path / "abl"
    metrics = [{"step": s, "VLA Train/Loss": 1.0, "CRaFT/Retention Loss": 0.5, "CRaFT/Lambda": 0.0,
                "CRaFT/Conflict Ratio": 0.1} for s in LOG_STEPS]
    write_run(run_root, "r", make_config(run_root, "r", "libero_10", 1, True, craft_retention_budget=0.25), metrics,
              None)
    results = lp.collect([run_root])
    assert [r["method"] for r in results.run_rows] == ["craft-eps0.25"]
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from matplotlib.axes import Axes

    original = Axes.axhline
    with mock.patch("matplotlib.axes.Axes.axhline", autospec=True, side_effect=original) as axhline:
        lp.plot_training_curves(results.records, tmp_path / "plots")
    # only ε: no conflict-ratio threshold line (unrelated gradients already give a ratio near 0.5; issue 15)
    assert sorted(call.args[1] for call in axhline.call_args_list) == [0.25]


def test_method_labels_from_config(tmp_path):
    base = make_config(tmp_path, "x", "libero_goal", 1, True)
    cases = [
        ({"use_craft": False}, "baseline"),
        ({}, "craft"),
        ({"craft_enable_projection": False}, "craft-noproj"),
        ({"craft_enable_dual": False, "craft_fixed_lambda": 0.1}, "craft-fixlam0.1"),
        ({"craft_enable_dual": False}, "craft-fixlam0"),
        ({"craft_anchor_type": "raw_only"}, "craft-anchor_raw_only"),
        ({"craft_retention_budget": 0.05}, "craft-eps0.05"),
        ({"craft_raw_layer": 6}, "craft-m6"),
        ({"craft_raw_layer": 12, "craft_aq_layer": 24}, "craft"),  # the real preset's defaults
        ({"model_preset": "tiny", "craft_raw_layer": 1}, "craft-m1"),
        ({"craft_anchor_source": "offline"}, "craft-offline"),
        ({"use_craft": False, "retention_method": "align"}, "align"),
        ({"use_craft": False, "retention_method": "ki"}, "ki"),
        ({"use_craft": False, "retention_method": "ki", "ki_action_loss_weight": 0.0}, "ki-w0"),
        ({"use_craft": False, "retention_method": "ki", "ki_action_loss_weight": "0.5"}, "ki-w0.5"),
        ({"use_craft": False, "freeze_vision_backbone": True}, "freeze"),
        ({"use_craft": "True", "craft_enable_projection": "False"}, "craft-noproj"),
    ]
    for change, label in cases:
        assert lp.method_label({**base, **change}) == label, change


def test_draccus_dumped_config_is_read(tmp_path):
    finetune_config = pytest.importorskip("prismatic.training.finetune_config")
    draccus = pytest.importorskip("draccus")
    cfg = finetune_config.FinetuneConfig(run_root_dir=tmp_path / "fewshot", dataset_name="libero_object_no_noops",
                                         num_demos_per_task=5, use_craft=True, craft_enable_projection=False,
                                         max_steps=MAX_STEPS, seed=3)
    run_dir = write_run(tmp_path / "fewshot", "r", None, [{"step": MAX_STEPS, "VLA Train/Loss": 0.5}],
                        ("libero_object", 1, 2))
    with open(run_dir / "config.yaml", "w") as f:
        draccus.dump(cfg, f)
    row = lp.collect([tmp_path / "fewshot"]).run_rows[0]
    assert (row["experiment"], row["method"], row["suite"], row["shots"], row["seed"]) == \
        ("fewshot", "craft-noproj", "libero_object", "5", 3)
    assert row["success_pct"] == 50.0


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_runs_are_reported_and_left_out(tmp_path):
    rng = np.random.default_rng(1)
    run_root = tmp_path / "table1"
    good = {}
    for seed in SEEDS:
        run_id = f"good-s{seed}"
        metrics = metric_series(rng, True)
        successes = int(rng.integers(0, 50))
        write_run(run_root, run_id, make_config(run_root, run_id, "libero_goal", seed, True), metrics,
                  ("libero_goal", successes, 50))
        good[seed] = (metrics, successes)
    # same group (craft / libero_goal), each broken in one way
    truncated = "".join(json.dumps(r) + "\n" for r in metric_series(rng, True)) + '{"step": 110, "VLA Tr'
    write_run(run_root, "truncated", make_config(run_root, "truncated", "libero_goal", 1, True), None,
              ("libero_goal", 50, 50), raw_metrics=truncated)
    write_run(run_root, "no-metrics", make_config(run_root, "no-metrics", "libero_goal", 2, True), None,
              ("libero_goal", 50, 50))
    write_run(run_root, "no-summary", make_config(run_root, "no-summary", "libero_goal", 3, True),
              metric_series(rng, True), None)
    write_run(run_root, "unfinished", make_config(run_root, "unfinished", "libero_goal", 4, True),
              metric_series(rng, True)[:5], ("libero_goal", 50, 50), checkpoint=False)
    write_run(run_root, "no-config", None, metric_series(rng, True), ("libero_goal", 50, 50))
    write_run(run_root, "empty-metrics", make_config(run_root, "empty-metrics", "libero_goal", 5, True), None,
              ("libero_goal", 50, 50), raw_metrics="\n")
    nan_final = metric_series(rng, True)
    nan_final[-1]["CRaFT/Lambda"] = "nan"
    write_run(run_root, "nan-lambda", make_config(run_root, "nan-lambda", "libero_goal", 6, True), nan_final, None)
    (run_root / "empty").mkdir()
    (run_root / "orphan--100_chkpt").mkdir()

    results = lp.collect([run_root])
    text = "\n".join(str(i) for i in results.issues)
    assert "truncated" not in text  # a torn last line is skipped (with a warning); the good lines are kept
    assert "[warning] no-metrics: no metrics.jsonl" in text
    assert "[warning] no-summary: no eval/summary.json" in text
    assert "[error] unfinished: training unfinished: last logged step 40 of max_steps 100" in text
    assert "[error] no-config: no config.yaml" in text
    assert "[warning] empty-metrics: training metrics left out" in text and "is empty" in text
    assert "[error] empty: empty run directory" in text
    assert "[error] orphan: checkpoints" in text
    assert "[warning] nan-lambda: final 'CRaFT/Lambda' is not finite" in text

    (row,) = results.aggregate
    assert row["runs"] == 3 + 5  # good x3, truncated, no-metrics, no-summary, empty-metrics, nan-lambda
    # success: good runs + truncated + no-metrics + empty-metrics (each 100 %); never no-summary / nan-lambda
    success = [100.0 * good[s][1] / 50 for s in SEEDS] + [100.0] * 3
    assert row["success_pct_n"] == 6 and row["success_pct_mean"] == pytest.approx(np.mean(success))
    # training metrics only from runs with a readable metrics file
    assert row["final_action_loss_n"] == 6 and row["final_lambda_n"] == 5
    torn_good_lines = [json.loads(line) for line in truncated.splitlines()[:-1]]
    assert len(lp.read_metrics_jsonl(run_root / "truncated" / "metrics.jsonl")) == len(torn_good_lines) == 11
    lambdas = [good[s][0][-1]["CRaFT/Lambda"] for s in SEEDS] + [torn_good_lines[-1]["CRaFT/Lambda"]] + \
        [lp.read_metrics_jsonl(run_root / "no-summary" / "metrics.jsonl")[-1]["CRaFT/Lambda"]]
    assert row["final_lambda_mean"] == pytest.approx(np.mean(lambdas))
    assert row["final_lambda_std"] == pytest.approx(np.std(lambdas, ddof=1))

    out = tmp_path / "out"
    assert lp.main(["--runs_dir", str(run_root), "--output_dir", str(out), "--no_plots"]) == 0
    issues_txt = (out / "issues.txt").read_text()
    assert issues_txt.count("\n") == len(results.issues) and "unfinished" in issues_txt
    assert "(n=6)" in (out / "summary.md").read_text()
    assert lp.main(["--runs_dir", str(run_root), "--output_dir", str(out), "--no_plots", "--strict"]) == 1
    included = lp.collect([run_root], include_incomplete=True)
    assert included.aggregate[0]["runs"] == 9


def test_inconsistent_summary_and_backwards_steps(tmp_path):
    run_root = tmp_path / "x"
    run_dir = write_run(run_root, "r", make_config(run_root, "r", "libero_goal", 1, False),
                        [{"step": 0, "VLA Train/Loss": 1.0}, {"step": 100, "VLA Train/Loss": 1.0},
                         {"step": 50, "VLA Train/Loss": 1.0}], ("libero_goal", 3, 10))
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    summary["success_rate"] = 0.9
    (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))
    text = "\n".join(str(i) for i in lp.collect([run_root]).issues)
    assert "steps go backwards" in text and "success_rate 0.9 != num_successes 3 / num_episodes 10" in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lp.collect([tmp_path / "missing"])


def test_suite_mismatch_between_training_and_eval_is_reported(tmp_path):
    run_root = tmp_path / "x"
    write_run(run_root, "r", make_config(run_root, "r", "libero_goal", 1, False),
              [{"step": MAX_STEPS, "VLA Train/Loss": 1.0}], ("libero_10", 3, 10))
    results = lp.collect([run_root])
    assert math.isnan(results.run_rows[0]["success_pct"])
    assert any("evaluated on 'libero_10' but trained on 'libero_goal'" in i.message for i in results.issues)


def test_duplicate_seed_in_a_group_is_refused(tmp_path):
    run_root = tmp_path / "x"
    for name in ("a", "b"):
        write_run(run_root, name, make_config(run_root, name, "libero_goal", 1, False),
                  [{"step": MAX_STEPS, "VLA Train/Loss": 1.0}], ("libero_goal", 3, 10))
    with pytest.raises(lp.SeedCollisionError, match=r"seed\(s\) \[1\] appear in several runs"):
        lp.collect([run_root])
    proc = subprocess.run([sys.executable, str(REPO / "craft_experiments/common_utils/log_parser.py"), "--runs_dir",
                           str(run_root), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: seed(s) [1]") and "Traceback" not in proc.stderr


def _one_step_run(run_root: Path, name: str, seed: int, episodes: int = 10, craft: bool = False, **extra) -> Path:
    return write_run(run_root, name, make_config(run_root, name, "libero_goal", seed, craft, **extra),
                     [{"step": MAX_STEPS, "VLA Train/Loss": 0.1 * seed}], ("libero_goal", 3, episodes))


def test_roots_and_presets_are_never_averaged_together(tmp_path):
    """A SMOKE root and a real root of the same experiment (same seeds) are separate rows; so are presets."""
    for parent, preset in (("craft_experiments", "real"), ("craft_experiments_smoke", "tiny")):
        root = tmp_path / parent / "table1"
        for seed in (1, 2):
            _one_step_run(root, f"r{seed}", seed, model_preset=preset)
    results = lp.collect([tmp_path])
    assert sorted((r["preset"], r["runs"]) for r in results.aggregate) == [("real", 2), ("tiny", 2)]
    assert len({r["root"] for r in results.aggregate}) == 2
    md = lp.markdown_table(results.aggregate)
    assert "| table1-tiny |" in md and "| table1 |" in md  # names from experiment and preset only


def test_different_episode_counts_are_not_averaged(tmp_path):
    root = tmp_path / "table1"
    _one_step_run(root, "a", 1, episodes=10)
    _one_step_run(root, "b", 2, episodes=500)
    results = lp.collect([root])
    (row,) = results.aggregate
    assert row["success_pct_n"] == 0 and row["final_action_loss_n"] == 2
    assert any("different episode counts [10, 500]" in str(i) for i in results.issues)


def test_stale_evaluation_is_ignored(tmp_path):
    root = tmp_path / "table1"
    run_dir = _one_step_run(root, "a", 1)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    summary["checkpoint"] = {"path": str(root / "a--50_chkpt"), "step": 50}
    (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))
    results = lp.collect([root])
    assert math.isnan(results.run_rows[0]["success_pct"])
    assert any("stale evaluation ignored: it evaluated step 50, not step" in str(i) for i in results.issues)
    summary["checkpoint"] = {"path": str(root / f"a--{MAX_STEPS}_chkpt"), "step": MAX_STEPS}
    (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))
    assert lp.collect([root]).run_rows[0]["success_pct"] == 30.0


def test_monitor_retention_and_drift_numbers_fill_every_row(tmp_path):
    """Final L_ret comes from the retention monitor (baseline included; in a CRaFT run its own monitor key), and the
    drift columns from drift/drift.json of the final checkpoint."""
    root = tmp_path / "table1"
    base = write_run(root, "b", make_config(root, "b", "libero_goal", 1, False),
                     [{"step": 50, "VLA Train/Loss": 1.0, "CRaFT/Retention Loss": 0.7},
                      {"step": MAX_STEPS, "VLA Train/Loss": 1.0, "CRaFT/Retention Loss": 0.9}], ("libero_goal", 1, 2))
    write_run(root, "c", make_config(root, "c", "libero_goal", 1, True),
              [{"step": MAX_STEPS, "VLA Train/Loss": 1.0, "CRaFT/Retention Loss": 0.2,
                "CRaFT/Retention Loss (monitor)": 0.25}], ("libero_goal", 1, 2))
    (base / "drift").mkdir()
    aq = {"cka": [0.1, 0.2, 0.3, 0.4, 0.55], "probe_accuracy_finetuned": [None, 0.5, 0.5, 0.5, 0.75]}
    (base / "drift" / "drift.json").write_text(json.dumps({
        "config": {"finetuned_path": str(root / f"b--{MAX_STEPS}_chkpt")},
        "craft_default_anchor": {"raw_layer": 2, "aq_layer": 4, "L_ret_concat": 1.5}, "groups": {"aq": aq}}))
    rows = {r["run"]: r for r in lp.collect([root]).run_rows}
    assert rows["b"]["final_retention_loss"] == 0.9 and rows["c"]["final_retention_loss"] == 0.25
    assert (rows["b"]["drift_retention"], rows["b"]["drift_cka_aq"], rows["b"]["drift_probe_aq"]) == (1.5, 0.55, 0.75)
    assert math.isnan(rows["c"]["drift_retention"])


def test_wandb_project_reads_local_runs_offline(tmp_path, monkeypatch):
    """--wandb_project P without --wandb_online: the local runs whose config names project P, no wandb API call."""
    root = tmp_path / "runs" / "craft_experiments" / "table1"
    for seed, project in ((1, "vla-craft-training"), (2, "vla-craft-training"), (3, "other")):
        _one_step_run(root, f"r{seed}", seed, wandb_project=project)
    import wandb

    monkeypatch.setattr(wandb, "Api", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network used")))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    assert lp.main(["--wandb_project", "vla-craft-training", "--output_dir", str(out), "--generate_latex_table",
                    "--no_plots"]) == 0
    with open(out / "runs.csv") as f:
        assert sorted(r["run"] for r in csv.DictReader(f)) == ["r1", "r2"]
    monkeypatch.chdir(tmp_path / "runs")
    assert lp.main(["--wandb_project", "vla-craft-training", "--output_dir", str(out)]) == 2  # no runs/ here


def test_seed_band_is_the_mean_and_std_over_seeds():
    sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
    from table_rendering import seed_band

    steps = np.arange(0, 100, 10)
    a, b = np.linspace(0, 1, 10), np.linspace(1, 3, 10)
    grid, mean, std = seed_band([(steps, a), (steps[:8], b[:8])], smooth_fraction=0.0)
    assert grid.tolist() == steps[:8].tolist()
    np.testing.assert_allclose(mean, (a[:8] + b[:8]) / 2)
    np.testing.assert_allclose(std, np.std(np.stack([a[:8], b[:8]]), axis=0))


def test_cli_without_usable_runs_fails(tmp_path):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(REPO / "craft_experiments/common_utils/log_parser.py"), "--runs_dir",
                           str(tmp_path / "runs"), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "PROBLEM [error] empty: empty run directory" in proc.stderr and "no usable run" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# wandb
# ---------------------------------------------------------------------------------------------------------------------
class FakeRun:
    def __init__(self, name, config, history, summary, job_type=None):
        self.name, self.id, self.config, self._history, self.summary = name, name, config, history, summary
        self.job_type = job_type

    def scan_history(self):
        return iter(self._history)


def test_wandb_runs_are_read_through_the_api(tmp_path):
    rng = np.random.default_rng(2)
    runs, finals = [], []
    for seed in SEEDS:
        history = [{"_step": s, "VLA Train/Loss": float(rng.uniform()), "CRaFT/Lambda": float(rng.uniform()),
                    "_runtime": 1.0} for s in LOG_STEPS]
        config = {k: {"value": v} for k, v in make_config(Path("runs/table1"), f"w{seed}", "libero_10", seed,
                                                          True).items()}
        runs.append(FakeRun(f"w{seed}", config, history, {"success_rate": seed / 200}))
        finals.append(history[-1]["CRaFT/Lambda"])
    seen = {}

    class Api:
        def runs(self, path):
            seen["path"] = path
            return runs

    results = lp.collect(wandb_project="vla-craft-training", wandb_entity="lab", api_factory=Api)
    assert seen["path"] == "lab/vla-craft-training"
    (row,) = results.aggregate
    assert (row["experiment"], row["method"], row["suite"]) == ("table1", "craft", "libero_10")
    assert row["final_lambda_mean"] == pytest.approx(np.mean(finals))
    assert row["success_pct_mean"] == pytest.approx(np.mean([100 * s / 200 for s in SEEDS]))


def test_wandb_unreachable_gives_a_clear_error():
    def offline_api():
        raise ConnectionError("Max retries exceeded with url: https://api.wandb.ai/graphql")

    with pytest.raises(RuntimeError, match="could not read wandb project 'p'.*Offline or not logged in.*--runs_dir"):
        lp.load_wandb_runs("p", api_factory=offline_api)


def test_local_run_is_not_counted_twice_when_also_in_wandb(tmp_path):
    run_root = tmp_path / "table1"
    write_run(run_root, "w7", make_config(run_root, "w7", "libero_10", 7, False),
              [{"step": MAX_STEPS, "VLA Train/Loss": 0.25}], ("libero_10", 1, 4))
    history = [{"_step": MAX_STEPS, "VLA Train/Loss": 0.75}]
    wandb_runs = [FakeRun("w7", make_config(run_root, "w7", "libero_10", 7, False), history, {}),
                  FakeRun("w8", make_config(run_root, "w8", "libero_10", 8, False), history, {})]

    class Api:
        def runs(self, path):
            return wandb_runs

    results = lp.collect([run_root], wandb_project="p", api_factory=Api)
    assert sorted((r["run"], r["final_action_loss"]) for r in results.run_rows) == [("w7", 0.25), ("w8", 0.75)]


def test_evaluation_runs_are_joined_to_their_training_runs(tmp_path):
    """run_libero_eval.py logs to its own wandb run (job_type eval): its success rate of the final checkpoint reaches
    the training run named by the eval config's `train_run_id` (set by the real training_run_labels)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_libero_eval_join", REPO / "LIBERO/run_libero_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_root = tmp_path / "table1"
    config = make_config(run_root, "t1-x-s7", "libero_10", 7, False)
    (run_root / "t1-x-s7").mkdir(parents=True)
    (run_root / "t1-x-s7" / "config.yaml").write_text(__import__("yaml").safe_dump(config))
    labels = module.training_run_labels(module.EvalConfig(
        pretrained_checkpoint=str(run_root / f"t1-x-s7--{MAX_STEPS}_chkpt"), task_suite_name="libero_10"))
    assert labels["config"]["train_run_id"] == "t1-x-s7" and labels["group"].endswith("/libero_10/all/baseline")
    history = [{"_step": MAX_STEPS, "VLA Train/Loss": 0.5}]
    eval_config = {"task_suite_name": "libero_10", **labels["config"]}
    runs = [FakeRun("t1-x-s7", config, history, {}, job_type="train"),
            FakeRun("eval-early", {**eval_config, "checkpoint": {"step": 50}}, [],
                    {"Eval/Success Rate/libero_10": 0.9}, job_type="eval"),
            FakeRun("eval-final", {**eval_config, "checkpoint": {"step": MAX_STEPS}}, [],
                    {"Eval/Success Rate/libero_10": 0.35, "num_episodes": 20}, job_type="eval")]

    class Api:
        def runs(self, path):
            return runs

    results = lp.collect(wandb_project="p", api_factory=Api)
    (row,) = results.run_rows
    assert row["run"] == "t1-x-s7" and row["success_pct"] == pytest.approx(35.0) and row["eval_episodes"] == 20
    assert [str(i) for i in results.issues] == []


# ---------------------------------------------------------------------------------------------------------------------
# A clean results folder per aggregation (issue 24)
# ---------------------------------------------------------------------------------------------------------------------
def _parser_cli(cwd: Path, *args: str):
    import subprocess

    return subprocess.run([sys.executable, str(REPO / "craft_experiments/common_utils/log_parser.py"), *args],
                          cwd=cwd, capture_output=True, text=True)


def _project_runs(tmp_path: Path) -> None:
    for parent, preset in (("craft_experiments", "real"), ("craft_experiments_smoke", "tiny")):
        root = tmp_path / "runs" / parent / "table1"
        for seed in (1, 2):
            _one_step_run(root, f"r{seed}", seed, model_preset=preset, wandb_project="vla-craft-training")


def test_project_aggregation_reads_real_runs_unless_smoke_is_asked_for(tmp_path):
    _project_runs(tmp_path)
    proc = _parser_cli(tmp_path, "--wandb_project", "vla-craft-training", "--output_dir", "results",
                       "--generate_latex_table", "--no_plots")
    assert proc.returncode == 0, proc.stderr
    rows = (tmp_path / "results" / "runs.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(",real," in r for r in rows)
    assert "2 SMOKE run(s) (tiny preset) of the project left out" in proc.stdout
    assert "placeholders" not in (tmp_path / "results" / "table_success_table1.tex").read_text()
    both = _parser_cli(tmp_path, "--wandb_project", "vla-craft-training", "--output_dir", "both",
                       "--generate_latex_table", "--no_plots", "--include_smoke", "True")
    assert both.returncode == 0, both.stderr
    assert len((tmp_path / "both" / "runs.csv").read_text().splitlines()) == 5
    smoke_tex = (tmp_path / "both" / "table_success_table1-tiny.tex").read_text()
    assert "placeholders" in smoke_tex and "\\label{tab:table1-tiny-success}" in smoke_tex
    # the real table's file and label do not change because a SMOKE root was read too
    real_tex = (tmp_path / "both" / "table_success_table1.tex").read_text()
    assert real_tex == (tmp_path / "results" / "table_success_table1.tex").read_text()
    assert "\\label{tab:table1-success}" in real_tex


def test_two_roots_of_one_experiment_are_refused_for_files(tmp_path):
    for parent in ("a", "b"):
        _one_step_run(tmp_path / parent / "table1", "r1", 1)
    proc = _parser_cli(tmp_path, "--runs_dir", "a", "--runs_dir", "b", "--output_dir", "out",
                       "--generate_latex_table")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "2 roots would write the tables of 'table1'" in proc.stderr and not (tmp_path / "out").exists()


def test_stale_outputs_are_removed_and_unknown_ones_refused(tmp_path):
    _one_step_run(tmp_path / "runs" / "table1", "r1", 1)
    _one_step_run(tmp_path / "runs" / "fewshot", "f1", 1, num_demos_per_task=5)
    first = _parser_cli(tmp_path, "--runs_dir", "runs", "--output_dir", "out", "--generate_latex_table")
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    assert (out / "table_success_fewshot.tex").is_file() and list((out / "plots").glob("fewshot_*.png"))
    second = _parser_cli(tmp_path, "--runs_dir", "runs/table1", "--output_dir", "out", "--generate_latex_table")
    assert second.returncode == 0, second.stderr
    assert not (out / "table_success_fewshot.tex").exists() and not list((out / "plots").glob("fewshot_*"))
    assert (out / "table_success_table1.tex").is_file() and list((out / "plots").glob("table1_*.png"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "table_success_old.tex").write_text("%")
    refused = _parser_cli(tmp_path, "--runs_dir", "runs", "--output_dir", "foreign", "--generate_latex_table")
    assert refused.returncode == 2 and "not written by a recorded aggregation" in refused.stderr
    assert (foreign / "table_success_old.tex").read_text() == "%" and not (foreign / "runs.csv").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Tables a reviewer accepts (issue 24)
# ---------------------------------------------------------------------------------------------------------------------
def test_tables_carry_n_no_single_seed_std_and_the_conflict_null(tmp_path):
    root = tmp_path / "table1"
    nulls = {1: [0.5, 0.52], 2: [0.48, 0.5]}
    for seed in (1, 2):
        write_run(root, f"c{seed}", make_config(root, f"c{seed}", "libero_goal", seed, True),
                  [{"step": 50, "VLA Train/Loss": 1.0, "CRaFT/Conflict Ratio": 0.1 * seed,
                    "CRaFT/Conflict Ratio Null": nulls[seed][0]},
                   {"step": MAX_STEPS, "VLA Train/Loss": 1.0, "CRaFT/Conflict Ratio": 0.3 * seed,
                    "CRaFT/Conflict Ratio Null": nulls[seed][1]}], ("libero_goal", 3 + seed, 50))
    write_run(root, "b1", make_config(root, "b1", "libero_goal", 1, False),
              [{"step": MAX_STEPS, "VLA Train/Loss": 1.0}], ("libero_goal", 10, 50))
    results = lp.collect([root], ddof=0)  # ddof 0 gives a single seed a std of 0.0: it must not be printed
    rows = {r["method"]: r for r in results.aggregate}
    assert rows["craft"]["mean_conflict_null_mean"] == pytest.approx(np.mean([np.mean(v) for v in nulls.values()]))
    assert rows["craft"]["mean_conflict_ratio_mean"] == pytest.approx(np.mean([0.2, 0.4]))
    md = lp.markdown_table(results.aggregate, ddof=0)
    assert "| Conflict ratio | Conflict null |" in md
    baseline_line = next(line for line in md.splitlines() if "| baseline |" in line)
    assert "| 20.0 |" in baseline_line and "±" not in baseline_line
    craft_line = next(line for line in md.splitlines() if "| craft |" in line)
    assert f"{np.mean([8, 10]):.1f} ± {np.std([8, 10]):.1f}" in craft_line
    out = tmp_path / "out"
    lp.write_outputs(results, out, ddof=0, latex=True, plots=False)
    success = (out / "table_success_table1.tex").read_text()
    assert "n = 1–2 seeds per cell, 50 episodes per evaluation." in success
    metrics = (out / "table_metrics_table1.tex").read_text()
    assert "Method & Suite & Shots & Seeds & Episodes" in metrics and "craft & libero\\_goal & all & 2 & 50" in metrics
