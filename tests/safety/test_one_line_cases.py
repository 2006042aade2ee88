"""Issue 23 item 5: the remaining tracebacks of the issue are one line, exit 2 (real scripts, as a user runs them)."""

from __future__ import annotations

import errno
import os

import pytest
from safety_helpers import REPO, finetune_args, run_cli, tree

FT = REPO / "vla-scripts" / "finetune.py"
SMOKE = REPO / "craft_experiments" / "common_utils" / "make_smoke_data.py"
DASHBOARD = REPO / "craft_experiments" / "common_utils" / "make_dashboard.py"


def _one_line(proc) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and " — " in errors[0], proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("text,words", [
    ("- max_steps: 5\n- seed: 3\n", ["holds a YAML list, not a mapping"]),
    ("5000\n", ["holds a YAML int, not a mapping"]),
    ("max_steps: 5\nlearning_rate: [0.1,\n", ["is not valid YAML", "line 3"]),  # a truncated copy
])
def test_bad_config_yaml_is_one_line_naming_the_file(text, words, data_root, tmp_path):
    """On main: a list or scalar gave draccus' TypeError traceback; a truncated file <_io.TextIOWrapper ...>."""
    path = tmp_path / "flags.yaml"
    path.write_text(text)
    line = _one_line(run_cli(finetune_args(data_root, tmp_path / "runs", "--config_path", path)))
    assert str(path) in line and "TextIOWrapper" not in line, line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "runs").exists()


def test_a_wrongly_typed_yaml_value_is_refused_even_when_the_flag_is_given(data_root, tmp_path):
    """On main: `batch_size: eight` was accepted silently when --batch_size was also on the command line."""
    path = tmp_path / "flags.yaml"
    path.write_text("batch_size: eight\n")
    line = _one_line(run_cli(finetune_args(data_root, tmp_path / "runs", "--config_path", path)))  # has --batch_size 1
    assert str(path) in line and "batch_size" in line and "eight" in line, line


@pytest.mark.parametrize("flag", ["--config_file_path", "--vlm_path"])
def test_an_empty_model_folder_is_one_line(flag, data_root, tmp_path):
    """On main: the loader's ValueError traceback after the imports."""
    empty = tmp_path / "empty_model"
    empty.mkdir()
    line = _one_line(run_cli(finetune_args(data_root, tmp_path / "runs", flag, empty)))
    assert f"{flag} '{empty}' holds no model" in line, line
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_run_root_is_one_line_before_the_model_is_built(data_root, tmp_path):
    """On main: EROFS / PermissionError / NotADirectoryError traceback after ~20 s of model building."""
    (tmp_path / "a_file").write_text("x")
    line = _one_line(run_cli(finetune_args(data_root, tmp_path / "a_file" / "runs")))
    assert "a_file" in line, line


@pytest.mark.parametrize("error", [errno.ENOTDIR, errno.EROFS, errno.EACCES])
def test_an_unwritable_run_root_is_refused_before_the_model_is_built(error, data_root, tmp_path, monkeypatch,
                                                                     capsys):
    """The same in-process, with the model builder replaced by a tripwire: on main the refusal (or EROFS /
    PermissionError traceback) came only after the model was built. EROFS / EACCES are what a read-only mount or a
    foreign folder answer to the first write (this test may run as root, so they are raised by a stand-in os.open
    for paths under the run root; ENOTDIR is the real filesystem's answer)."""
    import finetune

    def tripwire(*_args, **_kwargs):
        raise AssertionError("the model was built before the run root was found unwritable")

    monkeypatch.setattr(finetune.policy_setup, "build_policy", tripwire)
    (tmp_path / "a_file").write_text("x")
    runs = tmp_path / "a_file" / "runs" if error == errno.ENOTDIR else tmp_path / "ro" / "runs"
    if error != errno.ENOTDIR:
        (tmp_path / "ro").mkdir()
        real_open, real_mkdir = os.open, os.mkdir

        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(runs)):
                raise OSError(error, os.strerror(error), str(path))
            return (real_open if refuse.kind == "open" else real_mkdir)(path, *args, **kwargs)

        def fake_open(path, *args, **kwargs):
            refuse.kind = "open"
            return refuse(path, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            refuse.kind = "mkdir"
            return refuse(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([str(a) for a in finetune_args(data_root, runs)[1:]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "runs" in lines[0] and os.strerror(error) in lines[0], err


def test_make_smoke_data_output_dir_that_is_a_file(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    before = tree(tmp_path)
    line = _one_line(run_cli([SMOKE, "--output_dir", target]))
    assert str(target) in line and "is a file" in line, line
    assert tree(tmp_path) == before and target.read_text() == "x"


@pytest.mark.parametrize("script,args,words", [
    (SMOKE, ["--output_dir", "{tmp}", "--output_dri", "x"], ["unrecognized arguments: --output_dri"]),
    (SMOKE, [], ["required: --output_dir"]),
    (SMOKE, ["--output_dir", "{tmp}", "--seed", "one"], ["--seed", "'one'"]),
    (DASHBOARD, [], ["required: --wandb_project"]),
    (DASHBOARD, ["--wandb_project", "p", "--output_json", "{tmp}/d.json", "--nme", "x"],
     ["unrecognized arguments: --nme"]),
])
def test_argparse_tools_answer_a_bad_flag_in_one_line(script, args, words, tmp_path):
    """On main: argparse's usage block and its own `<prog>: error:` line."""
    line = _one_line(run_cli([script, *[a.format(tmp=tmp_path / "out") for a in args]], timeout=120))
    assert not (tmp_path / "out").exists()
    for word in words:
        assert word in line, line


def test_help_still_prints_the_usage():
    proc = run_cli([SMOKE, "--help"], timeout=120)
    assert proc.returncode == 0 and "--output_dir" in proc.stdout, proc.stderr
