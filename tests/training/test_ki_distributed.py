"""--retention_method ki under torchrun (2 ranks, gloo): DDP 2 x b == FSDP 2 x b == 1 process x 2b, with gradient
accumulation; the w = 0 ablation leaves the VLA at θ0 on every rank; FSDP resume is bit-exact (fsdp_worker.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from finetune import train
from prismatic.training.distributed import init_distributed
from prismatic.training.policy_setup import build_policy, trainable_state

HERE = Path(__file__).resolve().parent
STEPS = 3

sys.path.insert(0, str(HERE))
from ddp_worker import worker_config  # noqa: E402
from fsdp_worker import KI_VARIANTS  # noqa: E402
from test_distributed import assert_params_close  # noqa: E402
from test_fsdp import relative_gap  # noqa: E402
from two_ranks import run_two_ranks  # noqa: E402


@pytest.mark.distributed
@pytest.mark.slow
def test_ki_two_ranks_equal_one_process_under_ddp_and_fsdp(tiny_data_root, tmp_path):
    runs = [("ki-lora", 1), ("ki-full", 2), ("ki0-full", 1)]
    resumes = [("resume-ki-lora", 2)]
    out = tmp_path / "out"
    out.mkdir()
    run_two_ranks(HERE / "fsdp_worker.py", tiny_data_root, tmp_path / "runs", out, 1, STEPS,
                  ",".join(f"{v}:{k}" for v, k in runs + resumes), tmp_path / "no_cache", timeout=1200)
    for variant, k in runs:
        got = {s: [torch.load(out / f"{s}_{variant}_k{k}_rank{r}.pt", weights_only=True) for r in range(2)]
               for s in ("ddp", "fsdp")}
        for strategy, ranks in got.items():  # every rank holds (or gathered) the same weights
            for n, t in ranks[0]["params"].items():
                assert torch.equal(t, ranks[1]["params"][n]), (strategy, variant, n)
        cfg = worker_config(tiny_data_root, tmp_path / f"single_{variant}_k{k}", batch_size=2, max_steps=STEPS,
                            grad_accumulation_steps=k, run_id="single", **KI_VARIANTS[variant])
        single = train(cfg)
        reference = trainable_state(single.policy)
        for strategy in ("ddp", "fsdp"):
            params = got[strategy][0]["params"]
            assert set(params) == set(reference), (variant, strategy)
            assert relative_gap(params, reference) <= 1e-5, (variant, k, strategy, relative_gap(params, reference))
            assert_params_close(params, reference)
            for key, values in got[strategy][0]["metrics"].items():
                if key == "KI/Token Accuracy":  # an argmax: compared on the single process below only when equal
                    continue
                want = torch.tensor([h[key] for h in single.history], dtype=torch.float64)
                torch.testing.assert_close(values, want, rtol=1e-4, atol=1e-6, msg=f"{variant} {strategy} {key}")
            assert "KI/Token CE" in got[strategy][0]["metrics"]
        vla_names = [n for n in reference if n.startswith("vla.")]
        initial = trainable_state(build_policy(cfg, init_distributed()))
        vla_moved = max(float((got["fsdp"][0]["params"][n] - initial[n]).abs().max()) for n in vla_names)
        if KI_VARIANTS[variant].get("ki_action_loss_weight", 1.0) == 0:  # the ablation: the VLA is θ0 on every side
            for params in (got["ddp"][0]["params"], got["fsdp"][0]["params"], reference):
                for n in vla_names:
                    assert torch.equal(params[n], initial[n]), (variant, n)
        else:
            assert vla_moved > 1e-4, variant
    for variant, k in resumes:
        for r in range(2):
            both = torch.load(out / f"fsdp_{variant}_k{k}_rank{r}.pt", weights_only=True)
            whole, resumed = both["whole"], both["resumed"]
            for n, t in whole["params"].items():
                assert torch.equal(t, resumed["params"][n]), (variant, n)
            for key, values in whole["metrics"].items():
                assert torch.equal(values[-len(resumed["metrics"][key]):], resumed["metrics"][key]), (variant, key)
