"""Offline anchor cache: round trip, sharding, manifest checks, missing/stale samples, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prismatic.training.craft_cache import (
    CacheManifestMismatch,
    CraftCacheReader,
    CraftCacheWriter,
    build_manifest,
    hash_state_dict,
)

F = 6


def _manifest(**kw):
    base = dict(weights_hash="w0", config_hash="c0", raw_layer=2, aq_layer=4, anchor_type="concat", feature_dim=F,
                dataset_name="libero_spatial_no_noops", dataset_version="1.0.0", dataset_files_hash="f0")
    base.update(kw)
    return build_manifest(**base)


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"libero_spatial_no_noops/{i // 10:06d}/{i % 10:04d}" for i in range(n)]
    hashes = [f"h{i}" for i in range(n)]
    return ids, hashes, rng.standard_normal((n, F)).astype(np.float32)


def _write(tmp_path, n=23, shard_size=5, batch=4):
    ids, hashes, feats = _samples(n)
    with CraftCacheWriter(tmp_path, _manifest(), shard_size=shard_size) as w:
        for s in range(0, n, batch):
            w.add(ids[s : s + batch], hashes[s : s + batch], torch.from_numpy(feats[s : s + batch]))
    return ids, hashes, feats


def test_roundtrip_across_shards(tmp_path):
    ids, hashes, feats = _write(tmp_path)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 5  # 23 samples, 5 per shard
    assert not list(tmp_path.glob("*.tmp"))
    r = CraftCacheReader(tmp_path)
    assert len(r) == 23 and r.manifest["num_samples"] == 23
    order = [17, 0, 4, 5, 22, 9]
    got = r.lookup([ids[i] for i in order], [hashes[i] for i in order])
    np.testing.assert_array_equal(got.numpy(), feats[order])
    r.check_manifest(_manifest())  # identical -> no error


def test_manifest_mismatch_lists_every_differing_field(tmp_path):
    _write(tmp_path)
    r = CraftCacheReader(tmp_path)
    with pytest.raises(CacheManifestMismatch) as e:
        r.check_manifest(_manifest(weights_hash="w1", raw_layer=3, center_crop=True))
    msg = str(e.value)
    assert "3 fields" in msg
    for field in ("model_identity.weights_sha256", "raw_layer", "image_transform.center_crop"):
        assert field in msg
    assert "aq_layer" not in msg


def test_missing_and_stale_samples_raise(tmp_path):
    ids, hashes, _ = _write(tmp_path)
    r = CraftCacheReader(tmp_path)
    with pytest.raises(KeyError, match="libero_spatial_no_noops/000099/0000"):
        r.lookup([ids[0], "libero_spatial_no_noops/000099/0000"], [hashes[0], "x"])
    with pytest.raises(KeyError, match="stale"):
        r.lookup([ids[3]], ["other-hash"])


def test_incomplete_cache_refused_and_no_overwrite(tmp_path):
    ids, hashes, feats = _samples(7)
    w = CraftCacheWriter(tmp_path, _manifest(), shard_size=3)
    w.add(ids, hashes, torch.from_numpy(feats))  # two shards written, manifest not yet
    with pytest.raises(FileNotFoundError, match="not a complete"):
        CraftCacheReader(tmp_path)
    w.close()
    CraftCacheReader(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        CraftCacheWriter(tmp_path, _manifest())
    with pytest.raises(RuntimeError):
        with CraftCacheWriter(tmp_path / "fail", _manifest()) as w2:
            w2.add(ids[:2], hashes[:2], torch.from_numpy(feats[:2]))
            raise RuntimeError("crash mid-build")
    assert not (tmp_path / "fail" / "manifest.json").exists()


def test_writer_bad_inputs(tmp_path):
    w = CraftCacheWriter(tmp_path, _manifest())
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        w.add(["a"], ["h"], torch.zeros(1, 5))
    with pytest.raises(ValueError, match="sample ids"):
        w.add(["a", "b"], ["h"], torch.zeros(2, F))
    with pytest.raises(FloatingPointError):
        w.add(["a"], ["h"], torch.full((1, F), float("nan")))
    w.add(["a"], ["h"], torch.zeros(1, F))
    with pytest.raises(ValueError, match="duplicate"):
        w.add(["a"], ["h"], torch.zeros(1, F))
    with pytest.raises(ValueError, match="required fields"):
        CraftCacheWriter(tmp_path / "x", {"raw_layer": 1})


def test_hash_state_dict_sensitivity():
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    h = hash_state_dict(sd)
    assert h == hash_state_dict({"b": torch.ones(2, 2), "a": torch.arange(4.0)})  # order independent
    sd2 = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    sd2["b"][0, 0] = 1.5
    assert hash_state_dict(sd2) != h
    assert hash_state_dict({"a": torch.arange(4.0).double(), "b": torch.ones(2, 2)}) != h


def test_manifest_json_is_readable(tmp_path):
    _write(tmp_path, n=3)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["image_transform"]["view"] == "unaugmented" and m["feature_dim"] == F


def test_hash_state_dict_bf16_and_scalars():
    sd = {"s": torch.tensor(2.0), "w": torch.ones(3, dtype=torch.bfloat16)}
    h = hash_state_dict(sd)
    assert h != hash_state_dict({"s": torch.tensor(2.0), "w": torch.full((3,), 2.0, dtype=torch.bfloat16)})
    assert h != hash_state_dict({"s": torch.tensor(3.0), "w": torch.ones(3, dtype=torch.bfloat16)})
