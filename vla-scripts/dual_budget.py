"""Does a dual rule spend its retention budget? (issue 26, item 2) CRaFT on `make demo`'s setting, over seeds.

Same embedded data and theta0 as `vla-scripts/demo.py` (built with its stages, demo seed), then CRaFT fine-tuning on
the new tasks for each rule and each fine-tuning seed (`--seed` of the run: LoRA init, data order). Per run, from the
logged training L_ret (the rank-averaged L_ret the dual sees):
  last10   mean L_ret of the last 10% of steps / epsilon         (goal: in [0.5, 1])
  above    share of steps with L_ret > epsilon after the first 10% (goal: <= 0.10)
Rules: `gradient` (the paper's rule, the demo's eta), `nupi` (the flags below; docs/CRAFT.md "Dual modes"),
`gradient-actv` (the paper's rule with --craft_adam_second_moment action: diverges here), `new` (NEW_RULE_FLAGS of
prismatic/training/dual_presets.py: the chosen rule, a warm-started PID) and `plain` (no CRaFT; L_ret from the
retention monitor, for reference). Every run also records AdamW's final mean sqrt(v_hat) of the LLM LoRA
(`--log_update_norms`, which does not change training). Runs are resumable (a finished run is reused). Results:
`dual_budget.json` and a printed table.

    python vla-scripts/dual_budget.py --output_dir dual_budget_runs --seeds 7,8,9 --rules gradient,nupi,new
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "vla-scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import demo  # noqa: E402  (the demo's data, theta0 and CRaFT row are reused as they are)

from prismatic.cli_errors import UserError, cli_entry, parse_config  # noqa: E402
from prismatic.training.dual_presets import NEW_RULE_FLAGS  # noqa: E402
from prismatic.training.metrics_log import read_metrics  # noqa: E402
from prismatic.training.update_norms import ADAM_KEY  # noqa: E402

RULES = ("gradient", "nupi", "gradient-actv", "new", "plain")


@dataclass
class DualBudgetConfig:
    # fmt: off
    output_dir: Path = Path("dual_budget_runs")
    seeds: str = "7,8,9"                   # fine-tuning seeds (comma-separated); data and theta0 use the demo's seed
    rules: str = "gradient,nupi,new"       # any of gradient, nupi, gradient-actv, new, plain
    threads: int = 1                       # torch CPU threads per run
    # nupi (docs/CRAFT.md "Dual modes": why these values)
    nupi_ki: float = 0.1                   # --craft_dual_lr (integral gain) on the log-ratio error
    nupi_kp: float = 0.5                   # --craft_dual_kp
    nupi_nu: float = 0.9                   # --craft_dual_nu
    nupi_setpoint: float = 0.8             # --craft_dual_setpoint
    nupi_max_lambda: float | None = 1.5    # --craft_max_lambda
    # fmt: on


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must name at least one seed, each once, got '{text}'")
    return seeds


def parse_rules(text: str) -> list[str]:
    rules = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if not rules or bad:
        raise UserError(f"--rules must be a comma-separated subset of {RULES}, got '{text}'")
    return rules


def budget_metrics(l_ret: np.ndarray, epsilon: float) -> dict[str, float]:
    """The issue's two numbers from a run's per-step L_ret: mean of the last 10% of steps / epsilon, and the share of
    steps above epsilon after the first 10% (10% = max(1, n // 10) steps)."""
    n = len(l_ret)
    if n == 0:
        raise ValueError("no L_ret logged")
    k = max(1, n // 10)
    return {"last10_over_eps": float(l_ret[-k:].mean() / epsilon),
            "share_above_eps": float((l_ret[k:] > epsilon).mean())}


def rule_overrides(cfg: DualBudgetConfig, rule: str) -> dict:
    if rule in ("gradient", "plain"):
        return {}
    if rule == "gradient-actv":
        return {"craft_adam_second_moment": "action"}
    if rule == "new":
        return dict(NEW_RULE_FLAGS)
    return dict(craft_dual_mode="nupi", craft_dual_log_error=True, craft_dual_lr=cfg.nupi_ki,
                craft_dual_kp=cfg.nupi_kp, craft_dual_nu=cfg.nupi_nu, craft_dual_setpoint=cfg.nupi_setpoint,
                craft_max_lambda=cfg.nupi_max_lambda)


def main(cfg: DualBudgetConfig) -> list[dict]:
    seeds, rules = parse_seeds(cfg.seeds), parse_rules(cfg.rules)
    if cfg.threads < 1:
        raise UserError(f"--threads must be >= 1, got {cfg.threads}")
    torch.set_num_threads(cfg.threads)
    demo_cfg = demo.DemoConfig(output_dir=Path(cfg.output_dir))
    out = Path(cfg.output_dir).resolve()
    data_root, run_root = out / "data", out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    demo.build_data(demo_cfg, data_root)
    theta0, _ = demo.run_training(demo.theta0_config(demo_cfg, data_root, run_root))
    configs = demo.finetune_configs(demo_cfg, data_root, run_root, theta0)
    eps = configs["craft"].craft_retention_budget
    rows = []
    for i, (rule, seed) in enumerate([(r, s) for r in rules for s in seeds]):
        started = time.perf_counter()
        base = configs["plain"] if rule == "plain" else configs["craft"]
        rows.append(run_rule(base, run_root, rule, rule_overrides(cfg, rule), seed, eps))
        print(f"[dual_budget] {i + 1}/{len(rules) * len(seeds)} {rule} seed {seed}: "
              f"last10 {rows[-1]['last10_over_eps']:.3f} eps, above {rows[-1]['share_above_eps']:.3f}, "
              f"sqrt(v) llm_lora {rows[-1]['adam_sqrt_v_llm_lora']:.2e} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    record = {"epsilon": eps, "config": {k: str(v) for k, v in vars(cfg).items()}, "rows": rows,
              "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                          "torch": torch.__version__, "numpy": np.__version__}}
    (out / "dual_budget.json").write_text(json.dumps(record, indent=2) + "\n")
    print("| rule | seed | last-10% L_ret / eps | share > eps after 10% | max lambda | final lambda | "
          "sqrt(v) llm_lora |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        budget = (f"{r['last10_over_eps']:.3f} | {r['share_above_eps']:.3f}" if r["diverged"] is None
                  else f"diverged at step {r['steps'] + 1} | -")
        print(f"| {r['rule']} | {r['seed']} | {budget} | {r['max_lambda']:.2f} | {r['final_lambda']:.2f} | "
              f"{r['adam_sqrt_v_llm_lora']:.2e} |")
    return rows


def run_rule(base, run_root: Path, rule: str, overrides: dict, seed: int, epsilon: float) -> dict:
    """One fine-tuning run of `base` with `overrides` and `seed` (reused if finished) -> its row."""
    # the run id names the rule's flags: a finished run is reused only for the same settings
    tag = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    ft = replace(base, run_id=f"dual-{rule}-{tag}-s{seed}", seed=seed, log_update_norms=True, **overrides)
    diverged = None
    try:
        demo.run_training(ft)
    except FloatingPointError as err:  # a run that diverges (CRaFT refuses non-finite numbers) is a result too
        diverged = str(err).splitlines()[0]
    metrics = read_metrics(run_root / ft.run_id / "metrics.jsonl")
    l_ret = np.asarray([m[demo.RET_KEY] for m in metrics if demo.RET_KEY in m], dtype=np.float64)
    lam = np.asarray([m.get(demo.LAMBDA_KEY, 0.0) for m in metrics if demo.RET_KEY in m], dtype=np.float64)
    sqrt_v = [m[ADAM_KEY.format("llm_lora")] for m in metrics if ADAM_KEY.format("llm_lora") in m]
    row = {"rule": rule, "seed": seed, "steps": len(l_ret), **budget_metrics(l_ret, epsilon),
           "max_lambda": float(lam.max()), "final_lambda": float(lam[-1]), "adam_sqrt_v_llm_lora": sqrt_v[-1],
           "overrides": overrides, "diverged": diverged}
    if diverged is not None:  # the goal's numbers need the whole run
        row.update(last10_over_eps=float("nan"), share_above_eps=float("nan"))
    return row


@cli_entry("dual_budget")
def cli_main(argv: list[str] | None = None) -> list[dict]:
    return main(parse_config(DualBudgetConfig, argv))


if __name__ == "__main__":
    cli_main()
