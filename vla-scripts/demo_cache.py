"""The offline CRaFT anchor cache of `make demo`'s θ0 on the demo's fine-tuning data, as flags for its CRaFT runs.

    from demo_cache import demo_cache_flags          # vla-scripts/ on sys.path (as for `import demo`)
    flags = demo_cache_flags(theta0_path, data_root, out_dir)
    ft = dataclasses.replace(demo.finetune_configs(cfg, data_root, run_root, theta0_path)["craft"], **flags)

The cache is built once with `build_craft_cache.py`'s code and the demo's fine-tuning settings (tiny preset, θ0 loaded
as the fine-tuning runs load it, `--config_file_path θ0`; one camera, proprio, no augmentation: the cached view is
the view those runs train on), and reused when `out_dir` already holds one. A cache that does not fit a run is
refused by the run at start-up (manifest check), never silently used. Used by the retention check of
`--craft_reuse coefficient` (docs/CRAFT.md, "Cheaper step").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, from any working directory

from build_craft_cache import BuildCacheConfig, build_cache  # noqa: E402

from prismatic.training.craft_cache import MANIFEST_NAME  # noqa: E402

DEMO_TARGET_SET = "demo_target_no_noops"  # demo.TARGET_SET: the fine-tuning task set B (its training split)


def demo_cache_flags(theta0_path: Path | str, data_root: Path | str, out_dir: Path | str, *,
                     dataset_name: str = DEMO_TARGET_SET, num_images_in_input: int = 1,
                     device: str = "cpu") -> dict[str, object]:
    """Build (or reuse) the cache of θ0's anchors of every frame of `dataset_name` under `data_root` into `out_dir`;
    return the FinetuneConfig fields that make a CRaFT run use it:
    {"craft_anchor_source": "offline", "craft_cache_dir": Path(out_dir)}."""
    out = Path(out_dir)
    if not (out / MANIFEST_NAME).is_file():
        build_cache(BuildCacheConfig(
            cache_dir=out, config_file_path=Path(theta0_path), model_preset="tiny", use_proprio=True,
            num_images_in_input=num_images_in_input, data_root_dir=Path(data_root), dataset_name=dataset_name,
            image_aug=False, device=device))
    return {"craft_anchor_source": "offline", "craft_cache_dir": out}
