"""`--dtype bfloat16` on CPU: the training path under bf16 autocast (fp32 master weights), as on CUDA by default."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from finetune import seed_everything, train
from prismatic.training import policy_setup
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import init_distributed
from prismatic.training.finetune_config import ConfigError, validate_config
from prismatic.training.train_step import autocast_dtype, forward_losses


def _loss_and_hidden_dtype(cfg, dtype: str):
    env = init_distributed()
    seed_everything(cfg.seed)
    policy = policy_setup.build_policy(cfg, env)
    data = build_training_data(cfg, policy, env, run_dir=Path(cfg.run_root_dir) / dtype)
    micro = next(data.train_stream(0))[0]
    seen = []
    core = policy.vla.get_base_model().language_model.model
    handle = core.layers[0].mlp.register_forward_hook(lambda _m, _a, out: seen.append(out[0].dtype if isinstance(
        out, tuple) else out.dtype))
    try:
        with autocast_dtype(dtype):
            loss, *_ = forward_losses(policy, micro, env.device)
    finally:
        handle.remove()
    params = {p.dtype for p in policy.parameters()}
    return float(loss), seen[0], params


def test_bfloat16_autocast_on_cpu_vs_fp32(make_cfg):
    cfg = make_cfg()
    l32, h32, p32 = _loss_and_hidden_dtype(cfg, "auto")       # CPU default: fp32
    l16, h16, p16 = _loss_and_hidden_dtype(cfg, "bfloat16")
    assert h32 == torch.float32 and h16 == torch.bfloat16      # the decoder MLP computed in bf16
    assert p32 == p16 == {torch.float32}                        # master weights stay fp32
    assert l16 != l32 and l16 == pytest.approx(l32, rel=5e-2)  # bf16 rounding, not another computation


def test_train_with_bfloat16_crafts_and_restores_the_default(make_cfg):
    res = train(make_cfg(dtype="bfloat16", use_craft=True, craft_anchor_source="online", max_steps=2, run_id="bf16"))
    assert len(res.history) == 2
    for h in res.history:
        assert math.isfinite(h["VLA Train/Loss"]) and math.isfinite(h["CRaFT/Retention Loss"])
    from prismatic.training import train_step

    assert train_step._autocast_dtype == "auto"  # the run's precision does not leak into the process
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        validate_config(make_cfg(dtype="float16"))
