"""benchmarks/gpu_check.sh: the summary table's arithmetic (fast), refusals (fast) and the CPU dry run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    return env


def test_summary_table_ratios_from_the_json_files(tmp_path):
    rows = {"baseline": dict(device="cuda:0", step_s=0.5, peak_bytes=10 * 2**20, tokens_per_step=1000,
                             tokens_per_s=2000.0),
            "craft_offline": dict(device="cuda:0", step_s=0.7, peak_bytes=12 * 2**20, tokens_per_step=1000,
                                  tokens_per_s=1000 / 0.7),
            "craft_online": dict(device="cuda:0", step_s=0.8, peak_bytes=13 * 2**20, tokens_per_step=1000,
                                 tokens_per_s=1250.0)}
    (tmp_path / "modes.json").write_text(json.dumps(dict(preset="real", batch_size=8, num_images=2, use_lora=True,
                                                         steps=5, warmup=2, rows=rows)))
    (tmp_path / "ddp.json").write_text(json.dumps({"ok": True, "detail": "3 steps"}))
    (tmp_path / "fsdp.json").write_text(json.dumps({"ok": True, "detail": "3 steps"}))
    for run_id, loss in (("gpu_check", 0.5), ("gpu_check_fsdp", 0.5000004)):
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "VLA Train/Loss": 0.9}) + "\n" + json.dumps({"step": 2, "VLA Train/Loss": loss}))
    (tmp_path / "libero.json").write_text(json.dumps({"ok": False, "detail": "see libero.log"}))
    lines = gpu_check.summary(tmp_path)
    table = {line.split()[0]: line.split() for line in lines[2:5]}
    assert table["craft_offline"][1:6] == ["0.700", "1.40", "12", "1.20", "1429"]
    assert table["craft_online"][1:6] == ["0.800", "1.60", "13", "1.30", "1250"]
    assert any(line.startswith("torchrun DDP") and " ok " in line for line in lines)
    assert any(line.startswith("torchrun FSDP") and " ok " in line for line in lines)
    assert [line for line in lines if line.startswith("FSDP vs DDP")][0].endswith("Loss 0.5 vs 0.5")
    assert any(line.startswith("LIBERO episode") and "FAILED" in line for line in lines)


def test_refuses_a_used_work_dir_and_a_missing_gpu(tmp_path):
    (tmp_path / "modes.json").write_text("{}")
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env={**_env(), "DRY_RUN": "1"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and " — " in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "new")], env={**_env(), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu(tmp_path):
    work = tmp_path / "check"
    proc = subprocess.run(["bash", str(SCRIPT), str(work)], env={**_env(), "DRY_RUN": "1"}, cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every command was printed before it ran
    for name in ("modes", "ddp", "fsdp", "libero"):
        assert f"+ [{name}]" in proc.stdout and f"[{name}] ok" in proc.stdout
    modes = json.loads((work / "modes.json").read_text())
    for mode in gpu_check.MODES:
        r = modes["rows"][mode]
        assert r["step_s"] > 0 and r["peak_bytes"] > 0 and r["tokens_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
    # the same batches in every mode: the same LLM tokens per step
    assert len({modes["rows"][m]["tokens_per_step"] for m in gpu_check.MODES}) == 1
    assert (work / "runs" / "gpu_check--2_chkpt").is_dir() and (work / "runs" / "gpu_check_fsdp--2_chkpt").is_dir()
    assert "FSDP vs DDP, last step" in proc.stdout
    episodes = [json.loads(line) for line in (work / "libero" / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 1
    assert "craft_online" in proc.stdout and "LIBERO episode (EGL)" in proc.stdout
