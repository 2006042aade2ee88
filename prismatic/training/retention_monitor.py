"""Retention monitor: CRaFT's L_ret against θ0, measured WITHOUT gradient, for any method (SFT, Align, ConSFT,
Freeze, CRaFT), so every row of the paper's tables has a drift number in the same units.

    L_ret = mean over the batch of Σ_dims (f_θ - f_θ0)²,   f = [Pool(C_R^(m)) ; Pool(C_AQ^(M))]

computed with CRaFT's own components (prismatic/training/craft_utils.py): `CRaFTFeatureExtractor` (same layers,
anchor type, pooling) and `CRaFTWeightManager` (θ0 swapped in for an online reference forward), with the same θ0
as CRaFT (`--craft_snapshot_path` if given, else the model as loaded; on resume the copy saved in the checkpoint).

Every `--retention_monitor_freq` optimizer steps (and at the last step), on the micro-batches of that step with the
weights BEFORE its update (the weights CRaFT's logged L_ret of the same step sees), both forwards in eval mode
(deterministic; identical to train mode without dropout), RNG states saved and restored: training is unchanged.
The value is averaged over micro-batches and ranks and logged as `CRaFT/Retention Loss` (the key CRaFT logs), or,
in a CRaFT run (which already logs that key every step), as `CRaFT/Retention Loss (monitor)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prismatic.models.image_transform import batch_pixel_values
from prismatic.training import checkpointing as ckpt
from prismatic.training.craft_utils import CRaFTFeatureExtractor, CRaFTWeightManager, all_reduce_mean, retention_loss
from prismatic.training.train_step import MicroBatch, autocast_context

RETENTION_KEY = "CRaFT/Retention Loss"
BUDGET_KEY = "CRaFT/Retention Budget"  # ε, logged beside the monitor so dashboards can draw the ε line
MONITOR_KEY_UNDER_CRAFT = "CRaFT/Retention Loss (monitor)"
STATE_VERSION = 1


class RetentionMonitor:
    """Built from the run's flags and policy BEFORE training moves any weight (θ0 = the weights at construction)."""

    def __init__(self, cfg: Any, policy: nn.Module, saved_state: Mapping[str, Any] | None = None,
                 craft_state: Mapping[str, Any] | None = None) -> None:
        from prismatic.models.modeling_vla import unwrap_vla

        if int(cfg.retention_monitor_freq) <= 0:
            raise ValueError(f"--retention_monitor_freq must be > 0, got {cfg.retention_monitor_freq}")
        self.freq = int(cfg.retention_monitor_freq)
        self.max_steps = int(cfg.max_steps)
        self.key = MONITOR_KEY_UNDER_CRAFT if cfg.use_craft else RETENTION_KEY
        self.epsilon = float(cfg.craft_retention_budget)
        self.vla = policy.vla
        self.is_lora = unwrap_vla(self.vla) is not self.vla
        self.extractor = CRaFTFeatureExtractor(self.vla, raw_layer=cfg.craft_raw_layer, aq_layer=cfg.craft_aq_layer,
                                               anchor_type=cfg.craft_anchor_type)
        self.weights = self._theta0(cfg, dict(saved_state or {}), dict(craft_state or {}))

    def _theta0(self, cfg: Any, saved: dict, craft_saved: dict) -> CRaFTWeightManager:
        # Full fine-tuning keeps θ0 of the whole VLA: on CPU (swapped in every `freq` steps) to spare device memory.
        storage = "copy" if self.is_lora else "cpu_swap"
        if cfg.craft_snapshot_path is not None:
            from prismatic.training.craft_step import load_snapshot_state

            snapshot = load_snapshot_state(Path(cfg.craft_snapshot_path), cfg.model_preset)
            return CRaFTWeightManager(self.vla, storage=storage, snapshot_state=snapshot)
        if cfg.resume:
            if not self.is_lora:
                raise ValueError("resuming a full fine-tuning run with --retention_monitor True needs θ0: pass "
                                 "--craft_snapshot_path <the model the run started from>")
            theta0 = saved.get("theta0", craft_saved.get("theta0"))
            if theta0 is None:
                raise KeyError("the checkpoint has no θ0 copies for the retention monitor ('retention_monitor' / "
                               "'craft' state): it was trained without --retention_monitor; resume with "
                               "--retention_monitor False")
            return CRaFTWeightManager(self.vla, storage=storage, snapshot_state=theta0)
        return CRaFTWeightManager(self.vla, storage=storage)

    def due(self, done: int) -> bool:
        """Measure at optimizer step `done` (1-based, the metrics index)?"""
        return done % self.freq == 0 or done == self.max_steps

    @torch.no_grad()
    def measure(self, micro_batches: Sequence[MicroBatch], device: torch.device) -> float:
        """Rank-averaged mean over micro-batches of L_ret(θ, θ0); every rank must call it at the same step."""
        rng = ckpt.capture_rng_state()
        modes = {m: m.training for m in self.vla.modules()}
        total = 0.0
        try:
            self.vla.eval()
            for micro in micro_batches:
                inputs = {k: micro.batch[k].to(device) for k in ("input_ids", "attention_mask")}
                inputs["pixel_values"] = batch_pixel_values(micro.batch, device)
                with self.weights.reference_weights(), self.extractor.capture(), autocast_context(device):
                    anchors = self.extractor.features(self.vla(**inputs).layout)
                with self.extractor.capture(), autocast_context(device):
                    feats = self.extractor.features(self.vla(**inputs).layout)
                total += float(retention_loss(feats, anchors).double())
        finally:
            for m, training in modes.items():
                m.training = training
            ckpt.restore_rng_state(rng)
        return all_reduce_mean(total / len(micro_batches))

    def metrics(self, micro_batches: Sequence[MicroBatch], device: torch.device) -> dict[str, float]:
        return {self.key: self.measure(micro_batches, device), BUDGET_KEY: self.epsilon}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": STATE_VERSION}
        if self.is_lora:  # θ0 of the trained non-LoRA tensors (e.g. action_queries): small, needed on resume
            state["theta0"] = {n: t.detach().cpu().clone() for n, t in self.weights.theta0_state().items()}
        return state
