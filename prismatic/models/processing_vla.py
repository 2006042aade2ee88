"""`PrismaticProcessor`: inference-time pre-processing shared by every deployed policy.

Images, as upstream's evaluation: uint8 (H, W, 3) -> (if not already `image_size`) JPEG round trip at quality 95 and
TF's lanczos3 + antialias resize (`image_ops.policy_view`, upstream's `resize_image_for_policy`) -> optional center
crop (area 0.9, bilinear, TF semantics; on for policies trained with crop augmentation) -> 6-channel DINO/SigLIP
pixel values, normalised with the folder's statistics (released folders store them bf16-rounded in
`preprocessor_config.json`). A frame already at `image_size` is taken as an evaluation view made by
`policy_view` (LIBERO's `prepare_image` makes them), as upstream's `prepare_images_for_vla` does. Text:
`build_prompt(instruction)` tokens (chat template, no BOS). Saved as the tokenizer files +
`prismatic_processor_config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prismatic.data import image_ops
from prismatic.data.image_ops import IMAGE_SIZE, policy_view
from prismatic.models.image_transform import (
    DEFAULT_NORMALIZATION,
    images_to_pixel_values,
    normalization_from_preprocessor_config,
)
from prismatic.models.prompting import check_chat_tokenizer, tokenize_prompt

PROCESSOR_CONFIG_NAME = "prismatic_processor_config.json"
HF_PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"  # released (upstream HF) folders


class PrismaticProcessor:
    """Tokenizer + image pre-processing + prompt format. `num_images` is the number of camera views expected."""

    def __init__(self, tokenizer, image_size: int = IMAGE_SIZE, num_images: int = 1, center_crop: bool = False,
                 normalization: dict | None = None) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        check_chat_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.num_images = int(num_images)
        self.center_crop = bool(center_crop)
        norm = normalization or DEFAULT_NORMALIZATION
        self.normalization = {"mean": tuple(tuple(map(float, g)) for g in norm["mean"]),
                              "std": tuple(tuple(map(float, g)) for g in norm["std"])}

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else int(self.tokenizer.eos_token_id)

    def preprocess_images(self, images: Sequence[np.ndarray], center_crop: bool | None = None) -> torch.Tensor:
        """List of N uint8 (H, W, 3) images -> pixel values (6N, S, S) float32 (see the module docstring)."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        images = list(images)
        if len(images) != self.num_images:
            raise ValueError(f"expected {self.num_images} image(s) (third-person first, then wrist), "
                             f"got {len(images)}")
        crop = self.center_crop if center_crop is None else center_crop
        views = []
        for image in images:
            view = np.asarray(image)
            if view.shape[:2] != (self.image_size, self.image_size):
                view = policy_view(view, self.image_size)
            views.append(image_ops.center_crop(view, size=self.image_size) if crop else view)
        return images_to_pixel_values(np.stack(views), self.normalization)

    def tokenize(self, instruction: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, instruction)

    def tokenize_batch(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids (B, Tp) int64 and attention mask (B, Tp) bool."""
        rows = [self.tokenize(text) for text in instructions]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        return ids, mask

    def __call__(self, images: Sequence[np.ndarray], instruction: str,
                 center_crop: bool | None = None) -> dict[str, torch.Tensor]:
        """Inputs of one sample: pixel_values (1, 6N, S, S), input_ids (1, Tp), attention_mask (1, Tp) bool."""
        ids, mask = self.tokenize_batch([instruction])
        return {"pixel_values": self.preprocess_images(images, center_crop).unsqueeze(0),
                "input_ids": ids, "attention_mask": mask}

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "num_images": self.num_images, "center_crop": self.center_crop,
                "normalization": {"mean": [list(g) for g in self.normalization["mean"]],
                                  "std": [list(g) for g in self.normalization["std"]]}}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        (directory / PROCESSOR_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> PrismaticProcessor:
        """Tokenizer via AutoTokenizer; image settings from the processor json when present, else defaults; a
        released folder's `preprocessor_config.json` supplies the normalisation statistics."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"processor directory {directory} does not exist")
        settings = {}
        config_file = directory / PROCESSOR_CONFIG_NAME
        if config_file.exists():
            settings = json.loads(config_file.read_text())
        elif (directory / HF_PREPROCESSOR_CONFIG_NAME).exists():
            hf_config = json.loads((directory / HF_PREPROCESSOR_CONFIG_NAME).read_text())
            settings["normalization"] = normalization_from_preprocessor_config(hf_config)
            # Released LIBERO policies were trained with crop augmentation; upstream evaluates them center-cropped.
            settings["center_crop"] = True
        settings.update({k: v for k, v in overrides.items() if v is not None})
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return cls(tokenizer, **settings)
