"""Every data-loss case of issue 14, reproduced: nothing is lost, and a resume equals the uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safety_helpers import DATASET, tree

from finetune import TrainHooks, train
from prismatic.cli_errors import DiskFullError, UserError, parse_config
from prismatic.training import checkpointing as ckpt
from prismatic.training import metrics_log, run_folder
from prismatic.training.finetune_config import RAW_STRING_FLAGS, FinetuneConfig, make_run_id
from prismatic.training.policy_setup import LORA_DIR, TRAINABLE_STATE_FILE


def _cfg(data_root: Path, run_root: Path, **overrides) -> FinetuneConfig:
    values = dict(data_root_dir=data_root, dataset_name=DATASET, run_root_dir=run_root, model_preset="tiny",
                  batch_size=1, max_steps=2, save_freq=1, num_images_in_input=1, image_aug=False,
                  wandb_mode="disabled", lora_rank=4, run_id="r", learning_rate=1e-3)
    values.update(overrides)
    return FinetuneConfig(**values)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _trainable(chkpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(chkpt / LORA_DIR / TRAINABLE_STATE_FILE))


# ---- run folders ------------------------------------------------------------------------------------------------
def test_second_fresh_run_is_refused_and_first_run_untouched(data_root, tmp_path):
    runs = tmp_path / "runs"
    train(_cfg(data_root, runs))
    before = _snapshot(runs)
    with pytest.raises(UserError, match=r"already exists.*--resume True.*--overwrite True"):
        train(_cfg(data_root, runs, seed=8))  # only the seed differs, same explicit run id
    assert _snapshot(runs) == before  # metrics, checkpoints and config.yaml byte for byte
    result = train(_cfg(data_root, runs, seed=8, overwrite=True))
    assert result.final_step == 2
    assert sorted(p.name for p in runs.iterdir()) == ["r", "r--1_chkpt", "r--2_chkpt"]
    assert "seed: 8" in (runs / "r" / "config.yaml").read_text()
    assert [r["step"] for r in metrics_log.read_metrics(runs / "r" / "metrics.jsonl")] == [1, 2]


def test_default_run_id_has_the_seed_and_run_ids_stay_raw_strings(tmp_path):
    a, b = FinetuneConfig(seed=3), FinetuneConfig(seed=4)
    assert make_run_id(a, 1) != make_run_id(b, 1) and "+seed-3" in make_run_id(a, 1)
    cfg = parse_config(FinetuneConfig, ["--run_id", "off", "--run_id_note", "no"], RAW_STRING_FLAGS)
    assert (cfg.run_id, cfg.run_id_note) == ("off", "no")
    assert parse_config(FinetuneConfig, ["--run_id=123"], RAW_STRING_FLAGS).run_id == "123"
    yaml_path = tmp_path / "flags.yaml"
    yaml_path.write_text("run_id: off\nrun_id_note: yes\nmax_steps: 5\n")
    cfg = parse_config(FinetuneConfig, ["--config_path", str(yaml_path)], RAW_STRING_FLAGS)
    assert (cfg.run_id, cfg.run_id_note, cfg.max_steps) == ("off", "yes", 5)
    cfg = parse_config(FinetuneConfig, ["--config_path", str(yaml_path), "--run_id", "on"], RAW_STRING_FLAGS)
    assert cfg.run_id == "on"  # the command line overrides the file


# ---- resume -----------------------------------------------------------------------------------------------------
README_RESUME_FLAGS = {"config_file_path", "resume", "resume_step", "max_steps", "run_root_dir"}


def test_readme_resume_keeps_the_run_and_equals_the_uninterrupted_run(data_root, tmp_path):
    full = train(_cfg(data_root, tmp_path / "a", max_steps=4, seed=11, lora_rank=8, run_id="x"))
    runs = tmp_path / "b"
    train(_cfg(data_root, runs, max_steps=4, seed=11, lora_rank=8, run_id="x", save_freq=2))
    shutil.rmtree(runs / "x--4_chkpt")  # as if the run had been stopped after step 2
    config_before = (runs / "x" / "config.yaml").read_bytes()
    metrics_log.truncate_after(runs / "x" / "metrics.jsonl", 2)
    # the README's command: only the checkpoint, --resume, --resume_step and --max_steps (seed, rank, data come
    # from the run); run_root_dir given as the test's folder
    resumed = train(FinetuneConfig(config_file_path=runs / "x--2_chkpt", resume=True, resume_step=2, max_steps=4,
                                   run_root_dir=runs), given_flags=README_RESUME_FLAGS)
    assert resumed.final_step == 4
    assert (runs / "x" / "config.yaml").read_bytes() == config_before  # never rewritten with defaults
    a, b = _trainable(full.last_checkpoint), _trainable(runs / "x--4_chkpt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    losses = [r["VLA Train/Loss"] for r in metrics_log.read_metrics(runs / "x" / "metrics.jsonl")]
    assert losses == pytest.approx([h["VLA Train/Loss"] for h in full.history], rel=1e-6)


def test_resume_refuses_changed_run_flags_with_a_list(data_root, finished_run, tmp_path):
    runs = shutil.copytree(finished_run, tmp_path / "runs")
    before = _snapshot(runs)
    base = dict(config_file_path=runs / "done--1_chkpt", resume=True, resume_step=1, max_steps=3, run_root_dir=runs)
    for changed, shown in (({"lora_rank": 16}, "--lora_rank 16 (run: 4)"),
                           ({"num_images_in_input": 2}, "--num_images_in_input 2 (run: 1)"),
                           ({"use_proprio": False}, "--use_proprio False (run: True)"),
                           ({"seed": 5, "dataset_name": "other"},
                            "--dataset_name 'other' (run: 'synthetic_libero_no_noops'), --seed 5 (run: 7)")):
        cfg = FinetuneConfig(**base, **changed)
        with pytest.raises(UserError) as err:
            train(cfg, given_flags=set(base) | set(changed))
        assert shown in str(err.value)
    assert _snapshot(runs) == before


# ---- metrics.jsonl ----------------------------------------------------------------------------------------------
def test_torn_last_metrics_line_is_reported_and_resume_truncates_it(data_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    train(_cfg(data_root, runs, max_steps=2))
    path = runs / "r" / "metrics.jsonl"
    good = metrics_log.read_metrics(path)
    with open(path, "a") as f:
        f.write('{"step": 3, "VLA Train/Lo')  # a crash / full disk mid-write
    assert metrics_log.read_metrics(path) == good
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    result = train(FinetuneConfig(config_file_path=runs / "r--2_chkpt", resume=True, resume_step=2, max_steps=3,
                                  run_root_dir=runs), given_flags={"config_file_path", "resume", "resume_step",
                                                                   "max_steps", "run_root_dir"})
    assert result.final_step == 3
    records, bad = metrics_log.read_metrics_checked(path)
    assert bad == [] and [r["step"] for r in records] == [1, 2, 3] and records[:2] == good


def test_metrics_write_failure_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    logger = metrics_log.MetricsLogger(tmp_path, "r", {}, enabled=True, wandb_mode="disabled",
                                       wandb_project="p", wandb_entity=None)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_log, "open", full_disk, raising=False)
    with pytest.raises(DiskFullError) as err:
        logger.log(1, {"loss": 1.0})
    message = str(err.value)
    assert str(tmp_path / "metrics.jsonl") in message and "No space left" in message and "\n" not in message
    from prismatic.cli_errors import report_and_exit

    with pytest.raises(SystemExit) as code:
        report_and_exit(err.value, "finetune", debug=False)
    assert code.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "No space left" in lines[0]


def test_reader_keeps_the_good_lines_of_a_torn_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    records, bad = metrics_log.read_metrics_checked(path, warn=False)
    assert [r["step"] for r in records] == [1, 2] and bad == [3]


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_complete_marker_records_sha256_of_every_file(finished_run):
    chkpt = finished_run / "done--2_chkpt"
    marker = json.loads((chkpt / "COMPLETE").read_text())
    files = {p.relative_to(chkpt).as_posix() for p in chkpt.rglob("*") if p.is_file() and p.name != "COMPLETE"}
    assert set(marker["sha256"]) == files
    import hashlib

    for name, digest in marker["sha256"].items():
        assert hashlib.sha256((chkpt / name).read_bytes()).hexdigest() == digest


def test_flipped_bytes_are_refused_by_every_reader(finished_run, tmp_path):
    from merge_lora_weights_and_save import merge_lora_checkpoint

    from prismatic.models.loaders import load_policy

    chkpt = shutil.copytree(finished_run / "done--1_chkpt", tmp_path / "done--1_chkpt")
    load_policy(chkpt)  # intact: loads
    weights = chkpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in the merged weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="model.safetensors"):
        load_policy(chkpt)  # what the LIBERO runner and predict_action use
    with pytest.raises(ckpt.CorruptCheckpointError, match="model.safetensors"):
        merge_lora_checkpoint(chkpt, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.verify_checkpoint(chkpt)


def test_merge_writes_a_new_sealed_folder_and_never_the_checkpoint(finished_run, tmp_path):
    import merge_lora_weights_and_save as merge
    from merge_lora_weights_and_save import merge_lora_checkpoint

    from prismatic.training import policy_setup

    assert (merge.LORA_DIR, merge.LORA_BASE_FILE) == (policy_setup.LORA_DIR, policy_setup.LORA_BASE_FILE)

    chkpt = shutil.copytree(finished_run / "done--1_chkpt", tmp_path / "done--1_chkpt")
    source = _snapshot(chkpt)
    out = merge_lora_checkpoint(chkpt)  # default: a new sibling folder
    assert out == tmp_path / "done--1_chkpt_merged"
    assert _snapshot(chkpt) == source  # the checkpoint itself is never written
    ckpt.verify_checkpoint(out)  # its own COMPLETE with the sha256 of every file
    marker = json.loads((out / "COMPLETE").read_text())
    assert marker["merged_from"] == str(chkpt.resolve()) and marker["step"] == 1
    assert set(marker["sha256"]) == {p.relative_to(out).as_posix() for p in out.rglob("*")
                                     if p.is_file() and p.name != "COMPLETE"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or lock file left
    with pytest.raises(UserError, match="is \\(or holds, or is inside\\) the checkpoint"):
        merge_lora_checkpoint(chkpt, chkpt, overwrite=True)


def test_nan_weights_are_never_saved_as_complete(data_root, tmp_path):
    runs = tmp_path / "runs"

    def poison(step, _metrics):
        if step == 2:
            with torch.no_grad():
                next(p for p in hooks.policy.parameters() if p.requires_grad).fill_(float("nan"))

    hooks = TrainHooks(on_step_end=poison)
    import finetune

    original = finetune.policy_setup.build_policy

    def build(cfg, env):
        hooks.policy = original(cfg, env)
        return hooks.policy

    finetune.policy_setup.build_policy = build
    try:
        with pytest.raises(UserError, match=r"step 2: .*not finite.*previous checkpoint .*r--1_chkpt is intact"):
            train(_cfg(data_root, runs, max_steps=3), hooks)
    finally:
        finetune.policy_setup.build_policy = original
    assert ckpt.list_checkpoints(runs, "r") == [(1, runs / "r--1_chkpt")]
    assert not (runs / "r--2_chkpt").exists() and not list(runs.glob(".r--2_chkpt*"))
    ckpt.verify_checkpoint(runs / "r--1_chkpt")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data_root, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    train(_cfg(data_root, runs, max_steps=1))
    previous = _snapshot(runs / "r--1_chkpt")
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if str(f).endswith("training_state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    with pytest.raises(DiskFullError) as err:
        train(FinetuneConfig(config_file_path=runs / "r--1_chkpt", resume=True, resume_step=1, max_steps=2,
                             run_root_dir=runs), given_flags={"config_file_path", "resume", "resume_step",
                                                              "max_steps", "run_root_dir"})
    message = str(err.value)
    assert str(runs / "r--2_chkpt") in message and "No space left" in message and "needed" in message
    # issue 23: "run the same command again" would be refused as an existing run; the advice names the resume
    assert f"--resume True --config_file_path {runs / 'r--1_chkpt'} --resume_step 1" in message, message
    assert "run the same command again" not in message
    assert _snapshot(runs / "r--1_chkpt") == previous
    assert not (runs / "r--2_chkpt").exists() and not list(runs.glob(".r--2_chkpt*"))


def test_startup_cleans_orphans_and_restores_a_checkpoint_hidden_between_renames(finished_run, tmp_path):
    runs = shutil.copytree(finished_run, tmp_path / "runs")
    intact = _snapshot(runs / "done--2_chkpt")
    dead = _dead_pid()
    # a kill between "final -> .old-<pid>" and ".tmp-<pid> -> final" of a re-save of step 2
    os.rename(runs / "done--2_chkpt", runs / f".done--2_chkpt.old-{dead}")
    shutil.copytree(runs / "done--1_chkpt", runs / f".done--2_chkpt.tmp-{dead}")
    shutil.copytree(runs / "done--1_chkpt", runs / f".done--3_chkpt.tmp-{dead}")  # a killed save
    shutil.copytree(runs / "done--1_chkpt", runs / f".done--3_chkpt.tmp-{os.getpid()}")  # a live process's save
    shutil.copytree(runs / "done--1_chkpt", runs / f".other--3_chkpt.tmp-{dead}")  # another run's
    notes = run_folder.recover_interrupted_saves(runs, "done")
    assert len(notes) == 3
    assert _snapshot(runs / "done--2_chkpt") == intact
    left = sorted(p.name for p in runs.iterdir() if p.name.startswith("."))
    assert left == [f".done--3_chkpt.tmp-{os.getpid()}", f".other--3_chkpt.tmp-{dead}"]


def test_prune_renames_to_trash_before_deleting(finished_run, tmp_path, monkeypatch):
    runs = shutil.copytree(finished_run, tmp_path / "runs")
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if ".trash-" in str(path) and Path(path).exists():
            raise KeyboardInterrupt  # killed while deleting
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(runs, "done", keep=runs / "done--2_chkpt")
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    # the pruned checkpoint is gone under its name (no half-deleted folder with COMPLETE), the kept one is intact
    assert ckpt.list_checkpoints(runs, "done") == [(2, runs / "done--2_chkpt")]
    ckpt.verify_checkpoint(runs / "done--2_chkpt")
    assert list(runs.glob(".done--1_chkpt.trash-*"))
    run_folder.recover_interrupted_saves(runs, "done")
    assert not list(runs.glob(".done--1_chkpt.trash-*"))


def test_cache_shards_are_checksummed(tmp_path):
    from prismatic.training.craft_cache import REQUIRED_MANIFEST_FIELDS, CraftCacheReader, CraftCacheWriter

    manifest = {k: "x" for k in REQUIRED_MANIFEST_FIELDS} | {"feature_dim": 4}
    with CraftCacheWriter(tmp_path / "cache", manifest, shard_size=3) as writer:
        writer.add([f"s{i}" for i in range(5)], [f"h{i}" for i in range(5)], torch.arange(20.0).reshape(5, 4))
    reader = CraftCacheReader(tmp_path / "cache")
    torch.testing.assert_close(reader.lookup(["s4"]), torch.tensor([[16.0, 17.0, 18.0, 19.0]]))
    shard = tmp_path / "cache" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-4] ^= 0x01  # a finite change of one feature value
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-00001.safetensors"):
        CraftCacheReader(tmp_path / "cache")


def test_few_shot_shortfall_needs_allow_fewer_demos(data_root, tmp_path):
    with pytest.raises(UserError, match=r"--num_demos_per_task 50: 2 task\(s\) have fewer demos"):
        train(_cfg(data_root, tmp_path / "runs", num_demos_per_task=50, max_steps=1))
    assert tree(tmp_path / "runs") == set()  # the run folder made before the data was read is removed
    result = train(_cfg(data_root, tmp_path / "runs", num_demos_per_task=50, allow_fewer_demos=True, max_steps=1))
    assert result.final_step == 1


def test_full_ft_online_anchors_resume_only_with_the_same_theta0(data_root, tmp_path):
    runs = tmp_path / "runs"
    full = dict(use_lora=False, max_steps=1)
    theta0 = train(_cfg(data_root, runs, run_id="theta0", **full)).last_checkpoint
    other = train(_cfg(data_root, runs, run_id="other", seed=3, **full)).last_checkpoint
    craft = _cfg(data_root, runs, run_id="c", use_lora=False, use_craft=True, max_steps=1, config_file_path=theta0)
    first = train(craft).last_checkpoint
    recorded = ckpt.load_training_state(first)["craft"]["theta0_sha256"]
    from prismatic.training.craft_cache import hash_state_dict
    from prismatic.training.craft_step import load_snapshot_state

    assert recorded == hash_state_dict(load_snapshot_state(theta0, "tiny"))
    given = {"config_file_path", "resume", "resume_step", "max_steps", "run_root_dir", "craft_snapshot_path"}

    def resume(snapshot):
        return train(FinetuneConfig(config_file_path=first, resume=True, resume_step=1, max_steps=2, run_root_dir=runs,
                                    craft_snapshot_path=snapshot), given_flags=given - ({"craft_snapshot_path"}
                                                                                        if snapshot is None else set()))

    with pytest.raises(UserError, match="is not the θ0 this run started with"):
        resume(other)
    with pytest.raises(UserError, match="needs θ0"):
        resume(None)
    assert resume(theta0).final_step == 2


def test_torch_style_write_error_on_a_full_disk_is_recognised(tmp_path, monkeypatch):
    import prismatic.cli_errors as cli

    torch_error = RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4160 vs 4054")
    assert cli.disk_full_error(torch_error, tmp_path) is torch_error  # plenty of space here: a real error
    monkeypatch.setattr(cli, "_free_bytes", lambda path: 1000)
    converted = cli.disk_full_error(torch_error, tmp_path / "x--1_chkpt", needed_bytes=5 << 20)
    assert isinstance(converted, DiskFullError)
    assert "x--1_chkpt" in str(converted) and "about 5.0 MiB needed" in str(converted)
    assert "1000 B free" in str(converted)


def test_full_disk_is_recognised_before_the_partial_folder_frees_its_space(tmp_path, monkeypatch):
    """torch.save on a full disk fails with a bare 'iostream error' / 'unexpected pos' RuntimeError; the space is
    low only while the partial folder exists (as in a CI run that filled its disk), so it must be judged first."""
    import prismatic.cli_errors as cli

    def free_bytes(path):
        return 1000 if list(tmp_path.glob(".r--2_chkpt.tmp-*")) else 1 << 40

    monkeypatch.setattr(cli, "_free_bytes", free_bytes)

    def write(folder):
        (folder / "model.safetensors").write_bytes(b"x" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 622120512 vs 622120400")

    with pytest.raises(DiskFullError) as err:
        ckpt.write_checkpoint_atomically(tmp_path / "r--2_chkpt", write, {"step": 2})
    assert "r--2_chkpt" in str(err.value) and "1000 B free" in str(err.value)
    assert not list(tmp_path.iterdir())  # the partial folder is gone all the same


def test_given_flags_are_those_on_the_command_line_and_in_the_yaml(tmp_path):
    from finetune import given_flag_names

    yaml_path = tmp_path / "flags.yaml"
    yaml_path.write_text("seed: 3\nlora_rank: 8\n")
    argv = ["--config_file_path", "runs/x--10_chkpt", "--resume", "True", "--resume_step=10", "--max_steps", "20",
            "--config_path", str(yaml_path)]
    assert given_flag_names(argv) == {"config_file_path", "resume", "resume_step", "max_steps", "seed", "lora_rank"}


@pytest.mark.slow
def test_readme_resume_command_from_the_command_line(data_root, tmp_path):
    from safety_helpers import REPO, run_cli

    runs = tmp_path / "runs"
    first = run_cli([REPO / "vla-scripts" / "finetune.py", "--data_root_dir", data_root, "--dataset_name", DATASET,
                     "--run_root_dir", runs, "--model_preset", "tiny", "--batch_size", "1", "--num_images_in_input",
                     "1", "--image_aug", "False", "--wandb_mode", "disabled", "--lora_rank", "4", "--max_steps", "2",
                     "--save_freq", "1", "--seed", "3", "--use_craft", "True", "--craft_retention_budget", "0.05",
                     "--run_id", "r"])
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = _trainable(runs / "r--2_chkpt")
    config_before = (runs / "r" / "config.yaml").read_bytes()
    # the README's command (plus where this test keeps its runs)
    again = run_cli([REPO / "vla-scripts" / "finetune.py", "--config_file_path", runs / "r--1_chkpt", "--resume",
                     "True", "--resume_step", "1", "--max_steps", "2", "--use_craft", "True", "--run_root_dir", runs])
    assert again.returncode == 0, again.stderr[-3000:]
    recorded = json.loads((runs / "r--2_chkpt" / "run_config.json").read_text())
    assert (recorded["seed"], recorded["craft_retention_budget"], recorded["lora_rank"]) == (3, 0.05, 4)
    assert (runs / "r" / "config.yaml").read_bytes() == config_before
    resumed = _trainable(runs / "r--2_chkpt")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0, msg=name)


@pytest.mark.distributed
def test_disk_full_on_rank_0_stops_every_rank_with_one_line(data_root, tmp_path):
    """Under torchrun, rank 0 alone writes the checkpoint; when its disk is full the other rank must stop with it
    (one error line each, exit 2), not wait at a barrier until the process group times out."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from two_ranks import launch_two_ranks

    runs = tmp_path / "runs"
    flags = ["--data_root_dir", data_root, "--dataset_name", DATASET, "--run_root_dir", runs, "--run_id", "r",
             "--model_preset", "tiny", "--batch_size", "1", "--max_steps", "1", "--save_freq", "1",
             "--wandb_mode", "disabled", "--image_aug", "False"]
    proc = launch_two_ranks(Path(__file__).with_name("disk_full_worker.py"), *flags, timeout=600,
                            torchrun_options=("--log_dir", tmp_path / "logs", "--redirects", "3", "--tee", "0"))
    assert proc.returncode != 0
    logs = {int(p.parent.name): p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert sorted(logs) == [0, 1], proc.stderr[-3000:]
    for rank, text in logs.items():
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in text, (rank, text[-3000:])
    assert "No space left on device" in logs[0] and str(runs / "r--1_chkpt") in logs[0]
    assert "rank 0 could not write the checkpoint of step 1" in logs[1]
    assert not (runs / "r--1_chkpt").exists() and not list(runs.glob(".r--1_chkpt*"))
