"""Layer-wise representation drift of a fine-tuned policy against its reference θ0, on a fixed set of frames.

    python vla-scripts/measure_drift.py --reference_path <θ0 folder> --finetuned_path runs/<run id>--<step>_chkpt \
        --data_root_dir datasets/rlds --dataset_name libero_spatial_no_noops --output_dir results/drift \
        [--num_samples 256] [--batch_size 8] [--seed 7] [--center_crop False] [--device cpu]

Both folders are anything `prismatic.models.loaders.load_policy` accepts (our checkpoints with merged weights,
released VLA-Adapter folders, Prismatic VLMs / bare HF VLA folders with --tokenizer_path). The frames are the
un-augmented view (`get_frame`: resize, plus the eval center crop with --center_crop True), chosen by seed; both
models see exactly the same batches. Per LLM layer l = 0..L and group (raw = vision tokens, aq = ActionQueries) it
reports retention (CRaFT L_ret units), linear CKA and task-probe accuracy of each model
(`prismatic.training.drift_metrics`). Output: `{output_dir}/drift.json` (schema in docs/BASELINES.md) and
`{output_dir}/drift.png`, both written only after everything was computed.
"""

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch

from prismatic.cli_errors import UserError, cli_entry, parse_config
from prismatic.data.collator import VLACollator
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.models.image_transform import batch_pixel_values
from prismatic.models.loaders import load_policy
from prismatic.models.precision import DTYPE_CHOICES, resolve_dtype
from prismatic.models.prompting import tokenize_prompt
from prismatic.training.checkpoint_identity import checkpoint_identity
from prismatic.training.drift_metrics import GROUPS, layerwise_drift, pooled_layer_features

SCHEMA_VERSION = 1
JSON_NAME = "drift.json"
PNG_NAME = "drift.png"


@dataclass
class DriftConfig:
    reference_path: Path = Path("checkpoints/theta0")   # θ0 policy folder
    finetuned_path: Path = Path("runs/run--1000_chkpt")  # fine-tuned policy folder
    data_root_dir: Path = Path("datasets/rlds")         # folder holding `{dataset_name}/1.0.0/`
    dataset_name: str = "libero_spatial_no_noops"
    output_dir: Path = Path("results/drift")
    num_samples: int = 256                  # frames drawn (without replacement, by seed); all if the dataset is smaller
    batch_size: int = 8
    seed: int = 7                           # frame choice and probe split
    center_crop: bool = False               # eval center crop (use for policies trained with image augmentation)
    probe_test_fraction: float = 0.25       # share of each task's episodes (or frames) held out for the probe
    probe_l2: float = 1e-3
    probe_max_iter: int = 200
    reference_step: int | None = None       # which action_head--{step} file when a folder holds several
    finetuned_step: int | None = None
    tokenizer_path: Path | None = None      # for bare VLA / Prismatic folders without tokenizer files
    device: str | None = None               # default: cuda if available, else cpu
    dtype: str = "auto"                     # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16; pooled in fp32


class DriftConfigError(UserError, ValueError):
    """Bad measure_drift flags (listed)."""


def validate(cfg: DriftConfig) -> None:
    errors = []
    for name in ("reference_path", "finetuned_path", "data_root_dir"):
        if not Path(getattr(cfg, name)).is_dir():
            errors.append(f"--{name} '{getattr(cfg, name)}' is not a directory")
    for name in ("num_samples", "batch_size", "probe_max_iter"):
        if not getattr(cfg, name) > 0:
            errors.append(f"--{name} must be > 0, got {getattr(cfg, name)}")
    if not 0.0 < cfg.probe_test_fraction < 1.0:
        errors.append(f"--probe_test_fraction must be in (0, 1), got {cfg.probe_test_fraction}")
    if not cfg.probe_l2 >= 0:
        errors.append(f"--probe_l2 must be >= 0, got {cfg.probe_l2}")
    if cfg.dtype not in DTYPE_CHOICES:
        errors.append(f"--dtype must be one of {list(DTYPE_CHOICES)}, got '{cfg.dtype}'")
    if errors:
        raise DriftConfigError("invalid measure_drift configuration: " + "; ".join(errors),
                        "fix the flags listed (see --help)")


def select_frames(num_frames: int, num_samples: int, seed: int) -> np.ndarray:
    """Sorted frame indices: all frames if num_samples >= num_frames, else a seeded draw without replacement."""
    if num_samples >= num_frames:
        return np.arange(num_frames)
    return np.sort(np.random.default_rng(seed).choice(num_frames, size=num_samples, replace=False))


def _load(path: Path, step: int | None, cfg: DriftConfig, device: torch.device):
    policy = load_policy(path, step=step, tokenizer_path=cfg.tokenizer_path, device=device,
                         dtype=resolve_dtype(cfg.dtype, device))
    return policy.eval()


@torch.no_grad()
def extract_features(policy, samples: list[dict], batch_size: int, pad_token_id: int,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Pooled per-layer features {"raw", "aq"}: (n, L+1, D) float32 on CPU, batches in sample order."""
    collate = VLACollator(pad_token_id)
    parts: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start: start + batch_size])
        out = policy.vla(pixel_values=batch_pixel_values(batch, device), input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device))
        feats = pooled_layer_features(out)
        for g in GROUPS:
            parts[g].append(feats[g].float().cpu())
    return {g: torch.cat(parts[g]) for g in GROUPS}


@dataclass
class PolicyMeta:
    policy_config: object
    processor: object
    vla_config: object


def _check_compatible(ref: PolicyMeta, ft: PolicyMeta, instructions: list[str]) -> None:
    problems = []
    for name in ("num_images_in_input",):
        a, b = getattr(ref.policy_config, name), getattr(ft.policy_config, name)
        if a != b:
            problems.append(f"{name}: reference {a} vs fine-tuned {b}")
    if ref.processor.image_size != ft.processor.image_size:
        problems.append(f"image_size: reference {ref.processor.image_size} vs fine-tuned {ft.processor.image_size}")
    for text in instructions:
        if tokenize_prompt(ref.processor.tokenizer, text) != tokenize_prompt(ft.processor.tokenizer, text):
            problems.append(f"the two tokenizers tokenize the prompt of {text!r} differently")
            break
    a, b = ref.vla_config, ft.vla_config
    if (a.num_llm_layers, a.hidden_size) != (b.num_llm_layers, b.hidden_size):
        problems.append(f"LLM sizes differ: reference (L={a.num_llm_layers}, D={a.hidden_size}) vs fine-tuned "
                        f"(L={b.num_llm_layers}, D={b.hidden_size})")
    if problems:
        raise DriftConfigError("the reference and fine-tuned policies cannot be compared on the same inputs: "
                               + "; ".join(problems), "compare policies with the same cameras and proprio")


def measure_drift(cfg: DriftConfig) -> dict:
    """Compute the report (and write drift.json + drift.png into cfg.output_dir); returns the report dict. The
    output folder is locked (prismatic/run_lock.py) from the start, so two runs never write one report."""
    from prismatic.run_lock import folder_lock

    validate(cfg)
    with folder_lock(Path(cfg.output_dir), "measure_drift",
                     fix="wait for that process to end, or pass another --output_dir"):
        return _measure_drift_locked(cfg)


def _measure_drift_locked(cfg: DriftConfig) -> dict:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference = _load(Path(cfg.reference_path), cfg.reference_step, cfg, device)
    tokenizer = reference.processor.tokenizer
    # image_aug=True only switches get_frame to the eval center crop; get_frame never draws random augmentation
    from prismatic.training.data_setup import dataset_errors_as_user_errors

    with dataset_errors_as_user_errors(cfg):
        dataset = RLDSFrameDataset(cfg.data_root_dir, cfg.dataset_name, tokenizer,
                                   num_images_in_input=reference.policy_config.num_images_in_input,
                                   image_aug=cfg.center_crop, seed=cfg.seed,
                                   image_size=reference.processor.image_size)
    frames = select_frames(dataset.num_frames, cfg.num_samples, cfg.seed)
    samples = [dataset.get_frame(int(i)) for i in frames]  # eval view: no random augmentation
    instructions = sorted({s["instruction"] for s in samples})
    task_index = {text: k for k, text in enumerate(instructions)}
    labels = np.asarray([task_index[s["instruction"]] for s in samples], dtype=np.int64)
    episodes = [s["sample_id"].rsplit("/", 1)[0] for s in samples]  # "{dataset}/{episode}"

    ref_feats = extract_features(reference, samples, cfg.batch_size, dataset.pad_token_id, device)
    num_layers = reference.vla.config.num_llm_layers
    # keep only what the compatibility check needs, so the two models are never in memory together
    ref_meta = PolicyMeta(reference.policy_config, reference.processor, reference.vla.config)
    del reference
    finetuned = _load(Path(cfg.finetuned_path), cfg.finetuned_step, cfg, device)
    _check_compatible(ref_meta, PolicyMeta(finetuned.policy_config, finetuned.processor, finetuned.vla.config),
                      instructions)
    ft_feats = extract_features(finetuned, samples, cfg.batch_size, dataset.pad_token_id, device)
    del finetuned
    try:  # the weights measured, so that the report stays valid when the folder moves and stale when it is rewritten
        finetuned_identity = checkpoint_identity(cfg.finetuned_path)
    except ValueError:
        finetuned_identity = None

    drift = layerwise_drift(ref_feats, ft_feats, labels, episodes, cfg.probe_test_fraction, cfg.seed, cfg.probe_l2,
                            cfg.probe_max_iter)
    m, M = num_layers // 2, num_layers
    report = {
        "schema_version": SCHEMA_VERSION,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "finetuned_checkpoint": finetuned_identity,
        "num_samples": len(samples),
        "num_llm_layers": num_layers,
        "layers": list(range(num_layers + 1)),
        "tasks": instructions,
        "sample_ids": [s["sample_id"] for s in samples],
        "retention_units": "mean over samples of the sum over feature dims of the squared difference of pooled "
                           "features (CRaFT L_ret units)",
        "groups": {g: drift[g] for g in GROUPS},
        "probe": drift["probe"],
        "craft_default_anchor": {"raw_layer": m, "aq_layer": M,
                                 "L_ret_concat": drift["raw"]["retention"][m] + drift["aq"]["retention"][M],
                                 "L_ret_raw_only": drift["raw"]["retention"][m]},
    }
    write_outputs(report, Path(cfg.output_dir))
    return report


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = {"raw": "Raw Latent (vision tokens)", "aq": "ActionQuery tokens"}
    for g, color in (("raw", "tab:blue"), ("aq", "tab:orange")):
        data = report["groups"][g]
        axes[0].plot(layers, data["retention"], "-o", color=color, label=names[g])
        axes[1].plot(layers, data["cka"], "-o", color=color, label=names[g])
        for key, style in (("probe_accuracy_reference", "--x"), ("probe_accuracy_finetuned", "-o")):
            values = [np.nan if v is None else v for v in data[key]]
            who = "θ0" if key.endswith("reference") else "fine-tuned"
            axes[2].plot(layers, values, style, color=color, alpha=0.8, label=f"{names[g]}, {who}")
    positive = [v for g in GROUPS for v in report["groups"][g]["retention"] if v > 0]
    if positive:
        axes[0].set_yscale("symlog", linthresh=min(positive))
    axes[0].set_title("retention: mean Σ_dims (f_ft − f_θ0)²")
    axes[1].set_title("linear CKA (θ0 vs fine-tuned)")
    axes[1].set_ylim(-0.02, 1.02)
    axes[2].axhline(report["probe"]["majority_accuracy"], color="grey", lw=0.8, label="majority class")
    axes[2].set_title(f"task probe accuracy ({report['probe']['num_classes']} tasks, held-out)")
    axes[2].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xticks(layers)
        ax.set_xlabel("LLM layer l (0 = embeddings, L = after final norm)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, output_dir: Path) -> None:
    """drift.json and drift.png, each written to a temporary file first and moved into place."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".drift-", dir=output_dir))
    try:
        (tmp_dir / JSON_NAME).write_text(text + "\n")
        plot_report(report, tmp_dir / PNG_NAME)
        os.replace(tmp_dir / PNG_NAME, output_dir / PNG_NAME)
        os.replace(tmp_dir / JSON_NAME, output_dir / JSON_NAME)
    finally:
        for item in tmp_dir.iterdir():
            item.unlink()
        tmp_dir.rmdir()


@cli_entry("measure_drift")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DriftConfig, argv)
    report = measure_drift(cfg)
    m = report["craft_default_anchor"]
    print(f"[measure_drift] {report['num_samples']} samples, {report['probe']['num_classes']} tasks; "
          f"L_ret(concat, m={m['raw_layer']}, M={m['aq_layer']}) = {m['L_ret_concat']:.6g}; "
          f"wrote {Path(cfg.output_dir) / JSON_NAME} and {PNG_NAME}")


if __name__ == "__main__":
    main()
