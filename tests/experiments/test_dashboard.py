"""make_dashboard.py: every panel names metric keys that a real tiny training (CRaFT and plain SFT, retention monitor
on) or the LIBERO evaluation really log; runs are grouped by the method / suite config entries finetune.py gives
wandb (with group, tags and job_type); offline the CLI writes the spec JSON wandb-workspaces accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
sys.path.insert(0, str(REPO / "vla-scripts"))
sys.path.insert(0, str(REPO))

import make_dashboard  # noqa: E402


class _Run:
    def log(self, *_a, **_k) -> None:
        pass

    def finish(self) -> None:
        pass


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[set[str], list[dict]]:
    """Keys logged by two tiny trainings, and the kwargs each gave wandb.init (wandb itself stubbed: no files)."""
    import torch
    import wandb

    from finetune import train
    from prismatic.data.synthetic_libero import make_synthetic_libero_dataset
    from prismatic.training.finetune_config import FinetuneConfig
    from prismatic.training.metrics_log import read_metrics

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dash")
    make_synthetic_libero_dataset(root / "rlds", "libero_goal_no_noops", num_tasks=2, episodes_per_task=2, steps=12,
                                  seed=0)
    inits: list[dict] = []
    original = wandb.init
    wandb.init = lambda **kwargs: inits.append(kwargs) or _Run()
    keys: set[str] = set()
    try:
        for method, extra in (("craft", {"use_craft": True}), ("sft", {})):
            cfg = FinetuneConfig(data_root_dir=root / "rlds", dataset_name="libero_goal_no_noops",
                                 run_root_dir=root / "table1", model_preset="tiny", batch_size=2, max_steps=2,
                                 save_freq=1000, wandb_mode="offline", wandb_project="p", image_aug=False,
                                 num_images_in_input=1, use_lora=True, lora_rank=4, run_id=method, seed=7,
                                 retention_monitor=True, retention_monitor_freq=1, **extra)
            result = train(cfg)
            for record in read_metrics(result.run_dir / "metrics.jsonl"):
                keys |= set(record)
    finally:
        wandb.init = original
    return keys, inits


def test_panels_name_keys_that_are_logged(logged):
    keys, _ = logged
    spec = make_dashboard.dashboard_spec("p", None, "CRaFT")
    line_keys = {k for s in spec["sections"] for p in s["panels"] if p["type"] == "line" for k in p["y"]}
    assert line_keys <= keys, line_keys - keys
    # what the issue asks for, by key
    for needed in ("CRaFT/Retention Loss", "CRaFT/Retention Budget", "CRaFT/Lambda", "CRaFT/Conflict Ratio",
                   "CRaFT/Grad Cosine", "VLA Train/Loss", "VLA Train/Curr Action L1 Loss", "VLA Train/Learning Rate"):
        assert needed in line_keys
    # the success-rate panel names the per-suite keys the LIBERO evaluation logs to wandb (the key function is the
    # one run_libero_eval uses; tests/libero/test_episode_logic.py checks a real evaluation logs it)
    from LIBERO.results import success_rate_key

    bar_keys = {k for s in spec["sections"] for p in s["panels"] if p["type"] == "bar" for k in p["metrics"]}
    assert bar_keys == {success_rate_key(s) for s in ("libero_spatial", "libero_object", "libero_goal", "libero_10")}
    assert spec["runs_grouped_by"] == ["experiment", "preset", "suite", "shots", "method"]


def test_wandb_runs_carry_group_tags_job_type_and_the_grouping_config(logged):
    _, inits = logged
    # the tables' labels: baseline (not sft), and experiment / preset / suite / shots / method in the group
    assert [i["group"] for i in inits] == ["table1/tiny/libero_goal/all/craft", "table1/tiny/libero_goal/all/baseline"]
    for init, method, run_id in zip(inits, ("craft", "baseline"), ("craft", "sft"), strict=True):
        assert init["job_type"] == "train"
        assert {"table1", "libero_goal", method, "preset-tiny", "seed-7", "shots-all"} <= set(init["tags"])
        config = init["config"]
        assert (config["method"], config["suite"], config["experiment"], config["preset"], config["shots"],
                config["seed"], config["train_run_id"]) == (method, "libero_goal", "table1", "tiny", "all", 7, run_id)


def test_offline_cli_writes_the_workspace_spec(tmp_path):
    out = tmp_path / "dash.json"
    proc = subprocess.run([sys.executable, str(REPO / "craft_experiments/common_utils/make_dashboard.py"),
                           "--wandb_project", "vla-craft-training", "--output_json", str(out)], capture_output=True,
                          text=True, env={"PATH": "", "WANDB_MODE": "offline", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "not saved" in proc.stdout
    data = json.loads(out.read_text())
    # one view per experiment, each filtered to its runs: Table-1, few-shot and ablation groups never share a band
    assert sorted(data["wandb_views"]) == sorted(f"CRaFT experiments — {e}" for e in ("table1", "fewshot", "ablations"))
    spec_keys = {k for s in data["spec"]["sections"] for p in s["panels"] for k in p.get("y", p.get("metrics", []))}
    for experiment in ("table1", "fewshot", "ablations"):
        model = data["wandb_views"][f"CRaFT experiments — {experiment}"]
        view = json.dumps(model)
        for key in spec_keys:  # every panel key made it into wandb's own view model
            assert json.dumps(key)[1:-1] in view, key
        assert model["project"] == "vla-craft-training"
        assert all(key in view for key in ("experiment", "preset", "suite", "shots", "method"))
        others = {"table1", "fewshot", "ablations"} - {experiment}
        assert f'"{experiment}"' in view and not any(f'"{o}"' in view for o in others)


def test_wandb_groups_are_the_tables_groups():
    """Shots and ablation variants are groups of their own, with the tables' method label (one vocabulary)."""
    import log_parser

    from prismatic.training.metrics_log import wandb_labels

    base = {"run_root_dir": "/x/fewshot", "dataset_name": "libero_spatial_no_noops", "seed": 42,
            "model_preset": "real", "use_craft": True, "num_demos_per_task": 5}
    configs = [base, {**base, "num_demos_per_task": 10}, {**base, "craft_retention_budget": 0.05},
               {**base, "craft_enable_projection": False}, {**base, "use_craft": False}]
    groups = [wandb_labels(c)["group"] for c in configs]
    prefix = "fewshot/real/libero_spatial/"
    assert groups == [prefix + g for g in ("5shot/craft", "10shot/craft", "5shot/craft-eps0.05", "5shot/craft-noproj",
                                           "5shot/baseline")]
    for config in configs:
        assert wandb_labels(config)["config"]["method"] == log_parser.method_label(config)
