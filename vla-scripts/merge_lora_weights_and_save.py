"""Merge the LoRA adapter of a fine-tuning checkpoint into its base VLA and save a deployable policy folder.

    python vla-scripts/merge_lora_weights_and_save.py --lora_finetuned_checkpoint_dir runs/<run id>--<step>_chkpt \
        [--base_checkpoint <base VLM dir, if it moved>] [--output_dir <folder>]

The checkpoint's `lora_adapter/` (trainable_state.safetensors + lora_base.json) and the base it names are
rebuilt exactly, every LoRA linear becomes W + (alpha / r) * B @ A, and the result is written with
`VLAPolicy.save_pretrained` (config.json, model.safetensors, head / proprio files, processor, statistics), loadable
with `prismatic.models.loaders.load_policy`. Without --output_dir the merged files go into the checkpoint folder
itself (as checkpoints written with --merge_lora_during_training True already hold them).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prismatic.cli_errors import UserError, cli_entry, parse_config
from prismatic.integrity import COMPLETE_MARKER, verify_checkpoint
from prismatic.training.checkpoint_names import parse_checkpoint_dir

LORA_DIR, LORA_BASE_FILE = "lora_adapter", "lora_base.json"  # as prismatic.training.policy_setup (imported lazily)


@dataclass
class MergeConfig:
    lora_finetuned_checkpoint_dir: Path = Path("runs/checkpoint--0_chkpt")  # a `<run id>--<step>_chkpt` folder
    base_checkpoint: Path | None = None  # override the base VLM path recorded in lora_adapter/lora_base.json
    output_dir: Path | None = None       # default: the checkpoint folder


def merge_lora_checkpoint(checkpoint_dir: Path, output_dir: Path | None = None,
                          base_checkpoint: Path | None = None) -> Path:
    """Write the merged policy of `checkpoint_dir` into `output_dir` (default: the checkpoint folder)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"--lora_finetuned_checkpoint_dir '{checkpoint_dir}' does not exist",
                        "pass a '<run id>--<step>_chkpt' folder written by vla-scripts/finetune.py")
    try:
        _, step = parse_checkpoint_dir(checkpoint_dir)
    except ValueError as exc:
        raise UserError(str(exc), "pass a '<run id>--<step>_chkpt' folder written by vla-scripts/finetune.py") from None
    if not (checkpoint_dir / COMPLETE_MARKER).is_file():
        raise UserError(f"'{checkpoint_dir}' has no {COMPLETE_MARKER} marker: an interrupted or partial save",
                        "merge an earlier, complete checkpoint of the run")
    if not (checkpoint_dir / LORA_DIR / LORA_BASE_FILE).is_file():
        raise UserError(f"{checkpoint_dir} has no {LORA_DIR}/{LORA_BASE_FILE}: not a LoRA fine-tuning checkpoint",
                        "full fine-tuning checkpoints are already deployable: load them directly")
    if base_checkpoint is not None and not Path(base_checkpoint).exists():
        raise UserError(f"--base_checkpoint '{base_checkpoint}' does not exist", "pass the base VLM's folder")
    verify_checkpoint(checkpoint_dir)  # the sha256 of every file recorded in COMPLETE
    from prismatic.training import checkpointing as ckpt  # torch / transformers: after the checks
    from prismatic.training.policy_setup import load_training_checkpoint_policy, merged_policy

    override = {"vlm_path": str(base_checkpoint)} if base_checkpoint is not None else None
    policy = load_training_checkpoint_policy(checkpoint_dir, base_override=override)
    output_dir = Path(output_dir) if output_dir is not None else checkpoint_dir
    merged_policy(policy).save_pretrained(output_dir, step)
    if output_dir.resolve() == checkpoint_dir.resolve():
        ckpt.reseal_checkpoint(checkpoint_dir)  # the merged files are now part of the checkpoint
    return output_dir


@cli_entry("merge_lora")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(MergeConfig, argv)
    out = merge_lora_checkpoint(cfg.lora_finetuned_checkpoint_dir, cfg.output_dir, cfg.base_checkpoint)
    print(f"[merge] merged policy written to {out}")


if __name__ == "__main__":
    main()
