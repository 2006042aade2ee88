"""Training / validation data of a fine-tuning run and the per-step micro-batch stream with the head's noise.

The loader yields rank r's micro-batches of optimizer step s at stream positions s*G + j*b*W + r*b + [0, b)
(`prismatic.data.stream`); the same positions seed the action head's start noise, so a sample gets the same noise
whatever the world size, accumulation or resume point.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prismatic.cli_errors import UserError
from prismatic.data.loader import make_eval_loader, make_train_loader
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.models.policy import STATS_NAME, VLAPolicy
from prismatic.training.distributed import DistEnv
from prismatic.training.finetune_config import FinetuneConfig, global_batch_size
from prismatic.training.train_step import MicroBatch, head_noise, to_device

VAL_FRACTION = 0.1  # share of each dataset's episodes held out when --use_val_set True (chosen by seed)
VAL_MAX_FRAMES = 2048  # cap of one validation pass (frames in file order, split over ranks)


class TrainStream(Iterator[list[MicroBatch]]):
    """Endless iterator of optimizer steps: each item is the k micro-batches (on the device) of one step."""

    def __init__(self, data: TrainingData, start_step: int) -> None:
        self.data, self.step = data, start_step
        cfg, env = data.cfg, data.env
        self._loader = iter(make_train_loader(
            data.train_set, per_rank_batch=cfg.batch_size, rank=env.rank, world_size=env.world_size,
            grad_accumulation_steps=cfg.grad_accumulation_steps, start_step=start_step, num_workers=cfg.num_workers))

    def __next__(self) -> list[MicroBatch]:
        cfg, env, data = self.data.cfg, self.data.env, self.data
        micro = []
        noise = None
        if data.noise_std > 0:
            noise = head_noise(cfg.seed, self.step, data.noise_shape, data.noise_std, env.device)
        for _ in range(cfg.grad_accumulation_steps):
            micro.append(MicroBatch(batch=to_device(next(self._loader), env.device), noise=noise))
        self.step += 1
        return micro


@dataclass
class TrainingData:
    cfg: FinetuneConfig
    env: DistEnv
    tokenizer: object
    train_set: RLDSFrameDataset
    val_set: RLDSFrameDataset | None
    noise_shape: tuple[int, ...]
    noise_std: float
    dataset_statistics: dict = field(default_factory=dict)

    def train_stream(self, start_step: int) -> TrainStream:
        return TrainStream(self, start_step)

    def val_batches(self):
        if self.val_set is None:
            raise ValueError("no validation set: pass --use_val_set True")
        return make_eval_loader(self.val_set, batch_size=self.cfg.batch_size, rank=self.env.rank,
                                world_size=self.env.world_size, num_workers=self.cfg.num_workers,
                                max_frames=VAL_MAX_FRAMES)

    def position_state(self, step: int) -> dict:
        """The data-stream position after `step` optimizer steps (the step IS the loader state)."""
        G = global_batch_size(self.cfg, self.env.world_size)
        return {"next_step": step, "global_batch_size": G, "next_position": step * G, "seed": self.cfg.seed,
                "dataset_name": self.cfg.dataset_name, "num_demos_per_task": self.cfg.num_demos_per_task}


def build_training_data(cfg: FinetuneConfig, policy: VLAPolicy, env: DistEnv, run_dir: Path,
                        resume_from: Path | None = None) -> TrainingData:
    """Datasets of the run; statistics from the resumed checkpoint if any (same normalisation), else computed.

    Rank 0 writes `dataset_statistics.json` (and `few_shot_episodes.json` for few-shot runs) into `run_dir`.
    """
    statistics = None
    if resume_from is not None and (resume_from / STATS_NAME).is_file():
        statistics = json.loads((resume_from / STATS_NAME).read_text())
    tokenizer = policy.processor.tokenizer
    common = dict(data_root_dir=cfg.data_root_dir, dataset_name=cfg.dataset_name, tokenizer=tokenizer,
                  num_images_in_input=cfg.num_images_in_input, use_proprio=cfg.use_proprio, image_aug=cfg.image_aug,
                  seed=cfg.seed, val_fraction=VAL_FRACTION if cfg.use_val_set else 0.0,
                  image_size=policy.processor.image_size)
    with dataset_errors_as_user_errors(cfg):
        train_set = RLDSFrameDataset(**common, num_demos_per_task=cfg.num_demos_per_task, split="train",
                                     statistics=statistics)
        check_few_shot_shortfall(train_set, cfg)
        val_set = None
        if cfg.use_val_set:
            val_set = RLDSFrameDataset(**common, split="val", statistics=train_set.dataset_statistics)
    if env.is_main:
        train_set.save_dataset_statistics(run_dir)
        if cfg.num_demos_per_task is not None:
            train_set.save_few_shot_episodes(run_dir)
    head = policy.action_head
    return TrainingData(cfg=cfg, env=env, tokenizer=tokenizer, train_set=train_set, val_set=val_set,
                        noise_shape=tuple(head.input_shape_per_sample), noise_std=float(head.noise_std),
                        dataset_statistics=train_set.dataset_statistics)



# ---- run safety --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def dataset_errors_as_user_errors(cfg: FinetuneConfig):
    """A dataset that cannot be read (corrupt / truncated / empty shard, episodes shorter than the action chunk,
    an empty few-shot selection) is the user's data, not a bug: one line naming the dataset."""
    from prismatic.data.example_codec import ExampleFormatError
    from prismatic.data.few_shot import EmptySelectionError
    from prismatic.data.rlds_catalog import DatasetNotFoundError
    from prismatic.data.tfrecord import CorruptTFRecordError

    try:
        yield
    except UserError:
        raise
    except (CorruptTFRecordError, ExampleFormatError, EmptySelectionError, DatasetNotFoundError, ValueError,
            KeyError, OSError) as exc:
        raise UserError(f"dataset '{cfg.dataset_name}' under '{cfg.data_root_dir}' cannot be used: "
                        f"{str(exc).strip() or type(exc).__name__}",
                        "re-download or rebuild the dataset (docs/DATASETS.md) or pick another --dataset_name") from exc


def check_few_shot_shortfall(train_set: RLDSFrameDataset, cfg: FinetuneConfig) -> None:
    """--num_demos_per_task N with fewer than N demos for some task is an error unless --allow_fewer_demos True."""
    if cfg.num_demos_per_task is None or not train_set.few_shot_episodes:
        return
    short = [f"{name}: '{task}' has {len(ids)}" for name, tasks in train_set.few_shot_episodes.items()
             for task, ids in tasks.items() if len(ids) < cfg.num_demos_per_task]
    if short and not cfg.allow_fewer_demos:
        raise UserError(f"--num_demos_per_task {cfg.num_demos_per_task}: {len(short)} task(s) have fewer demos "
                        f"({'; '.join(short[:3])}{' ...' if len(short) > 3 else ''})",
                        "lower --num_demos_per_task, or pass --allow_fewer_demos True to train on what there is")
