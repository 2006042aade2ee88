"""The experiment grids (craft_experiments/common_utils/grid.py behind the three shell scripts): DRY_RUN output
(parsed, counted, checked flag by flag against a recipe recomputed here from the LIBERO facts, every command parsed by
the real tools' configs), resume-safe skipping, stale evaluations redone, stop on first failure, orchestration with
stand-in tools that reject what the real ones reject, and (slow) SMOKE runs of every grid with the real tools into
the tables."""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prismatic.training.lr_schedule import WarmupStepDecay

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "table1": REPO / "craft_experiments/01_main_results/run_table1_experiments.sh",
    "fewshot": REPO / "craft_experiments/02_stability_efficiency/run_fewshot_experiments.sh",
    "ablations": REPO / "craft_experiments/03_ablations/run_ablation_experiments.sh",
}
FAKE_TOOLS = Path(__file__).with_name("fake_tools.py")
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
# VLA_ADAPTER_FACTS §5: (episodes, steps) per suite; a training frame needs 7 future actions.
FACTS = {"libero_spatial": (432, 52970), "libero_object": (454, 66984), "libero_goal": (428, 52042),
         "libero_10": (379, 101469)}


# Upstream's per-suite steps for 4 GPUs x batch 16 (VLA-Adapter issue #46, quoting the maintainers' answer in #35).
UPSTREAM_STEPS = {"libero_spatial": 20000, "libero_object": 5000, "libero_goal": 50000, "libero_10": 60000}


def expected_steps(suite: str, shots: int | None = None) -> int:
    """Upstream's steps; a k-shot run gets the same epochs over the k x 10 episodes it sees."""
    episodes, _ = FACTS[suite]
    if shots is None:
        return UPSTREAM_STEPS[suite]
    return math.ceil(UPSTREAM_STEPS[suite] * min(shots * 10, episodes) / episodes)


def epoch_steps(suite: str, global_batch: int, epochs: int, save_freq: int = 5000) -> int:
    episodes, steps = FACTS[suite]
    raw = math.ceil(epochs * (steps - 7 * episodes) / global_batch)
    return math.ceil(raw / save_freq) * save_freq


# Variables the scripts read: cleared so that the caller's shell cannot change the grid under test.
CONTROL_PREFIXES = ("SMOKE", "DRY_RUN", "SUITES", "SEEDS", "NUM_GPUS", "MAX_STEPS", "METHODS", "ABLATIONS", "WANDB_",
                    "EPOCHS", "BATCH_SIZE", "LEARNING_RATE", "LORA_RANK", "SAVE_", "WARMUP_", "DECAY_", "IMAGE_AUG",
                    "DATA_ROOT", "VLM_PATH", "CONFIG_FILE_PATH", "OUTPUT_ROOT", "PYTHON", "TORCHRUN", "CRAFT_",
                    "EVAL_", "LR_SCHEDULE", "SHOTS", "FIXED_LAMBDAS", "EPSILON_SWEEP", "RAW_LAYER_SWEEP",
                    "RELATED_BASELINES", "AUTO_RESUME", "NUM_WORKERS", "GRAD_ACCUMULATION_STEPS", "FAKE_", "NUM_ENVS",
                    "MEASURE_DRIFT", "DRIFT_", "RETENTION_MONITOR", "GRID_")


def run_script(name: str, tmp_path: Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(CONTROL_PREFIXES)}
    full_env["OUTPUT_ROOT"] = str(tmp_path / "out")
    full_env.update(env)
    return subprocess.run(["bash", str(SCRIPTS[name])], cwd=cwd or SCRIPTS[name].parent, env=full_env,
                          capture_output=True, text=True, timeout=120)


def parse_commands(stdout: str, prefix: str = "[DRY_RUN]") -> list[tuple[str, list[str]]]:
    """(kind, argv) for every printed command line `<prefix>[kind] argv...`."""
    out = []
    for line in stdout.splitlines():
        for kind in ("train", "eval", "cache", "drift"):
            if line.startswith(f"{prefix}[{kind}] "):
                out.append((kind, shlex.split(line[len(prefix) + len(kind) + 3:])))
    return out


def flags_of(argv: list[str]) -> dict[str, str]:
    start = next(i for i, a in enumerate(argv) if a.startswith("--") and a != "--standalone")
    if argv[0].endswith("torchrun"):
        start = next(i for i, a in enumerate(argv) if a.endswith(".py")) + 1
    tokens = argv[start:]
    assert len(tokens) % 2 == 0, f"odd flag list {tokens}"
    pairs = list(zip(tokens[::2], tokens[1::2], strict=True))
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"a flag is given twice: {keys}"
    assert all(k.startswith("--") for k in keys)
    return {k[2:]: v for k, v in pairs}


def dry_run(name: str, tmp_path: Path, **env: str) -> tuple[list[tuple[str, dict]], subprocess.CompletedProcess]:
    proc = run_script(name, tmp_path, DRY_RUN="1", **env)
    assert proc.returncode == 0, proc.stderr
    return [(kind, flags_of(argv)) for kind, argv in parse_commands(proc.stdout)], proc


RECIPE = {"batch_size": "16", "learning_rate": "2e-4", "lora_rank": "64", "image_aug": "True", "use_proprio": "True",
          "num_images_in_input": "2", "use_pro_version": "True", "use_lora": "True", "use_l1_regression": "True",
          "model_preset": "real", "grad_accumulation_steps": "4", "wandb_project": "vla-craft-training",
          "retention_monitor": "True", "retention_monitor_freq": "100"}


def expected_run_id(prefix: str, suite: str, label: str, seed, craft: bool, shots=None, lr="2e-4", batch=64,
                    rank=64, eps="0.1") -> str:
    """Every flag the grid varies is in the id."""
    parts = [prefix, suite, *([f"{shots}shot"] if shots else []), label, f"lr{lr}", f"b{batch}", f"r{rank}"]
    return "-".join(parts + ([f"eps{eps}", "dlr0.01"] if craft else []) + [f"s{seed}"])


def test_table1_dry_run_grid_and_recipe(tmp_path):
    commands, proc = dry_run("table1", tmp_path)
    trains = [f for kind, f in commands if kind == "train"]
    evals = [f for kind, f in commands if kind == "eval"]
    assert len(trains) == 4 * 3 * 3 and len(evals) == 4 * 3 * 3
    grid = {(f["dataset_name"], _method_of(f), f["seed"]) for f in trains}
    assert grid == set(itertools.product([f"{s}_no_noops" for s in SUITES], METHODS, ["7", "42", "123"]))
    run_root = str(tmp_path / "out" / "table1")
    for f in trains:
        for key, value in RECIPE.items():
            assert f[key] == value, (key, f)
        suite = f["dataset_name"].removesuffix("_no_noops")
        steps = expected_steps(suite)
        assert int(f["max_steps"]) == steps
        # upstream's schedule: the real scheduler's factor is 1 at every step of the run (no warm-up, no decay)
        factor = WarmupStepDecay(int(f["lr_warmup_steps"]), int(f["num_steps_before_decay"]))
        assert {factor(s) for s in (0, 1, steps // 2, steps - 1, 10 * steps)} == {1.0}
        assert f["run_root_dir"] == run_root
        craft = f["use_craft"] == "True"
        if craft:
            assert (f["craft_retention_budget"], f["craft_dual_lr"]) == ("0.1", "0.01")
            assert f["craft_enable_projection"] == f["craft_enable_dual"] == "True"
        else:
            assert not any(k.startswith("craft_") for k in f)
        assert f["run_id"] == expected_run_id("t1", suite, _method_of(f), f["seed"], craft)
    # every training is followed by the drift measure and the evaluation of its final checkpoint
    kinds = [kind for kind, _ in commands]
    assert kinds == ["train", "drift", "eval"] * 36
    vlm = str(REPO / "pretrained_models/prism-qwen25-extra-dinosiglip-224px-0_5b")
    for (_, train), (_, drift), (_, ev) in zip(commands[::3], commands[1::3], commands[2::3], strict=True):
        final = f"{run_root}/{train['run_id']}--{train['max_steps']}_chkpt"
        assert (drift["reference_path"], drift["finetuned_path"]) == (vlm, final)
        assert drift["output_dir"] == f"{run_root}/{train['run_id']}/drift"
        assert drift["dataset_name"] == train["dataset_name"] and drift["center_crop"] == "True"
        assert ev["pretrained_checkpoint"] == final
        assert ev["task_suite_name"] == train["dataset_name"].removesuffix("_no_noops")
        assert ev["local_log_dir"] == f"{run_root}/{train['run_id']}/eval"
        assert (ev["num_trials_per_task"], ev["seed"], ev["num_images_in_input"]) == ("50", "7", "2")
        assert ev["use_proprio"] == ev["center_crop"] == "True"
        assert ev["device"] == "auto" and ev["num_envs"] == "1"  # resolved by the evaluation on its node
    assert len({f["run_id"] for f in trains}) == 36
    assert not (tmp_path / "out").exists(), "DRY_RUN must not create anything"


METHODS = ("baseline", "craft", "ki")  # the default rows of Table 1 and the few-shot grid


def _method_of(flags: dict) -> str:
    """The row a printed training command is: craft, ki (knowledge insulation) or the plain baseline."""
    if flags["use_craft"] == "True":
        return "craft"
    return "ki" if flags.get("retention_method") == "ki" else "baseline"


def test_table1_multi_gpu_uses_torchrun_and_scales_steps(tmp_path):
    proc = run_script("table1", tmp_path, DRY_RUN="1", NUM_GPUS="4", SUITES="libero_10", SEEDS="7",
                      WANDB_ENTITY="lab", WANDB_PROJECT="p1", BATCH_SIZE="16")
    assert proc.returncode == 0, proc.stderr
    trains = [argv for kind, argv in parse_commands(proc.stdout) if kind == "train"]
    assert len(trains) == 3
    for argv in trains:
        assert Path(argv[0]).name == "torchrun"
        assert argv[1:6] == ["--standalone", "--nnodes", "1", "--nproc_per_node", "4"]
        assert argv[6] == "vla-scripts/finetune.py"
        f = flags_of(argv)
        assert int(f["max_steps"]) == expected_steps("libero_10")  # the recipe's 4 x 16: no accumulation
        assert (f["wandb_entity"], f["wandb_project"], f["batch_size"]) == ("lab", "p1", "16")
        assert f["grad_accumulation_steps"] == "1"
    assert "departures from the recipe: none" in proc.stdout


def test_env_paths_are_resolved_from_the_invocation_directory(tmp_path):
    proc = run_script("table1", tmp_path, cwd=tmp_path, DRY_RUN="1", SUITES="libero_goal", SEEDS="1",
                      DATA_ROOT="data/rlds", VLM_PATH="vlm", OUTPUT_ROOT="o", MAX_STEPS_LIBERO_GOAL="10000")
    assert proc.returncode == 0, proc.stderr
    f = flags_of(parse_commands(proc.stdout)[0][1])
    assert f["data_root_dir"] == str(tmp_path / "data/rlds") and f["vlm_path"] == str(tmp_path / "vlm")
    assert f["run_root_dir"] == str(tmp_path / "o/table1") and f["max_steps"] == "10000"


@pytest.mark.parametrize("env, message", [
    ({"NUM_GPUS": "two"}, "NUM_GPUS"),
    ({"SUITES": "libero_spatial libero_99"}, "unknown suite 'libero_99'"),
    ({"IMAGE_AUG": "yes"}, "IMAGE_AUG must be True or False"),
    ({"MAX_STEPS": "12x"}, "MAX_STEPS must be a non-negative integer"),
    ({"SMOKE_SKIP_EVAL": "1"}, "only allowed together with SMOKE=1"),
    ({"SEEDS": " "}, "SEEDS is empty"),
])
def test_bad_environment_is_refused(tmp_path, env, message):
    proc = run_script("table1", tmp_path, DRY_RUN="1", **env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "[DRY_RUN][train]" not in proc.stdout


def test_fewshot_dry_run(tmp_path):
    commands, _ = dry_run("fewshot", tmp_path)
    trains = [f for kind, f in commands if kind == "train"]
    assert len(trains) == 4 * 2 * 3 * 3 and sum(kind == "eval" for kind, _ in commands) == 72
    grid = {(f["dataset_name"], f["num_demos_per_task"], _method_of(f), f["seed"]) for f in trains}
    assert grid == set(itertools.product([f"{s}_no_noops" for s in SUITES], ["5", "10"], METHODS,
                                         ["7", "42", "123"]))
    for f in trains:
        suite = f["dataset_name"].removesuffix("_no_noops")
        assert int(f["max_steps"]) == expected_steps(suite, shots=int(f["num_demos_per_task"]))
        craft = f["use_craft"] == "True"
        assert f["run_id"] == expected_run_id("fs", suite, _method_of(f), f["seed"], craft,
                                              shots=f["num_demos_per_task"])


def test_ablation_dry_run(tmp_path):
    commands, proc = dry_run("ablations", tmp_path)
    trains = [f for kind, f in commands if kind == "train"]
    caches = [(i, f) for i, (kind, f) in enumerate(commands) if kind == "cache"]
    seeds = {"7", "42", "123"}
    assert all(f["dataset_name"] == "libero_spatial_no_noops" for f in trains)

    def select(**want):
        return [f for f in trains if all(f.get(k) == v for k, v in want.items())]

    craft = select(use_craft="True")
    plain = [f for f in trains if f["use_craft"] == "False"]
    # plain SFT: baseline, align, freeze; one run per seed each
    assert {f["seed"] for f in plain if "retention_method" not in f and "freeze_vision_backbone" not in f} == seeds
    assert len(select(retention_method="align")) == 3 and len(select(freeze_vision_backbone="True")) == 3
    assert len(plain) == 9
    assert len(select(craft_enable_projection="False")) == 3
    fixed = select(craft_enable_dual="False")
    assert sorted(f["craft_fixed_lambda"] for f in fixed) == sorted(["0", "0.1", "1"] * 3)
    assert {f["craft_anchor_type"] for f in craft} == {"concat", "raw_only", "aq_only"}
    assert len(select(craft_anchor_type="raw_only")) == len(select(craft_anchor_type="aq_only")) == 3
    eps = [f["craft_retention_budget"] for f in craft]
    assert sorted(set(eps)) == ["0.02", "0.05", "0.1", "0.2", "0.5"]
    assert all(eps.count(e) == 3 for e in ["0.02", "0.05", "0.2", "0.5"])
    assert sorted(f["craft_raw_layer"] for f in craft if "craft_raw_layer" in f) == sorted(["6", "18"] * 3)
    # reference CRaFT (all defaults) once per seed; total = 1 + 1 + 3 + 2 + 4 + 2 + 1 variants of CRaFT
    assert len(craft) == 14 * 3
    offline = select(craft_anchor_source="offline")
    assert len(offline) == 3 and len(caches) == 1
    cache_index, cache = caches[0]
    first_offline = next(i for i, (kind, f) in enumerate(commands) if f.get("craft_anchor_source") == "offline")
    assert cache_index < first_offline
    assert {f["craft_cache_dir"] for f in offline} == {cache["cache_dir"]}
    assert cache["dataset_name"] == "libero_spatial_no_noops" and cache["craft_anchor_type"] == "concat"
    assert cache["image_aug"] == "True" and cache["model_preset"] == "real"
    assert sum(kind == "eval" for kind, _ in commands) == len(trains) == 17 * 3
    assert len({f["run_id"] for f in trains}) == 17 * 3  # every variant x seed has its own run id


def test_ablation_groups_can_be_selected(tmp_path):
    commands, _ = dry_run("ablations", tmp_path, ABLATIONS="epsilon", EPSILON_SWEEP="0.1 0.3", SEEDS="1",
                          SUITES="libero_goal libero_10")
    trains = [f for kind, f in commands if kind == "train"]
    assert [(f["dataset_name"], f["craft_retention_budget"]) for f in trains] == [
        ("libero_goal_no_noops", "0.3"), ("libero_10_no_noops", "0.3")]  # 0.1 is the reference run
    proc = run_script("ablations", tmp_path, DRY_RUN="1", ABLATIONS="projection nonsense")
    assert proc.returncode != 0 and "unknown group 'nonsense'" in proc.stderr


def test_smoke_dry_run_uses_tiny_settings(tmp_path):
    env = {"SMOKE": "1", "SMOKE_FULL": "1", "SMOKE_DATA_ROOT": str(tmp_path / "tiny_data"),
           "SMOKE_VLM_PATH": str(tmp_path / "vlm")}
    commands, proc = dry_run("ablations", tmp_path, **env)
    trains = [f for kind, f in commands if kind == "train"]
    evals = [f for kind, f in commands if kind == "eval"]
    assert len(trains) == len(evals) == 17 * 3
    for f in trains:
        assert (f["model_preset"], f["max_steps"], f["save_freq"], f["wandb_mode"]) == ("tiny", "4", "4", "offline")
        assert f["run_root_dir"] == str(tmp_path / "out" / "ablations")  # OUTPUT_ROOT given: used as is
        assert f["data_root_dir"] == str(tmp_path / "tiny_data") and f["vlm_path"] == str(tmp_path / "vlm")
    assert sorted({f["craft_raw_layer"] for f in trains if "craft_raw_layer" in f}) == ["1", "3"]
    for f in evals:
        assert (f["task_ids"], f["max_steps_override"], f["num_trials_per_task"]) == ("[0]", "20", "1")
    skip = run_script("table1", tmp_path, DRY_RUN="1", SMOKE_SKIP_EVAL="1", **env)
    assert skip.returncode == 0
    kinds = [kind for kind, _ in parse_commands(skip.stdout)]
    assert kinds == ["train", "drift"] * 36
    assert skip.stderr.count("SMOKE_SKIP_EVAL=1") >= 36 and "EVALUATION IS SKIPPED" in skip.stderr
    missing = run_script("table1", tmp_path, SMOKE="1")
    assert missing.returncode != 0 and "SMOKE_DATA_ROOT" in missing.stderr
    scratch, _ = dry_run("table1", tmp_path, SMOKE="1", SMOKE_DATA_ROOT="d", SUITES="libero_10", SEEDS="1")
    assert all("vlm_path" not in f for _, f in scratch)  # no SMOKE_VLM_PATH: the tiny model is built from scratch
    assert "drift" not in {kind for kind, _ in scratch}  # ... and there is no θ0 folder to measure drift against
    # SMOKE runs live under their own root, never beside the real runs
    default = subprocess.run(["bash", str(SCRIPTS["table1"])], cwd=tmp_path, capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if not k.startswith(CONTROL_PREFIXES)},
                                  "DRY_RUN": "1", "SMOKE": "1", "SEEDS": "1", "SUITES": "libero_10"})
    roots = {flags_of(argv)["run_root_dir"] for kind, argv in parse_commands(default.stdout) if kind == "train"}
    assert roots == {str(REPO / "runs/craft_experiments_smoke/table1")}


# ---------------------------------------------------------------------------------------------------------------------
# Real (non-dry) runs against a fake trainer / evaluator
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_env(tmp_path):
    wrapper = tmp_path / "fake_python"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_TOOLS))} \"$@\"\n")
    wrapper.chmod(0o755)
    return {"PYTHON": str(wrapper), "FAKE_LOG": str(tmp_path / "calls.jsonl"), "WANDB_MODE": "disabled"}


def calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_real_run_skips_finished_work_and_feeds_the_log_parser(tmp_path, fake_env):
    env = {**fake_env, "SUITES": "libero_spatial libero_goal", "SEEDS": "1 2 3", "MAX_STEPS": "10000",
           "METHODS": "baseline craft"}
    first = run_script("table1", tmp_path, **env)
    assert first.returncode == 0, first.stderr
    made = calls(tmp_path)
    assert [Path(c["script"]).name for c in made] == ["finetune.py", "measure_drift.py", "run_libero_eval.py"] * 12
    run_root = tmp_path / "out" / "table1"
    craft_s2 = expected_run_id("t1", "libero_spatial", "craft", 2, True)
    assert (run_root / "logs" / f"{craft_s2}.train.log").is_file()

    second = run_script("table1", tmp_path, **env)
    assert second.returncode == 0, second.stderr
    assert len(calls(tmp_path)) == 36, "finished trainings, drift measures and evaluations must be skipped"
    assert second.stdout.count("[skip-train]") == second.stdout.count("[skip-eval]") == 12
    assert second.stdout.count("[skip-drift]") == 12

    # a missing summary.json re-runs only that evaluation
    baseline_goal_s3 = expected_run_id("t1", "libero_goal", "baseline", 3, False)
    (run_root / baseline_goal_s3 / "eval" / "summary.json").unlink()
    third = run_script("table1", tmp_path, **env)
    assert third.returncode == 0, third.stderr
    assert [Path(c["script"]).name for c in calls(tmp_path)[36:]] == ["run_libero_eval.py"]

    sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
    import log_parser
    from fake_tools import fake_success

    results = log_parser.collect([run_root])
    assert [str(i) for i in results.issues] == []
    rows = {(r["method"], r["suite"]): r for r in results.aggregate}
    assert set(rows) == set(itertools.product(["baseline", "craft"], ["libero_spatial", "libero_goal"]))
    for (method, suite), row in rows.items():
        ids = [expected_run_id("t1", suite, method, s, method == "craft") for s in (1, 2, 3)]
        values = [10.0 * fake_success(f"{i}--10000_chkpt") for i in ids]
        assert row["success_pct_mean"] == pytest.approx(np.mean(values))
        assert row["success_pct_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["final_action_loss_mean"] == pytest.approx(np.mean([1 / 10001 + 0.01 * s for s in (1, 2, 3)]))
        # drift for every method, baselines included: the monitor's L_ret and measure_drift's numbers
        assert row["final_retention_loss_mean"] == pytest.approx(np.mean([0.07 + 0.001 * s for s in (1, 2, 3)]))
        assert row["drift_retention_mean"] == pytest.approx(np.mean(values) / 100)


def test_stale_evaluation_is_redone_after_max_steps_changes(tmp_path, fake_env):
    """MAX_STEPS raised: the run resumes from its complete checkpoint to the new final step, and the evaluation (and
    drift measure) of the old final checkpoint are moved aside and redone; the parser then uses the new one."""
    env = {**fake_env, "SUITES": "libero_goal", "SEEDS": "1", "METHODS": "baseline", "MAX_STEPS": "5000"}
    assert run_script("table1", tmp_path, **env).returncode == 0
    run_id = expected_run_id("t1", "libero_goal", "baseline", 1, False)
    run_root = tmp_path / "out" / "table1"
    env["MAX_STEPS"] = "10000"
    proc = run_script("table1", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert "[stale-eval]" in proc.stdout and "[stale-drift]" in proc.stdout
    later = [(Path(c["script"]).name, flags_of(["x", *c["args"]])) for c in calls(tmp_path)[3:]]
    assert [name for name, _ in later] == ["finetune.py", "measure_drift.py", "run_libero_eval.py"]
    assert (later[0][1]["resume"], later[0][1]["resume_step"]) == ("True", "5000")
    assert later[2][1]["pretrained_checkpoint"] == str(run_root / f"{run_id}--10000_chkpt")
    summary = json.loads((run_root / run_id / "eval" / "summary.json").read_text())
    assert summary["checkpoint"]["step"] == 10000
    assert len(list((run_root / run_id).glob("eval.partial-*"))) == 1
    sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
    import log_parser
    from fake_tools import fake_success

    (row,) = log_parser.collect([run_root]).run_rows
    assert row["success_pct"] == 10.0 * fake_success(f"{run_id}--10000_chkpt")


def test_first_failure_stops_the_script_and_shows_the_command(tmp_path, fake_env):
    failing_id = expected_run_id("t1", "libero_object", "craft", 1, True)
    env = {**fake_env, "SUITES": "libero_object", "SEEDS": "1 2", "MAX_STEPS": "5000", "FAKE_FAIL_ON": failing_id}
    proc = run_script("table1", tmp_path, **env)
    assert proc.returncode == 3
    assert "FAILED (exit 3) [train]" in proc.stderr
    failing = proc.stderr.split("failing command:", 1)[1].splitlines()[0]
    assert flags_of(shlex.split(failing))["run_id"] == failing_id
    made = [flags_of(["x", *c["args"]]) for c in calls(tmp_path)]
    assert made[-1]["run_id"] == failing_id
    assert len(made) == 4  # baseline s1 train + drift + eval, then the failing craft s1 training; nothing after it


def test_stand_in_tools_reject_what_the_real_tools_reject(tmp_path):
    """The stand-in rejects a flag the real config lacks (e.g. the old `--output_dir` of the cache step)."""
    def fake(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(FAKE_TOOLS), script, *args], capture_output=True, text=True)

    bad = fake("vla-scripts/build_craft_cache.py", "--output_dir", str(tmp_path / "c"))
    assert bad.returncode == 2 and "no flag --output_dir" in bad.stderr
    assert fake("vla-scripts/finetune.py", "--use_craft", "yes").returncode == 2
    assert fake("vla-scripts/finetune.py", "--max_steps", "1.5").returncode == 2
    assert fake("vla-scripts/build_craft_cache.py", "--cache_dir", str(tmp_path / "c")).returncode == 0


def test_interrupted_training_resumes_from_latest_complete_checkpoint(tmp_path, fake_env):
    run_root = tmp_path / "out" / "table1"
    run_id = expected_run_id("t1", "libero_spatial", "baseline", 1, False)
    for step, complete in ((5000, True), (10000, True), (15000, False)):
        chkpt = run_root / f"{run_id}--{step}_chkpt"
        chkpt.mkdir(parents=True)
        if complete:
            (chkpt / "COMPLETE").write_text("{}")
    (run_root / run_id).mkdir()
    commands, _ = dry_run("table1", tmp_path, SUITES="libero_spatial", SEEDS="1", METHODS="baseline",
                          MAX_STEPS="20000")
    f = commands[0][1]
    assert (f["resume"], f["resume_step"]) == ("True", "10000")
    assert f["config_file_path"] == str(run_root / f"{run_id}--10000_chkpt")
    assert f["seed"] == "1" and f["run_id"] == run_id  # the run's own flags, which the resume guards compare
    # a run folder without any complete checkpoint is moved aside, not appended to
    other_id = expected_run_id("t1", "libero_spatial", "baseline", 2, False)
    other = run_root / other_id
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 0}\n')
    proc = run_script("table1", tmp_path, SUITES="libero_spatial", SEEDS="2", METHODS="baseline", MAX_STEPS="5000",
                      **fake_env)
    assert proc.returncode == 0, proc.stderr
    moved = [p for p in run_root.iterdir() if p.name.startswith(f"{other_id}.partial-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert "resume" not in flags_of(["x", *calls(tmp_path)[0]["args"]])


def test_offline_cache_is_built_once_then_reused(tmp_path, fake_env):
    env = {**fake_env, "ABLATIONS": "anchor_source", "SEEDS": "1 2", "MAX_STEPS": "5000"}
    proc = run_script("ablations", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    scripts = [Path(c["script"]).name for c in calls(tmp_path)]
    assert scripts == ["build_craft_cache.py"] + ["finetune.py", "measure_drift.py", "run_libero_eval.py"] * 2
    env["SEEDS"] = "1 2 3"
    proc = run_script("ablations", tmp_path, **env)
    assert proc.returncode == 0 and "[skip-cache]" in proc.stdout
    assert [Path(c["script"]).name for c in calls(tmp_path)][7:] == ["finetune.py", "measure_drift.py",
                                                                     "run_libero_eval.py"]


def test_log_parser_labels_every_ablation_variant_as_the_script_names_it(tmp_path, fake_env):
    """The method label the parser derives from each resolved config equals the variant in the script's run id."""
    env = {**fake_env, "SEEDS": "1", "MAX_STEPS": "5000"}
    proc = run_script("ablations", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
    import log_parser

    results = log_parser.collect([tmp_path / "out" / "ablations"])
    assert [str(i) for i in results.issues] == []
    assert len(results.run_rows) == 17
    for row in results.run_rows:
        assert row["run"].startswith(f"abl-libero_spatial-{row['method']}-lr2e-4-b64-r64-")
        assert math.isfinite(row["final_retention_loss"]) and math.isfinite(row["drift_retention"])


def _load_module(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_every_printed_command_parses_with_the_real_configs(tmp_path):
    """The flags the grids emit (train, cache, drift, eval) are accepted by the real tools' draccus configs."""
    import draccus

    sys.path.insert(0, str(REPO))
    from prismatic.training.finetune_config import FinetuneConfig

    configs = {"train": FinetuneConfig,
               "eval": _load_module("run_libero_eval_for_test", REPO / "LIBERO/run_libero_eval.py").EvalConfig,
               "cache": _load_module("build_craft_cache_for_test",
                                     REPO / "vla-scripts/build_craft_cache.py").BuildCacheConfig,
               "drift": _load_module("measure_drift_for_test", REPO / "vla-scripts/measure_drift.py").DriftConfig}
    seen: dict[str, int] = {}
    for name in SCRIPTS:
        for env in ({}, {"SMOKE": "1", "SMOKE_FULL": "1", "SMOKE_DATA_ROOT": "d", "SMOKE_VLM_PATH": "v"}):
            proc = run_script(name, tmp_path, DRY_RUN="1", SEEDS="7", **env)
            assert proc.returncode == 0, proc.stderr
            for kind, argv in parse_commands(proc.stdout):
                args = argv[argv.index(next(a for a in argv if a.endswith(".py"))) + 1:]
                known = {f.name for f in __import__("dataclasses").fields(configs[kind])}
                flags = flags_of(argv)
                assert set(flags) <= known, (kind, set(flags) - known)
                cfg = draccus.parse(config_class=configs[kind], args=args)
                if kind == "train":
                    assert cfg.run_id == flags["run_id"] and cfg.max_steps == int(flags["max_steps"])
                    assert cfg.use_craft == (flags["use_craft"] == "True") and cfg.retention_monitor is True
                elif kind == "eval":
                    assert cfg.local_log_dir.endswith("/eval") and cfg.center_crop is True
                elif kind == "cache":
                    assert str(cfg.cache_dir) == flags["cache_dir"]
                seen[kind] = seen.get(kind, 0) + 1
    # 2 modes x (table1 12 runs + fewshot 24 + ablations 17) trainings, each with drift and eval; 1 cache per mode
    assert seen == {"train": 2 * 53, "drift": 2 * 53, "eval": 2 * 53, "cache": 2}


# ---------------------------------------------------------------------------------------------------------------------
# SMOKE: the real tools on the tiny preset, into the tables
# ---------------------------------------------------------------------------------------------------------------------
SMOKE_GRIDS = {  # kept minimal: ~2-3 min per run (most of it the one short LIBERO episode) on a 2-core machine
    "table1": ({"METHODS": "baseline craft"}, 2),
    "fewshot": ({"METHODS": "baseline craft", "SMOKE_SHOTS": "1"}, 2),
    "ablations": ({"ABLATIONS": "reference anchor_source related"}, 2 + 1 + 2),
}


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> dict[str, str]:
    """The documented SMOKE data command, run as written."""
    out = tmp_path_factory.mktemp("smoke_data")
    proc = subprocess.run([sys.executable, str(REPO / "craft_experiments/common_utils/make_smoke_data.py"),
                           "--output_dir", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return dict(item.split("=", 1) for item in proc.stdout.split())


@pytest.mark.slow
@pytest.mark.grid
@pytest.mark.parametrize("name", list(SMOKE_GRIDS))
def test_smoke_grid_runs_the_real_tools_into_the_tables(tmp_path, smoke_data, name):
    """SMOKE=1 with the real finetune.py, build_craft_cache.py (offline anchors), measure_drift.py and
    run_libero_eval.py (one 20-step LIBERO episode) on one suite and seed; then the promised log_parser command,
    offline, gives CSV / Markdown / LaTeX / PNG tables with a drift number in every row, baselines included."""
    extra, expected_runs = SMOKE_GRIDS[name]
    env = {"SMOKE": "1", "SUITES": "libero_spatial", "SEEDS": "7", "WANDB_MODE": "offline", **smoke_data,
           **extra}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(CONTROL_PREFIXES)}
    full_env.update(OUTPUT_ROOT=str(tmp_path / "runs" / "craft_experiments_smoke"), WANDB_SILENT="true", **env)
    proc = subprocess.run(["bash", str(SCRIPTS[name])], env=full_env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_root = tmp_path / "runs" / "craft_experiments_smoke" / name
    commands = parse_commands(proc.stdout, prefix="")
    trains = [flags_of(argv) for kind, argv in commands if kind == "train"]
    assert len(trains) == expected_runs
    assert sum(kind == "cache" for kind, _ in commands) == (1 if name == "ablations" else 0)
    for f in trains:
        assert (run_root / f"{f['run_id']}--4_chkpt" / "COMPLETE").is_file()
        assert (run_root / f["run_id"] / "eval" / "summary.json").is_file()
        assert (run_root / f["run_id"] / "drift" / "drift.json").is_file()
        assert list((run_root / f["run_id"] / "wandb").glob("offline-run-*"))  # what `wandb sync` uploads

    # the promised command, offline, from the folder holding runs/
    out = tmp_path / "results"
    parser = subprocess.run([sys.executable, str(REPO / "craft_experiments/common_utils/log_parser.py"),
                             "--wandb_project", "vla-craft-training", "--output_dir", str(out),
                             "--generate_latex_table", "--include_smoke", "True"], cwd=tmp_path, capture_output=True,
                            text=True,
                            env={**full_env, "WANDB_MODE": "offline", "WANDB_API_KEY": ""})
    assert parser.returncode == 0, parser.stderr
    with open(out / "runs.csv") as fh:
        rows = {r["run"]: r for r in __import__("csv").DictReader(fh)}
    assert sorted(rows) == sorted(f["run_id"] for f in trains)
    for f in trains:
        row = rows[f["run_id"]]
        for column in ("final_action_loss", "final_retention_loss", "drift_retention", "drift_cka_aq",
                       "success_pct"):
            assert math.isfinite(float(row[column])), (f["run_id"], column)
        assert row["preset"] == "tiny" and row["eval_episodes"] == "1"
        if f["use_craft"] == "True":
            assert math.isfinite(float(row["final_lambda"]))
    assert (out / f"table_success_{name}-tiny.tex").is_file() and (out / f"table_metrics_{name}-tiny.tex").is_file()
    assert list((out / "plots").glob("*.png")) and list((out / "plots").glob("*.pdf"))
    assert "Drift L_ret" in (out / "summary.md").read_text()

    # a second invocation finds everything finished
    again = subprocess.run(["bash", str(SCRIPTS[name])], env=full_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and not parse_commands(again.stdout, prefix="")


# ---------------------------------------------------------------------------------------------------------------------
# Results belong to weights (issue 24): a copied root keeps them, a checkpoint rewritten in place loses them
# ---------------------------------------------------------------------------------------------------------------------
def test_copied_root_keeps_every_result_in_the_parser_and_the_grid(tmp_path, fake_env):
    import shutil

    env = {**fake_env, "SUITES": "libero_goal", "SEEDS": "1 2", "MAX_STEPS": "5000", "METHODS": "baseline craft"}
    assert run_script("table1", tmp_path, **env).returncode == 0
    sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
    import log_parser

    original = log_parser.collect([tmp_path / "out" / "table1"])
    elsewhere = tmp_path / "elsewhere" / "moved_out"
    shutil.copytree(tmp_path / "out", elsewhere, symlinks=True)
    copied = log_parser.collect([elsewhere / "table1"])
    assert [str(i) for i in copied.issues] == []
    columns = ("success_pct", "drift_retention", "final_action_loss")
    assert [[r[c] for c in columns] for r in copied.run_rows] == [[r[c] for c in columns] for r in original.run_rows]
    assert all(math.isfinite(r["success_pct"]) and math.isfinite(r["drift_retention"]) for r in copied.run_rows)
    made = len(calls(tmp_path))
    again = run_script("table1", tmp_path, **{**env, "OUTPUT_ROOT": str(elsewhere)})
    assert again.returncode == 0, again.stderr
    assert len(calls(tmp_path)) == made, "a copied finished root has nothing to redo"
    assert again.stdout.count("[skip-eval]") == again.stdout.count("[skip-drift]") == 4


def test_checkpoint_retrained_in_place_invalidates_its_results(tmp_path, fake_env):
    env = {**fake_env, "SUITES": "libero_goal", "SEEDS": "1", "METHODS": "baseline", "MAX_STEPS": "5000"}
    assert run_script("table1", tmp_path, **env).returncode == 0
    train_args = calls(tmp_path)[0]["args"]
    # the same training run again into the same folder, other weights (a rerun of finetune.py by hand)
    subprocess.run([sys.executable, str(FAKE_TOOLS), "vla-scripts/finetune.py", *train_args], check=True,
                   env={**os.environ, "FAKE_WEIGHTS_SALT": "retrained"})
    sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
    import log_parser

    results = log_parser.collect([tmp_path / "out" / "table1"])
    (row,) = results.run_rows
    assert math.isnan(row["success_pct"]) and math.isnan(row["drift_retention"])
    messages = [str(i) for i in results.issues]
    assert any("stale evaluation ignored" in m and "retrained at the same path" in m for m in messages), messages
    assert any("stale drift report ignored" in m for m in messages), messages
    proc = run_script("table1", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    assert "[stale-eval]" in proc.stdout and "[stale-drift]" in proc.stdout
    assert [Path(c["script"]).name for c in calls(tmp_path)[3:]] == ["measure_drift.py", "run_libero_eval.py"]
    (row,) = log_parser.collect([tmp_path / "out" / "table1"]).run_rows
    assert math.isfinite(row["success_pct"]) and math.isfinite(row["drift_retention"])


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint selection (issue 27): the final checkpoint in the tables; best of every k-th one in its own column
# ---------------------------------------------------------------------------------------------------------------------
def test_every_kth_checkpoint_is_evaluated_and_reported_apart_from_the_final(tmp_path, fake_env):
    env = {**fake_env, "SUITES": "libero_goal", "SEEDS": "1 2", "METHODS": "baseline", "MAX_STEPS": "15000",
           "EVAL_EVERY_KTH_CHECKPOINT": "1", "SAVE_LATEST_CHECKPOINT_ONLY": "False"}
    proc = run_script("table1", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    evals = [flags_of(["x", *c["args"]])["pretrained_checkpoint"] for c in calls(tmp_path)
             if c["script"].endswith("run_libero_eval.py")]
    ids = [expected_run_id("t1", "libero_goal", "baseline", s, False) for s in (1, 2)]
    run_root = tmp_path / "out" / "table1"
    assert evals == [str(run_root / f"{i}--{step}_chkpt") for i in ids for step in (15000, 5000, 10000)]
    sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
    import log_parser

    results = log_parser.collect([run_root])
    assert [str(i) for i in results.issues] == []
    for row, run_id in zip(results.run_rows, ids, strict=True):
        rates = {step: 10.0 * fake_success_of(f"{run_id}--{step}_chkpt") for step in (5000, 10000, 15000)}
        assert row["success_pct"] == rates[15000]  # the tables' number: the final checkpoint's
        assert row["best_success_pct"] == max(rates.values()) and row["checkpoints_evaluated"] == 3
        assert rates[row["best_step"]] == max(rates.values())
    out = tmp_path / "results"
    log_parser.write_outputs(results, out, latex=True, plots=False)
    md = (out / "summary.md").read_text()
    assert "| Success (%) | Best-ckpt success (%) |" in md and "selected on the evaluation episodes" in md
    best_tex = (out / "table_success_best_table1.tex").read_text()
    assert "\\label{tab:table1-success-best}" in best_tex and "optimistic" in best_tex
    assert "Final checkpoint of every run" in (out / "table_success_table1.tex").read_text()
    again = run_script("table1", tmp_path, **env)
    assert again.returncode == 0 and again.stdout.count("[skip-eval]") == 6


def test_tables_have_no_best_column_without_the_option(tmp_path, fake_env):
    env = {**fake_env, "SUITES": "libero_goal", "SEEDS": "1", "METHODS": "baseline", "MAX_STEPS": "5000"}
    assert run_script("table1", tmp_path, **env).returncode == 0
    sys.path.insert(0, str(REPO / "craft_experiments/common_utils"))
    import log_parser

    results = log_parser.collect([tmp_path / "out" / "table1"])
    out = tmp_path / "results"
    log_parser.write_outputs(results, out, latex=True, plots=False)
    assert "Best" not in (out / "summary.md").read_text() and not (out / "table_success_best_table1.tex").exists()
    refused = run_script("table1", tmp_path, DRY_RUN="1", EVAL_EVERY_KTH_CHECKPOINT="2")
    assert refused.returncode == 2 and "SAVE_LATEST_CHECKPOINT_ONLY=False" in refused.stderr


def fake_success_of(name: str) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_tools import fake_success

    return fake_success(name)


# ---------------------------------------------------------------------------------------------------------------------
# wandb modes (issue 24): offline by default, WANDB_MODE the same with and without SMOKE, online without login = 1 line
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoke", [{}, {"SMOKE": "1", "SMOKE_DATA_ROOT": "d", "SMOKE_VLM_PATH": "v"}])
def test_wandb_mode_is_offline_by_default_and_means_the_same_under_smoke(tmp_path, smoke):
    for env, mode in (({}, "offline"), ({"WANDB_MODE": "disabled"}, "disabled"), ({"WANDB_MODE": "online"}, "online")):
        commands, _ = dry_run("table1", tmp_path, SEEDS="7", SUITES="libero_goal", **smoke, **env)
        modes = {f["wandb_mode"] for kind, f in commands if kind == "train"}
        assert modes == {mode}, (env, smoke)
    refused = run_script("table1", tmp_path, DRY_RUN="1", SMOKE_WANDB_MODE="offline", **smoke)
    assert refused.returncode == 2 and "set WANDB_MODE" in refused.stderr


def test_online_without_login_is_one_line_before_anything_runs(tmp_path, fake_env):
    """The real wandb is asked (no network, no terminal): with no key anywhere it refuses, and the grid says so."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**fake_env, "WANDB_MODE": "online", "HOME": str(home), "NETRC": str(home / ".netrc"),
           "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(home / ".config"), "SUITES": "libero_goal", "SEEDS": "1",
           "MAX_STEPS": "5000"}
    proc = run_script("table1", tmp_path, **env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "No API key configured" in proc.stderr and "wandb login" in proc.stderr
    assert calls(tmp_path) == [] and not (tmp_path / "out").exists()


def test_metrics_logger_online_without_login_is_a_user_error(tmp_path):
    """finetune.py's wandb run: the real wandb's refusal becomes `error: ... — <fix>`, exit 2 (cli_entry)."""
    probe = (
        "import sys\n"
        "from prismatic.cli_errors import cli_entry\n"
        "from prismatic.training.metrics_log import MetricsLogger\n"
        "@cli_entry('probe')\n"
        "def main(argv=None):\n"
        f"    config = {{'run_root_dir': {str(tmp_path / 'table1')!r}, 'dataset_name': 'libero_goal_no_noops',"
        " 'seed': 1}\n"
        f"    MetricsLogger({str(tmp_path / 'run')!r}, 'r', config, enabled=True, wandb_mode='online',"
        " wandb_project='p', wandb_entity=None)\n"
        "main([])\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), WANDB_CONFIG_DIR=str(home / ".config"))
    proc = subprocess.run([sys.executable, "-c", probe], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: wandb online mode: No API key configured")
    assert "--wandb_mode offline" in lines[0]
