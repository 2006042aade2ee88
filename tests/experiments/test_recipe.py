"""The grids' default recipe (craft_experiments/recipes/<suite>.json, common_utils/recipe.py): the numbers equal
upstream's README command (vendored excerpt under tests/experiments/facts/), every number names its source, other
hardware keeps the global batch by accumulation or the banner says how it departs, EPOCHS / MAX_STEPS* override,
and the project's warm-up stays available as LR_SCHEDULE=project."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from prismatic.training.lr_schedule import WarmupStepDecay

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
sys.path.insert(0, str(Path(__file__).parent))

import recipe as recipe_module  # noqa: E402
from test_experiment_scripts import FACTS, SUITES, UPSTREAM_STEPS, dry_run, epoch_steps, run_script  # noqa: E402

README_EXCERPT = Path(__file__).parent / "facts" / "upstream_readme_838a36d_recipe.txt"


def upstream_command_flags() -> dict[str, str]:
    text = README_EXCERPT.read_text()
    flags = dict(re.findall(r"^--(\w+) (\S+) \\$", text, flags=re.M))
    flags["nproc_per_node"] = re.search(r"--nproc-per-node (\d+)", text).group(1)
    return flags


@pytest.mark.parametrize("suite", SUITES)
def test_recipe_file_equals_upstreams_command_and_cites_every_number(suite):
    r = recipe_module.load_recipe(suite)
    up = upstream_command_flags()
    assert r["global_batch"] == int(up["nproc_per_node"]) * int(up["batch_size"]) * int(up["grad_accumulation_steps"])
    assert r["global_batch"] == 64
    assert float(r["learning_rate"]) == float(up["learning_rate"]) == 2e-4
    assert r["lora_rank"] == int(up["lora_rank"])
    assert r["save_freq"] == int(up["save_freq"])
    for key in ("image_aug", "use_proprio", "use_lora", "use_pro_version", "num_images_in_input"):
        assert str(r[key]) == up[key], key
    # upstream decays at 150000 of 150005 steps: none in practice
    assert int(up["max_steps"]) - int(up["num_steps_before_decay"]) == 5 and r["lr_decay"] == "none"
    assert r["max_steps"] == UPSTREAM_STEPS[suite]
    for key in recipe_module.RECIPE_KEYS:
        assert r.sources[key].strip(), key
    assert "L450" in r.sources["learning_rate"] and "#46" in r.sources["max_steps"]


def test_upstream_warmup_of_0_1_steps_is_no_warmup():
    """Upstream's `lr_warmup_steps: int = 0.1` in its own formula gives the full lr from the first step, so the
    recipe's 0 (no warm-up) is the same schedule."""
    upstream_factor = [0.1 + 0.9 * min((step + 1) / 0.1, 1.0) for step in range(1000)]
    ours = WarmupStepDecay(0, recipe_module.NO_DECAY_STEP)
    assert upstream_factor == [ours(step) for step in range(1000)] == [1.0] * 1000


def test_a_recipe_without_a_source_is_refused(tmp_path):
    doc = json.loads((recipe_module.RECIPE_DIR / "libero_goal.json").read_text())
    doc["recipe"]["learning_rate"]["source"] = " "
    (tmp_path / "libero_goal.json").write_text(json.dumps(doc))
    with pytest.raises(recipe_module.RecipeError, match="'learning_rate' needs a value and a source"):
        recipe_module.load_recipe("libero_goal", tmp_path)


@pytest.mark.parametrize("gpus, batch, accum", [("1", "16", "4"), ("2", "8", "4"), ("8", "8", "1"), ("1", "64", "1"),
                                                ("1", "", "4"), ("2", "", "2"), ("8", "", "1"), ("16", "", "1")])
def test_other_hardware_keeps_the_global_batch_and_the_steps(tmp_path, gpus, batch, accum):
    """BATCH_SIZE given, or its default (16 per GPU, 64 / NUM_GPUS past 4 GPUs)."""
    env = {"BATCH_SIZE": batch} if batch else {}
    commands, proc = dry_run("table1", tmp_path, NUM_GPUS=gpus, SEEDS="7", METHODS="baseline", **env)
    for _, f in commands:
        if "grad_accumulation_steps" in f:
            assert f["grad_accumulation_steps"] == accum
            assert int(gpus) * int(f["batch_size"]) * int(accum) == 64
            assert int(f["max_steps"]) == UPSTREAM_STEPS[f["dataset_name"].removesuffix("_no_noops")]
    assert "departures from the recipe: none" in proc.stdout


def test_impossible_global_batch_is_announced_before_anything_runs(tmp_path):
    commands, proc = dry_run("table1", tmp_path, NUM_GPUS="3", SEEDS="7", METHODS="baseline", SUITES="libero_goal")
    (train,) = [f for kind, f in commands if kind == "train"]
    assert (train["batch_size"], train["grad_accumulation_steps"]) == ("16", "1")  # 48: the nearest to 64
    departures = [line for line in proc.stdout.splitlines() if line.startswith("# DEPARTS FROM THE RECIPE")]
    assert len(departures) == 2
    assert "global batch 48" in departures[0] and "0.75x" in departures[0]
    assert f"{50000 * 48:,} samples seen instead of the recipe's {50000 * 64:,}" in departures[1]
    assert proc.stdout.index("DEPARTS FROM THE RECIPE") < proc.stdout.index("[DRY_RUN][train]")


def test_explicit_overrides_epochs_and_max_steps(tmp_path):
    commands, proc = dry_run("table1", tmp_path, EPOCHS="7", SEEDS="7", METHODS="baseline")
    for _, f in commands:
        if "max_steps" in f:
            suite = f["dataset_name"].removesuffix("_no_noops")
            assert int(f["max_steps"]) == epoch_steps(suite, 64, 7)
    assert proc.stdout.count("(EPOCHS=7)") == 4
    commands, proc = dry_run("table1", tmp_path, MAX_STEPS_LIBERO_10="1234", SUITES="libero_10 libero_goal",
                             SEEDS="7", METHODS="baseline")
    steps = {f["dataset_name"]: f["max_steps"] for kind, f in commands if kind == "train"}
    assert steps == {"libero_10_no_noops": "1234", "libero_goal_no_noops": "50000"}
    assert "# DEPARTS FROM THE RECIPE: libero_10: 1234 steps (MAX_STEPS_LIBERO_10)" in proc.stdout


def test_fewshot_steps_scale_with_the_episodes_seen(tmp_path):
    commands, _ = dry_run("fewshot", tmp_path, SEEDS="7", METHODS="baseline", SUITES="libero_object")
    got = {f["num_demos_per_task"]: int(f["max_steps"]) for kind, f in commands if kind == "train"}
    episodes = FACTS["libero_object"][0]
    assert got == {"5": math.ceil(5000 * 50 / episodes), "10": math.ceil(5000 * 100 / episodes)} == {"5": 551,
                                                                                                    "10": 1102}


def test_project_warmup_is_a_flag_and_its_percentages_need_it(tmp_path):
    commands, proc = dry_run("table1", tmp_path, LR_SCHEDULE="project", SEEDS="7", METHODS="baseline",
                             SUITES="libero_spatial")
    (train,) = [f for kind, f in commands if kind == "train"]
    assert (train["lr_warmup_steps"], train["num_steps_before_decay"]) == ("2000", "16000")
    assert "DEPARTS FROM THE RECIPE: the project's lr schedule" in proc.stdout
    bad = run_script("table1", tmp_path, DRY_RUN="1", WARMUP_PERCENT="5")
    assert bad.returncode == 2 and "only apply to LR_SCHEDULE=project" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_banner_prints_sources_cost_and_disk(tmp_path):
    _, proc = dry_run("table1", tmp_path, SEEDS="7")
    assert "learning_rate = 2e-4: VLA-Adapter README @838a36d" in proc.stdout
    # (5 + 1 + 3 + 12) h x 4 GPUs for the baseline and KI rows, x 1.72 for CRaFT; 2 checkpoints of 3 GB at most per
    # run (12 runs)
    hours = (5 + 1 + 3 + 12) * 4 * (2 + recipe_module.CRAFT_TIME_FACTOR)
    assert f"~{hours:,.0f} H100 GPU-hours" in proc.stdout and "disk ~72 GB" in proc.stdout
