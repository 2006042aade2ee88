"""torchrun worker of test_fsdp.py: the same training under DDP and FSDP2 (2 ranks, gloo), dumping this rank's results.

    torchrun --standalone --nproc_per_node 2 tests/training/fsdp_worker.py DATA_ROOT RUN_ROOT OUT_DIR BATCH STEPS \
        VARIANT:K[,VARIANT:K...] CACHE_DIR

For each VARIANT:K and each strategy (ddp, fsdp): OUT_DIR/{strategy}_{VARIANT}_k{K}_rank{r}.pt with the whole trainable
tensors (gathered under FSDP), the logged losses and, with CRaFT, λ and L_ret per step. VARIANT `resume-*` instead runs
FSDP for STEPS steps in one go and as STEPS // 2 steps + a resume, and dumps both (`fsdp_resume_*`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vla-scripts"))  # `from finetune import train`
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from ddp_worker import worker_config

from finetune import train
from prismatic.training.distributed import init_distributed
from prismatic.training.fsdp import trainable_full_state

CRAFT = dict(use_craft=True, craft_retention_budget=1e-3, craft_dual_lr=0.05, craft_init_lambda=0.01)
VARIANTS = {
    "plain-lora": dict(use_lora=True),
    "plain-full": dict(use_lora=False),
    "plain-lora-val": dict(use_lora=True, use_val_set=True, val_freq=1),  # collective validation forwards
    "online-lora": dict(use_lora=True, craft_anchor_source="online", **CRAFT),
    "online-full": dict(use_lora=False, craft_anchor_source="online", **CRAFT),
    "offline-lora": dict(use_lora=True, craft_anchor_source="offline", **CRAFT),
    "offline-full": dict(use_lora=False, craft_anchor_source="offline", **CRAFT),
}
# knowledge insulation (test_ki_distributed.py): LoRA and full, and the w = 0 ablation
KI_VARIANTS = {
    "ki-lora": dict(use_lora=True, retention_method="ki"),
    "ki-full": dict(use_lora=False, retention_method="ki", ki_action_loss_weight=0.5),
    "ki0-full": dict(use_lora=False, retention_method="ki", ki_action_loss_weight=0.0),
}
# --craft_adam_second_moment action (test_fsdp.py): AdamW's v on the action part, the local shard under FSDP; a small
# fixed λ (a larger one turns summation-order noise into O(0.1) differences through near-zero action √v̂)
ACTV_VARIANTS = {"online-lora-actv": dict(use_lora=True, craft_anchor_source="online", use_craft=True,
                                          craft_retention_budget=1e-3, craft_enable_dual=False,
                                          craft_fixed_lambda=1e-4, craft_adam_second_moment="action")}
# --craft_retention_every (test_craft_retention_every.py): g_ret reused on every other step
CHEAP_VARIANTS = {"online-lora-every2": dict(use_lora=True, craft_anchor_source="online", craft_retention_every=2,
                                             **CRAFT)}
ALL_VARIANTS = {**VARIANTS, **KI_VARIANTS, **ACTV_VARIANTS, **CHEAP_VARIANTS}
LOGGED = ("VLA Train/Loss", "VLA Val/Loss", "CRaFT/Lambda", "CRaFT/Retention Loss", "KI/Token CE",
          "KI/Token Accuracy")


def logged(history: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([h[key] for h in history], dtype=torch.float64) for key in LOGGED if key in history[0]}


def run(cfg) -> dict:
    result = train(cfg)
    return {"params": trainable_full_state(result.policy), "metrics": logged(result.history)}


def main() -> None:
    data_root, run_root, out_dir = (Path(a) for a in sys.argv[1:4])
    batch_size, max_steps = int(sys.argv[4]), int(sys.argv[5])
    runs = [(spec.split(":")[0], int(spec.split(":")[1])) for spec in sys.argv[6].split(",")]
    cache_dir = Path(sys.argv[7])
    torch.set_num_threads(1)
    init_distributed()
    rank = torch.distributed.get_rank()
    for variant, k in runs:
        if variant.startswith("resume-"):
            flags = dict(ALL_VARIANTS[variant.removeprefix("resume-")], distributed_strategy="fsdp",
                         grad_accumulation_steps=k, craft_cache_dir=cache_dir if "offline" in variant else None)
            root = run_root / f"{variant}_k{k}"
            whole = run(worker_config(data_root, root / "whole", batch_size, max_steps, **flags))
            half = max_steps // 2
            train(worker_config(data_root, root / "split", batch_size, half, **flags))  # saves at step `half`
            chkpt = root / "split" / f"ddp--{half}_chkpt"
            resumed = run(worker_config(data_root, root / "split", batch_size, max_steps, config_file_path=chkpt,
                                        resume=True, resume_step=half, **flags))
            torch.save({"whole": whole, "resumed": resumed}, out_dir / f"fsdp_{variant}_k{k}_rank{rank}.pt")
            continue
        for strategy in ("ddp", "fsdp"):
            cfg = worker_config(data_root, run_root / f"{strategy}_{variant}_k{k}", batch_size, max_steps,
                                grad_accumulation_steps=k, distributed_strategy=strategy,
                                craft_cache_dir=cache_dir if "offline" in variant else None,
                                **ALL_VARIANTS[variant])
            torch.save(run(cfg), out_dir / f"{strategy}_{variant}_k{k}_rank{rank}.pt")
    torch.distributed.barrier()  # both ranks leave together (see tests/craft/dist_craft_fsdp.py)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
