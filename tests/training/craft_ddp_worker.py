"""torchrun worker of test_craft_distributed.py: CRaFT training of the tiny preset, dumping this rank's results.

    torchrun --standalone --nproc_per_node 2 tests/training/craft_ddp_worker.py DATA_ROOT RUN_ROOT OUT_DIR \
        BATCH STEPS VARIANT:K[,VARIANT:K...] [CACHE_DIR]

One CRaFT run per VARIANT:K (variants in `VARIANTS`: LoRA + online anchors, full fine-tuning + offline cache; K the
accumulation steps); writes OUT_DIR/craft_{VARIANT}_k{K}_rank{r}.pt with the trainable tensors, the parameters after
every step and the logged λ / L_ret / conflict-ratio sequences of this rank (every rank computes them).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vla-scripts"))  # `from finetune import train`
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from ddp_worker import worker_config

import prismatic.training.policy_setup as ps
from finetune import TrainHooks, train
from prismatic.training.distributed import init_distributed
from prismatic.training.policy_setup import trainable_state

CRAFT_FLAGS = dict(use_craft=True, craft_retention_budget=1e-3, craft_dual_lr=0.05, craft_init_lambda=0.01)
VARIANTS = {"lora": dict(use_lora=True, craft_anchor_source="online"),
            "full-offline": dict(use_lora=False, craft_anchor_source="offline"),
            # AdamW's v on the rank-averaged action part (--craft_adam_second_moment action). A small fixed λ: a larger
            # one divides λ g_ret by a near-zero action √v̂ on some coordinates, which turns summation-order noise into
            # O(0.1) parameter differences (docs/CRAFT.md "Dual modes", the AdamW remedy)
            "lora-actv": dict(use_lora=True, craft_anchor_source="online", craft_adam_second_moment="action",
                              craft_enable_dual=False, craft_fixed_lambda=1e-4),
            "lora-every2": dict(use_lora=True, craft_anchor_source="online", craft_retention_every=2),
            # --craft_reuse coefficient: the steps in between are one backward through DDP's own all-reduce
            "lora-every2-coef": dict(use_lora=True, craft_anchor_source="online", craft_retention_every=2,
                                     craft_reuse="coefficient"),
            "full-offline-every2-coef": dict(use_lora=False, craft_anchor_source="offline", craft_retention_every=2,
                                             craft_reuse="coefficient")}
KEYS = ("CRaFT/Lambda", "CRaFT/Retention Loss", "CRaFT/Conflict Ratio", "CRaFT/Grad Dot")


def main() -> None:
    data_root, run_root, out_dir = (Path(a) for a in sys.argv[1:4])
    batch_size, max_steps = int(sys.argv[4]), int(sys.argv[5])
    runs = [(spec.split(":")[0], int(spec.split(":")[1])) for spec in sys.argv[6].split(",")]
    cache_dir = Path(sys.argv[7]) if len(sys.argv) > 7 else None
    torch.set_num_threads(1)
    init_distributed()
    rank = torch.distributed.get_rank()
    for variant, k in runs:
        built, per_step = [], []  # the policy train() builds; its parameters after every step

        def capture(cfg_, env_, built=built, original=ps.build_policy):
            built.append(original(cfg_, env_))
            return built[-1]

        def snapshot(step, metrics, built=built, per_step=per_step):
            per_step.append(torch.cat([p.detach().flatten() for p in built[0].parameters() if p.requires_grad]))

        cfg = worker_config(data_root, run_root / f"{variant}_k{k}", batch_size, max_steps, grad_accumulation_steps=k,
                            run_id="craft-ddp", craft_cache_dir=cache_dir, **CRAFT_FLAGS, **VARIANTS[variant])
        original = ps.build_policy
        ps.build_policy = capture  # the loop calls policy_setup.build_policy: keep a handle on the live policy
        try:
            result = train(cfg, TrainHooks(on_step_end=snapshot))
        finally:
            ps.build_policy = original
        # a key a step does not log (the gradient statistics of a --craft_reuse coefficient step in between): nan
        metrics = {key: torch.tensor([h.get(key, float("nan")) for h in result.history], dtype=torch.float64)
                   for key in KEYS}
        torch.save({"params": trainable_state(result.policy), "metrics": metrics, "per_step": torch.stack(per_step)},
                   out_dir / f"craft_{variant}_k{k}_rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
