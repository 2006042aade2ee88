"""The training recipe of the grids: upstream VLA-Adapter's LIBERO recipe, one file per suite, and how a grid on
other hardware keeps it (or says how it departs from it).

`craft_experiments/recipes/<suite>.json` holds every number of the recipe with its source (upstream README line,
maintainers' answer, the seed). `plan_suite` turns it into what one suite's runs get under the user's settings:

- global batch: BATCH_SIZE x NUM_GPUS x accumulation; the accumulation is chosen so that the global batch is the
  recipe's (64). When BATCH_SIZE x NUM_GPUS does not divide 64 (or GRAD_ACCUMULATION_STEPS is given), the nearest
  accumulation is used and the plan lists the departure (global batch, samples seen) for the banner.
- steps: the recipe's per-suite steps, unchanged by the hardware. A k-shot run sees k x 10 of the suite's episodes and
  gets the same number of epochs as the full-data recipe: steps_k = ceil(steps x min(k x 10, episodes) / episodes).
  EPOCHS (passes over the frames at the actual global batch, rounded up to SAVE_FREQ), MAX_STEPS_<SUITE> (full data)
  and MAX_STEPS are explicit overrides, each listed as a departure.
- lr schedule: upstream's (no warm-up, no decay) unless LR_SCHEDULE=project (linear warm-up over WARMUP_PERCENT of
  the steps from 10% of the lr, x0.1 from DECAY_PERCENT of the steps on).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_KEYS = ("global_batch", "learning_rate", "lora_rank", "max_steps", "lr_warmup_steps", "lr_decay", "save_freq",
               "image_aug", "num_images_in_input", "use_proprio", "use_lora", "use_pro_version",
               "craft_retention_budget", "craft_dual_lr", "hours_4xH100", "checkpoint_gb")
# "no decay": a step no run reaches, so a run resumed to a higher MAX_STEPS keeps its full lr too (finetune.py keeps
# the schedule a checkpoint was started with)
NO_DECAY_STEP = 1_000_000_000
# CRaFT's step time over plain SFT (LoRA, online anchors), docs/CRAFT.md "Tiny preset, final code" (CPU-measured)
CRAFT_TIME_FACTOR = 1.72
H100_PER_RUN = 4  # upstream's wall-clock is for 4 GPUs


class RecipeError(ValueError):
    """A recipe file that is missing a number or its source."""


@dataclass(frozen=True)
class Recipe:
    suite: str
    values: dict[str, Any]
    sources: dict[str, str]
    path: Path

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def load_recipe(suite: str, recipe_dir: Path = RECIPE_DIR) -> Recipe:
    """The suite's recipe file; RecipeError if a number or its source is missing."""
    path = Path(recipe_dir) / f"{suite}.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecipeError(f"cannot read the recipe file '{path}': {exc}") from None
    entries = doc.get("recipe") if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or doc.get("suite") != suite:
        raise RecipeError(f"'{path}' is not the recipe of {suite} (needs 'suite' and a 'recipe' object)")
    values, sources = {}, {}
    for key in RECIPE_KEYS:
        entry = entries.get(key)
        if not isinstance(entry, dict) or "value" not in entry or not str(entry.get("source", "")).strip():
            raise RecipeError(f"'{path}': '{key}' needs a value and a source")
        values[key], sources[key] = entry["value"], entry["source"]
    return Recipe(suite, values, sources, path)


@dataclass
class Plan:
    """How the runs of one suite are trained under the user's settings."""

    steps: int
    grad_accum: int
    global_batch: int
    warmup_steps: int
    decay_step: int
    departures: list[str] = field(default_factory=list)


def accumulation(target_batch: int, batch_size: int, num_gpus: int, explicit: int | None) -> tuple[int, list[str]]:
    """(accumulation steps, departures) that bring batch_size x num_gpus x accumulation to target_batch."""
    per_step = batch_size * num_gpus
    if explicit is not None:
        accum = explicit
    elif target_batch % per_step == 0:
        accum = target_batch // per_step
    else:  # the recipe's global batch cannot be made: the nearest one, said out loud
        accum = max(1, round(target_batch / per_step))
    notes = []
    if per_step * accum != target_batch:
        notes.append(f"global batch {per_step * accum} (BATCH_SIZE {batch_size} x NUM_GPUS {num_gpus} x accumulation "
                     f"{accum}) instead of the recipe's {target_batch}: each step sees "
                     f"{per_step * accum / target_batch:.3g}x the recipe's samples")
    return accum, notes


def recipe_steps(recipe: Recipe, episodes: int, shots: int | None, tasks_per_suite: int) -> int:
    """The recipe's steps, scaled for a k-shot run by the share of the episodes it sees (same epochs)."""
    steps = int(recipe["max_steps"])
    if shots is None or shots * tasks_per_suite >= episodes:
        return steps
    return math.ceil(steps * shots * tasks_per_suite / episodes)


def epoch_steps(epochs: int, frames: int, global_batch: int, save_freq: int) -> int:
    """EPOCHS passes over `frames` at the global batch, rounded up to a multiple of SAVE_FREQ (the old rule)."""
    raw = math.ceil(epochs * frames / global_batch)
    return math.ceil(raw / save_freq) * save_freq


def schedule(steps: int, lr_schedule: str, warmup_percent: int, decay_percent: int) -> tuple[int, int]:
    """(lr_warmup_steps, num_steps_before_decay) for finetune.py."""
    if lr_schedule == "upstream":
        return 0, NO_DECAY_STEP
    return steps * warmup_percent // 100, max(1, steps * decay_percent // 100)


def samples_departure(steps: int, global_batch: int, recipe: Recipe, shots: int | None, episodes: int,
                      tasks_per_suite: int) -> str | None:
    """A note when the run sees another number of samples than the recipe (scaled for k shots) would."""
    want = recipe_steps(recipe, episodes, shots, tasks_per_suite) * int(recipe["global_batch"])
    have = steps * global_batch
    if have == want:
        return None
    return f"{have:,} samples seen instead of the recipe's {want:,} ({have / want:.3g}x)"


def gpu_hours(recipe: Recipe, steps: int, global_batch: int, craft: bool) -> float:
    """4xH100 GPU-hours of one run, from upstream's wall-clock scaled by the samples it sees (CRaFT slower)."""
    share = steps * global_batch / (int(recipe["max_steps"]) * int(recipe["global_batch"]))
    return float(recipe["hours_4xH100"]) * H100_PER_RUN * share * (CRAFT_TIME_FACTOR if craft else 1.0)


def disk_gb(recipe: Recipe, steps: int, save_freq: int, latest_only: bool) -> float:
    """Checkpoint disk of one run: one checkpoint kept (two while the next is written), or every saved one."""
    kept = 2 if latest_only else math.ceil(steps / save_freq)
    return float(recipe["checkpoint_gb"]) * kept


def recipe_lines(recipes: dict[str, Recipe]) -> list[str]:
    """The recipe and where each number comes from, for the banner (shared numbers once, steps per suite)."""
    first = next(iter(recipes.values()))
    lines = ["recipe (craft_experiments/recipes/<suite>.json): upstream VLA-Adapter's LIBERO recipe"]
    for key in RECIPE_KEYS:
        if key in ("max_steps", "hours_4xH100"):
            continue
        lines.append(f"  {key} = {first[key]}: {first.sources[key]}")
    lines.append("  max_steps = " + ", ".join(f"{s} {r['max_steps']}" for s, r in recipes.items())
                 + f": {first.sources['max_steps']}")
    lines.append("  hours_4xH100 = " + ", ".join(f"{s} {r['hours_4xH100']}" for s, r in recipes.items())
                 + f": {first.sources['hours_4xH100']}")
    return lines
