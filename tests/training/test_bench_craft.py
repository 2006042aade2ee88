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
    (["--retention_every", "0"], "--retention_every must be >= 1, got 0"),
    (["--modes", "craft_offline_coef"], "--modes craft_offline_coef need --retention_every k > 1"),
    (["--modes", "craft_nope", "--retention_every", "2"], "--modes names unknown modes ['craft_nope']"),
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


def _attention_inputs(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 7, 8, generator=g, requires_grad=True)  # batch 2, 4 query heads, 7 queries, head dim 8
    k = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)  # 2 key/value heads (GQA), 9 keys
    v = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)
    return q, k, v


def _explicit_attention(q, k, v):
    import torch

    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_cpu_attention_flops_match_explicit_matmuls():
    """The CPU flash-attention kernel is counted as the matmuls it replaces (torch's table alone sees nothing)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = _attention_inputs()
    fused = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    ours, out = bench_craft.count_flops(fused)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with FlopCounterMode(display=False) as explicit:
        reference = _explicit_attention(q, k, v)
    torch.testing.assert_close(out, reference)  # same function
    qk, pv = 2 * 2 * 4 * 7 * 9 * 8, 2 * 2 * 4 * 7 * 9 * 8  # 2 FLOPs per multiply-add, per query head
    assert explicit.get_total_flops() == qk + pv
    assert ours == qk + pv
    assert plain.get_total_flops() in (0, qk + pv)  # 0: why the mapping exists; if torch learns it, it must agree

    grad = torch.randn_like(reference)
    ours_bwd, _ = bench_craft.count_flops(lambda: torch.autograd.grad(fused(), (q, k, v), grad))
    with FlopCounterMode(display=False) as explicit_bwd:
        torch.autograd.grad(_explicit_attention(q, k, v), (q, k, v), grad)
    # forward + the four backward matmuls, + the recomputation of QKᵀ a flash backward does (torch's CUDA formula)
    assert explicit_bwd.get_total_flops() == 3 * (qk + pv)
    assert ours_bwd == 3 * (qk + pv) + qk


@pytest.mark.slow
def test_tiny_interleaved_run_reports_the_projector_sets(tmp_path, capsys, monkeypatch):
    import time

    from prismatic.training.craft_utils import CRaFTGradientProjector

    surgery = CRaFTGradientProjector.step

    def slow_surgery(self, lam):  # 0.3 s of wall time per call: the share must count the timed step's call only
        time.sleep(0.3)
        return surgery(self, lam)

    monkeypatch.setattr(CRaFTGradientProjector, "step", slow_surgery)
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
    # work: the L_ret VJP adds at most one backward (< 2x the forward+backward), θ0's forward adds more on top
    offline = rows["craft_offline"]
    for row in (online, offline):  # one timed step holds one surgery call (not the memory or FLOP rounds' calls)
        assert 0.3 / row["step_s"] <= row["surgery_share"] <= 1.0
    assert rows["baseline"]["flop_ratio"] == 1.0 and 1.0 < offline["flop_ratio"] < 2.0
    assert offline["flop_ratio"] < online["flop_ratio"] < offline["flop_ratio"] + 1.0
    bench_craft.print_table(result)
    assert "reached by neither" in capsys.readouterr().out


def test_freeze_vision_backbone_reaches_the_trainers_config(tmp_path, monkeypatch):
    """--freeze_vision_backbone is a training flag: every mode's FinetuneConfig gets it (θ0 then shares the ViTs)."""
    seen = {}
    monkeypatch.setattr(bench_craft, "_build_cache", lambda cache_cfg: None)
    monkeypatch.setattr(bench_craft, "run_interleaved",
                        lambda cfg, common, cache_dir: seen.update(common) or {"rows": {}})
    for frozen in (True, False):
        result = bench_craft.run(bench_craft.BenchConfig(work_dir=tmp_path, freeze_vision_backbone=frozen))
        assert seen["freeze_vision_backbone"] is frozen and result["freeze_vision_backbone"] is frozen


def test_cycle_work_ratios_average_one_refresh_and_k_minus_1_reused_steps():
    rows = {"craft_offline": {"flop_ratio": 1.5}, "craft_offline_reuse": {"flop_ratio": 1.0},
            "craft_online": {"flop_ratio": 2.0}, "craft_online_reuse": {"flop_ratio": 1.02}}
    ratios = bench_craft.cycle_work_ratios(rows, ks=(2, 4))
    assert ratios["offline"] == {2: pytest.approx(1.25), 4: pytest.approx(1.125)}
    assert ratios["online"] == {2: pytest.approx(1.51), 4: pytest.approx((2.0 + 3 * 1.02) / 4)}
    assert bench_craft.cycle_work_ratios({"craft_offline": {"flop_ratio": 1.5}}) == {}
    coef = bench_craft.cycle_work_ratios({"craft_offline": {"flop_ratio": 1.5},
                                          "craft_offline_coef": {"flop_ratio": 1.01},
                                          "craft_online": {"flop_ratio": 2.0}}, ks=(4,))
    assert coef == {"offline_coef": {4: pytest.approx((1.5 + 3 * 1.01) / 4)}}


def test_modes_selects_baseline_and_the_named_modes(tmp_path):
    cfg = bench_craft.BenchConfig(retention_every=4, modes="craft_offline_coef, craft_online_coef")
    bench_craft.validate(cfg)
    modes = bench_craft._run_modes(cfg, tmp_path)
    assert list(modes) == ["baseline", "craft_offline_coef", "craft_online_coef"]
    assert modes["craft_offline_coef"] == dict(use_craft=True, craft_anchor_source="offline", craft_cache_dir=tmp_path,
                                               craft_retention_every=4, craft_reuse="coefficient")
    assert list(bench_craft._run_modes(bench_craft.BenchConfig(), tmp_path)) == list(bench_craft.MODES)


@pytest.mark.slow
def test_tiny_run_with_retention_every_counts_a_step_that_reuses_g_ret(tmp_path, capsys):
    """--retention_every 2: the *_reuse trainers' counted step does one forward and L_act's backward only, i.e. the
    plain step's matmuls on the same samples (the refresh step is the exact step, counted by craft_offline/online)."""
    cfg = bench_craft.BenchConfig(work_dir=tmp_path, steps=1, warmup=0, memory_steps=1, batch_size=1,
                                  retention_every=2)
    result = bench_craft.run(cfg)
    rows = result["rows"]
    assert set(rows) == {*bench_craft.MODES, *bench_craft.REUSE_MODES, *bench_craft.COEF_MODES}
    for mode in bench_craft.REUSE_MODES:
        assert rows[mode]["flop_ratio"] == pytest.approx(1.0, abs=0.01), mode
    # --craft_reuse coefficient: one forward + one backward (the pooled L_ret adds no matmul); online adds θ0's forward
    assert rows["craft_offline_coef"]["flop_ratio"] == pytest.approx(1.0, abs=0.01)
    assert rows["craft_online_coef"]["flop_ratio"] > 1.2
    assert rows["craft_offline"]["flop_ratio"] > 1.3 and rows["craft_online"]["flop_ratio"] > 1.6
    bench_craft.print_table(result)
    assert "k=8" in capsys.readouterr().out
