"""vla-scripts/bench_craft.py: bad flags give one line and exit 2 before anything is built; the tiny run's table
is consistent with the projector it measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "vla-scripts"))
import bench_craft  # noqa: E402


@pytest.mark.parametrize("argv,message", [
    (["--model_preset", "real"], "--model_preset real has no scratch build here — pass --random_init True"),
    (["--random_init", "True", "--config_file_path", "."], "--random_init True builds its own model"),
    (["--model_preset", "huge"], "--model_preset 'huge' is not a preset"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--isolation", "parallel"], "--isolation 'parallel' is unknown"),
    (["--vlm_path", "/nonexistent/vlm"], "--vlm_path /nonexistent/vlm does not exist"),
    (["--steps", "many"], "see --help for the flags"),
    (["--no_such_flag", "1"], "see --help for the flags"),
])
def test_bad_flags_one_line_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_craft.main([*argv, "--work_dir", str(tmp_path / "work")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "work").exists()  # nothing built


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "vla-scripts" / "bench_craft.py"), "--model_preset", "real"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --model_preset real has no scratch build here")


@pytest.mark.slow
def test_tiny_interleaved_run_reports_the_projector_sets(tmp_path, capsys):
    cfg = bench_craft.BenchConfig(work_dir=tmp_path, steps=1, warmup=0, memory_steps=1, batch_size=1)
    result = bench_craft.run(cfg)
    rows = result["rows"]
    assert result["isolation"] == "interleaved" and set(rows) == set(bench_craft.MODES)
    assert rows["baseline"]["time_ratio"] == 1.0 and rows["baseline"]["memory_ratio"] == 1.0
    online = rows["craft_online"]
    # the buffers hold g_act and g_ret of the L_ret-reached parameters + flags, nothing else
    assert online["buffer_mb"] * 2**20 == pytest.approx(4 * (2 * online["ret_params"] + 2 * online["n_ret"]
                                                             + online["n_act_only"]))
    assert 0 < online["ret_params"] < online["trainable_params"] and online["n_unreached"] > 0
    bench_craft.print_table(result)
    assert "reached by neither" in capsys.readouterr().out
