"""A tiny policy folder in upstream's released file layout, fully determined by (name, shape) fills.

Used by the end-to-end parity test and, in a scratch folder outside the repo, by upstream's own code to produce the
golden action chunk of `upstream_golden.json["end_to_end"]`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from prismatic.models.configuration_vla import make_vla_config
from prismatic.models.modeling_vla import OpenVLAForActionPrediction
from prismatic.models.policy import PolicyConfig, VLAPolicy
from prismatic.models.processing_vla import PrismaticProcessor
from prismatic.models.tokenizer_tiny import train_tiny_tokenizer

from . import golden_inputs as gi

UNNORM_KEY = "libero_spatial_no_noops"
STEP = 5000
INSTRUCTION = "Pick up the black bowl between the plate and the ramekin and place it on the plate"
# Released folders store the DINO / SigLIP statistics rounded to bf16 (upstream's preprocessor_config.json).
BF16_DINO_MEAN, BF16_DINO_STD = [0.484375, 0.455078125, 0.40625], [0.228515625, 0.2236328125, 0.224609375]


def norm_stats() -> dict:
    rng = np.random.default_rng(11)
    a01, a99 = -rng.uniform(0.5, 1.0, 7), rng.uniform(0.5, 1.0, 7)
    p01, p99 = -rng.uniform(0.1, 0.4, 8), rng.uniform(0.1, 0.4, 8)
    return {UNNORM_KEY: {
        "action": {"mean": [0.0] * 7, "std": [1.0] * 7, "q01": a01.tolist(), "q99": a99.tolist(),
                   "min": (a01 - 0.1).tolist(), "max": (a99 + 0.1).tolist(), "mask": [True] * 6 + [False]},
        "proprio": {"mean": [0.0] * 8, "std": [1.0] * 8, "q01": p01.tolist(), "q99": p99.tolist(),
                    "min": (p01 - 0.1).tolist(), "max": (p99 + 0.1).tolist()},
        "num_transitions": 100, "num_trajectories": 2}}


def build_policy() -> VLAPolicy:
    """24 LLM layers (upstream's head has 24 blocks), width 64, tiny ViTs; every weight from `gi.param_value`."""
    vla = OpenVLAForActionPrediction(make_vla_config("tiny", text_config={"num_hidden_layers": 24})).eval()
    gi.fill_module(vla)
    vla.tie_weights()
    processor = PrismaticProcessor(train_tiny_tokenizer(), num_images=2, center_crop=True,
                                   normalization={"mean": (BF16_DINO_MEAN, [0.5] * 3),
                                                  "std": (BF16_DINO_STD, [0.5] * 3)})
    policy = VLAPolicy.from_vla(vla, processor, norm_stats(),
                                PolicyConfig(head_variant="pro", num_images_in_input=2, use_proprio=True))
    gi.fill_module(policy.action_head)
    gi.fill_module(policy.proprio_projector)
    return policy.eval()


def observation() -> tuple[list[np.ndarray], np.ndarray]:
    """Two 256 px frames (third-person, wrist) as the simulator gives them after the 180° rotation, and a raw state."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:256, 0:256]
    frames = []
    for k in range(2):
        base = np.stack([(x * (1 + k) + 30 * np.sin(y / 11)) % 256, (y * 1.7) % 256, ((x + y) * 0.6) % 256], -1)
        frames.append(np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8))
    state = rng.uniform(-0.3, 0.3, 8)
    return frames, state


def write_released_folder(policy: VLAPolicy, path: Path) -> Path:
    """Files as upstream's HF policy repos hold them: config.json, model.safetensors (no tied lm_head), tokenizer,
    dataset_statistics.json, preprocessor_config.json, `module.`-prefixed head / proprio files; no policy_config."""
    path.mkdir(parents=True)
    config = policy.vla.config.to_dict()
    config.update({"architectures": ["OpenVLAForActionPrediction"], "torch_dtype": "bfloat16",
                   "norm_stats": policy.norm_stats})
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in policy.vla.state_dict().items() if k != "language_model.lm_head.weight"}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    policy.processor.tokenizer.save_pretrained(str(path))
    (path / "dataset_statistics.json").write_text(json.dumps(policy.norm_stats))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "PrismaticImageProcessor", "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]], "interpolations": ["bicubic", "bicubic"],
        "means": [[0.485, 0.456, 0.406], [0.5] * 3], "stds": [[0.229, 0.224, 0.225], [0.5] * 3],
        "tvf_crop_params": [{"output_size": [224, 224]}] * 2, "tvf_do_letterbox": False, "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": BF16_DINO_MEAN, "std": BF16_DINO_STD},
                                 {"inplace": False, "mean": [0.5] * 3, "std": [0.5] * 3}],
        "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]}] * 2,
        "use_fused_vision_backbone": True}))
    torch.save({"module." + k: v for k, v in policy.action_head.state_dict().items()},
               path / f"action_head--{STEP}_checkpoint.pt")
    torch.save({"module." + k: v for k, v in policy.proprio_projector.state_dict().items()},
               path / f"proprio_projector--{STEP}_checkpoint.pt")
    return path
