"""Policy side of the evaluation: load a checkpoint, pick its action statistics, turn requests into actions.

`PolicyRunner` receives the requests of every simulator worker that is waiting at the same moment and answers
them with simulator-ready action chunks, in one batched forward when it can:
- a policy exposing `predict_action_batch(images=[...], instructions=[...], proprios=[...], unnorm_key, center_crop)`
  is called once per round;
- a `VLAPolicy` (whose `predict_action` takes one observation) is run batched here with the same steps as
  `predict_action`: processor images + right-padded prompts, q01/q99 proprio normalisation, `forward`, action
  un-normalisation (tests check it equals per-observation `predict_action`);
- anything else (or `batch=False`) gets one `predict_action` call per waiting environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from LIBERO.action_processing import chunk_to_env_actions
from LIBERO.suites import base_suite

STATS_FILE = "dataset_statistics.json"


def checkpoint_statistics(checkpoint_dir: str | Path) -> dict:
    """The action statistics a checkpoint folder carries (`dataset_statistics.json`, else config `norm_stats`)."""
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"pretrained_checkpoint {path} is not a directory")
    stats_file = path / STATS_FILE
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text())
    else:
        config_file = path / "config.json"
        stats = json.loads(config_file.read_text()).get("norm_stats") if config_file.is_file() else None
    if not stats:
        raise ValueError(f"checkpoint {path} has no action statistics: neither {STATS_FILE} nor a 'norm_stats' "
                         "entry in config.json; predict_action needs the q01/q99 of the training data to "
                         "un-normalise actions")
    return stats


def resolve_unnorm_key(available: Sequence[str], requested: str | None, suite: str) -> str:
    """Pick the statistics entry: `requested` (or `{requested}_no_noops`); else derived from the suite
    (libero_spatial_lan -> libero_spatial[_no_noops]); else the only entry."""
    available = list(available)
    candidates = [requested] if requested else []
    base = base_suite(suite)
    if not requested and base:
        candidates.append(base)
    for name in candidates:
        for key in (name, f"{name}_no_noops"):
            if key in available:
                return key
    if not requested and len(available) == 1:
        return available[0]
    raise ValueError(f"no action statistics for unnorm_key '{requested or base}' (suite '{suite}'); the "
                     f"checkpoint has statistics for {available}")


def policy_statistics_keys(policy) -> list[str]:
    stats = getattr(policy, "norm_stats", None)
    if not stats:
        raise ValueError(f"{type(policy).__name__} carries no action statistics (norm_stats is empty); "
                         "predict_action could not un-normalise actions")
    return list(stats)


def resolve_input_settings(policy, num_images: int | None, use_proprio: bool | None) -> tuple[int, bool]:
    """Camera count and proprio use: from the checkpoint's policy_config unless given; a contradiction is an error
    (a policy trained with the wrist camera cannot be fed one image, one with proprio needs the state)."""
    config = getattr(policy, "policy_config", None)
    resolved = []
    for name, given, default in (("num_images_in_input", num_images, 2), ("use_proprio", use_proprio, True)):
        stored = getattr(config, name, None)
        if given is not None and stored is not None and given != stored:
            raise ValueError(f"--{name}={given} contradicts the checkpoint, which was trained with {name}={stored}")
        resolved.append(given if given is not None else stored if stored is not None else default)
    return int(resolved[0]), bool(resolved[1])


def load_policy_checkpoint(checkpoint_dir: str | Path, device: str = "cpu", dtype=None):
    """Load this project's checkpoint folder or an upstream-released VLA-Adapter policy folder, cast to `dtype`
    (a torch dtype; None = float32)."""
    import torch

    checkpoint_statistics(checkpoint_dir)  # fail before building a large model
    from prismatic.models.loaders import load_policy

    return load_policy(str(checkpoint_dir), device=device, dtype=dtype or torch.float32)


class PolicyRunner:
    """Maps worker requests {images, instruction, proprio} to simulator action chunks (K, 7)."""

    def __init__(self, policy, unnorm_key: str, center_crop: bool, use_proprio: bool, num_images: int,
                 batch: bool = True):
        self.policy = policy
        self.batch = batch
        self.unnorm_key = unnorm_key
        self.center_crop = center_crop
        self.use_proprio = use_proprio
        self.num_images = num_images
        self.calls = 0  # observations answered
        self.rounds = 0  # policy rounds (one forward each when batched)
        self.received_instructions: list[str] = []  # what the policy was actually asked (for audits and tests)

    def __call__(self, requests: Sequence[Mapping]) -> list[np.ndarray]:
        for r in requests:
            if len(r["images"]) != self.num_images:
                raise ValueError(f"request carries {len(r['images'])} images, the policy expects {self.num_images}")
        proprios = [np.asarray(r["proprio"], dtype=np.float32) if self.use_proprio else None for r in requests]
        batch_fn = getattr(self.policy, "predict_action_batch", None)
        if self.batch and batch_fn is not None and len(requests) > 1:
            chunks = batch_fn(images=[list(r["images"]) for r in requests],
                              instructions=[r["instruction"] for r in requests], proprios=proprios,
                              unnorm_key=self.unnorm_key, center_crop=self.center_crop)
        else:
            chunks = [self.policy.predict_action(images=list(r["images"]), instruction=r["instruction"],
                                                 proprio=p, unnorm_key=self.unnorm_key,
                                                 center_crop=self.center_crop)
                      for r, p in zip(requests, proprios, strict=True)]
        self.calls += len(requests)
        self.rounds += 1
        self.received_instructions.extend(r["instruction"] for r in requests)
        return [chunk_to_env_actions(np.asarray(c)) for c in chunks]
