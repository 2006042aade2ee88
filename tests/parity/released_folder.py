"""A tiny policy folder in upstream's released file layout, fully determined by (name, shape) fills.

Used by the end-to-end parity test and, written to a scratch folder outside the repo, by upstream's own code
(`generate_upstream_golden.py`) to produce the golden action chunk of `upstream_golden.json["end_to_end"]`:

    (cd tests && PYTHONPATH=.. ../.venv/bin/python -m parity.released_folder --output /scratch/released)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from prismatic.cli_errors import UserError, cli_entry
from prismatic.models.configuration_vla import make_vla_config
from prismatic.models.modeling_vla import OpenVLAForActionPrediction
from prismatic.models.policy import PolicyConfig, VLAPolicy
from prismatic.models.processing_vla import PrismaticProcessor
from prismatic.models.tokenizer_tiny import train_tiny_tokenizer

from . import golden_inputs as gi

STEP = 5000
# The shared, dependency-light inputs (the upstream generator reads the same definitions).
UNNORM_KEY, INSTRUCTION, norm_stats, observation = gi.UNNORM_KEY, gi.INSTRUCTION, gi.norm_stats, gi.observation
BF16_DINO_MEAN, BF16_DINO_STD = gi.BF16_DINO_MEAN, gi.BF16_DINO_STD


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


def write_released_folder(policy: VLAPolicy, path: Path) -> Path:
    """Files as upstream's HF policy repos hold them: config.json, model.safetensors (no tied lm_head), tokenizer,
    dataset_statistics.json, preprocessor_config.json, `module.`-prefixed head / proprio files; no policy_config."""
    path.mkdir(parents=True)
    config = policy.vla.config.to_dict()
    config.update({"architectures": ["OpenVLAForActionPrediction"], "torch_dtype": "bfloat16",
                   "norm_stats": policy.norm_stats})
    # Released config.json files were written by transformers 4.40, which reads the RoPE base from `rope_theta`.
    config["text_config"]["rope_theta"] = config["text_config"]["rope_parameters"]["rope_theta"]
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in policy.vla.state_dict().items() if k != "language_model.lm_head.weight"}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    policy.processor.tokenizer.save_pretrained(str(path))
    # Released folders were saved by transformers 4.40: name a tokenizer class and special-token key it knows too.
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config.update({"tokenizer_class": "PreTrainedTokenizerFast",
                       "additional_special_tokens": tok_config.get("extra_special_tokens", [])})
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    # ... and BPE merges as "a b" strings (tokenizers < 0.20 reads only those; byte-level symbols hold no space).
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
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


@cli_entry("released_folder")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the end-to-end parity folder (generate_upstream_golden.py).")
    parser.add_argument("--output", type=Path, required=True, help="folder to create (must not exist)")
    args = parser.parse_args(argv)
    if args.output.exists():
        raise UserError(f"'{args.output}' already exists", "give a new folder (nothing is overwritten)")
    if not args.output.parent.is_dir():
        raise UserError(f"'{args.output.parent}' is not a directory", "create it or give --output inside one")
    print(f"wrote {write_released_folder(build_policy(), args.output)}")


if __name__ == "__main__":
    main()
