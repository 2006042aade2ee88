"""CRaFT in the fine-tuning loop: the replacement of `train_step.plain_gradients` and the state it carries.

`CRaFTStep(cfg, policy, env, train_set, saved_state)` builds the components of `craft_utils.py` from the flags:

    extractor  CRaFTFeatureExtractor(policy.vla, --craft_raw_layer, --craft_aq_layer, --craft_anchor_type)
    projector  CRaFTGradientProjector(every trainable parameter of the policy, --craft_delta, --craft_enable_projection)
    dual       CRaFTDualOptimizer(--craft_retention_budget, --craft_dual_lr, --craft_init_lambda, --craft_enable_dual,
               --craft_fixed_lambda)
    anchors    online: CRaFTWeightManager(policy.vla) -- θ0 = the model as loaded or --craft_snapshot_path;
               offline: CraftCacheReader(--craft_cache_dir), manifest checked against this run at start-up.

One optimizer step (`compute_gradients`, then the loop's unchanged `apply_update`, then `finish_step`):

    per micro-batch j of k:   anchors (θ0 no-grad forward of the bare VLA, or cache lookup)
                              ONE forward of the trained model (under no_sync with DDP) with the extractor's hooks
                              L_act unchanged (forward_losses), L_ret = retention_loss(features, anchors)
                              projector.accumulate(L_act / k, L_ret / k)          (autograd.grad: no DDP hook fires)
    projector.step(λ)         all-reduce of [g_act | g_ret] over ranks, g = g_act + (λ - c) g_ret written into .grad
    apply_update              as the plain step (finite check, AdamW, scheduler; no clipping, as the plain path);
                              --craft_adam_second_moment action: SplitMomentAdamW, its v fed `action_grads()`
    finish_step               λ <- max(0, λ + η (all_reduce_mean(L_ret) - ε))   (or pid / nupi, --craft_dual_mode)

With --craft_retention_every k > 1 the steps t % k != 0 skip θ0's forward and L_ret's VJP: the projector reuses the
g_ret kept from the last refresh (`projector.accumulate_act`); see docs/CRAFT.md, "Cheaper step". With
--craft_reuse coefficient they instead keep both gradients fresh and reuse only the scalar: ONE backward of
L_act + (λ_t - c_last) L_ret through DDP's own all-reduce (`_coefficient_gradients`), c_last the conflict coefficient
of the last refresh step (rank-consistent: computed from all-reduced sums).

Non-finite losses or features are errors here (the projection cannot be computed from them), unlike the plain
step which skips such an update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from prismatic.cli_errors import UserError
from prismatic.models.image_transform import batch_pixel_values
from prismatic.training.craft_cache import (
    CraftCacheReader,
    build_manifest,
    hash_file_list,
    hash_json,
    hash_state_dict,
)
from prismatic.training.craft_utils import (
    CRaFTDualOptimizer,
    CRaFTFeatureExtractor,
    CRaFTGradientProjector,
    CRaFTWeightManager,
    StopForward,
    _check_losses,
    _is_lora_name,
    all_reduce_mean,
    canonical_param_name,
    retention_loss,
)
from prismatic.training.train_step import MicroBatch, autocast_context, forward_losses, gradient_sync

STATE_VERSION = 1
METRIC_KEYS = {
    "retention_loss": "CRaFT/Retention Loss",
    "lambda": "CRaFT/Lambda",
    "conflict_ratio_params": "CRaFT/Conflict Ratio",
    "conflict_ratio_tensors": "CRaFT/Conflict Ratio (tensors)",
    "dot": "CRaFT/Grad Dot",
    "cosine": "CRaFT/Grad Cosine",
    "projection_fired": "CRaFT/Projection Fired",
    "grad_norm_act": "CRaFT/Act Grad Norm",
    "grad_norm_ret": "CRaFT/Ret Grad Norm",
    "slack": "CRaFT/Constraint Slack",
    "projection_coef": "CRaFT/Projection Coef",
    "projection_fired_rate": "CRaFT/Projection Fired Rate",
    "conflict_indicator_mean": "CRaFT/Conflict Indicator Mean",
    "conflict_ratio_params_null": "CRaFT/Conflict Ratio Null",
    "conflict_ratio_tensors_null": "CRaFT/Conflict Ratio Null (tensors)",
    "dual_integral": "CRaFT/Dual Integral",
    "dual_error_ema": "CRaFT/Dual Error EMA",
    "retention_refresh": "CRaFT/Retention Refresh",  # --craft_retention_every k > 1: 1 on steps that compute g_ret
}
_CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype")


# ---- identity of θ0, of the dataset and of the cache ---------------------------------------------------------
def theta0_vla_state(vla: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA parameter of the VLA in the plain VLA naming (θ0 when called before training)."""
    inner = vla.module if isinstance(vla, DDP) else vla
    return {canonical_param_name(n): p.detach() for n, p in inner.named_parameters() if not _is_lora_name(n)}


def vla_config_hash(vla: nn.Module) -> str:
    from prismatic.models.modeling_vla import unwrap_vla

    config = unwrap_vla(vla).config.to_dict()
    return hash_json(_strip_config(config))


def _strip_config(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_config(v) for k, v in value.items() if k not in _CONFIG_KEYS_IGNORED}
    return value


def model_identity(theta0: Mapping[str, torch.Tensor], vla: nn.Module) -> dict[str, str]:
    return {"weights_sha256": hash_state_dict(theta0), "config_sha256": vla_config_hash(vla)}


def dataset_identity(train_set: Any, dataset_name: str) -> dict[str, str]:
    """Name (the --dataset_name spec), version folder(s) and a hash of the shard files of every source dataset."""
    from prismatic.data.rlds_catalog import resolve_dataset

    layouts = [resolve_dataset(train_set.data_root_dir, s.name) for s in train_set.sources]
    files = [f for layout in layouts for f in layout.shard_files]
    return {"name": str(dataset_name), "version": ",".join(f"{lay.name}:{lay.directory.name}" for lay in layouts),
            "files_sha256": hash_file_list(files)}


def expected_cache_manifest(*, identity: Mapping[str, str], extractor: CRaFTFeatureExtractor, hidden_size: int,
                            train_set: Any, dataset_name: str, num_images: int,
                            checkpoint_path: str | None = None) -> dict[str, Any]:
    """The manifest a cache must carry to serve this run (the cache builder writes exactly this)."""
    ds = dataset_identity(train_set, dataset_name)
    manifest = build_manifest(
        weights_hash=identity["weights_sha256"], config_hash=identity["config_sha256"],
        raw_layer=extractor.raw_layer, aq_layer=extractor.aq_layer, anchor_type=extractor.anchor_type,
        feature_dim=extractor.feature_dim(hidden_size), dataset_name=ds["name"], dataset_version=ds["version"],
        dataset_files_hash=ds["files_sha256"], image_size=int(train_set.image_size),
        center_crop=bool(train_set.image_aug), checkpoint_path=checkpoint_path)
    manifest["image_transform"]["num_images"] = int(num_images)
    return manifest


def all_sample_ids(train_set: Any) -> list[str]:
    """The sample id of every frame of the training split (cheap: no image is read)."""
    return [f"{s.name}/{int(e):06d}/{int(t):04d}" for s in train_set.sources
            for e, t in zip(s.frame_episode, s.frame_step, strict=True)]


def load_snapshot_state(path: Path, model_preset: str) -> dict[str, torch.Tensor]:
    """θ0 from a policy / VLA folder (--craft_snapshot_path) as a plain-VLA state (parameters only)."""
    from prismatic.models.configuration_vla import make_vla_config
    from prismatic.models.loaders import load_policy

    policy = load_policy(path, vla_config=make_vla_config(model_preset))
    return {n: p.detach().float() for n, p in policy.vla.named_parameters()}


# ---- θ0's reference forward (online anchors) -----------------------------------------------------------------
def vision_tower_shared(vla: nn.Module, weights: CRaFTWeightManager) -> bool:
    """True when θ0's vision backbone output is provably the live one's, so θ0's forward may reuse it.

    Holds when no vision parameter is trainable, no adapter sits in the backbone (`--freeze_vision_backbone`; under
    LoRA, `without_vision` targets), nothing in it acts differently in train and eval mode (the live forward trains,
    θ0's runs in eval mode: dropout / drop-path / batch norm), and θ0's copies of its tensors (a snapshot) equal the
    live ones. Anything else (e.g. LoRA on the ViTs, the default) runs θ0's vision tower.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from prismatic.models.modeling_vla import unwrap_vla

    backbone = unwrap_vla(vla).vision_backbone
    if any(p.requires_grad for p in backbone.parameters()):
        return False
    for m in backbone.modules():
        if isinstance(m, BaseTunerLayer | nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
        if float(getattr(m, "drop_prob", 0.0) or 0.0) > 0:  # timm DropPath
            return False
    live = {canonical_param_name(n): p for n, p in vla.named_parameters()}
    for name, t in weights.theta0_state().items():
        if name.startswith("vision_backbone.") and not torch.equal(t.to(live[name].device), live[name].detach()):
            return False
    return True


def reference_features(vla: nn.Module, extractor: CRaFTFeatureExtractor, weights: CRaFTWeightManager,
                       batch: Mapping[str, Any], device: torch.device,
                       vision_features: torch.Tensor | None = None) -> torch.Tensor:
    """θ0's bridge features of a batch, no grad: the features of the full VLA forward with θ0, computed with less.

    The decoder stops after the deepest hooked layer (`StopForward`), no latents are stacked and no head runs;
    `vision_features` (the live vision backbone's output when `vision_tower_shared`) replaces θ0's vision tower.
    """
    from prismatic.models.modeling_vla import unwrap_vla
    from prismatic.models.sequence_layout import llm_attention_kwargs

    base = unwrap_vla(vla)
    with torch.no_grad(), weights.reference_weights(), extractor.capture(stop_after_deepest=True):
        with autocast_context(device):
            layout = base.build_layout(batch_pixel_values(batch, device), batch["input_ids"].to(device),
                                       batch["attention_mask"].to(device), vision_features=vision_features)
            try:
                base.language_model.model(inputs_embeds=layout.inputs_embeds, use_cache=False, return_dict=True,
                                          **llm_attention_kwargs(layout))
            except StopForward:
                pass
        return extractor.features(layout)


# ---- the step ------------------------------------------------------------------------------------------------
class CRaFTStep:
    """Builds CRaFT from the flags; `compute_gradients` is the drop-in of `plain_gradients`.

    `saved_state`: training_state.pt["craft"] of a resumed run. It restores θ0 of online LoRA anchors (the saved
    copies of the trained non-LoRA tensors, e.g. action_queries) and the θ0 identity of offline anchors, so that the
    resumed run anchors to the same θ0 as the original one; `load_state_dict` then restores λ and the statistics.
    """

    def __init__(self, cfg: Any, policy: nn.Module, env: Any, train_set: Any,
                 saved_state: Mapping[str, Any] | None = None) -> None:
        from prismatic.models.modeling_vla import unwrap_vla

        self.cfg, self.policy, self.env = cfg, policy, env
        self.source = cfg.craft_anchor_source
        vla = policy.vla
        base = unwrap_vla(vla)
        self.is_lora = base is not vla
        self.extractor = CRaFTFeatureExtractor(vla, raw_layer=cfg.craft_raw_layer, aq_layer=cfg.craft_aq_layer,
                                               anchor_type=cfg.craft_anchor_type)
        self.hidden_size = int(base.config.hidden_size)
        named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        self.projector = CRaFTGradientProjector(named, delta=cfg.craft_delta,
                                                enable_projection=cfg.craft_enable_projection)
        self.projector.null_seed = int(cfg.seed)  # the null conflict share's random g_ret: same on every rank
        # --craft_adam_second_moment action: the projector keeps g_act - c g_ret for AdamW's v (`action_grads`)
        self.projector.keep_action_part = cfg.craft_adam_second_moment == "action"
        self.dual = CRaFTDualOptimizer(epsilon=cfg.craft_retention_budget, dual_lr=cfg.craft_dual_lr,
                                       init_lambda=cfg.craft_init_lambda, enable_dual=cfg.craft_enable_dual,
                                       fixed_lambda=cfg.craft_fixed_lambda, mode=cfg.craft_dual_mode,
                                       kp=cfg.craft_dual_kp, kd=cfg.craft_dual_kd,
                                       normalize=cfg.craft_dual_normalize, max_lambda=cfg.craft_max_lambda,
                                       nu=cfg.craft_dual_nu, log_error=cfg.craft_dual_log_error,
                                       setpoint=cfg.craft_dual_setpoint)
        saved = dict(saved_state or {})
        if saved and saved.get("anchor_source", self.source) != self.source:
            raise ValueError(f"the checkpoint's CRaFT run used --craft_anchor_source {saved['anchor_source']}, "
                             f"this one {self.source}: θ0 / the cache would differ; keep the same source")
        snapshot = None
        self.snapshot_sha256 = None
        # θ0's weights hash, recorded when the run starts: a resume must anchor to the same θ0
        self.theta0_sha256 = saved.get("theta0_sha256")
        if cfg.craft_snapshot_path is not None:
            snapshot = load_snapshot_state(Path(cfg.craft_snapshot_path), cfg.model_preset)
            self.snapshot_sha256 = hash_state_dict(snapshot)
            recorded = saved.get("snapshot_sha256") or saved.get("theta0_sha256")
            if recorded not in (None, self.snapshot_sha256):
                raise UserError(f"--craft_snapshot_path {cfg.craft_snapshot_path} is not the θ0 this run started "
                                "with (its weights hash differs from the one recorded at the start)",
                                "pass the model the run started from (or resume without --craft_snapshot_path if "
                                "the run used none)")
            self.theta0_sha256 = self.snapshot_sha256
        elif saved and saved.get("snapshot_sha256") is not None:
            raise UserError("the resumed CRaFT run anchored to a snapshot", "pass the same --craft_snapshot_path")
        elif not saved and self.source == "online" and not self.is_lora:
            self.theta0_sha256 = hash_state_dict({n: t.float() for n, t in theta0_vla_state(vla).items()})

        self.weights: CRaFTWeightManager | None = None
        self.cache: CraftCacheReader | None = None
        self.identity: dict[str, str] | None = None
        self.share_vision = False
        if self.source == "online":
            self.weights = self._build_weight_manager(vla, snapshot, saved)
            # under FSDP θ0's forward runs through the root module first (below): nothing to share
            self.share_vision = not self.projector.sharded and vision_tower_shared(vla, self.weights)
        else:
            self.identity = self._theta0_identity(vla, snapshot, saved)
            self.cache = CraftCacheReader(cfg.craft_cache_dir)
            expected = expected_cache_manifest(identity=self.identity, extractor=self.extractor,
                                               hidden_size=self.hidden_size, train_set=train_set,
                                               dataset_name=cfg.dataset_name, num_images=cfg.num_images_in_input)
            self.cache.check_manifest(expected)
            missing = [s for s in all_sample_ids(train_set) if s not in self.cache]
            if missing:
                raise KeyError(f"the CRaFT cache {cfg.craft_cache_dir} lacks {len(missing)} training samples, e.g. "
                               f"{missing[:3]}: rebuild it with vla-scripts/build_craft_cache.py (samples are never "
                               "skipped)")
        self._pending_ret: float | None = None
        # --craft_retention_every k (docs/CRAFT.md, "Cheaper step"): g_ret on steps t % k == 0, reused in between
        self.retention_every = int(getattr(cfg, "craft_retention_every", 1))
        self._last_ret: float | None = None  # the last measured rank-averaged L_ret
        self._dual_skip = False  # this step measured no L_ret (online anchors, reused g_ret): λ stays
        # --craft_reuse coefficient: steps in between take g = g_act + (λ_t - c_last) g_ret from ONE backward
        self.reuse_coefficient = self.retention_every > 1 and getattr(cfg, "craft_reuse", "gradient") == "coefficient"
        self._coef_last: float | None = None  # c of the last refresh step (identical on every rank)

    # -- θ0 ----------------------------------------------------------------------------------------------------
    def _build_weight_manager(self, vla: nn.Module, snapshot: dict | None, saved: Mapping[str, Any]):
        if snapshot is not None:
            return CRaFTWeightManager(vla, storage="copy", snapshot_state=snapshot)
        if self.cfg.resume:
            if not self.is_lora:
                raise UserError("resuming a full fine-tuning CRaFT run with online anchors needs θ0",
                                "pass --craft_snapshot_path <the model the run started from> (checked against the "
                                "weights hash recorded at the start)")
            theta0 = saved.get("theta0")
            if theta0 is None:
                raise KeyError("the checkpoint's CRaFT state has no θ0 copies ('theta0'): cannot rebuild the anchors")
            return CRaFTWeightManager(vla, storage="copy", snapshot_state=theta0)
        return CRaFTWeightManager(vla, storage="copy")  # θ0 = the model as loaded

    def _theta0_identity(self, vla: nn.Module, snapshot: dict | None, saved: Mapping[str, Any]) -> dict[str, str]:
        if snapshot is not None:
            return {"weights_sha256": self.snapshot_sha256, "config_sha256": vla_config_hash(vla)}
        if self.cfg.resume:
            if saved.get("model_identity") is None:
                raise KeyError("the checkpoint's CRaFT state has no θ0 identity ('model_identity')")
            return dict(saved["model_identity"])
        return model_identity(theta0_vla_state(vla), vla)

    # -- the gradient ------------------------------------------------------------------------------------------
    def _anchors(self, micro: MicroBatch, device: torch.device,
                 vision_features: torch.Tensor | None = None) -> torch.Tensor:
        batch = micro.batch
        if self.cache is not None:
            return self.cache.lookup(batch["sample_ids"], batch["content_hashes"]).to(device)
        return reference_features(self.policy.vla, self.extractor, self.weights, batch, device, vision_features)

    @contextlib.contextmanager
    def _live_vision_output(self):
        """Online anchors with a shared vision tower: keep the live forward's vision output (detached) for θ0."""
        box: dict[str, torch.Tensor] = {}
        if not self.share_vision:
            yield box
            return
        from prismatic.models.modeling_vla import unwrap_vla

        handle = unwrap_vla(self.policy.vla).vision_backbone.register_forward_hook(
            lambda _m, _a, out: box.__setitem__("features", out.detach()))
        try:
            yield box
        finally:
            handle.remove()

    def _reference_features_sharded(self, model: nn.Module, micro: MicroBatch, device: torch.device) -> torch.Tensor:
        """θ0's features under FSDP: a no-grad forward of the root module (no head) with θ0 swapped into the shards.

        Every FSDP unit gathers at its own forward, so θ0 must be in place before the root's forward starts, and the
        root's gathered parameters (kept after a forward) are freed before the live weights return. Runs before the
        live forward of the micro-batch, whose root parameters FSDP keeps gathered for its backward.
        """
        from prismatic.training.fsdp import reshard_root

        with torch.no_grad(), self.weights.reference_weights(), self.extractor.capture():
            try:
                with autocast_context(device):
                    out = model(micro.batch, run_head=False)
            finally:
                reshard_root(model)
            return self.extractor.features(out.vla_output.layout)

    def _sharded_micro_batch(self, model: nn.Module, micro: MicroBatch, device: torch.device, k: int,
                             refresh: bool = True):
        """FSDP2: autograd.grad cannot reach DTensor shards, so two backward passes with the projector capturing each
        (FSDP reduce-scatters and averages both); the action-only parameters keep their `.grad` from the first."""
        if not refresh:
            return self._reuse_micro_batch(model, micro, device, k)
        anchors = self._anchors(micro, device) if self.cache is not None \
            else self._reference_features_sharded(model, micro, device)
        with self.extractor.capture():
            loss, curr, nxt, out = forward_losses(model, micro, device)
        loss_ret = retention_loss(self.extractor.features(out.vla_output.layout), anchors)
        self.projector.backward_and_capture(loss / k, loss_ret / k)
        return loss, curr, nxt, loss_ret

    def _micro_batch(self, model: nn.Module, micro: MicroBatch, device: torch.device, k: int, refresh: bool = True):
        """DDP / one process: the live forward, the anchors, then both VJPs by autograd.grad (no DDP hook fires,
        hence no_sync; the projector all-reduces its buffers at the step)."""
        if not refresh:
            return self._reuse_micro_batch(model, micro, device, k)
        sync_off = model.no_sync() if isinstance(model, DDP) else contextlib.nullcontext()
        with sync_off:
            loss, curr, nxt, loss_ret = self._live_losses(model, micro, device)
            self.projector.accumulate(loss / k, loss_ret / k)
        return loss, curr, nxt, loss_ret

    def _live_losses(self, model: nn.Module, micro: MicroBatch, device: torch.device):
        """(L_act, current L1, next L1, L_ret) of the live forward. Offline anchors are looked up first; online, θ0's
        forward runs after the live one (it may reuse its vision output; in eval mode without dropout it draws no
        random numbers, so the order changes nothing else)."""
        anchors = self._anchors(micro, device) if self.cache is not None else None
        with self.extractor.capture(), self._live_vision_output() as vision:
            loss, curr, nxt, out = forward_losses(model, micro, device)
        feats = self.extractor.features(out.vla_output.layout)
        if anchors is None:
            anchors = self._anchors(micro, device, vision.get("features"))
        return loss, curr, nxt, retention_loss(feats, anchors)

    def _reuse_micro_batch(self, model: nn.Module, micro: MicroBatch, device: torch.device, k: int):
        """A step between g_ret refreshes: the live forward and L_act's backward only; g_ret is the kept one.
        Offline anchors: L_ret of this forward costs a cache lookup and the pooling (no gradient), so it is measured;
        online anchors would need θ0's forward: not measured (None)."""
        sync_off = model.no_sync() if isinstance(model, DDP) and not self.projector.sharded \
            else contextlib.nullcontext()
        loss_ret = None
        with sync_off:
            capture = self.extractor.capture() if self.cache is not None else contextlib.nullcontext()
            with capture:
                loss, curr, nxt, out = forward_losses(model, micro, device)
            if self.cache is not None:
                with torch.no_grad():
                    loss_ret = retention_loss(self.extractor.features(out.vla_output.layout),
                                              self._anchors(micro, device))
            if self.projector.sharded:
                self.projector.backward_act_and_capture(loss / k)
            else:
                self.projector.accumulate_act(loss / k)
        return loss, curr, nxt, loss_ret

    def compute_gradients(self, model: nn.Module, micro_batches: Sequence[MicroBatch], device: torch.device) -> dict:
        """Drop-in for `plain_gradients`: leaves g = g_act + (λ - c) g_ret in `.grad`, returns the loss numbers."""
        k = len(micro_batches)
        every = self.retention_every
        refresh = self.projector.steps % every == 0  # the projector's step count is restored on resume
        if self.reuse_coefficient and not refresh:
            return self._coefficient_gradients(model, micro_batches, device)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, curr, next, L_ret
        one_micro_batch = self._sharded_micro_batch if self.projector.sharded else self._micro_batch
        measured = True
        for micro in micro_batches:
            loss, curr, nxt, loss_ret = one_micro_batch(model, micro, device, k, refresh) if every > 1 \
                else one_micro_batch(model, micro, device, k)
            measured = loss_ret is not None
            ret = loss_ret.detach() if measured else torch.zeros_like(loss.detach())
            sums += torch.stack([loss.detach(), curr.detach(), nxt.detach(), ret]).double().cpu()
        means = sums / k
        if every > 1:  # keep g_ret for the next step unless that one refreshes it (or reuses only c)
            self.projector.keep_ret = (self.projector.steps + 1) % every != 0 and not self.reuse_coefficient
        stats = self.projector.step(self.dual.lam)
        if self.reuse_coefficient:
            self._coef_last = float(stats["projection_coef"])
        if measured:
            l_ret = all_reduce_mean(means[3])
            self._pending_ret = self._last_ret = l_ret
        else:  # online anchors between refreshes: the last measured L_ret is logged; the dual waits for a new one
            l_ret = self._last_ret if self._last_ret is not None else math.nan
            self._pending_ret, self._dual_skip = None, True
        running = self.projector.running_stats()
        metrics = {METRIC_KEYS["retention_loss"]: l_ret, METRIC_KEYS["slack"]: l_ret - self.dual.epsilon}
        for key in ("lambda", "conflict_ratio_params", "conflict_ratio_tensors", "dot", "cosine", "projection_fired",
                    "grad_norm_act", "grad_norm_ret", "projection_coef", "conflict_ratio_params_null",
                    "conflict_ratio_tensors_null"):
            metrics[METRIC_KEYS[key]] = float(stats[key])
        if self.dual.mode == "pid":
            metrics[METRIC_KEYS["dual_integral"]] = self.dual.integral  # the I used for this step's λ
        elif self.dual.mode == "nupi":
            metrics[METRIC_KEYS["dual_error_ema"]] = self.dual.xi  # ξ after the previous step's update
        for key in ("projection_fired_rate", "conflict_indicator_mean"):
            metrics[METRIC_KEYS[key]] = running[key]
        if every > 1:
            metrics[METRIC_KEYS["retention_refresh"]] = float(refresh)
        return {"loss": means[0], "curr_l1": means[1], "next_l1": means[2], "metrics": metrics}

    def _coefficient_gradients(self, model: nn.Module, micro_batches: Sequence[MicroBatch],
                               device: torch.device) -> dict:
        """--craft_reuse coefficient, a step between refreshes: per micro-batch the live forward (and the anchors:
        a cache lookup, or θ0's forward with online anchors), then ONE backward of (L_act + a L_ret) / k with
        a = λ_t - c_last, DDP's all-reduce on the last micro-batch only (as `plain_gradients`). Exact: the rank
        average of g_act + a g_ret is the combination of the rank averages, a being the same on every rank."""
        if self._coef_last is None:
            raise RuntimeError("--craft_reuse coefficient: no conflict coefficient of a refresh step to reuse")
        lam, coef = self.dual.lam, self._coef_last
        a = lam - coef
        k = len(micro_batches)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, curr, next, L_ret
        for j, micro in enumerate(micro_batches):
            with gradient_sync(model, j == k - 1):
                loss, curr, nxt, loss_ret = self._live_losses(model, micro, device)
                _check_losses(loss, loss_ret)
                ((loss + a * loss_ret) / k).backward()
            sums += torch.stack([loss.detach(), curr.detach(), nxt.detach(), loss_ret.detach()]).double().cpu()
        self.projector.count_unmeasured_step()
        means = sums / k
        l_ret = all_reduce_mean(means[3])
        self._pending_ret = self._last_ret = l_ret
        running = self.projector.running_stats()
        # the gradient statistics (dot, norms, conflict shares) are not measured on this step: not logged
        metrics = {METRIC_KEYS["retention_loss"]: l_ret, METRIC_KEYS["slack"]: l_ret - self.dual.epsilon,
                   METRIC_KEYS["lambda"]: float(lam), METRIC_KEYS["projection_coef"]: coef,
                   METRIC_KEYS["retention_refresh"]: 0.0}
        if self.dual.mode == "pid":
            metrics[METRIC_KEYS["dual_integral"]] = self.dual.integral
        elif self.dual.mode == "nupi":
            metrics[METRIC_KEYS["dual_error_ema"]] = self.dual.xi
        for key in ("projection_fired_rate", "conflict_indicator_mean"):
            metrics[METRIC_KEYS[key]] = running[key]
        return {"loss": means[0], "curr_l1": means[1], "next_l1": means[2], "metrics": metrics}

    def action_grads(self) -> dict[nn.Parameter, torch.Tensor]:
        """This step's action part (combined - λ g_ret) per parameter L_ret reaches, rank-averaged (FSDP2: the local
        shard, as a DTensor), for `SplitMomentAdamW.set_second_moment_grads`. Only with
        --craft_adam_second_moment action."""
        return self.projector.action_grads()

    def finish_step(self) -> float:
        """After the optimizer step: λ <- max(0, λ + η (L_ret - ε)) with the rank-averaged L_ret. Returns λ."""
        if self._pending_ret is None and self._dual_skip:
            self._dual_skip = False
            return self.dual.lam
        if self._pending_ret is None:
            raise RuntimeError("CRaFTStep.finish_step() without a preceding compute_gradients()")
        lam = self.dual.step(self._pending_ret)
        self._pending_ret = None
        return lam

    # -- resume ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": STATE_VERSION, "dual": self.dual.state_dict(),
                                 "projector": self.projector.state_dict(), "anchor_source": self.source,
                                 "snapshot_sha256": self.snapshot_sha256, "model_identity": self.identity,
                                 "theta0_sha256": self.theta0_sha256,
                                 "raw_layer": self.extractor.raw_layer, "aq_layer": self.extractor.aq_layer,
                                 "anchor_type": self.extractor.anchor_type}
        if self.weights is not None and self.is_lora and self.snapshot_sha256 is None:
            from prismatic.training.fsdp import full_tensor  # collective for FSDP shards (every rank saves this)

            state["theta0"] = {n: full_tensor(t.detach()).cpu().clone()
                               for n, t in self.weights.theta0_state().items()}
        if self.retention_every > 1:
            reuse_next = self.projector.keep_ret and self.projector.layout_ready
            state["retention_every"] = {
                "every": self.retention_every, "last_ret": self._last_ret, "sharded": self.projector.sharded,
                "reuse": "coefficient" if self.reuse_coefficient else "gradient", "coef_last": self._coef_last,
                # the g_ret the next step reuses (None when it refreshes it, or for FSDP shards: not saved)
                "kept": self.projector.kept_ret_state() if reuse_next and not self.projector.sharded else None}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"CRaFT state version {state.get('version')} != {STATE_VERSION}")
        mine = {"raw_layer": self.extractor.raw_layer, "aq_layer": self.extractor.aq_layer,
                "anchor_type": self.extractor.anchor_type}
        diffs = [f"{k}: checkpoint {state.get(k)!r} vs flags {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise ValueError("the checkpoint's CRaFT anchors differ from the flags: " + "; ".join(diffs))
        self.dual.load_state_dict(state["dual"])
        self.projector.load_state_dict(state["projector"])
        if self.retention_every > 1:
            self._load_retention_every(state.get("retention_every"))

    def _load_retention_every(self, saved: Mapping[str, Any] | None) -> None:
        """Resume under --craft_retention_every k: a step that reuses g_ret gets the saved one back (exact)."""
        k, step = self.retention_every, self.projector.steps
        if saved is not None and saved.get("every") != k:
            raise UserError(f"the checkpoint's run used --craft_retention_every {saved.get('every')}, this one {k}",
                            "resume with the run's value")
        self._last_ret = saved.get("last_ret") if saved is not None else None
        reuse = "coefficient" if self.reuse_coefficient else "gradient"
        if saved is not None and saved.get("reuse", "gradient") != reuse:
            raise UserError(f"the checkpoint's run used --craft_reuse {saved.get('reuse', 'gradient')}, this one "
                            f"{reuse}", "resume with the run's value")
        if step % k == 0:
            return  # this step computes g_ret anew
        if self.reuse_coefficient:  # a step in between needs only the last refresh's conflict coefficient
            if saved is None or saved.get("coef_last") is None:
                raise UserError(f"resuming at optimizer step {step} with --craft_reuse coefficient needs the "
                                "conflict coefficient of the last refresh, which this checkpoint does not hold",
                                f"resume from a checkpoint at a step that is a multiple of {k}")
            self._coef_last = float(saved["coef_last"])
            return
        if saved is None or saved.get("kept") is None:
            why = " (FSDP shards of g_ret are not saved)" if saved is not None and saved.get("sharded") else ""
            raise UserError(f"resuming at optimizer step {step} with --craft_retention_every {k} needs the g_ret kept "
                            f"at the last refresh, which this checkpoint does not hold{why}",
                            f"resume from a checkpoint at a step that is a multiple of {k}")
        self.projector.load_kept_ret(saved["kept"])

