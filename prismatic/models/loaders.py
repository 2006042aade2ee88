"""Loading what a user brings: upstream VLA-Adapter policy folders and Prismatic-native base VLM checkpoints.

- `load_upstream_policy_folder`: HF folder (config.json, model.safetensors, tokenizer files, dataset_statistics.json,
  action_head--*.pt, proprio_projector--*.pt with DDP `module.` prefixes). Without policy_config.json the head variant
  and use_proprio are inferred from the files.
- `load_prismatic_vlm_checkpoint`: `config.json` ({"model": {...}}) + `checkpoints/*.pt` ({"model": {"vision_backbone",
  "projector", "llm_backbone"}}); keys renamed to the VLA's names; only `action_queries` (new, zeros) may be missing.
  A checkpoint without `vision_backbone` (upstream's base VLM keeps the ViTs frozen and may omit them) gets timm's
  pretrained ViT weights, as upstream does.
- `load_policy`: dispatch on what a folder holds.
All `torch.load` calls use weights_only=True.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from prismatic.models.configuration_vla import OpenVLAConfig, make_vla_config
from prismatic.models.modeling_vla import OpenVLAForActionPrediction, load_vla_pretrained
from prismatic.models.policy import (
    POLICY_CONFIG_NAME,
    PolicyConfig,
    VLAPolicy,
    assemble_policy,
    find_component_file,
    load_component_state_dict,
)
from prismatic.models.processing_vla import PrismaticProcessor

# (pattern, replacement) applied in order to "<component>.<key>" names of a Prismatic checkpoint.
PRISMATIC_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^vision_backbone\.dino_featurizer\.", "vision_backbone.featurizer."),
    (r"^vision_backbone\.siglip_featurizer\.", "vision_backbone.fused_featurizer."),
    (r"^llm_backbone\.llm\.", "language_model."),
    (r"^projector\.projector\.0\.", "projector.fc1."),
    (r"^projector\.projector\.2\.", "projector.fc2."),
    (r"^projector\.projector\.4\.", "projector.fc3."),
    (r"\.gamma$", ".scale_factor"),
)
PRISMATIC_COMPONENTS = ("vision_backbone", "projector", "llm_backbone")
NEW_VLA_KEYS = ("action_queries.weight",)  # not in a base VLM: fresh zeros
TIED_KEYS = ("language_model.lm_head.weight",)  # tied to embed_tokens: may be absent from a checkpoint


def rename_prismatic_key(key: str) -> str:
    for pattern, replacement in PRISMATIC_KEY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def load_vla_state_dict(model: OpenVLAForActionPrediction, state_dict: dict[str, torch.Tensor], source: str,
                        allowed_missing: tuple[str, ...] = NEW_VLA_KEYS) -> None:
    """Copy weights into the VLA after checking every name and shape; nothing is loaded if anything is off."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict) - set(allowed_missing) - set(TIED_KEYS))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the VLA: missing keys {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected keys "
                         f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})")
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{source}: shape mismatch for '{key}': checkpoint {tuple(value.shape)} vs model "
                             f"{tuple(own[key].shape)}")
    model.load_state_dict(state_dict, strict=False)
    if "action_queries.weight" not in state_dict:
        torch.nn.init.zeros_(model.action_queries.weight)
    model.tie_weights()


def _prismatic_checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    checkpoints = sorted((path / "checkpoints").glob("*.pt"))
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoints/*.pt under {path}")
    latest = [p for p in checkpoints if p.name.startswith("latest")]
    if latest:
        return latest[0]
    if len(checkpoints) > 1:
        raise ValueError(f"{path}/checkpoints holds several files {[p.name for p in checkpoints]}; pass the file")
    return checkpoints[0]


def vla_config_from_prismatic(model_cfg: dict, preset: str = "real") -> OpenVLAConfig:
    """Map a Prismatic `config.json["model"]` onto an OpenVLAConfig (architecture sizes from the preset)."""
    known = {"vision_backbone_id", "llm_backbone_id", "arch_specifier", "image_resize_strategy", "llm_max_length"}
    return make_vla_config(preset, **{k: v for k, v in model_cfg.items() if k in known})


def load_prismatic_vlm_checkpoint(path: str | Path, vla_config: OpenVLAConfig | None = None,
                                  tokenizer_path: str | Path | None = None) -> OpenVLAForActionPrediction:
    """A Prismatic-native base VLM as an `OpenVLAForActionPrediction` with fresh (zero) ActionQueries.

    path: the run folder (config.json + checkpoints/*.pt) or a .pt file. vla_config: sizes of the model (default: the
    "real" preset with the ids of config.json). tokenizer_path is accepted for symmetry with load_policy and unused
    here (the VLA needs no tokenizer; a tokenizer folder is only read by the processor).
    """
    del tokenizer_path
    path = Path(path)
    if vla_config is None:
        config_file = (path if path.is_dir() else path.parent.parent) / "config.json"
        model_cfg = json.loads(config_file.read_text()).get("model", {}) if config_file.exists() else {}
        vla_config = vla_config_from_prismatic(model_cfg)
    checkpoint_file = _prismatic_checkpoint_file(path)
    from prismatic.integrity import unreadable_file

    with unreadable_file(checkpoint_file):
        payload = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"{checkpoint_file} is not a Prismatic checkpoint: expected {{'model': {{...}}}}")
    parts = payload["model"]
    absent = [c for c in PRISMATIC_COMPONENTS if c not in parts]
    vision_from_timm = absent == ["vision_backbone"]
    if absent and not vision_from_timm:
        raise ValueError(f"{checkpoint_file} lacks components {absent} (has {sorted(parts)})")
    state = {}
    for component in PRISMATIC_COMPONENTS:
        for key, value in parts.get(component, {}).items():
            state[rename_prismatic_key(f"{component}.{key}")] = value
    model = OpenVLAForActionPrediction(vla_config)
    allowed = NEW_VLA_KEYS
    if vision_from_timm:
        model.vision_backbone.load_timm_pretrained()  # fails in one line when the weights cannot be had
        allowed = NEW_VLA_KEYS + tuple(f"vision_backbone.{k}" for k in model.vision_backbone.state_dict())
    load_vla_state_dict(model, state, f"Prismatic checkpoint {checkpoint_file}", allowed_missing=allowed)
    return model.eval()


def infer_policy_config(directory: Path, step: int | None = None, num_images_in_input: int = 2) -> PolicyConfig:
    """Head variant and use_proprio from the component files of an upstream folder (no policy_config.json)."""
    head_file = find_component_file(directory, "action_head", step)
    if head_file is None:
        raise FileNotFoundError(f"{directory} has no action_head--*_checkpoint.pt")
    keys = load_component_state_dict(head_file)
    pro = any(".k_self." in k for k in keys)
    original = any(".k_proj." in k for k in keys)
    if pro == original:
        raise ValueError(f"cannot tell the head variant of {head_file.name}: expected k_self (Pro) or k_proj keys")
    use_proprio = find_component_file(directory, "proprio_projector", step) is not None
    num_heads = PolicyConfig().num_heads
    return PolicyConfig(head_variant="pro" if pro else "original", num_images_in_input=num_images_in_input,
                        use_proprio=use_proprio, num_heads=num_heads)


def load_upstream_policy_folder(path: str | Path, step: int | None = None, num_images_in_input: int | None = None,
                                center_crop: bool | None = None, device: str | torch.device | None = None,
                                dtype: torch.dtype | None = torch.float32) -> VLAPolicy:
    """A released VLA-Adapter policy folder (or one of ours) as a `VLAPolicy`.

    num_images_in_input defaults to the folder's policy_config.json, else 2 (third-person + wrist, as the LIBERO
    policies were trained).
    """
    directory = Path(path)
    config_file = directory / POLICY_CONFIG_NAME
    if config_file.exists():
        policy_config = PolicyConfig.from_dict(json.loads(config_file.read_text()))
        if num_images_in_input is not None:
            policy_config.num_images_in_input = num_images_in_input
    else:
        policy_config = infer_policy_config(directory, step, num_images_in_input or 2)
    overrides = {} if center_crop is None else {"center_crop": center_crop}
    return assemble_policy(directory, policy_config, step=step, device=device, dtype=dtype,
                           processor_overrides=overrides)


def _is_prismatic_vlm(directory: Path) -> bool:
    config_file = directory / "config.json"
    if not config_file.exists() or not (directory / "checkpoints").is_dir():
        return False
    return "model" in json.loads(config_file.read_text())


def load_policy(path: str | Path, *, step: int | None = None, tokenizer_path: str | Path | None = None,
                policy_config: PolicyConfig | None = None, vla_config: OpenVLAConfig | None = None,
                device: str | torch.device | None = None, dtype: torch.dtype | None = torch.float32) -> VLAPolicy:
    """Dispatch on the folder: our checkpoint (policy_config.json) -> VLAPolicy.from_pretrained; upstream policy
    folder (action_head--*.pt) -> load_upstream_policy_folder; Prismatic VLM (config.json {"model"} + checkpoints/)
    or a bare HF VLA folder -> a policy with a fresh head (policy_config or defaults) and the tokenizer of
    `tokenizer_path` (or the folder itself)."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"policy folder {directory} does not exist")
    from prismatic.integrity import verify_checkpoint

    # our checkpoints: the policy's files against the sha256 in COMPLETE (the optimizer state is not read here)
    verify_checkpoint(directory, skip=("training_state.pt",))
    if (directory / POLICY_CONFIG_NAME).exists():
        return VLAPolicy.from_pretrained(directory, step=step, device=device, dtype=dtype)
    if find_component_file(directory, "action_head", step) is not None:
        return load_upstream_policy_folder(directory, step=step, device=device, dtype=dtype)
    if _is_prismatic_vlm(directory):
        vla = load_prismatic_vlm_checkpoint(directory, vla_config=vla_config)
    elif (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        vla = load_vla_pretrained(str(directory), dtype=dtype)
    else:
        raise ValueError(f"{directory} holds neither a policy checkpoint (policy_config.json or action_head--*.pt), "
                         "a Prismatic VLM (config.json + checkpoints/) nor an HF VLA (config.json + *.safetensors)")
    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else directory
    if not any((tok_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer files in {tok_dir}; pass tokenizer_path=")
    policy_config = policy_config or PolicyConfig()
    processor = PrismaticProcessor.from_pretrained(tok_dir, num_images=policy_config.num_images_in_input,
                                                   image_size=vla.config.image_size)
    policy = VLAPolicy.from_vla(vla, processor, vla.config.norm_stats, policy_config)
    if dtype is not None:
        policy.to(dtype=dtype)
    if device is not None:
        policy.to(device)
    return policy
