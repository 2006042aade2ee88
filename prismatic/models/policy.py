"""`VLAPolicy`: VLA + bridge-attention action head + proprio projector + normalisation statistics + processor.

Checkpoint folder written by `save_pretrained(dir, step)`:
    config.json, model.safetensors            the VLA (HF format, `OpenVLAForActionPrediction`)
    tokenizer files, prismatic_processor_config.json
    action_head--{step}_checkpoint.pt         head state_dict, keys prefixed `module.` (upstream DDP layout)
    proprio_projector--{step}_checkpoint.pt   (only when use_proprio)
    dataset_statistics.json                   upstream norm-stats dict {dataset: {action: {...}, proprio: {...}}}
    policy_config.json                        head variant, num_images_in_input, use_proprio, noise_std, ...
`training_state.pt` and the `COMPLETE` marker belong to the training loop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prismatic.data.normalization import normalize_proprio_for_eval, unnormalize_bounds_q99
from prismatic.integrity import unreadable_file
from prismatic.models.action_heads import ACTION_DIM, NUM_ACTIONS_CHUNK, L1RegressionActionHead
from prismatic.models.image_transform import batch_pixel_values
from prismatic.models.modeling_vla import (
    OpenVLAForActionPrediction,
    VLAOutput,
    load_vla_pretrained,
    merged_vla_state_dict,
    unwrap_vla,
)
from prismatic.models.processing_vla import PrismaticProcessor
from prismatic.models.proprio_projector import PROPRIO_DIM, ProprioProjector

POLICY_CONFIG_NAME = "policy_config.json"
STATS_NAME = "dataset_statistics.json"
DDP_PREFIX = "module."
HEAD_VARIANTS = ("pro", "original")


def component_filename(component: str, step: int) -> str:
    """`action_head--{step}_checkpoint.pt` / `proprio_projector--{step}_checkpoint.pt` (upstream names)."""
    return f"{component}--{step}_checkpoint.pt"


def find_component_file(directory: str | Path, component: str, step: int | None = None) -> Path | None:
    """The `{component}--{step}_checkpoint.pt` file of a folder: by step, or the only one; None if absent."""
    directory = Path(directory)
    pattern = re.compile(rf"^{re.escape(component)}--(.+)_checkpoint\.pt$")
    found = sorted(p for p in directory.iterdir() if pattern.match(p.name))
    if step is not None:
        wanted = directory / component_filename(component, step)
        if not wanted.exists():
            raise FileNotFoundError(f"no {wanted.name} in {directory}; present: {[p.name for p in found]}")
        return wanted
    if len(found) > 1:
        raise ValueError(f"{directory} holds several {component} files {[p.name for p in found]}; pass step=")
    return found[0] if found else None


def strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in state_dict.items()}


def load_component_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    with unreadable_file(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    return strip_ddp_prefix(state)


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with one clear error listing missing/unexpected keys and every shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(f"{what} does not match the model: missing keys {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}, shape mismatches {mismatched[:10]}")
    module.load_state_dict(state_dict, strict=True)


@dataclass
class PolicyConfig:
    """What a checkpoint must remember besides the weights."""

    head_variant: str = "pro"  # "pro" (default upstream) or "original"
    num_images_in_input: int = 2  # third-person + wrist for LIBERO
    use_proprio: bool = True
    noise_std: float = 0.02
    num_actions_chunk: int = NUM_ACTIONS_CHUNK
    action_dim: int = ACTION_DIM
    proprio_dim: int = PROPRIO_DIM
    num_heads: int = 8

    def __post_init__(self) -> None:
        if self.head_variant not in HEAD_VARIANTS:
            raise ValueError(f"unknown head_variant {self.head_variant!r}; valid: {list(HEAD_VARIANTS)}")

    @classmethod
    def from_dict(cls, data: dict) -> PolicyConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def build_action_head(vla_config, policy_config: PolicyConfig) -> L1RegressionActionHead:
    dim = vla_config.hidden_size
    return L1RegressionActionHead(
        input_dim=dim, hidden_dim=dim, action_dim=policy_config.action_dim,
        num_actions_chunk=policy_config.num_actions_chunk, num_blocks=vla_config.num_llm_layers,
        use_pro_version=policy_config.head_variant == "pro", num_heads=policy_config.num_heads,
        noise_std=policy_config.noise_std,
    )


@dataclass
class PolicyOutput:
    actions: torch.Tensor | None  # (B, chunk, action_dim), normalised; None with `run_head=False`
    vla_output: VLAOutput


class VLAPolicy(nn.Module):
    """The deployable policy. `vla` may be peft-wrapped for training; `save_pretrained` folds LoRA deltas into the
    saved VLA weights, so a checkpoint always reloads as a plain policy."""

    def __init__(self, vla: OpenVLAForActionPrediction, action_head: L1RegressionActionHead,
                 proprio_projector: ProprioProjector | None, norm_stats: dict | None, processor: PrismaticProcessor,
                 policy_config: PolicyConfig) -> None:
        super().__init__()
        if policy_config.use_proprio and proprio_projector is None:
            raise ValueError("policy_config.use_proprio is True but no proprio_projector was given")
        self.vla = vla
        self.action_head = action_head
        self.proprio_projector = proprio_projector if policy_config.use_proprio else None
        self.norm_stats = dict(norm_stats or {})
        self.processor = processor
        self.policy_config = policy_config

    @classmethod
    def from_vla(cls, vla: OpenVLAForActionPrediction, processor: PrismaticProcessor, norm_stats: dict | None = None,
                 policy_config: PolicyConfig | None = None) -> VLAPolicy:
        """A policy around an existing VLA with a freshly initialised head (and proprio projector)."""
        policy_config = policy_config or PolicyConfig()
        head = build_action_head(vla.config, policy_config)
        proprio = ProprioProjector(vla.config.hidden_size, policy_config.proprio_dim) if policy_config.use_proprio \
            else None
        return cls(vla, head, proprio, norm_stats, processor, policy_config)

    @property
    def device(self) -> torch.device:
        return next(self.action_head.parameters()).device

    def forward(self, batch: dict, noise: torch.Tensor | None = None, run_head: bool = True,
                action_token_ids: torch.Tensor | None = None, insulate: bool = False,
                vla_grad: bool = True) -> PolicyOutput:
        """Batch dict of PROJECT_STRUCTURE.md (pixel_values or uint8 images, input_ids, attention_mask, proprio...) ->
        actions.
        `run_head=False`: the VLA's latents only (CRaFT's θ0 forward under FSDP, which must go through the root).
        Knowledge insulation (training only; inference passes none of these): `action_token_ids` (B, N) are appended
        after the stop token and scored (`vla_output.action_token_logits`); `insulate` detaches the latents the head
        reads, so the head's loss never reaches the VLA; `vla_grad=False` runs the VLA without autograd at all."""
        for key in ("input_ids", "attention_mask"):
            if key not in batch:
                raise KeyError(f"batch has no '{key}' entry (keys present: {sorted(batch)})")
        device = self.device
        extra = {} if action_token_ids is None else {"action_token_ids": action_token_ids.to(device)}
        with torch.set_grad_enabled(vla_grad and torch.is_grad_enabled()):
            vla_out = self.vla(pixel_values=batch_pixel_values(batch, device),
                               input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device), **extra)
        if not run_head:
            return PolicyOutput(actions=None, vla_output=vla_out)
        raw, queries = vla_out.raw_latents, vla_out.action_query_latents
        if insulate:
            raw, queries = raw.detach(), queries.detach()
        proprio_features = None
        if self.proprio_projector is not None:
            if batch.get("proprio") is None:
                raise KeyError("this policy uses proprio but the batch has no 'proprio' entry")
            proprio = batch["proprio"].to(device=device, dtype=raw.dtype)
            proprio_features = self.proprio_projector(proprio).unsqueeze(1)
        actions = self.action_head(raw, queries, proprio_features, noise)
        return PolicyOutput(actions=actions, vla_output=vla_out)

    def _stats(self, unnorm_key: str | None) -> dict:
        if not self.norm_stats:
            raise KeyError("this policy has no normalisation statistics (dataset_statistics.json)")
        if unnorm_key is None:
            if len(self.norm_stats) != 1:
                raise KeyError(f"several datasets in the normalisation statistics {sorted(self.norm_stats)}: "
                               "pass unnorm_key")
            unnorm_key = next(iter(self.norm_stats))
        if unnorm_key not in self.norm_stats:
            raise KeyError(f"unknown unnorm_key {unnorm_key!r}; statistics exist for {sorted(self.norm_stats)}")
        return self.norm_stats[unnorm_key]

    @torch.no_grad()
    def predict_action(self, images: list[np.ndarray], instruction: str, proprio: np.ndarray | None = None,
                       unnorm_key: str | None = None, center_crop: bool | None = None) -> np.ndarray:
        """Un-normalised action chunk (chunk, action_dim) float32 for one observation (no gripper post-processing).

        `center_crop=None` uses the checkpoint's recorded setting (on for policies trained with crop augmentation);
        a value that contradicts it is refused. Precision is the policy's: load it with `dtype=torch.bfloat16` to
        evaluate as upstream does on GPU (see `prismatic.models.precision.resolve_dtype`)."""
        return self.predict_action_batch([images], [instruction], [proprio], unnorm_key, center_crop)[0]

    def predict_action_batch(self, images: list[list[np.ndarray]], instructions: list[str],
                             proprios: list[np.ndarray | None] | None = None, unnorm_key: str | None = None,
                             center_crop: bool | None = None) -> list[np.ndarray]:
        """`predict_action` for several observations in ONE forward (right-padded prompts): a list of (chunk, 7)."""
        if not len(images) == len(instructions) or (proprios is not None and len(proprios) != len(images)):
            raise ValueError(f"got {len(images)} image lists, {len(instructions)} instructions and "
                             f"{'no' if proprios is None else len(proprios)} proprio vectors: one of each per request")
        if center_crop is not None and bool(center_crop) != self.processor.center_crop:
            raise ValueError(f"center_crop={bool(center_crop)} contradicts this checkpoint, which was "
                             f"{'trained with' if self.processor.center_crop else 'trained without'} crop "
                             "augmentation and is evaluated with center_crop="
                             f"{self.processor.center_crop}; leave center_crop unset")
        stats = self._stats(unnorm_key)
        if "action" not in stats:
            raise KeyError(f"statistics for {unnorm_key!r} have no 'action' entry (keys: {sorted(stats)})")
        input_ids, attention_mask = self.processor.tokenize_batch(list(instructions))
        inputs = {"pixel_values": torch.stack([self.processor.preprocess_images(list(ims), center_crop)
                                               for ims in images]),
                  "input_ids": input_ids, "attention_mask": attention_mask}
        if self.proprio_projector is not None:
            if proprios is None or any(p is None for p in proprios):
                raise ValueError("this policy uses proprio: pass the robot state (proprio=...)")
            if "proprio" not in stats:
                raise KeyError(f"statistics for {unnorm_key!r} have no 'proprio' entry (keys: {sorted(stats)})")
            state = np.stack([np.asarray(p, dtype=np.float64) for p in proprios])
            inputs["proprio"] = torch.as_tensor(normalize_proprio_for_eval(state, stats["proprio"]),
                                                dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                actions = self.forward(inputs).actions.float().cpu().numpy()
        finally:
            self.train(was_training)
        return [unnormalize_bounds_q99(a, stats["action"], "action") for a in actions]

    def save_pretrained(self, directory: str | Path, step: int) -> None:
        """Write the checkpoint files (see module docstring). Files appear only once all were written."""
        directory = Path(directory)
        vla = unwrap_vla(self.vla)
        # LoRA adapters are folded into the saved weights (the live model keeps its adapters).
        vla_state = merged_vla_state_dict(self.vla)
        stats_text = json.dumps(_jsonable(self.norm_stats), indent=2)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            vla.save_pretrained(str(staging), state_dict=vla_state)
            self.processor.save_pretrained(staging)
            torch.save(_ddp_state(self.action_head), staging / component_filename("action_head", step))
            if self.proprio_projector is not None:
                torch.save(_ddp_state(self.proprio_projector), staging / component_filename("proprio_projector", step))
            (staging / STATS_NAME).write_text(stats_text + "\n")
            (staging / POLICY_CONFIG_NAME).write_text(json.dumps(asdict(self.policy_config), indent=2) + "\n")
            directory.mkdir(parents=True, exist_ok=True)
            for item in staging.iterdir():
                os.replace(item, directory / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, directory: str | Path, step: int | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = torch.float32) -> VLAPolicy:
        """Load a folder written by `save_pretrained` (policy_config.json present)."""
        directory = Path(directory)
        config_file = directory / POLICY_CONFIG_NAME
        if not config_file.exists():
            raise FileNotFoundError(f"{directory} has no {POLICY_CONFIG_NAME}; for upstream folders use "
                                    "prismatic.models.loaders.load_policy")
        with unreadable_file(config_file):
            recorded = json.loads(config_file.read_text())
        policy_config = PolicyConfig.from_dict(recorded)
        return assemble_policy(directory, policy_config, step=step, device=device, dtype=dtype)


def assemble_policy(directory: Path, policy_config: PolicyConfig, step: int | None, device, dtype,
                    processor_overrides: dict | None = None) -> VLAPolicy:
    """Shared by our folders and upstream ones: VLA + head/proprio files + stats + processor from one directory."""
    vla = load_vla_pretrained(str(directory), dtype=dtype)
    head = build_action_head(vla.config, policy_config)
    head_file = find_component_file(directory, "action_head", step)
    if head_file is None:
        raise FileNotFoundError(f"{directory} has no action_head--*_checkpoint.pt")
    load_strict(head, load_component_state_dict(head_file), f"action head file {head_file.name}")
    proprio = None
    if policy_config.use_proprio:
        proprio_file = find_component_file(directory, "proprio_projector", step)
        if proprio_file is None:
            raise FileNotFoundError(f"{directory} has no proprio_projector--*_checkpoint.pt but use_proprio is True")
        proprio = ProprioProjector(vla.config.hidden_size, policy_config.proprio_dim)
        load_strict(proprio, load_component_state_dict(proprio_file), f"proprio projector file {proprio_file.name}")
    stats_file = directory / STATS_NAME
    with unreadable_file(stats_file):
        norm_stats = json.loads(stats_file.read_text()) if stats_file.exists() else (vla.config.norm_stats or {})
    overrides = {"num_images": policy_config.num_images_in_input, "image_size": vla.config.image_size}
    overrides.update(processor_overrides or {})
    processor = PrismaticProcessor.from_pretrained(directory, **overrides)
    policy = VLAPolicy(vla, head, proprio, norm_stats, processor, policy_config)
    if dtype is not None:
        policy.to(dtype=dtype)
    if device is not None:
        policy.to(device)
    return policy.eval()


def _ddp_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with upstream's DDP `module.` key prefix, on CPU."""
    return {DDP_PREFIX + k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
