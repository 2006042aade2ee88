"""`OpenVLAConfig`: the VLA's HF config (model_type "openvla"), compatible with upstream `config.json` files.

Every field of the released VLA-Adapter `config.json` is accepted (unknown extra fields are kept as attributes, as
HF configs do). Fields added by this project:

- `num_action_queries` (64): number of learned ActionQuery embeddings appended after the prompt.
- `timm_model_kwargs`: one dict per ViT of keyword overrides for `timm.create_model` (e.g. `embed_dim`, `depth`,
  `num_heads` for the tiny preset); `None` builds the released sizes.
- `vision_readout`: which ViT features feed the projector. Only `"second_to_last_block_patches"` exists: the output of
  block `len(blocks) - 2` via `get_intermediate_layers`, patch tokens only (no cls/register tokens, no final norm).
- `stop_token_id`: the token closing the multimodal sequence (the tokenizer's eos).

Presets: `make_vla_config("real" | "tiny", **overrides)`.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig, Qwen2Config
from transformers.configuration_utils import SubConfigSpec

DINO_TIMM_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_TIMM_ID = "vit_so400m_patch14_siglip_224"
VISION_READOUTS = ("second_to_last_block_patches",)

# Qwen2.5-0.5B, as stored under `text_config` of the released checkpoints.
REAL_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
QWEN25_ENDOFTEXT_ID = 151643  # `<|endoftext|>`: Qwen2.5's eos and pad (its config names it bos too; no BOS is used)

# Tiny ViTs keep the real timm ids (same code paths, same parameter names) with small widths.
TINY_VIT_KWARGS: dict[str, Any] = {"embed_dim": 64, "depth": 3, "num_heads": 2}


class OpenVLAConfig(PreTrainedConfig):
    """Config of `OpenVLAForActionPrediction`; see the module docstring for the fields this project adds."""

    model_type = "openvla"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=Qwen2Config, init_kwargs=REAL_TEXT_CONFIG)}

    # --- upstream (Prismatic / OpenVLA) fields ---
    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "qwen25-0_5b-extra"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    use_fused_vision_backbone: bool | None = True
    image_resize_strategy: str = "resize-naive"
    text_config: dict | Qwen2Config | None = None
    llm_max_length: int = 2048
    pad_token_id: int | None = None
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    norm_stats: dict | None = None
    image_sizes: list | None = None
    timm_model_ids: list | None = None
    timm_override_act_layers: list | None = None
    output_projector_states: bool = False
    # --- fields added by this project ---
    num_action_queries: int = 64
    timm_model_kwargs: list | None = None
    vision_readout: str = "second_to_last_block_patches"
    stop_token_id: int | None = None

    def __post_init__(self, **kwargs):
        # Upstream configs point `auto_map` at remote-code files this project does not ship: drop it so our saved
        # configs resolve to the registered local classes.
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)
        if self.image_sizes is None:
            self.image_sizes = [224, 224]
        if self.timm_model_ids is None:
            self.timm_model_ids = [DINO_TIMM_ID, SIGLIP_TIMM_ID]
        if self.timm_override_act_layers is None:
            self.timm_override_act_layers = [None] * len(self.timm_model_ids)
        self.image_sizes = [int(s) for s in self.image_sizes]
        self.timm_model_ids = list(self.timm_model_ids)
        self.timm_override_act_layers = list(self.timm_override_act_layers)
        if self.timm_model_kwargs is not None:
            self.timm_model_kwargs = [dict(kw or {}) for kw in self.timm_model_kwargs]
        if self.stop_token_id is None:
            eos = self.text_config.eos_token_id
            self.stop_token_id = int(eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else None
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
        self.validate_vla_fields()

    def validate_vla_fields(self) -> None:
        """Clear errors for settings the model code cannot build."""
        if not self.use_fused_vision_backbone:
            raise ValueError("only the fused DINOv2+SigLIP backbone is supported (use_fused_vision_backbone=True), "
                             f"got use_fused_vision_backbone={self.use_fused_vision_backbone!r}")
        if len(self.timm_model_ids) != 2:
            raise ValueError(f"timm_model_ids must list 2 ViTs [dino, siglip], got {self.timm_model_ids}")
        if len(self.timm_override_act_layers) != len(self.timm_model_ids):
            raise ValueError(f"timm_override_act_layers needs {len(self.timm_model_ids)} entries, "
                             f"got {self.timm_override_act_layers}")
        if self.timm_model_kwargs is not None and len(self.timm_model_kwargs) != len(self.timm_model_ids):
            raise ValueError(f"timm_model_kwargs needs {len(self.timm_model_ids)} dicts (one per ViT), "
                             f"got {len(self.timm_model_kwargs)}")
        if self.vision_readout not in VISION_READOUTS:
            raise ValueError(f"unknown vision_readout {self.vision_readout!r}; valid: {list(VISION_READOUTS)}")
        if len(set(self.image_sizes)) != 1:
            raise ValueError(f"image_sizes must be square [S, S], got {self.image_sizes}")
        if self.num_action_queries < 1:
            raise ValueError(f"num_action_queries must be >= 1, got {self.num_action_queries}")
        if self.stop_token_id is None:
            raise ValueError("stop_token_id is not set and text_config has no eos_token_id to use in its place")

    @property
    def hidden_size(self) -> int:
        """Width D of the LLM (and of every latent the action head reads)."""
        return int(self.text_config.hidden_size)

    @property
    def num_llm_layers(self) -> int:
        """L: number of decoder layers; forward returns L + 1 hidden states."""
        return int(self.text_config.num_hidden_layers)

    @property
    def image_size(self) -> int:
        return int(self.image_sizes[0])


def _real_fields() -> dict[str, Any]:
    return {
        "text_config": copy.deepcopy(REAL_TEXT_CONFIG),
        "timm_model_ids": [DINO_TIMM_ID, SIGLIP_TIMM_ID],
        "timm_model_kwargs": None,
        "num_action_queries": 64,
        "stop_token_id": QWEN25_ENDOFTEXT_ID,
        "pad_token_id": QWEN25_ENDOFTEXT_ID,
        "llm_max_length": 32768,
    }


def tiny_tokenizer_ids() -> dict[str, int]:
    """vocab size and special ids of the in-process tiny tokenizer (deterministic, so the preset is too)."""
    from prismatic.models.tokenizer_tiny import train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    # Like Qwen2.5's config.json, bos_token_id names `<|endoftext|>`; the prompt itself carries no BOS.
    return {"vocab_size": len(tok), "bos": int(tok.eos_token_id), "eos": int(tok.eos_token_id),
            "pad": int(tok.pad_token_id)}


def _tiny_fields() -> dict[str, Any]:
    ids = tiny_tokenizer_ids()
    text = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": ids["vocab_size"],
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
    }
    return {
        "text_config": text,
        "timm_model_ids": [DINO_TIMM_ID, SIGLIP_TIMM_ID],
        "timm_model_kwargs": [dict(TINY_VIT_KWARGS), dict(TINY_VIT_KWARGS)],  # SigLIP keeps its attn_pool
        "num_action_queries": 64,
        "stop_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "llm_max_length": 2048,
    }


PRESETS = {"real": _real_fields, "tiny": _tiny_fields}


def make_vla_config(preset: str, **overrides: Any) -> OpenVLAConfig:
    """Build a config from a preset ("real" = released sizes, "tiny" = test sizes) with field overrides.

    `text_config` overrides given as a dict are merged into the preset's text config (so
    `text_config={"num_hidden_layers": 2}` changes only the depth).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown VLA config preset {preset!r}; valid presets: {sorted(PRESETS)}")
    fields = PRESETS[preset]()
    text_override = overrides.pop("text_config", None)
    if isinstance(text_override, Qwen2Config):
        fields["text_config"] = copy.deepcopy(text_override)
    elif text_override is not None:
        fields["text_config"].update(copy.deepcopy(text_override))
    fields.update(copy.deepcopy(overrides))
    return OpenVLAConfig(**fields)
