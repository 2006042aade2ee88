"""`OpenVLAForActionPrediction`: Prismatic VLM (fused ViTs -> projector -> Qwen2) + learned ActionQuery tokens.

forward(pixel_values, input_ids, attention_mask) returns, for every LLM layer l = 0..L (see PROJECT_STRUCTURE.md:
l = 0 embeddings, l = L after the final RMSNorm), the Raw Latents and the ActionQuery latents exactly as upstream's
head reads them (`SequenceLayout.raw_latent_mask` / `action_query_latent_mask`: one position left of the patches /
the queries).
No logits are computed (the LM head is never run), except for the discretised action tokens a knowledge-insulation
training forward appends (`action_token_ids`; training signal only, see prismatic.models.action_tokens).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, PreTrainedModel, Qwen2ForCausalLM

from prismatic.models.configuration_vla import OpenVLAConfig
from prismatic.models.projector import FusedMLPProjector
from prismatic.models.sequence_layout import SequenceLayout, build_sequence_layout, llm_attention_kwargs
from prismatic.models.vision_backbone import FusedVisionBackbone

LM_HEAD_NAME = "language_model.lm_head"


@dataclass
class VLAOutput:
    """hidden_states: L+1 tensors (B, T, D); raw_latents (B, L+1, P, D); action_query_latents (B, L+1, Q, D);
    action_token_logits (B, N, vocab rows): the LM head at `layout.action_prediction_mask` (None without action
    tokens), position i predicting action token i."""

    hidden_states: tuple[torch.Tensor, ...]
    layout: SequenceLayout
    raw_latents: torch.Tensor
    action_query_latents: torch.Tensor
    action_token_logits: torch.Tensor | None = None


class OpenVLAForActionPrediction(PreTrainedModel):
    """Submodules: `vision_backbone` (`featurizer`, `fused_featurizer`), `projector`, `language_model`
    (Qwen2ForCausalLM, tied embeddings), `action_queries` (nn.Embedding(Q, D), zero-initialised)."""

    config_class = OpenVLAConfig
    base_model_prefix = "vla"  # matches no key: checkpoints store the full names above
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _tied_weights_keys = {f"{LM_HEAD_NAME}.weight": "language_model.model.embed_tokens.weight"}

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__(config)
        self.vision_backbone = FusedVisionBackbone(
            config.timm_model_ids, config.image_size, config.timm_override_act_layers, config.timm_model_kwargs
        )
        self.projector = FusedMLPProjector(self.vision_backbone.embed_dim, config.hidden_size)
        # from_config-style construction mutates/shares the sub-config in transformers 5: give it a private copy.
        text_config = copy.deepcopy(config.text_config)
        text_config._attn_implementation = config._attn_implementation or "sdpa"
        self.language_model = Qwen2ForCausalLM(text_config)
        self.action_queries = nn.Embedding(config.num_action_queries, config.hidden_size)
        nn.init.zeros_(self.action_queries.weight)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # timm and Qwen2 initialise their own modules at construction; only the ActionQueries are ours (zeros).
        if module is self:
            nn.init.zeros_(self.action_queries.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @property
    def num_patches_per_image(self) -> int:
        return self.vision_backbone.num_patches_per_image

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 6N, H, W) -> projected patch embeddings (B, N * 256, D)."""
        return self.projector(self.vision_backbone(pixel_values))

    def build_layout(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, vision_features: torch.Tensor | None = None,
                     action_token_ids: torch.Tensor | None = None) -> SequenceLayout:
        """The assembled LLM input sequence (see prismatic.models.sequence_layout).

        `vision_features`: the vision backbone's output for these pixels, computed elsewhere (CRaFT's θ0 forward reuses
        the live forward's when the backbone is frozen and identical); the projector still runs here.
        `action_token_ids` (B, N): discretised actions appended after the stop token (knowledge insulation)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, Tp), got shape {tuple(input_ids.shape)}")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values batch {pixel_values.shape[0]} != input_ids batch {input_ids.shape[0]}")
        embed = self.get_input_embeddings()
        if vision_features is None:
            patches = self.embed_patches(pixel_values.to(embed.weight.dtype))
        else:
            patches = self.projector(vision_features)
        stop_id = torch.tensor(self.config.stop_token_id, device=input_ids.device)
        return build_sequence_layout(
            prompt_embeds=embed(input_ids),
            prompt_attention_mask=attention_mask,
            patch_embeds=patches.to(embed.weight.dtype),
            query_embeds=self.action_queries.weight.to(embed.weight.dtype),
            stop_embed=embed(stop_id),
            action_token_embeds=None if action_token_ids is None else embed(action_token_ids.to(input_ids.device)),
        )

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                action_token_ids: torch.Tensor | None = None, **_: object) -> VLAOutput:
        layout = self.build_layout(pixel_values, input_ids, attention_mask, action_token_ids=action_token_ids)
        # The decoder stack only (language_model.model): hidden states, no LM-head logits.
        out = self.language_model.model(
            inputs_embeds=layout.inputs_embeds,
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
            **llm_attention_kwargs(layout),
        )
        hidden_states = tuple(out.hidden_states)
        raw = torch.stack([layout.gather(h, layout.raw_latent_mask) for h in hidden_states], dim=1)
        queries = torch.stack([layout.gather(h, layout.action_query_latent_mask) for h in hidden_states], dim=1)
        logits = None
        if layout.action_prediction_mask is not None:  # the last hidden state is after the final norm: LM-head input
            logits = self.language_model.lm_head(layout.gather(hidden_states[-1], layout.action_prediction_mask))
        return VLAOutput(hidden_states=hidden_states, layout=layout, raw_latents=raw, action_query_latents=queries,
                         action_token_logits=logits)


def load_vla_pretrained(directory: str, dtype: torch.dtype | None = torch.float32,
                        allowed_missing: tuple[str, ...] = ()) -> OpenVLAForActionPrediction:
    """`from_pretrained` that fails (instead of silently re-initialising) on missing / unexpected / mismatched keys.

    The tied LM head may be absent from the file; `allowed_missing` lists other tolerated names.
    """
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model, info = OpenVLAForActionPrediction.from_pretrained(str(directory), output_loading_info=True, **kwargs)
    except Exception:
        _name_unreadable_weights(directory)  # a damaged weight file: one line naming it
        raise
    missing = sorted(set(info.get("missing_keys", ())) - {f"{LM_HEAD_NAME}.weight", *allowed_missing})
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(m) for m in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise ValueError(f"VLA weights in {directory} do not match its config.json: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}, shape mismatches {mismatched[:10]}")
    return model.eval()


def _name_unreadable_weights(directory: str) -> None:
    """Raise CorruptCheckpointError naming the first *.safetensors of `directory` whose header cannot be read."""
    from safetensors import safe_open

    from prismatic.integrity import unreadable_file

    for path in sorted(Path(directory).glob("*.safetensors")):
        with unreadable_file(path), safe_open(str(path), framework="pt") as f:
            f.metadata()


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of every nn.Linear of the VLA except the LM head: upstream's "all-linear" recipe.

    peft's `target_modules="all-linear"` on this custom class would also wrap `language_model.lm_head`; pass this list
    instead. Works on the bare model (names relative to it).
    """
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith("lm_head")]


def apply_lora(model: OpenVLAForActionPrediction, rank: int = 32, alpha: int | None = None, dropout: float = 0.0,
               init_lora_weights: bool | str = "gaussian", target_modules: list[str] | None = None):
    """Wrap the VLA with LoRA (upstream recipe: all linear layers but the LM head, alpha = 2 * rank) and keep the
    ActionQueries fully trainable. Returns the peft model; its `disable_adapter()` reproduces the base model.
    `target_modules`: full module names to adapt instead (e.g. the list without the vision backbone)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model) if target_modules is None else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=targets, init_lora_weights=init_lora_weights)
    peft_model = get_peft_model(model, config)
    model.action_queries.weight.requires_grad_(True)
    return peft_model


def unwrap_vla(model: nn.Module) -> OpenVLAForActionPrediction:
    """The OpenVLAForActionPrediction inside a peft / DDP wrapper (or the model itself)."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    if not isinstance(inner, OpenVLAForActionPrediction):
        raise TypeError(f"expected an OpenVLAForActionPrediction (optionally peft/DDP-wrapped), got {type(model)}")
    return inner


@torch.no_grad()
def merged_vla_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain VLA state_dict with LoRA deltas folded in (W + delta), without touching the live model.

    For a model without adapters this is its state_dict. Names are the plain VLA names (no `base_layer`/`lora_*`).
    """
    from peft.tuners.lora import LoraLayer

    vla = unwrap_vla(model)
    state = {}
    lora_layers = {name: m for name, m in vla.named_modules() if isinstance(m, LoraLayer)}
    for key, value in vla.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        state[clean] = value
        owner = key.rsplit(".base_layer.", 1)[0] if ".base_layer." in key else None
        if owner in lora_layers and key.endswith(".base_layer.weight"):
            layer = lora_layers[owner]
            if not layer.merged and not layer.disable_adapters:
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                state[clean] = value + delta.to(value.dtype) if isinstance(delta, torch.Tensor) else value
    return state


def register_auto_classes() -> None:
    """Register "openvla" with AutoConfig / AutoModel / AutoModelForImageTextToText (idempotent)."""
    for auto, args in ((AutoConfig, ("openvla", OpenVLAConfig)),
                       (AutoModel, (OpenVLAConfig, OpenVLAForActionPrediction)),
                       (AutoModelForImageTextToText, (OpenVLAConfig, OpenVLAForActionPrediction))):
        try:
            auto.register(*args, exist_ok=True)
        except TypeError:  # older signature without exist_ok
            try:
                auto.register(*args)
            except ValueError:
                pass


register_auto_classes()
