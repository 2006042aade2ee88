"""Atomic checkpoint folders, RNG capture/restore and weights_only-loadable training state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from prismatic.training.checkpointing import (
    capture_rng_state,
    checkpoint_dir,
    is_complete_checkpoint,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    restore_rng_state,
    save_training_state,
    write_checkpoint_atomically,
)


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1)), random.gauss(0, 1), np.random.randn()


def test_rng_roundtrip_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in both generators
    state = capture_rng_state()
    expected = _draws()
    torch.save(state, tmp_path / "rng.pt")
    _draws()  # move on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def _writer(files: dict[str, str], fail_after: str | None = None):
    def write(d: Path) -> None:
        for name, text in files.items():
            (d / name).write_text(text)
            if name == fail_after:
                raise KeyboardInterrupt("simulated kill during save")
    return write


def test_atomic_write_and_replace(tmp_path):
    final = checkpoint_dir(tmp_path, "run", 10)
    write_checkpoint_atomically(final, _writer({"a.txt": "1"}), {"step": 10})
    assert is_complete_checkpoint(final) and (final / "a.txt").read_text() == "1"
    write_checkpoint_atomically(final, _writer({"a.txt": "2"}), {"step": 10})
    assert (final / "a.txt").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temp or old folders left


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path):
    final = checkpoint_dir(tmp_path, "run", 10)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint_atomically(final, _writer({"a.txt": "1", "b.txt": "2"}, fail_after="a.txt"), {"step": 10})
    assert not final.exists() and list(tmp_path.iterdir()) == []
    # An interrupted overwrite keeps the previous complete checkpoint.
    write_checkpoint_atomically(final, _writer({"a.txt": "old"}), {"step": 10})
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint_atomically(final, _writer({"a.txt": "new"}, fail_after="a.txt"), {"step": 10})
    assert is_complete_checkpoint(final) and (final / "a.txt").read_text() == "old"
    # A folder without the marker (e.g. a crash of a non-atomic writer) is never listed as a checkpoint.
    (tmp_path / "run--20_chkpt").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path, "run")] == [10]


def test_prune_keeps_only_latest(tmp_path):
    for step in (5, 10, 15):
        write_checkpoint_atomically(checkpoint_dir(tmp_path, "run", step), _writer({"x": "y"}), {})
    write_checkpoint_atomically(checkpoint_dir(tmp_path, "other", 5), _writer({"x": "y"}), {})
    prune_checkpoints(tmp_path, "run", keep=checkpoint_dir(tmp_path, "run", 15))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other--5_chkpt", "run--15_chkpt"]


def test_training_state_weights_only(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    final = checkpoint_dir(tmp_path, "run", 1)

    def write(d: Path) -> None:
        save_training_state(d / "training_state.pt", {"step": 1, "optimizer": opt.state_dict(),
                                                       "rng": [capture_rng_state()], "craft": None})

    write_checkpoint_atomically(final, write, {"step": 1})
    state = load_training_state(final)
    assert state["step"] == 1 and state["craft"] is None
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_training_state(tmp_path / "run--2_chkpt")
