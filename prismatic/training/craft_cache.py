"""Offline CRaFT anchor cache: θ0 bridge features f̃ stored as safetensors shards plus `manifest.json`.

Layout of a cache directory:
    shard-00000.safetensors ...   tensor "features" (n, F) float32; metadata "sample_ids", "content_hashes" (JSON)
    manifest.json                 written LAST (atomically): its presence marks a complete cache

The manifest records what the anchors depend on (model identity, layers, pooling, anchor type, image transform,
dataset identity, feature dim). Training calls `check_manifest(expected)` and refuses a mismatched cache; a sample
missing from the cache (or present with another content hash) raises KeyError, it is never skipped.
The cache represents the UN-AUGMENTED view of each sample (image transform recorded in the manifest): with training
augmentation on, online anchors are the faithful choice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prismatic.cli_errors import UserError
from prismatic.integrity import unreadable_file

CACHE_FORMAT_VERSION = 2  # 2: chat-template prompt, head positions one left of patches/queries
MANIFEST_NAME = "manifest.json"
_REBUILD = "rebuild the cache with vla-scripts/build_craft_cache.py --overwrite True"
REQUIRED_MANIFEST_FIELDS = (
    "model_identity",
    "raw_layer",
    "aq_layer",
    "pooling",
    "anchor_type",
    "image_transform",
    "dataset",
    "feature_dim",
)


class CacheManifestMismatch(UserError, ValueError):
    """The cache was built for another model / layers / transform / dataset than the one requested."""


def hash_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes of every tensor (the θ0 weights identity)."""
    h = hashlib.sha256()
    from prismatic.training.fsdp import full_tensor

    for name in sorted(state):
        t = full_tensor(state[name].detach()).cpu().contiguous()  # FSDP shards: gathered one at a time (collective)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, no extra copy; works for bf16 too
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of a canonical JSON dump (e.g. a model config dict)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_file_list(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the sorted file names and sizes of a dataset's files (cheap identity of the dataset version)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


def build_manifest(
    *,
    weights_hash: str,
    config_hash: str,
    raw_layer: int,
    aq_layer: int,
    anchor_type: str,
    feature_dim: int,
    dataset_name: str,
    dataset_version: str,
    dataset_files_hash: str,
    image_size: int = 224,
    center_crop: bool = False,
    pooling: str = "masked_mean",
    checkpoint_path: str | None = None,
) -> dict[str, Any]:
    """The manifest fields a cache is identified by (checkpoint_path is informative only, not compared)."""
    return {
        "model_identity": {"weights_sha256": weights_hash, "config_sha256": config_hash},
        "raw_layer": int(raw_layer),
        "aq_layer": int(aq_layer),
        "pooling": pooling,
        "anchor_type": anchor_type,
        "image_transform": {"view": "unaugmented", "resize": int(image_size), "center_crop": bool(center_crop)},
        "dataset": {"name": dataset_name, "version": dataset_version, "files_sha256": dataset_files_hash},
        "feature_dim": int(feature_dim),
        "checkpoint_path": checkpoint_path,
    }


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CraftCacheWriter:
    """Appends batches of (sample_id, content_hash, feature) and writes a shard every `shard_size` samples.

    Shards are written to a temporary name and renamed; `close()` writes the last shard and then the manifest.
    A directory that already holds a manifest is refused unless `overwrite=True` (old shards are then removed).
    """

    def __init__(self, cache_dir: str | os.PathLike, manifest: Mapping[str, Any], shard_size: int = 4096,
                 overwrite: bool = False) -> None:
        missing = [k for k in REQUIRED_MANIFEST_FIELDS if k not in manifest]
        if missing:
            raise ValueError(f"manifest lacks required fields {missing}")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be > 0, got {shard_size}")
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / MANIFEST_NAME).exists():
            if not overwrite:
                raise FileExistsError(f"{self.dir} already holds a CRaFT cache (manifest.json); pass overwrite=True")
            (self.dir / MANIFEST_NAME).unlink()  # first: the directory is no longer a complete cache
        for old in self.dir.glob("shard-*.safetensors*"):
            old.unlink()
        self.manifest = dict(manifest)
        self.feature_dim = int(manifest["feature_dim"])
        self.shard_size = int(shard_size)
        self._ids: list[str] = []
        self._hashes: list[str] = []
        self._feats: list[torch.Tensor] = []
        self._seen: set[str] = set()
        self._shards: list[dict[str, Any]] = []
        self._closed = False

    def add(self, sample_ids: Sequence[str], content_hashes: Sequence[str], features: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("CraftCacheWriter is closed")
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features shape {tuple(features.shape)}; expected (B, {self.feature_dim})")
        if not (len(sample_ids) == len(content_hashes) == features.shape[0]):
            raise ValueError(f"{len(sample_ids)} sample ids, {len(content_hashes)} hashes, {features.shape[0]} rows")
        if not torch.isfinite(features).all():
            raise FloatingPointError("refusing to cache non-finite anchor features")
        dup = [s for s in sample_ids if s in self._seen]
        if dup or len(set(sample_ids)) != len(sample_ids):
            raise ValueError(f"duplicate sample ids in the cache: {dup[:5] or list(sample_ids)[:5]}")
        self._seen.update(sample_ids)
        self._ids.extend(sample_ids)
        self._hashes.extend(content_hashes)
        self._feats.append(features.detach().to("cpu", torch.float32))
        while len(self._ids) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        feats = torch.cat(self._feats) if self._feats else torch.zeros(0, self.feature_dim)
        name = f"shard-{len(self._shards):05d}.safetensors"
        meta = {"sample_ids": json.dumps(self._ids[:n]), "content_hashes": json.dumps(self._hashes[:n])}
        tmp = self.dir / (name + ".tmp")
        save_file({"features": feats[:n].contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, self.dir / name)
        self._shards.append({"file": name, "num_samples": n, "sha256": _file_sha256(self.dir / name)})
        self._ids, self._hashes = self._ids[n:], self._hashes[n:]
        self._feats = [feats[n:]] if feats.shape[0] > n else []

    def close(self) -> dict[str, Any]:
        """Write the remaining samples and the manifest (last). Returns the manifest."""
        if self._closed:
            raise RuntimeError("CraftCacheWriter already closed")
        if self._ids:
            self._flush(len(self._ids))
        manifest = dict(self.manifest)
        manifest.update({"format_version": CACHE_FORMAT_VERSION, "shards": self._shards,
                         "num_samples": sum(s["num_samples"] for s in self._shards)})
        _atomic_write_bytes(self.dir / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode())
        self._closed = True
        return manifest

    def __enter__(self) -> CraftCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()  # on error no manifest is written: the directory is not a usable cache


class CraftCacheReader:
    """Reads a complete cache; `lookup(sample_ids, content_hashes)` -> (B, F) float32 features."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {self.dir} is not a complete CRaFT anchor cache")
        with unreadable_file(path, _REBUILD):
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        if self.manifest.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"cache format_version {self.manifest.get('format_version')} != {CACHE_FORMAT_VERSION}: "
                             "it was built with another prompt / feature layout; rebuild it with "
                             "vla-scripts/build_craft_cache.py")
        self.feature_dim = int(self.manifest["feature_dim"])
        self._index: dict[str, tuple[int, int, str]] = {}
        self._shard_files = [s["file"] for s in self.manifest["shards"]]
        self._loaded: dict[int, torch.Tensor] = {}
        corrupt = [s["file"] for s in self.manifest["shards"]
                   if "sha256" in s and (not (self.dir / s["file"]).is_file()
                                         or _file_sha256(self.dir / s["file"]) != s["sha256"])]
        if corrupt:  # older caches carry no shard checksums and are read as they are
            raise UserError(f"CRaFT cache {self.dir} is corrupt: {', '.join(corrupt[:5])} missing or its sha256 "
                            "differs from manifest.json",
                            "rebuild it with vla-scripts/build_craft_cache.py --overwrite True")
        for si, fname in enumerate(self._shard_files):
            with unreadable_file(self.dir / fname, _REBUILD), safe_open(str(self.dir / fname), framework="pt") as f:
                meta = f.metadata()
            for row, (sid, h) in enumerate(zip(json.loads(meta["sample_ids"]), json.loads(meta["content_hashes"]),
                                               strict=True)):
                self._index[sid] = (si, row, h)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._index

    def check_manifest(self, expected: Mapping[str, Any]) -> None:
        """Raise CacheManifestMismatch listing every differing field (nested keys dotted) of `expected`."""
        have, want = _flatten(self.manifest), _flatten(expected)
        ignored = {"checkpoint_path"}
        diffs = [f"{k}: cache has {have.get(k, '<missing>')!r}, expected {v!r}"
                 for k, v in sorted(want.items()) if k not in ignored and have.get(k, "<missing>") != v]
        if diffs:
            raise CacheManifestMismatch(f"CRaFT cache {self.dir} does not match this run ({len(diffs)} fields):\n  "
                                        + "\n  ".join(diffs))

    def _shard(self, si: int) -> torch.Tensor:
        if si not in self._loaded:
            path = self.dir / self._shard_files[si]
            with unreadable_file(path, _REBUILD), safe_open(str(path), framework="pt") as f:
                self._loaded[si] = f.get_tensor("features")
        return self._loaded[si]

    def lookup(self, sample_ids: Sequence[str], content_hashes: Sequence[str] | None = None) -> torch.Tensor:
        if content_hashes is not None and len(content_hashes) != len(sample_ids):
            raise ValueError(f"{len(sample_ids)} sample ids but {len(content_hashes)} content hashes")
        rows = []
        for i, sid in enumerate(sample_ids):
            if sid not in self._index:
                raise KeyError(f"sample {sid!r} is not in the CRaFT cache {self.dir} (rebuild the cache; "
                               "missing samples are never skipped)")
            si, row, h = self._index[sid]
            if content_hashes is not None and content_hashes[i] != h:
                raise KeyError(f"sample {sid!r}: content hash {content_hashes[i]!r} differs from the cached {h!r} "
                               "(stale cache: the image/instruction changed)")
            rows.append(self._shard(si)[row])
        if not rows:
            return torch.zeros(0, self.feature_dim)
        return torch.stack(rows)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
