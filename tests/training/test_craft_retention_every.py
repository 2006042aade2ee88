"""--craft_retention_every k in `train(cfg)` (tiny preset, synthetic LIBERO): the schedule of refresh steps, the
dual's rule on the steps in between, exact resume across a step that reuses g_ret, and the flag's validation.

The per-step gradient rule with a kept g_ret is checked against a float64 numpy reference in
tests/craft/test_retention_every.py; here the loop's bookkeeping is checked against the logged numbers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_craft_loop import _cache

from finetune import train
from prismatic.cli_errors import UserError
from prismatic.training import checkpointing as ckpt
from prismatic.training import policy_setup
from prismatic.training.craft_step import CRaFTStep
from prismatic.training.craft_utils import CRaFTGradientProjector
from prismatic.training.finetune_config import ConfigError, validate_config
from prismatic.training.metrics_log import read_metrics

RET, LAM, FRESH = "CRaFT/Retention Loss", "CRaFT/Lambda", "CRaFT/Retention Refresh"
EPS, ETA, LAM0 = 1e-3, 0.05, 0.01


def _common(**extra) -> dict:
    return dict(use_craft=True, craft_retention_budget=EPS, craft_dual_lr=ETA, craft_init_lambda=LAM0, **extra)


def test_online_k2_dual_waits_for_a_measured_l_ret_and_resume_across_a_reuse_step_is_exact(make_cfg, tmp_path):
    n, k = 3, 2  # the checkpoint after step 3: the next step (index 3) reuses g_ret
    common = _common(max_steps=2 * n, save_freq=n, craft_retention_every=k)
    full = train(make_cfg(run_root_dir=tmp_path / "a", **common))
    records = read_metrics(full.run_dir / "metrics.jsonl")
    assert [r[FRESH] for r in records] == [1.0, 0.0] * n
    lam = LAM0
    for i, r in enumerate(records):
        assert r[LAM] == pytest.approx(lam, rel=1e-12, abs=1e-15)
        if r[FRESH]:  # θ0's features only on refresh steps: the dual updates from those
            lam = max(0.0, lam + ETA * (r[RET] - EPS))
        else:  # online anchors between refreshes: the last measured L_ret is logged, λ stays
            assert r[RET] == records[i - 1][RET]
    assert records[-1][RET] > 0
    mid = ckpt.load_training_state(ckpt.checkpoint_dir(tmp_path / "a", "test", n))["craft"]["retention_every"]
    assert mid["every"] == k and mid["kept"] is not None and mid["last_ret"] == records[n - 1][RET]
    end = ckpt.load_training_state(ckpt.checkpoint_dir(tmp_path / "a", "test", 2 * n))["craft"]["retention_every"]
    assert end["kept"] is None  # step 6 refreshes: nothing to keep

    resumed = train(make_cfg(run_root_dir=tmp_path / "b", resume=True, config_file_path=ckpt.checkpoint_dir(
        tmp_path / "a", "test", n), resume_step=n, **common))
    a, b = policy_setup.trainable_state(full.policy), policy_setup.trainable_state(resumed.policy)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for key in (LAM, RET, FRESH, "CRaFT/Grad Dot", "VLA Train/Loss"):
        assert [h[key] for h in resumed.history] == [h[key] for h in full.history[n:]], key


def test_offline_k2_measures_l_ret_every_step_and_k1_is_the_exact_step(make_cfg, tiny_data_root, tmp_path):
    cache = _cache(tmp_path, tiny_data_root)
    common = _common(max_steps=3, craft_anchor_source="offline", craft_cache_dir=cache)
    cheap = train(make_cfg(run_root_dir=tmp_path / "k2", craft_retention_every=2, **common))
    exact = train(make_cfg(run_root_dir=tmp_path / "k1", craft_retention_every=1, **common))
    records = read_metrics(cheap.run_dir / "metrics.jsonl")
    assert [r[FRESH] for r in records] == [1.0, 0.0, 1.0]
    lam = LAM0
    for r in records:  # cache anchors: L_ret of the live forward is free, so the dual updates every step
        assert r[LAM] == pytest.approx(lam, rel=1e-12, abs=1e-15)
        lam = max(0.0, lam + ETA * (r[RET] - EPS))
    exact_records = read_metrics(exact.run_dir / "metrics.jsonl")
    assert FRESH not in exact_records[0]  # k = 1 logs what it logged before
    # the first step refreshes: it is the exact step, bit for bit; the second reuses step 1's g_ret and differs
    assert records[0] == {**exact_records[0], FRESH: 1.0}
    assert records[1]["CRaFT/Grad Dot"] != exact_records[1]["CRaFT/Grad Dot"]
    # step 2's L_ret is measured at θ after step 1, which is the same in both runs
    assert records[1][RET] == exact_records[1][RET]


@pytest.mark.parametrize(("value", "use_craft", "message"), [
    (0, True, "--craft_retention_every must be an integer >= 1 (1 = the exact step), got 0"),
    (2.5, True, "--craft_retention_every must be an integer >= 1 (1 = the exact step), got 2.5"),
    (2, False, "--craft_retention_every 2 needs CRaFT (--use_craft True or --retention_method craft)"),
])
def test_bad_retention_every_is_one_line(make_cfg, value, use_craft, message):
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(use_craft=use_craft, craft_retention_every=value))
    lines = [line for line in str(err.value).splitlines() if "craft_retention_every" in line]
    assert lines == [f"  - {message}"]


def test_resume_at_a_reuse_step_without_the_kept_g_ret_is_refused_in_one_line():
    """FSDP checkpoints do not hold the kept shards: resuming at a step that would reuse them is refused."""
    proj = CRaFTGradientProjector([("w", torch.nn.Parameter(torch.ones(2)))])
    proj.steps = 3
    step = SimpleNamespace(retention_every=2, projector=proj, _last_ret=None, reuse_coefficient=False)
    with pytest.raises(UserError) as err:
        CRaFTStep._load_retention_every(step, {"every": 2, "last_ret": 0.5, "sharded": True, "kept": None})
    assert "\n" not in str(err.value) and "multiple of 2" in str(err.value) and "FSDP" in str(err.value)
    with pytest.raises(UserError, match="used --craft_retention_every 4, this one 2"):
        CRaFTStep._load_retention_every(step, {"every": 4, "last_ret": 0.5, "sharded": False, "kept": None})
    proj.steps = 4  # a refresh step needs nothing kept
    CRaFTStep._load_retention_every(step, {"every": 2, "last_ret": 0.5, "sharded": True, "kept": None})
    assert step._last_ret == 0.5 and not math.isnan(step._last_ret)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_reuse_the_rank_averaged_g_ret(tiny_data_root, tmp_path):
    """torchrun, 2 ranks x b=1 == 1 rank x b=2 with --craft_retention_every 2 over 4 steps (step 3 refreshes a
    non-zero g_ret, step 4 reuses it): the kept g_ret is the rank average and is not averaged again."""
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from craft_ddp_worker import CRAFT_FLAGS, KEYS, VARIANTS
    from ddp_worker import worker_config
    from test_distributed import assert_params_close
    from two_ranks import run_two_ranks

    steps = 4
    run_two_ranks(here / "craft_ddp_worker.py", tiny_data_root, tmp_path / "ddp_runs", tmp_path, 1, steps,
                  "lora-every2:1", timeout=600)
    ranks = [torch.load(tmp_path / f"craft_lora-every2_k1_rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["per_step"], ranks[1]["per_step"])
    for key in KEYS:
        assert torch.equal(ranks[0]["metrics"][key], ranks[1]["metrics"][key]), key
    single = train(worker_config(tiny_data_root, tmp_path / "single", batch_size=2, max_steps=steps,
                                 grad_accumulation_steps=1, run_id="craft-single", **CRAFT_FLAGS,
                                 **VARIANTS["lora-every2"]))
    assert_params_close(ranks[0]["params"], policy_setup.trainable_state(single.policy))
    dots = torch.tensor([h["CRaFT/Grad Dot"] for h in single.history], dtype=torch.float64)
    assert dots[3] != 0  # the reused g_ret of step 4 is step 3's, not zero
    torch.testing.assert_close(ranks[0]["metrics"]["CRaFT/Grad Dot"], dots, rtol=1e-4, atol=1e-9)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_reuses_the_kept_shard_like_ddp(tiny_data_root, tmp_path):
    """torchrun, 2 ranks: FSDP2 with --craft_retention_every 2 (steps 2 and 4 reuse the kept local shard of g_ret,
    `backward_act_and_capture`) equals DDP with the same flag over 4 steps: parameters and the logged λ / L_ret."""
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from test_fsdp import relative_gap
    from two_ranks import run_two_ranks

    out = tmp_path / "out"
    out.mkdir()
    run_two_ranks(here / "fsdp_worker.py", tiny_data_root, tmp_path / "runs", out, 1, 4, "online-lora-every2:1",
                  tmp_path / "no_cache", timeout=900)
    got = {s: torch.load(out / f"{s}_online-lora-every2_k1_rank0.pt", weights_only=True) for s in ("ddp", "fsdp")}
    assert relative_gap(got["fsdp"]["params"], got["ddp"]["params"]) <= 1e-5
    for key in ("CRaFT/Lambda", "CRaFT/Retention Loss"):
        torch.testing.assert_close(got["fsdp"]["metrics"][key], got["ddp"]["metrics"][key], rtol=1e-5, atol=1e-6)
    lam = got["fsdp"]["metrics"]["CRaFT/Lambda"]
    assert lam[2] == lam[1] and lam[1] != lam[0] and lam[3] != lam[2]  # online: λ moves after refresh steps only
