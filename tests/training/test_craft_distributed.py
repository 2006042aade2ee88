"""CRaFT under torchrun (gloo, 2 ranks x b) against one process with batch 2b: exact up to float summation order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from finetune import train
from prismatic.training.policy_setup import trainable_state

HERE = Path(__file__).resolve().parent
STEPS = 3

sys.path.insert(0, str(HERE))
from craft_ddp_worker import CRAFT_FLAGS, KEYS, VARIANTS  # noqa: E402
from ddp_worker import worker_config  # noqa: E402
from test_craft_loop import _cache  # noqa: E402
from test_distributed import assert_params_close  # noqa: E402
from two_ranks import run_two_ranks  # noqa: E402


@pytest.mark.distributed
@pytest.mark.slow
def test_craft_two_ranks_equal_one_rank_double_batch(tiny_data_root, tmp_path):
    """2 ranks x b=1 == 1 rank x b=2 (same k): parameters, λ, L_ret; replicas identical after every step.
    LoRA + online anchors with k = 1 and 2; full fine-tuning (unused ViT parameters) + offline cache with k = 1;
    LoRA with --craft_adam_second_moment action, k = 2 (AdamW's v takes the rank-averaged action part)."""
    cache_dir = _cache(tmp_path, tiny_data_root)
    runs = [("lora", 1), ("lora", 2), ("full-offline", 1), ("lora-actv", 2)]
    run_two_ranks(HERE / "craft_ddp_worker.py", tiny_data_root, tmp_path / "ddp_runs", tmp_path, 1, STEPS,
                  ",".join(f"{v}:{k}" for v, k in runs), cache_dir, timeout=600)
    for variant, k in runs:
        ranks = [torch.load(tmp_path / f"craft_{variant}_k{k}_rank{r}.pt", weights_only=True) for r in range(2)]
        # bit-identical replicas after every step
        assert torch.equal(ranks[0]["per_step"], ranks[1]["per_step"]), (variant, k)
        for key in KEYS:
            assert torch.equal(ranks[0]["metrics"][key], ranks[1]["metrics"][key]), (k, key)
        single = train(worker_config(tiny_data_root, tmp_path / f"single_{variant}_k{k}", batch_size=2,
                                     max_steps=STEPS, grad_accumulation_steps=k, run_id="craft-single",
                                     craft_cache_dir=cache_dir, **CRAFT_FLAGS, **VARIANTS[variant]))
        reference = trainable_state(single.policy)
        assert set(ranks[0]["params"]) == set(reference)
        assert_params_close(ranks[0]["params"], reference)
        for key in ("CRaFT/Lambda", "CRaFT/Retention Loss"):
            want = torch.tensor([h[key] for h in single.history], dtype=torch.float64)
            torch.testing.assert_close(ranks[0]["metrics"][key], want, rtol=1e-5, atol=1e-7, msg=key)
        assert float(ranks[0]["metrics"]["CRaFT/Retention Loss"][-1]) > 0
