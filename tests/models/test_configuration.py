"""OpenVLAConfig: presets, upstream config.json compatibility, save/reload."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from prismatic.models.configuration_vla import OpenVLAConfig, make_vla_config

# A config.json shaped like the released VLA-Adapter ones (transformers 4.x era: rope_theta, torch_dtype, auto_map).
UPSTREAM_CONFIG = {
    "arch_specifier": "no-align+fused-gelu-mlp",
    "architectures": ["OpenVLAForActionPrediction"],
    "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                 "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
    "hf_llm_id": "Qwen/Qwen2.5-0.5B",
    "image_resize_strategy": "resize-naive",
    "image_sizes": [224, 224],
    "llm_backbone_id": "qwen25-0_5b-extra",
    "llm_max_length": 32768,
    "model_type": "openvla",
    "n_action_bins": 256,
    "norm_stats": {"libero_spatial_no_noops": {
        "action": {"mean": [0.1] * 7, "std": [0.2] * 7, "max": [1.0] * 7, "min": [-1.0] * 7, "q01": [-0.9] * 7,
                   "q99": [0.9] * 7, "mask": [True] * 6 + [False]},
        "proprio": {"mean": [0.0] * 8, "std": [1.0] * 8, "max": [1.0] * 8, "min": [-1.0] * 8, "q01": [-0.5] * 8,
                    "q99": [0.5] * 8},
        "num_transitions": 52970, "num_trajectories": 432}},
    "output_projector_states": False,
    "pad_to_multiple_of": 64,
    "pad_token_id": 151643,
    "text_config": {
        "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None],
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_fused_vision_backbone": True,
    "vision_backbone_id": "dinosiglip-vit-so-224px",
}


def test_upstream_config_json_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(UPSTREAM_CONFIG))
    for config in (OpenVLAConfig.from_pretrained(str(tmp_path)), AutoConfig.from_pretrained(str(tmp_path))):
        assert isinstance(config, OpenVLAConfig)
        text = config.text_config
        assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
                text.intermediate_size, text.vocab_size) == (896, 24, 14, 2, 4864, 151936)
        assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
        assert text.tie_word_embeddings and config.tie_word_embeddings
        assert config.timm_model_ids == UPSTREAM_CONFIG["timm_model_ids"]
        assert config.norm_stats == UPSTREAM_CONFIG["norm_stats"]
        assert config.pad_token_id == 151643 and config.stop_token_id == 151643  # eos of text_config
        assert config.num_action_queries == 64 and config.timm_model_kwargs is None
        assert config.hf_llm_id == "Qwen/Qwen2.5-0.5B"  # unknown upstream fields are kept
        assert not hasattr(config, "auto_map")  # remote-code pointers dropped


def test_real_preset_matches_upstream_config():
    real = make_vla_config("real")
    upstream = OpenVLAConfig(**{k: v for k, v in UPSTREAM_CONFIG.items() if k != "norm_stats"})
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(real.text_config, name) == getattr(upstream.text_config, name), name
    assert real.text_config.rope_parameters["rope_theta"] == upstream.text_config.rope_parameters["rope_theta"]
    assert real.timm_model_ids == upstream.timm_model_ids and real.image_sizes == [224, 224]


def test_tiny_preset_sizes(tiny_tokenizer):
    tiny = make_vla_config("tiny")
    assert tiny.text_config.vocab_size == len(tiny_tokenizer)
    assert tiny.stop_token_id == tiny_tokenizer.eos_token_id and tiny.pad_token_id == tiny_tokenizer.pad_token_id
    assert (tiny.hidden_size, tiny.num_llm_layers, tiny.text_config.num_attention_heads,
            tiny.text_config.num_key_value_heads, tiny.text_config.intermediate_size) == (64, 4, 4, 2, 128)
    assert tiny.timm_model_kwargs == [{"embed_dim": 64, "depth": 3, "num_heads": 2}] * 2
    assert tiny.num_action_queries == 64


def test_overrides_merge_text_config():
    cfg = make_vla_config("tiny", text_config={"num_hidden_layers": 2}, num_action_queries=8)
    assert cfg.num_llm_layers == 2 and cfg.hidden_size == 64 and cfg.num_action_queries == 8


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown VLA config preset 'huge'.*\['real', 'tiny'\]"):
        make_vla_config("huge")


def test_bad_fields_rejected():
    with pytest.raises(ValueError, match="fused"):
        make_vla_config("tiny", use_fused_vision_backbone=False)
    with pytest.raises(ValueError, match="vision_readout"):
        make_vla_config("tiny", vision_readout="last_block")


def test_save_reload_roundtrip(tmp_path):
    cfg = make_vla_config("tiny", norm_stats=UPSTREAM_CONFIG["norm_stats"])
    cfg.save_pretrained(str(tmp_path))
    again = OpenVLAConfig.from_pretrained(str(tmp_path))
    assert again.to_dict()["text_config"] == cfg.to_dict()["text_config"]
    for name in ("timm_model_kwargs", "num_action_queries", "stop_token_id", "norm_stats", "image_sizes"):
        assert getattr(again, name) == getattr(cfg, name), name
