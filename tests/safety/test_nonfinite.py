"""Issue 23 item 3: NaN / inf in the data is refused in one line naming the episode and step; a run none of whose
steps was applied never exits 0 nor writes a COMPLETE checkpoint; NonFiniteLossError is one line with its advice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safety_helpers import DATASET, finetune_args, one_error_line

from prismatic.data import rlds_writer
from prismatic.data.rlds_episodes import EpisodeTable
from prismatic.data.statistics import cached_statistics, compute_statistics
from prismatic.data.synthetic_libero import synthetic_episode, synthetic_tasks
from prismatic.training import train_step as train_step_module


def _dataset_with(tmp: Path, monkeypatch, key: str, episode: int, step: int, dim: int, value: float) -> Path:
    """A 2-task, 4-episode dataset with one non-finite number, written as a foreign writer would (ours refuses it:
    its finite check is lifted for this write only; TFDS and h5py-based converters store NaN as any float)."""
    rng = np.random.default_rng(0)
    episodes = [synthetic_episode(task, 12, rng) for task in synthetic_tasks(2) for _ in range(2)]
    for i, e in enumerate(episodes):
        e["file_path"] = f"synthetic/episode_{i:06d}.hdf5"
    episodes[episode][key] = np.array(episodes[episode][key], dtype=np.float32)
    episodes[episode][key][step, dim] = value

    def unchecked(ep, k, num_steps, d, idx):
        return np.asarray(ep[k], dtype=np.float32).reshape(num_steps, d)

    with monkeypatch.context() as m:
        m.setattr(rlds_writer, "_vector", unchecked)
        rlds_writer.write_rlds_dataset(tmp / "rlds", DATASET, episodes)
    return tmp / "rlds"


@pytest.mark.parametrize("key,value,word", [("action", float("nan"), "action"), ("state", float("inf"), "state")])
def test_a_non_finite_action_or_proprio_is_one_line_naming_episode_and_step(key, value, word, tmp_path,
                                                                           monkeypatch, capsys):
    import finetune

    data = _dataset_with(tmp_path, monkeypatch, key, episode=2, step=5, dim=3, value=value)
    runs = tmp_path / "runs"
    line = one_error_line(capsys, lambda: finetune.main([str(a) for a in finetune_args(data, runs)[1:]]))
    assert f"'steps/{'observation/' if key == 'state' else ''}{word}'" in line, line
    assert "episode_000002.hdf5" in line and "at step 5, dimension 3" in line, line
    assert not runs.exists()  # no run folder, no statistics with NaN entries


def test_statistics_refuse_non_finite_values_naming_episode_and_step(tmp_path):
    """Statistics of a table that bypassed the reader (the reader itself refuses first)."""
    actions = np.zeros((10, 7), np.float32)
    actions[6, 1] = np.nan  # episode 1 (steps 4..9), its step 2
    table = EpisodeTable(name="d", tfds_name="d", content_hash="h", episode_starts=np.array([0, 4, 10]),
                         actions=actions, states=np.zeros((10, 8), np.float32), instruction_ids=np.zeros(10, np.int32),
                         instructions=["x"], file_paths=["a.hdf5", "b.hdf5"], image_refs={})
    with pytest.raises(ValueError, match=r"action of episode 1 \(b.hdf5\) is not finite at step 2, dimension 1"):
        compute_statistics(table)
    with pytest.raises(ValueError, match="episode 1"):
        cached_statistics(table, tmp_path)  # no cached entry is consulted for NaN data either
    assert not list(tmp_path.iterdir())


def _nan_losses(monkeypatch) -> None:
    original = train_step_module.action_l1_losses
    monkeypatch.setattr(train_step_module, "action_l1_losses",
                        lambda p, t: tuple(x * float("nan") for x in original(p, t)))


def test_a_run_whose_every_step_was_skipped_never_exits_0(data_root, tmp_path, monkeypatch, capsys):
    """The issue's case (4 steps, every loss NaN): on main rc 0 with a COMPLETE checkpoint of untrained weights."""
    import finetune

    _nan_losses(monkeypatch)
    runs = tmp_path / "runs"
    argv = [str(a) for a in finetune_args(data_root, runs, "--max_steps", "4", "--save_freq", "2", "--run_id", "n")[1:]]
    line = one_error_line(capsys, lambda: finetune.main(argv))
    assert "all 4 optimizer steps of this run had a non-finite loss" in line and "no checkpoint" in line, line
    assert not list(runs.rglob("COMPLETE")) and not list(runs.glob("n--*"))


def test_non_finite_loss_error_is_one_line_with_its_advice(data_root, tmp_path, monkeypatch, capsys):
    """On main: a NonFiniteLossError traceback, rc 1."""
    import finetune

    _nan_losses(monkeypatch)
    argv = [str(a) for a in finetune_args(data_root, tmp_path / "runs", "--max_steps", "12", "--save_freq", "100",
                                          "--max_consecutive_nonfinite", "3")[1:]]
    line = one_error_line(capsys, lambda: finetune.main(argv))
    assert "3 consecutive optimizer steps had a non-finite loss" in line, line
    assert "— lower --learning_rate, check the data for NaN/inf" in line and "start again" in line, line
