"""Build the offline CRaFT anchor cache: θ0 bridge features f̃ of every frame of a dataset (no action labels used).

    python vla-scripts/build_craft_cache.py --vlm_path <base VLM> [--config_file_path <tokenizer/policy folder>] \
        --data_root_dir datasets/rlds --dataset_name libero_spatial_no_noops --cache_dir caches/spatial_concat \
        [--craft_raw_layer 12] [--craft_aq_layer 24] [--craft_anchor_type concat] [--image_aug True] \
        [--num_images_in_input 2] [--batch_size 16] [--craft_snapshot_path <θ0 folder>]

θ0 is loaded exactly as `vla-scripts/finetune.py` loads the model it starts from (same flags: --vlm_path,
--config_file_path, --model_preset, --seed, --use_pro_version, --use_proprio, --num_images_in_input), or from
--craft_snapshot_path. The cache holds the UN-AUGMENTED view of every frame (`RLDSFrameDataset.get_frame`: with
--image_aug True the evaluation center crop of the trained crop area, else the full image), the same view training
sees with --image_aug False. Pass the --image_aug value of the training run: it is recorded in the manifest and
checked. With augmentation on, training's online anchors (the default) are the faithful choice.

Output: safetensors shards + manifest.json (written last, atomically: an interrupted build leaves no manifest and is
not a cache; re-run with --overwrite True). The manifest records θ0's identity, layers, anchor type, image transform
and the dataset's identity; `finetune.py --craft_anchor_source offline --craft_cache_dir ...` refuses a mismatch.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from prismatic.cli_errors import UserError, cli_entry, parse_config


@dataclass
class BuildCacheConfig:
    # fmt: off
    cache_dir: Path | None = None             # output folder (required)
    vlm_path: Path | None = None              # as finetune.py
    config_file_path: Path | None = None      # as finetune.py (a policy folder, or the tokenizer with --vlm_path)
    model_preset: str = "real"
    seed: int = 7
    use_pro_version: bool = True
    use_proprio: bool = True
    num_images_in_input: int = 2
    craft_snapshot_path: Path | None = None   # θ0 from this folder instead (as finetune.py --craft_snapshot_path)
    data_root_dir: Path = Path("datasets/rlds")
    dataset_name: str = "libero_spatial_no_noops"
    image_aug: bool = True                    # the training run's --image_aug (decides the center crop)
    craft_raw_layer: int | None = None        # None: L // 2
    craft_aq_layer: int | None = None         # None: L
    craft_anchor_type: str = "concat"
    batch_size: int = 16
    shard_size: int = 4096
    num_workers: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    overwrite: bool = False
    # fmt: on


def build_cache(cfg: BuildCacheConfig) -> dict:
    """Compute and write the cache under the lock of --cache_dir (prismatic/run_lock.py); returns its manifest."""
    from prismatic.run_lock import folder_lock

    validate(cfg)  # before anything is written (the lock file included)
    with folder_lock(Path(cfg.cache_dir), "build_craft_cache",
                     fix="wait for that build to end; two builds must not write one --cache_dir"):
        validate(cfg)  # again, now that the folder is ours (another build may have finished meanwhile)
        return _build_cache_locked(cfg)


def _build_cache_locked(cfg: BuildCacheConfig) -> dict:
    from prismatic.data.loader import make_eval_loader
    from prismatic.data.rlds_dataset import RLDSFrameDataset
    from prismatic.models.image_transform import batch_pixel_values
    from prismatic.training.craft_cache import CraftCacheWriter, hash_state_dict
    from prismatic.training.craft_step import (
        expected_cache_manifest,
        load_snapshot_state,
        model_identity,
        theta0_vla_state,
        vla_config_hash,
    )
    from prismatic.training.craft_utils import CRaFTFeatureExtractor
    from prismatic.training.data_setup import dataset_errors_as_user_errors
    from prismatic.training.policy_setup import BASE_KEYS, build_base_policy
    from prismatic.training.train_step import autocast_context

    device = torch.device(cfg.device)
    policy = build_base_policy({k: getattr(cfg, k) for k in BASE_KEYS})
    vla = policy.vla
    if cfg.craft_snapshot_path is not None:
        snapshot = load_snapshot_state(Path(cfg.craft_snapshot_path), cfg.model_preset)
        vla.load_state_dict(snapshot, strict=False)  # parameters of θ0; buffers are constants
        identity = {"weights_sha256": hash_state_dict(snapshot), "config_sha256": vla_config_hash(vla)}
    else:
        identity = model_identity(theta0_vla_state(vla), vla)
    vla.to(device).eval()
    extractor = CRaFTFeatureExtractor(vla, raw_layer=cfg.craft_raw_layer, aq_layer=cfg.craft_aq_layer,
                                      anchor_type=cfg.craft_anchor_type)
    with dataset_errors_as_user_errors(cfg):
        dataset = RLDSFrameDataset(cfg.data_root_dir, cfg.dataset_name, policy.processor.tokenizer,
                                   num_images_in_input=cfg.num_images_in_input, use_proprio=cfg.use_proprio,
                                   image_aug=cfg.image_aug, seed=cfg.seed, image_size=policy.processor.image_size)
    manifest = expected_cache_manifest(identity=identity, extractor=extractor, hidden_size=vla.config.hidden_size,
                                       train_set=dataset, dataset_name=cfg.dataset_name,
                                       num_images=cfg.num_images_in_input,
                                       checkpoint_path=str(cfg.craft_snapshot_path or cfg.vlm_path
                                                           or cfg.config_file_path))
    loader = make_eval_loader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    with CraftCacheWriter(cfg.cache_dir, manifest, shard_size=cfg.shard_size, overwrite=cfg.overwrite) as writer:
        for batch in loader:
            with torch.no_grad(), extractor.capture(), autocast_context(device):
                out = vla(pixel_values=batch_pixel_values(batch, device), input_ids=batch["input_ids"].to(device),
                          attention_mask=batch["attention_mask"].to(device))
            writer.add(batch["sample_ids"], batch["content_hashes"], extractor.features(out.layout))
    return writer.manifest | {"num_samples": dataset.num_frames}


def validate(cfg: BuildCacheConfig) -> None:
    """Every flag and path, before the model or the data is built (UserError listing the problems)."""
    from prismatic.training.finetune_config import PRESETS, SUPPORTED_NUM_IMAGES, _dataset_errors

    errors = []
    if cfg.cache_dir is None:
        errors.append("--cache_dir is required (the folder to write the cache into)")
    elif (Path(cfg.cache_dir) / "manifest.json").exists() and not cfg.overwrite:
        errors.append(f"--cache_dir '{cfg.cache_dir}' already holds a CRaFT cache (pass --overwrite True to rebuild)")
    for name in ("batch_size", "shard_size"):
        if not getattr(cfg, name) > 0:
            errors.append(f"--{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.num_workers < 0:
        errors.append(f"--num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.model_preset not in PRESETS:
        errors.append(f"--model_preset must be one of {PRESETS}, got '{cfg.model_preset}'")
    if cfg.num_images_in_input not in SUPPORTED_NUM_IMAGES:
        errors.append(f"--num_images_in_input must be 1 or 2, got {cfg.num_images_in_input}")
    if cfg.craft_anchor_type not in ("concat", "raw_only", "aq_only"):
        errors.append(f"--craft_anchor_type must be concat, raw_only or aq_only, got '{cfg.craft_anchor_type}'")
    if cfg.model_preset == "real" and cfg.vlm_path is None and cfg.config_file_path is None:
        errors.append("--model_preset real needs --vlm_path or --config_file_path (only --model_preset tiny can be "
                      "built from scratch)")
    for name in ("vlm_path", "config_file_path", "craft_snapshot_path"):
        value = getattr(cfg, name)
        if value is not None and not Path(value).exists():
            errors.append(f"--{name} '{value}' does not exist")
    if not Path(cfg.data_root_dir).is_dir():
        errors.append(f"--data_root_dir '{cfg.data_root_dir}' does not exist or is not a directory")
    else:
        errors.extend(_dataset_errors(Path(cfg.data_root_dir), cfg.dataset_name))
    if errors:
        raise UserError("invalid build_craft_cache configuration: " + "; ".join(errors),
                        "fix the flags listed (see --help)")


@cli_entry("build_craft_cache")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BuildCacheConfig, argv)
    validate(cfg)  # before the model is loaded
    manifest = build_cache(cfg)
    print(f"[build_craft_cache] wrote {manifest['num_samples']} anchors (F = {manifest['feature_dim']}) to "
          f"{cfg.cache_dir}")


if __name__ == "__main__":
    main()
