"""--retention_method align | consft through train(): the logged extra loss equals an independent computation
(KI: tests/training/test_ki_training.py); every related method resumes bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_craft_loop import _setup

from finetune import train
from prismatic.training import checkpointing as ckpt
from prismatic.training.align_loss import AlignRetention


def _first_step_forward(cfg, name):
    env, policy, _, stream = _setup(cfg, name)
    policy.train()
    micro = next(stream)
    assert len(micro) == 1
    with torch.no_grad():
        out = policy(micro[0].batch, noise=micro[0].noise)
    return policy, micro[0].batch, out


def test_align_switch_logs_the_align_loss(make_cfg, tmp_path):
    cfg = make_cfg(retention_method="align", align_weight=0.5, align_layer=1, max_steps=2, save_freq=2)
    result = train(cfg)
    logged = result.history[0]["Align/Loss"]
    policy, batch, out = _first_step_forward(make_cfg(retention_method="align", align_layer=1, run_id="ref"), "ref")
    align = AlignRetention(policy.vla, layer=1, weight=0.5, seed=cfg.seed)
    lay = out.vla_output.layout
    h = out.vla_output.hidden_states[1][lay.vision_mask].double().numpy()  # (B * P, D), row-major by sample
    with torch.no_grad():
        p_h = align.projector(torch.from_numpy(h).float()).double().numpy()
        z = align.teacher_features(batch["pixel_values"]).reshape(-1, p_h.shape[-1]).double().numpy()
    cos = (p_h * z).sum(-1) / (np.linalg.norm(p_h, axis=-1) * np.linalg.norm(z, axis=-1))
    assert logged == pytest.approx(-cos.mean(), rel=1e-5, abs=1e-6)
    assert result.history[0]["Align/Cosine"] == pytest.approx(-logged)
    total = result.history[0]["VLA Train/Loss"] + 0.5 * logged
    assert result.history[0]["Align/Total Loss"] == pytest.approx(total, rel=1e-5)
    state = ckpt.load_training_state(result.last_checkpoint)
    assert state["related"]["method"] == "align" and state["craft"] is None
    torch.testing.assert_close(state["related"]["align"]["projector"]["1.weight"], align.projector[1].weight)


def test_consft_switch_logs_the_weighted_loss(make_cfg):
    tau, rho = 0.05, 0.3
    cfg = make_cfg(retention_method="consft", consft_tau=tau, consft_clip=rho, max_steps=1, batch_size=4)
    result = train(cfg)
    rec = result.history[0]
    _, batch, out = _first_step_forward(make_cfg(retention_method="consft", batch_size=4, run_id="ref"), "ref")
    per_sample = (out.actions.double() - batch["actions"].double()).abs().flatten(1).mean(1).numpy()
    e = np.exp(-per_sample / tau)
    w = np.clip(e / e.mean(), 1 - rho, 1 + rho)
    assert rec["ConSFT/Loss"] == pytest.approx(float((w * per_sample).mean()), rel=1e-5)
    assert rec["ConSFT/Weight Min"] == pytest.approx(w.min(), rel=1e-5)
    assert rec["ConSFT/Weight Max"] == pytest.approx(w.max(), rel=1e-5)
    assert rec["VLA Train/Loss"] == pytest.approx(per_sample.mean(), rel=1e-5)


@pytest.mark.parametrize("method", ["align", "consft", "ki"])
def test_related_method_resume_is_bit_exact(make_cfg, tmp_path, method):
    common = dict(retention_method=method, max_steps=4, save_freq=2, use_lora=method in ("align", "ki"))
    full = train(make_cfg(run_root_dir=tmp_path / "a", **common))
    first = ckpt.checkpoint_dir(tmp_path / "a", "test", 2)
    resumed = train(make_cfg(run_root_dir=tmp_path / "b", resume=True, config_file_path=first, resume_step=2,
                             **common))
    a = {n: p.detach() for n, p in full.policy.named_parameters() if p.requires_grad}
    b = {n: p.detach() for n, p in resumed.policy.named_parameters() if p.requires_grad}
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    key = {"align": "Align/Loss", "consft": "ConSFT/Loss", "ki": "KI/Token CE"}[method]
    assert [h[key] for h in resumed.history] == [h[key] for h in full.history[2:]]
