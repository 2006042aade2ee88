"""vla-scripts/demo_cache.py: the cache of a θ0 policy folder on a dataset is accepted by a CRaFT run that loads that
θ0 (the run's own manifest check is the judge), and a second call reuses it."""

from __future__ import annotations

import sys
from pathlib import Path

from finetune import train
from prismatic.training import checkpointing as ckpt
from prismatic.training.craft_cache import CraftCacheReader
from prismatic.training.metrics_log import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vla-scripts"))
from demo_cache import demo_cache_flags  # noqa: E402


def test_demo_cache_flags_serve_a_craft_run_from_that_theta0(make_cfg, tiny_data_root, tmp_path):
    pre = train(make_cfg(run_root_dir=tmp_path / "pre", use_lora=False, max_steps=1, save_freq=1))
    theta0 = ckpt.checkpoint_dir(tmp_path / "pre", "test", 1)
    assert Path(pre.last_checkpoint) == theta0
    flags = demo_cache_flags(theta0, tiny_data_root, tmp_path / "cache", dataset_name="synthetic_libero_no_noops")
    assert flags == {"craft_anchor_source": "offline", "craft_cache_dir": tmp_path / "cache"}
    manifest = tmp_path / "cache" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert len(CraftCacheReader(tmp_path / "cache")) == 20  # every frame of the 20-frame dataset
    assert demo_cache_flags(theta0, tiny_data_root, tmp_path / "cache",
                            dataset_name="synthetic_libero_no_noops") == flags
    assert manifest.stat().st_mtime_ns == stamp  # reused, not rebuilt
    run = train(make_cfg(run_root_dir=tmp_path / "ft", config_file_path=theta0, use_craft=True, max_steps=2,
                         craft_init_lambda=0.1, **flags))
    records = read_metrics(run.run_dir / "metrics.jsonl")
    # LoRA B = 0: θ = θ0 at step 0, and the cache holds θ0's features (up to float summation order); then θ moves
    assert records[0]["CRaFT/Retention Loss"] < 1e-9
    assert records[1]["CRaFT/Retention Loss"] > 1e3 * records[0]["CRaFT/Retention Loss"]
