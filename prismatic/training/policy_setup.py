"""Building the policy to fine-tune (base VLM, policy folder, scratch preset; LoRA or full) and checkpointing it.

Checkpoint folder `{run_id}--{step}_chkpt/` (see docs/craft/PROJECT_STRUCTURE.md):

- full fine-tuning: `VLAPolicy.save_pretrained` files (config.json, model.safetensors, processor/tokenizer files,
  action_head--{step}_checkpoint.pt, proprio_projector--{step}_checkpoint.pt, dataset_statistics.json,
  policy_config.json), `training_state.pt`, `COMPLETE`.
- LoRA: the same top-level policy files holding the MERGED weights (eval-ready, loads with `load_policy`, like
  upstream's checkpoints; skipped with --merge_lora_during_training False), plus `lora_adapter/`:
  `adapter_config.json` + `adapter_model.safetensors` (peft format), `trainable_state.safetensors` (every trainable
  tensor of the policy, unmerged: LoRA A/B, action_queries, head, proprio projector) and `lora_base.json` (how to
  rebuild the frozen base and a fingerprint of it). Resume rebuilds the base, applies LoRA and loads
  `trainable_state.safetensors`: bit-exact, which re-merging cannot be. `vla-scripts/merge_lora_weights_and_save.py`
  writes the merged policy for an adapter-only checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prismatic.cli_errors import UserError
from prismatic.models.configuration_vla import make_vla_config
from prismatic.models.loaders import load_policy
from prismatic.models.modeling_vla import OpenVLAForActionPrediction, apply_lora, lora_target_modules
from prismatic.models.policy import POLICY_CONFIG_NAME, STATS_NAME, PolicyConfig, VLAPolicy, component_filename
from prismatic.models.processing_vla import PrismaticProcessor
from prismatic.training import checkpointing as ckpt
from prismatic.training import run_folder
from prismatic.training.distributed import DistEnv
from prismatic.training.finetune_config import TRAINING_STATE_FILE, FinetuneConfig

LORA_DIR = "lora_adapter"
TRAINABLE_STATE_FILE = "trainable_state.safetensors"
LORA_BASE_FILE = "lora_base.json"
RUN_CONFIG_FILE = "run_config.json"  # the run's resolved flags: what a resume inherits and must not change
BASE_KEYS = ("vlm_path", "config_file_path", "model_preset", "seed", "use_pro_version", "use_proprio",
             "num_images_in_input")


def policy_config_from_flags(cfg: FinetuneConfig) -> PolicyConfig:
    return PolicyConfig(head_variant="pro" if cfg.use_pro_version else "original",
                        num_images_in_input=cfg.num_images_in_input, use_proprio=cfg.use_proprio)


def is_lora(policy: VLAPolicy) -> bool:
    return not isinstance(policy.vla, OpenVLAForActionPrediction)


# ---- building ------------------------------------------------------------------------------------------------
def build_base_policy(base: dict) -> VLAPolicy:
    """The policy before fine-tuning, from the `BASE_KEYS` of a config (fp32, CPU, train mode).

    vlm_path set: a Prismatic native VLM (fresh head; tokenizer from config_file_path or the folder) or a policy
    folder (its head too). Else config_file_path: a policy / HF VLA folder. Else: built from scratch with
    `model_preset` (only "tiny": it has an in-process tokenizer), deterministic given `seed`.
    """
    policy_config = PolicyConfig(head_variant="pro" if base["use_pro_version"] else "original",
                                 num_images_in_input=base["num_images_in_input"], use_proprio=base["use_proprio"])
    torch.manual_seed(base["seed"])  # fresh heads / scratch weights depend on the seed only
    source = base["vlm_path"] or base["config_file_path"]
    if source is not None:
        tokenizer_path = base["config_file_path"] if base["vlm_path"] and base["config_file_path"] else None
        policy = load_policy(source, tokenizer_path=tokenizer_path, policy_config=policy_config,
                             vla_config=make_vla_config(base["model_preset"]))
        _check_policy_config(policy.policy_config, policy_config, source)
    elif base["model_preset"] == "tiny":
        from prismatic.models.tokenizer_tiny import train_tiny_tokenizer

        vla = OpenVLAForActionPrediction(make_vla_config("tiny"))
        processor = PrismaticProcessor(train_tiny_tokenizer(), image_size=vla.config.image_size,
                                       num_images=policy_config.num_images_in_input)
        policy = VLAPolicy.from_vla(vla, processor, None, policy_config)
    else:
        raise ValueError("no --vlm_path / --config_file_path given: building from scratch is only supported for "
                         "--model_preset tiny (the real preset needs the base VLM and its tokenizer)")
    return policy.float().train()


def _check_policy_config(loaded: PolicyConfig, wanted: PolicyConfig, source) -> None:
    diffs = [f"{name}: folder {getattr(loaded, name)!r} vs flags {getattr(wanted, name)!r}"
             for name in ("head_variant", "use_proprio", "num_images_in_input")
             if getattr(loaded, name) != getattr(wanted, name)]
    if diffs:
        raise ValueError(f"the policy in {source} does not match the flags (--use_pro_version / --use_proprio / "
                         f"--num_images_in_input): {'; '.join(diffs)}")


def add_lora(policy: VLAPolicy, rank: int, dropout: float, without_vision: bool = False) -> VLAPolicy:
    """Upstream recipe: LoRA (rank, alpha 2*rank, gaussian init) on every linear of the VLA but the LM head;
    action_queries, action head and proprio projector fully trained. `without_vision`: no adapter in the two ViTs
    (the Freeze baseline under LoRA)."""
    targets = None
    if without_vision:
        from prismatic.training.vision_freeze import lora_targets_without_vision

        targets = lora_targets_without_vision(lora_target_modules(policy.vla))
    policy.vla = apply_lora(policy.vla, rank=rank, alpha=2 * rank, dropout=dropout, init_lora_weights="gaussian",
                            target_modules=targets)
    for module in (policy.action_head, policy.proprio_projector):
        if module is not None:
            module.requires_grad_(True)
    return policy


def freeze_vision_backbone(policy: VLAPolicy) -> None:
    """No gradient (nor LoRA update) for the two ViTs: the "Freeze" baseline (prismatic/training/vision_freeze.py)."""
    from prismatic.training.vision_freeze import freeze_vision_backbone as freeze

    freeze(policy.vla)


def base_fingerprint(policy: VLAPolicy) -> str:
    """sha1 of every frozen tensor of the VLA (names, shapes, float64 sums): detects a changed base on resume."""
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, p in sorted(_base_vla(policy).named_parameters(), key=lambda kv: kv[0].replace(".base_layer.", ".")):
            if "lora_" in name or name.endswith("action_queries.weight"):
                continue
            x = p.detach().double()
            name = name.replace(".base_layer.", ".")  # same names with and without LoRA wrappers
            digest.update(f"{name}{tuple(p.shape)}{x.sum().item():.10e}{x.abs().sum().item():.10e}".encode())
    return digest.hexdigest()


def _base_vla(policy: VLAPolicy) -> torch.nn.Module:
    return policy.vla.get_base_model() if is_lora(policy) else policy.vla


def build_policy(cfg: FinetuneConfig, env: DistEnv) -> VLAPolicy:
    """The policy to train: on resume, the checkpoint's exact weights; else base + LoRA (if --use_lora)."""
    if cfg.resume:
        policy = load_training_checkpoint_policy(Path(cfg.config_file_path), cfg, base_override=_base_override(cfg))
        if cfg.freeze_vision_backbone:
            freeze_vision_backbone(policy)
    else:
        policy = build_base_policy({k: getattr(cfg, k) for k in BASE_KEYS})
        if cfg.use_lora:
            add_lora(policy, cfg.lora_rank, cfg.lora_dropout, without_vision=cfg.freeze_vision_backbone)
        else:
            policy.requires_grad_(True)
        if cfg.freeze_vision_backbone:
            freeze_vision_backbone(policy)
    policy.processor.center_crop = cfg.image_aug  # deployed policies see the center crop of the trained crop area
    return policy


def load_training_checkpoint_policy(chkpt: Path, cfg: FinetuneConfig | None = None,
                                    base_override: dict | None = None) -> VLAPolicy:
    """The training-time policy of a checkpoint (LoRA unmerged), in train mode: what resume continues from.

    base_override: replaces entries of the recorded base (e.g. {"vlm_path": new location of the same VLM}).
    """
    chkpt = Path(chkpt)
    lora_dir = chkpt / LORA_DIR
    if not (lora_dir / LORA_BASE_FILE).is_file():
        if cfg is not None and cfg.use_lora:
            raise ValueError(f"--use_lora True but checkpoint {chkpt} was written by full fine-tuning "
                             f"(no {LORA_DIR}/{LORA_BASE_FILE}); resume with --use_lora False")
        policy = load_policy(chkpt).float().train()
        policy.requires_grad_(True)
        return policy
    if cfg is not None and not cfg.use_lora:
        raise ValueError(f"--use_lora False but checkpoint {chkpt} holds a LoRA adapter; resume with --use_lora True")
    with ckpt.unreadable_file(lora_dir / LORA_BASE_FILE):
        meta = json.loads((lora_dir / LORA_BASE_FILE).read_text())
    meta["base"].update(base_override or {})
    policy = build_base_policy(meta["base"])
    if base_fingerprint(policy) != meta["base_fingerprint"]:
        raise ValueError(f"the base model rebuilt from {meta['base']} differs from the one checkpoint {chkpt} was "
                         "trained on (fingerprint mismatch): restore the original --vlm_path / --config_file_path")
    add_lora(policy, meta["lora_rank"], meta["lora_dropout"], without_vision=meta.get("freeze_vision_backbone", False))
    if meta.get("freeze_vision_backbone", False):
        freeze_vision_backbone(policy)
    with ckpt.unreadable_file(lora_dir / TRAINABLE_STATE_FILE):
        saved = load_file(str(lora_dir / TRAINABLE_STATE_FILE))
    load_trainable_state(policy, saved, str(lora_dir))
    policy.norm_stats = json.loads((chkpt / STATS_NAME).read_text()) if (chkpt / STATS_NAME).is_file() else {}
    return policy.train()


def trainable_state(policy: VLAPolicy) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in policy.named_parameters() if p.requires_grad}


def load_trainable_state(policy: VLAPolicy, state: dict[str, torch.Tensor], source: str) -> None:
    params = dict(policy.named_parameters())
    own = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    bad = [f"{n}: {tuple(state[n].shape)} vs {tuple(params[n].shape)}" for n in own & set(state)
           if state[n].shape != params[n].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{source}/{TRAINABLE_STATE_FILE} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {bad[:5]}")
    with torch.no_grad():
        for name in own:
            params[name].copy_(state[name])


# ---- merging and saving --------------------------------------------------------------------------------------
def merged_vla(policy: VLAPolicy) -> OpenVLAForActionPrediction:
    """A plain VLA whose linear weights are W + scale * B @ A; the training model is left untouched."""
    from peft.tuners.lora import LoraLayer

    base = policy.vla.get_base_model()
    state: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach()
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and module.merged_adapters == [] and "default" in module.lora_A:
                weight = state[f"{name}.weight"]
                delta = module.get_delta_weight("default")
                state[f"{name}.weight"] = (weight.float() + delta.float()).to(weight.dtype)
    with torch.device("meta"):
        vla = OpenVLAForActionPrediction(base.config)
    vla.load_state_dict({k: v.to("cpu") for k, v in state.items()}, strict=True, assign=True)
    vla.tie_weights()
    return vla.eval()


def merged_policy(policy: VLAPolicy) -> VLAPolicy:
    """The deployable policy (plain VLA) sharing head, proprio projector, stats and processor with `policy`."""
    vla = merged_vla(policy) if is_lora(policy) else policy.vla
    return VLAPolicy(vla, policy.action_head, policy.proprio_projector, policy.norm_stats, policy.processor,
                     policy.policy_config)


def write_lora_adapter(policy: VLAPolicy, directory: Path, base: dict, lora_rank: int, lora_dropout: float,
                       frozen_vision: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    policy.vla.save_pretrained(str(directory))  # peft format: adapter_config.json + adapter_model.safetensors
    save_file(trainable_state(policy), str(directory / TRAINABLE_STATE_FILE))
    meta = {"base": {k: (str(v) if isinstance(v, Path) else v) for k, v in base.items()},
            "base_fingerprint": base_fingerprint(policy), "lora_rank": lora_rank, "lora_alpha": 2 * lora_rank,
            "lora_dropout": lora_dropout, "freeze_vision_backbone": frozen_vision,
            "target_modules": lora_target_modules(policy.vla.get_base_model())}
    (directory / LORA_BASE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def write_policy_files_without_vla(policy: VLAPolicy, directory: Path, step: int) -> None:
    """Head, proprio projector, processor, stats and policy config (adapter-only LoRA checkpoints)."""
    policy.processor.save_pretrained(directory)
    torch.save({"module." + k: v.detach().cpu() for k, v in policy.action_head.state_dict().items()},
               directory / component_filename("action_head", step))
    if policy.proprio_projector is not None:
        torch.save({"module." + k: v.detach().cpu() for k, v in policy.proprio_projector.state_dict().items()},
                   directory / component_filename("proprio_projector", step))
    (directory / STATS_NAME).write_text(json.dumps(policy.norm_stats, indent=2) + "\n")
    (directory / POLICY_CONFIG_NAME).write_text(json.dumps(asdict(policy.policy_config), indent=2) + "\n")


def save_training_checkpoint(cfg: FinetuneConfig, policy: VLAPolicy, *, run_root_dir: Path, run_id: str, step: int,
                             training_state: dict) -> Path:
    """Write `{run_root_dir}/{run_id}--{step}_chkpt` atomically (COMPLETE last); prune older ones if asked."""
    final = ckpt.checkpoint_dir(run_root_dir, run_id, step)
    lora = is_lora(policy)
    check_finite_weights(policy, run_root_dir, run_id, step)

    def write(tmp: Path) -> None:
        if not lora:
            policy.save_pretrained(tmp, step)
        else:
            if cfg.merge_lora_during_training:
                merged_policy(policy).save_pretrained(tmp, step)
            else:
                write_policy_files_without_vla(policy, tmp, step)
            base = training_base(cfg)
            write_lora_adapter(policy, tmp / LORA_DIR, base, cfg.lora_rank, cfg.lora_dropout,
                               cfg.freeze_vision_backbone)
        ckpt.save_training_state(tmp / TRAINING_STATE_FILE, training_state)
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(run_folder.config_record(cfg), indent=2) + "\n")

    marker = {"step": step, "run_id": run_id, "lora": lora, "merged": (not lora) or cfg.merge_lora_during_training}
    ckpt.write_checkpoint_atomically(final, write, marker)
    if cfg.save_latest_checkpoint_only:
        ckpt.prune_checkpoints(run_root_dir, run_id, keep=final)
    return final


def _base_override(cfg: FinetuneConfig) -> dict | None:
    """On resume, --vlm_path (if given) names where the same base VLM now lives (checked by fingerprint)."""
    return {"vlm_path": str(cfg.vlm_path)} if cfg.vlm_path is not None else None


def training_base(cfg: FinetuneConfig) -> dict:
    """The base of a LoRA run; on resume, the base recorded in the checkpoint being resumed."""
    if cfg.resume:
        meta = Path(cfg.config_file_path) / LORA_DIR / LORA_BASE_FILE
        return json.loads(meta.read_text())["base"] | (_base_override(cfg) or {})
    return {k: getattr(cfg, k) for k in BASE_KEYS}


# ---- run safety --------------------------------------------------------------------------------------------------
def check_finite_weights(policy: VLAPolicy, run_root_dir: Path, run_id: str, step: int,
                         across_ranks: bool = False) -> None:
    """A checkpoint whose trainable weights hold NaN / inf is never written (it would pass for complete).

    across_ranks: collective, every rank gets the same answer (FSDP shards: each rank checks its own part)."""
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    if across_ranks:
        from prismatic.training.fsdp import all_local_finite

        bad = all_local_finite(trainable)
    else:
        bad = [n for n, p in trainable if not torch.isfinite(p.detach()).all()]
    if bad:
        previous = ckpt.list_checkpoints(Path(run_root_dir), run_id)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no checkpoint was written"
        raise UserError(f"step {step}: {len(bad)} trainable tensor(s) are not finite (e.g. {bad[0]}); the run "
                        f"diverged and was not saved ({kept})",
                        "lower --learning_rate (or raise --lr_warmup_steps) and resume from the previous checkpoint "
                        "or start again")


def recorded_run_config(chkpt: Path, run_root_dir: Path | None = None) -> dict | None:
    """The flags of the run that wrote `chkpt`: its run_config.json, else the run's config.yaml (older runs)."""
    chkpt = Path(chkpt)
    if (chkpt / RUN_CONFIG_FILE).is_file():
        with ckpt.unreadable_file(chkpt / RUN_CONFIG_FILE):
            return json.loads((chkpt / RUN_CONFIG_FILE).read_text())
    run_id, _ = ckpt.parse_checkpoint_dir(chkpt)
    for root in {chkpt.parent, Path(run_root_dir) if run_root_dir is not None else chkpt.parent}:
        path = root / run_id / run_folder.CONFIG_FILE
        if path.is_file():
            import yaml

            loaded = yaml.safe_load(path.read_text())
            return loaded if isinstance(loaded, dict) else None
    return None
