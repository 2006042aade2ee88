"""A battery of bad inputs across the CLIs, each run as a real subprocess as a user would.

Each must exit 2 with exactly one stderr line starting `error:` that names the problem, print no traceback, and leave
nothing behind under its output folders (no run folder, checkpoint, cache or report that could pass for complete).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safety_helpers import DATASET, REPO, finetune_args, run_cli, shard_of, tree

FT = REPO / "vla-scripts" / "finetune.py"
CACHE = REPO / "vla-scripts" / "build_craft_cache.py"
DRIFT = REPO / "vla-scripts" / "measure_drift.py"
MERGE = REPO / "vla-scripts" / "merge_lora_weights_and_save.py"
LOG_PARSER = REPO / "craft_experiments" / "common_utils" / "log_parser.py"


def _corrupt_copy(data_root: Path, tmp: Path, how: str) -> Path:
    root = tmp / "bad_rlds"
    shutil.copytree(data_root, root)
    shard = shard_of(root)
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 100]
    elif how == "crc":
        data[len(data) // 2] ^= 0x55
    elif how == "empty":
        data = bytearray()
    shard.write_bytes(bytes(data))
    return root


def _short_episodes(tmp: Path) -> Path:
    from prismatic.data.synthetic_libero import make_synthetic_libero_dataset

    make_synthetic_libero_dataset(tmp / "short", DATASET, num_tasks=1, episodes_per_task=2, steps=5, seed=1)
    return tmp / "short"


def _incomplete_checkpoint(finished: Path, tmp: Path) -> Path:
    dst = tmp / "ck" / "done--1_chkpt"
    shutil.copytree(finished / "done--1_chkpt", dst)
    (dst / "COMPLETE").unlink()
    return dst


def _flipped_checkpoint(finished: Path, tmp: Path) -> Path:
    dst = tmp / "ck" / "done--1_chkpt"
    shutil.copytree(finished / "done--1_chkpt", dst)
    target = dst / "lora_adapter" / "trainable_state.safetensors"
    data = bytearray(target.read_bytes())
    for i in range(len(data) - 1000, len(data)):
        data[i] ^= 0xFF  # 1,000 flipped bytes in the weights
    target.write_bytes(bytes(data))
    return dst


# (case id, builder(ctx) -> (argv, expected substring in the error line)); ctx: tmp, data, finished (lazy)
CASES = {
    # ---- finetune: flags (fail before torch is imported) --------------------------------------------------------
    "ft_max_steps_word": lambda c: (finetune_args(c.data, c.runs, "--max_steps", "two"), "max_steps"),
    "ft_bool_typo": lambda c: (finetune_args(c.data, c.runs, "--use_craft", "Ture"), "use_craft"),
    "ft_yaml_typo": lambda c: (finetune_args(c.data, c.runs, "--config_path", c.yaml("lerning_rate: 0.001\n")),
                               "lerning_rate"),
    "ft_yaml_missing": lambda c: (finetune_args(c.data, c.runs, "--config_path", c.tmp / "nope.yaml"), "nope.yaml"),
    "ft_dual_lr_inf": lambda c: (finetune_args(c.data, c.runs, "--use_craft", "True", "--craft_dual_lr", "inf"),
                                 "--craft_dual_lr"),
    "ft_raw_layer_99": lambda c: (finetune_args(c.data, c.runs, "--use_craft", "True", "--craft_raw_layer", "99"),
                                  "--craft_raw_layer 99"),
    "ft_three_images": lambda c: (finetune_args(c.data, c.runs, "--num_images_in_input", "3"),
                                  "--num_images_in_input"),
    "ft_batch_zero": lambda c: (finetune_args(c.data, c.runs, "--batch_size", "0"), "--batch_size"),
    "ft_bad_strategy": lambda c: (finetune_args(c.data, c.runs, "--distributed_strategy", "zero3"),
                                  "--distributed_strategy"),
    "ft_fsdp_with_monitor": lambda c: (finetune_args(c.data, c.runs, "--distributed_strategy", "fsdp",
                                                     "--retention_monitor", "True"), "--retention_monitor True"),
    "ft_unknown_flag": lambda c: (finetune_args(c.data, c.runs, "--lerning_rate", "1"), "lerning_rate"),
    "ft_missing_value": lambda c: (finetune_args(c.data, c.runs, "--seed"), "seed"),
    "ft_missing_data_root": lambda c: (finetune_args(c.tmp / "no_data", c.runs), "--data_root_dir"),
    "ft_unknown_dataset": lambda c: (finetune_args(c.data, c.runs, "--dataset_name", "libero_spatail"),
                                     "libero_spatail"),
    "ft_run_id_slash": lambda c: (finetune_args(c.data, c.runs, "--run_id", "a/b"), "--run_id"),
    "ft_resume_no_checkpoint": lambda c: (finetune_args(c.data, c.runs, "--resume", "True"), "--resume"),
    "ft_resume_incomplete": lambda c: (finetune_args(c.data, c.runs, "--resume", "True", "--resume_step", "1",
                                                     "--config_file_path", _incomplete_checkpoint(c.finished, c.tmp)),
                                       "COMPLETE"),
    # ---- finetune: refused run folder, data (the tiny model is built first) ---------------------------------------
    "ft_existing_run": lambda c: (finetune_args(c.data, c.existing_run(), "--run_id", "taken"), "--overwrite True"),
    "ft_truncated_shard": lambda c: (finetune_args(_corrupt_copy(c.data, c.tmp, "truncated"), c.runs), "tfrecord"),
    "ft_crc_shard": lambda c: (finetune_args(_corrupt_copy(c.data, c.tmp, "crc"), c.runs), "CRC"),
    "ft_empty_shard": lambda c: (finetune_args(_corrupt_copy(c.data, c.tmp, "empty"), c.runs), "tfrecord"),
    "ft_short_episodes": lambda c: (finetune_args(_short_episodes(c.tmp), c.runs), "shorter than"),
    "ft_few_shot_shortfall": lambda c: (finetune_args(c.data, c.runs, "--num_demos_per_task", "50"),
                                        "--allow_fewer_demos True"),
    "ft_resume_changed_rank": lambda c: (
        finetune_args(c.data, c.resumable(), "--resume", "True", "--resume_step", "1", "--max_steps", "3",
                      "--config_file_path", c.resumable() / "done--1_chkpt", "--lora_rank", "16", "--seed", "5"),
        "--lora_rank 16"),
    "ft_resume_flipped_bytes": lambda c: (
        finetune_args(c.data, c.runs, "--resume", "True", "--resume_step", "1", "--max_steps", "3",
                      "--config_file_path", _flipped_checkpoint(c.finished, c.tmp)), "trainable_state.safetensors"),
    # ---- build_craft_cache --------------------------------------------------------------------------------------
    "cache_missing_vlm": lambda c: ([CACHE, "--vlm_path", c.tmp / "no_vlm", "--cache_dir", c.tmp / "cache",
                                     "--data_root_dir", c.data, "--dataset_name", DATASET], "--vlm_path"),
    "cache_missing_data": lambda c: ([CACHE, "--model_preset", "tiny", "--cache_dir", c.tmp / "cache",
                                      "--data_root_dir", c.tmp / "no_data"], "--data_root_dir"),
    "cache_no_cache_dir": lambda c: ([CACHE, "--model_preset", "tiny", "--data_root_dir", c.data, "--dataset_name",
                                      DATASET], "--cache_dir"),
    "cache_real_without_model": lambda c: ([CACHE, "--cache_dir", c.tmp / "cache", "--data_root_dir", c.data,
                                            "--dataset_name", DATASET], "--vlm_path or --config_file_path"),
    "ft_real_without_model": lambda c: (finetune_args(c.data, c.runs, "--model_preset", "real"),
                                        "--vlm_path or --config_file_path"),
    "cache_bad_anchor_type": lambda c: ([CACHE, "--model_preset", "tiny", "--cache_dir", c.tmp / "cache",
                                         "--data_root_dir", c.data, "--dataset_name", DATASET,
                                         "--craft_anchor_type", "both"], "--craft_anchor_type"),
    # ---- measure_drift ------------------------------------------------------------------------------------------
    "drift_missing_reference": lambda c: ([DRIFT, "--reference_path", c.tmp / "no_ref", "--finetuned_path",
                                           c.finished / "done--1_chkpt", "--data_root_dir", c.data,
                                           "--dataset_name", DATASET, "--output_dir", c.tmp / "drift"],
                                          "--reference_path"),
    "drift_missing_finetuned": lambda c: ([DRIFT, "--reference_path", c.finished / "done--1_chkpt",
                                           "--finetuned_path", c.tmp / "no_ft", "--data_root_dir", c.data,
                                           "--dataset_name", DATASET, "--output_dir", c.tmp / "drift"],
                                          "--finetuned_path"),
    # ---- merge_lora ---------------------------------------------------------------------------------------------
    "merge_missing": lambda c: ([MERGE, "--lora_finetuned_checkpoint_dir", c.tmp / "run--5_chkpt"], "does not exist"),
    "merge_incomplete": lambda c: ([MERGE, "--lora_finetuned_checkpoint_dir",
                                    _incomplete_checkpoint(c.finished, c.tmp)], "COMPLETE"),
    "merge_flipped_bytes": lambda c: ([MERGE, "--lora_finetuned_checkpoint_dir",
                                       _flipped_checkpoint(c.finished, c.tmp), "--output_dir", c.tmp / "merged"],
                                      "corrupt"),
    # ---- log_parser ---------------------------------------------------------------------------------------------
    "log_parser_missing_runs_dir": lambda c: ([LOG_PARSER, "--runs_dir", c.tmp / "no_runs", "--output_dir",
                                               c.tmp / "results"], "no_runs"),
}


class Ctx:
    def __init__(self, tmp: Path, request) -> None:
        self.tmp, self._request = tmp, request
        self.runs = tmp / "runs"

    @property
    def data(self) -> Path:
        return self._request.getfixturevalue("data_root")

    @property
    def finished(self) -> Path:
        return self._request.getfixturevalue("finished_run")

    def yaml(self, text: str) -> Path:
        path = self.tmp / "flags.yaml"
        path.write_text(text)
        return path

    def existing_run(self) -> Path:
        (self.runs / "taken").mkdir(parents=True, exist_ok=True)
        (self.runs / "taken" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
        return self.runs

    def resumable(self) -> Path:
        if not self.runs.exists():
            shutil.copytree(self.finished, self.runs)
        return self.runs


# these build the tiny model (or read a whole checkpoint) before the fault shows: ~10-30 s each on a shared machine
NEEDS_MODEL = {"ft_truncated_shard", "ft_crc_shard", "ft_empty_shard", "ft_short_episodes", "ft_few_shot_shortfall",
               "ft_resume_changed_rank", "ft_resume_flipped_bytes"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in NEEDS_MODEL else c
                                  for c in sorted(CASES)])
def test_bad_input_is_one_line_exit_2(case, tmp_path, request):
    ctx = Ctx(tmp_path, request)
    argv, expected = CASES[case](ctx)
    before = tree(tmp_path)
    proc = run_cli(argv)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0], errors[0]
    assert " — " in errors[0] or case.startswith("log_parser"), errors[0]  # "<what> — <how to fix>"
    added = {p for p in tree(tmp_path) - before if "__pycache__" not in p}
    assert not added, f"left behind: {sorted(added)[:10]}"


def test_battery_size():
    assert len(CASES) >= 25 and len(set(CASES) - NEEDS_MODEL) >= 25  # >= 25 also in the default (fast) suite


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli([FT, "--num_images_in_input", "3", "--data_root_dir", tmp_path, "--debug", "True"])
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")]
