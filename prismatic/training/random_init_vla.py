"""A random-init VLA folder of a model preset (e.g. the real 1.25B-parameter one) for benchmarks and tests.

`write_random_init_vla(folder, "real", seed)` writes an HF VLA folder: `config.json`, `model.safetensors` and the
files of the tiny in-process tokenizer (`prismatic/models/tokenizer_tiny.py`). Its ids (< 512) lie inside the real
vocabulary, so the real embedding table serves them; no hub access and no released weights are needed.
`--config_file_path <folder>` then builds the policy (fresh action head and proprio projector, from the flags) like
any HF VLA folder. The weights are stored in bf16 to halve the folder (2.5 GB for the real preset instead of 5);
the loaders read them back as fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

RANDOM_INIT_DTYPE = torch.bfloat16


def write_random_init_vla(folder: str | Path, model_preset: str = "real", seed: int = 0) -> Path:
    """The preset's VLA with random weights (deterministic given `seed`), saved to `folder` (new or empty)."""
    from prismatic.models.configuration_vla import make_vla_config
    from prismatic.models.modeling_vla import OpenVLAForActionPrediction
    from prismatic.models.tokenizer_tiny import train_tiny_tokenizer

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; pass a new folder for the random-init VLA")
    config = make_vla_config(model_preset)
    tokenizer = train_tiny_tokenizer()
    vocab = int(config.text_config.vocab_size)
    if len(tokenizer) > vocab:
        raise ValueError(f"the tiny tokenizer has {len(tokenizer)} ids, more than the {vocab} of preset {model_preset}")
    torch.manual_seed(seed)
    vla = OpenVLAForActionPrediction(config)
    vla.to(RANDOM_INIT_DTYPE)  # parameter by parameter: the fp32 copy is freed as it goes
    folder.mkdir(parents=True, exist_ok=True)
    vla.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
