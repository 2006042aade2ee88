"""torchrun (gloo, 2 ranks) against a single process: same samples, same noise, same parameters."""

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
from two_ranks import run_two_ranks  # noqa: E402


def assert_params_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same parameters up to float summation order, after a few AdamW steps at lr 1e-3.

    Most tensors agree to ~3e-6. The L1 loss's gradient sign(pred - target) and Adam's per-coordinate
    normalisation turn rounding differences into up to ~1e-4 (a tenth of one step of size lr) on coordinates whose
    prediction sits on its target (the head's output bias of constant action dims), hence a max bound of 2e-4 and a
    mean bound of 2e-6 over all trainable coordinates.
    """
    diffs = torch.cat([(got[n].double() - want[n].double()).abs().flatten() for n in want])
    assert float(diffs.max()) <= 2e-4, float(diffs.max())
    assert float(diffs.mean()) <= 2e-6, float(diffs.mean())


@pytest.mark.distributed
def test_two_ranks_equal_one_rank_double_batch(tiny_data_root, tmp_path):
    """2 ranks x b=1 (k=1 and k=2 micro-batches) == 1 rank x b=2 (k=1) and 1 rank x b=2 (k=2), respectively."""
    run_two_ranks(HERE / "ddp_worker.py", tiny_data_root, tmp_path / "ddp_runs", tmp_path, 1, STEPS, "1,2",
                  timeout=300)

    for k in (1, 2):
        ranks = [torch.load(tmp_path / f"k{k}_rank{r}.pt", weights_only=True) for r in range(2)]
        # one process, per-rank batch 2: global batch 2 * k, the same stream positions as 2 ranks x 1 x k
        cfg = worker_config(tiny_data_root, tmp_path / f"single_k{k}", batch_size=2, max_steps=STEPS,
                            grad_accumulation_steps=k)
        single = train(cfg)
        reference = trainable_state(single.policy)
        assert set(ranks[0]["params"]) == set(reference)
        for name in reference:  # replicas are bit-identical (the all-reduced gradient is the same on both)
            assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), (k, name)
        # equal up to float summation order: see assert_params_close for the tolerance
        assert_params_close(ranks[0]["params"], reference)
        single_losses = torch.tensor([h["VLA Train/Loss"] for h in single.history], dtype=torch.float64)
        torch.testing.assert_close(ranks[0]["losses"], single_losses, rtol=1e-4, atol=0)
        # training moved the parameters far beyond the tolerance, so the comparison is not vacuous
        initial = trainable_state(build_policy(cfg, init_distributed()))
        assert max(float((reference[n] - initial[n]).abs().max()) for n in reference) > 1e-3
