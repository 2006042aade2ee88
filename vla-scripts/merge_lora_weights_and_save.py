"""Merge the LoRA adapter of a fine-tuning checkpoint into its base VLA and save a deployable policy folder.

    python vla-scripts/merge_lora_weights_and_save.py --lora_finetuned_checkpoint_dir runs/<run id>--<step>_chkpt \
        [--base_checkpoint <base VLM dir, if it moved>] [--output_dir <new folder>] [--overwrite True]

The checkpoint's `lora_adapter/` (trainable_state.safetensors + lora_base.json) and the base it names are
rebuilt exactly, every LoRA linear becomes W + (alpha / r) * B @ A, and the result is written with
`VLAPolicy.save_pretrained` (config.json, model.safetensors, head / proprio files, processor, statistics), loadable
with `prismatic.models.loaders.load_policy`.

The output is always a new folder (default: `<checkpoint>_merged`, a sibling): it is assembled in a hidden temporary
sibling, sealed with its own COMPLETE marker (sha256 of every file, `merged_from` naming the source) and renamed into
place, under the output folder's lock (prismatic/run_lock.py). An existing non-empty output folder is refused unless
`--overwrite True`, which names what it replaces; the source checkpoint itself is never written.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prismatic.cli_errors import UserError, cli_entry, parse_config
from prismatic.integrity import COMPLETE_MARKER, verify_checkpoint
from prismatic.run_lock import folder_lock
from prismatic.training.checkpoint_names import parse_checkpoint_dir

LORA_DIR, LORA_BASE_FILE = "lora_adapter", "lora_base.json"  # as prismatic.training.policy_setup (imported lazily)
MERGED_SUFFIX = "_merged"


@dataclass
class MergeConfig:
    lora_finetuned_checkpoint_dir: Path = Path("runs/checkpoint--0_chkpt")  # a `<run id>--<step>_chkpt` folder
    base_checkpoint: Path | None = None  # override the base VLM path recorded in lora_adapter/lora_base.json
    output_dir: Path | None = None       # a new folder; default: `<checkpoint>_merged` next to the checkpoint
    overwrite: bool = False              # replace an existing, non-empty --output_dir (named in the output)


def default_output_dir(checkpoint_dir: Path) -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.parent / f"{checkpoint_dir.name}{MERGED_SUFFIX}"


def _check_output(checkpoint_dir: Path, output_dir: Path, overwrite: bool) -> list[str]:
    """What --overwrite True would replace ([] for a new or empty folder); UserError when it may not be written."""
    src, out = checkpoint_dir.resolve(), output_dir.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise UserError(f"--output_dir '{output_dir}' is (or holds, or is inside) the checkpoint being merged",
                        "pass a new folder: the source checkpoint is never written into")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir '{output_dir}' is a file", "pass a new folder")
    existing = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise UserError(f"--output_dir '{output_dir}' already holds files ({shown})",
                        "pass a new folder, or --overwrite True to replace it")
    return existing


def merge_lora_checkpoint(checkpoint_dir: Path, output_dir: Path | None = None,
                          base_checkpoint: Path | None = None, overwrite: bool = False) -> Path:
    """Write the merged policy of `checkpoint_dir` into the new folder `output_dir` (default `<checkpoint>_merged`)."""
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
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(checkpoint_dir)
    _check_output(checkpoint_dir, output_dir, overwrite)
    verify_checkpoint(checkpoint_dir)  # the sha256 of every file recorded in COMPLETE (and an intact marker)
    with folder_lock(output_dir, "merge_lora", fix="wait for that process to end; two merges must not write one "
                     "folder"):
        replaced = _check_output(checkpoint_dir, output_dir, overwrite)  # again, now that the folder is ours
        from prismatic.training import checkpointing as ckpt  # torch / transformers: after the checks
        from prismatic.training.policy_setup import load_training_checkpoint_policy, merged_policy

        override = {"vlm_path": str(base_checkpoint)} if base_checkpoint is not None else None
        policy = load_training_checkpoint_policy(checkpoint_dir, base_override=override)
        if replaced:
            print(f"[merge] --overwrite True: replacing '{output_dir}' ({len(replaced)} entries: "
                  f"{', '.join(replaced[:6])}{' ...' if len(replaced) > 6 else ''})")
        marker = {"step": step, "merged_from": str(checkpoint_dir.resolve()), "lora": False, "merged": True}
        ckpt.write_checkpoint_atomically(output_dir, lambda tmp: merged_policy(policy).save_pretrained(tmp, step),
                                         marker)
    return output_dir


@cli_entry("merge_lora")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(MergeConfig, argv)
    out = merge_lora_checkpoint(cfg.lora_finetuned_checkpoint_dir, cfg.output_dir, cfg.base_checkpoint, cfg.overwrite)
    print(f"[merge] merged policy written to {out}")


if __name__ == "__main__":
    main()
