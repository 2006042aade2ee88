"""The cheaper CRaFT step (issue 26, item 6) as flags a study script can import, with its measured cost.

`--craft_retention_every k` computes g_ret (and, with online anchors, θ0's forward) on steps t % k == 0 and reuses it
in between (docs/CRAFT.md, "Cheaper step"). The exact step (k = 1) stays the default.

Work ratios: FLOPs of k optimizer steps (1 refresh + k - 1 reusing g_ret) / k plain steps, from
`vla-scripts/bench_craft.py --model_preset real --random_init True --batch_size 1 --lora_rank 8
--num_images_in_input 1 --steps 1 --warmup 0 --threads 2 --retention_every 4` (2026-12-07, AMD EPYC 2 cores, torch
2.14.1, CPU fp32): plain 1473.78 GFLOP, exact offline 2184.15, exact online 2860.77, a step reusing g_ret 1473.78.

Retention is NOT kept close to the exact rule by this variant on `make demo`'s setting (online anchors, 60 steps,
ε 0.02, seed 7; docs/CRAFT.md "Cheaper step"): read RETENTION_CHECK before using it in a study.

`--craft_reuse coefficient` (COEFFICIENT_VARIANT_FLAGS) keeps the gradients fresh between refreshes and reuses only
the conflict coefficient c of the last refresh: one backward of L_act + (λ - c_last) L_ret. With cache anchors
(`--craft_anchor_source offline --craft_cache_dir ...`; the demo's: vla-scripts/demo_cache.py) a step in between
costs a plain step; COEFFICIENT_RETENTION_CHECK holds its 3-seed check on the demo's setting.
"""

from __future__ import annotations

# the smallest k with a work ratio <= 1.15 per anchor source (real preset, 1 camera, LoRA rank 8)
CHEAP_VARIANT_FLAGS_BY_SOURCE: dict[str, dict[str, int]] = {
    "offline": {"craft_retention_every": 4},
    "online": {"craft_retention_every": 7},
}
# one setting under 1.15x for both sources (online, the default source, needs k >= 7)
CHEAP_VARIANT_FLAGS: dict[str, int] = {"craft_retention_every": 8}

# measured work ratio per anchor source and k (k = 1: the exact step)
WORK_RATIOS: dict[str, dict[int, float]] = {
    "offline": {1: 1.482, 2: 1.241, 3: 1.161, 4: 1.121, 7: 1.069, 8: 1.060},
    "online": {1: 1.941, 2: 1.471, 3: 1.314, 4: 1.235, 7: 1.134, 8: 1.118},
}

# make demo's CRaFT row (online anchors, seed 7, 60 steps): mean L_ret of the last 10% / ε, share of steps above ε
# after the first 10%, mean training L_act of the last 10%, max λ (keys: last10_lret_eps = last-10% L_ret / ε)
RETENTION_CHECK: dict[str, dict[str, float]] = {
    "gradient k=1": {"last10_lret_eps": 0.015, "share_above_eps": 0.074, "last10_lact": 0.0725, "max_lambda": 4.27},
    "gradient k=2": {"last10_lret_eps": 0.122, "share_above_eps": 0.444, "last10_lact": 0.0738, "max_lambda": 12.0},
    "gradient k=4": {"last10_lret_eps": 1.626, "share_above_eps": 1.000, "last10_lact": 0.0734, "max_lambda": 20.0},
    "gradient k=8": {"last10_lret_eps": 16.34, "share_above_eps": 0.963, "last10_lact": 0.0723, "max_lambda": 31.0},
    "nupi k=1": {"last10_lret_eps": 0.612, "share_above_eps": 0.093, "last10_lact": 0.0710, "max_lambda": 1.5},
    "nupi k=4": {"last10_lret_eps": 1.147, "share_above_eps": 0.926, "last10_lact": 0.0742, "max_lambda": 1.5},
}

# --craft_reuse coefficient: the smallest k with a work ratio <= 1.15 (cache anchors; online anchors run θ0's forward
# on every step and stay above 1.15 for every k). Use with --craft_anchor_source offline.
COEFFICIENT_VARIANT_FLAGS: dict[str, int | str] = {"craft_retention_every": 4, "craft_reuse": "coefficient"}

# measured work ratio of --craft_reuse coefficient per anchor source and k (1 refresh + k - 1 steps in between)
COEFFICIENT_WORK_RATIOS: dict[str, dict[int, float]] = {
    # a step in between: offline 1473.78 GFLOP (= the plain step), online 2150.40 (+ θ0's forward); refresh = exact
    "offline": {1: 1.482, 2: 1.241, 3: 1.161, 4: 1.121, 7: 1.069, 8: 1.060},
    "online": {1: 1.941, 2: 1.700, 3: 1.620, 4: 1.580, 7: 1.528, 8: 1.519},
}

# make demo's CRaFT row with CACHE anchors (vla-scripts/demo_cache.py), paper's dual rule, 60 steps, ε 0.02; per
# variant the values of seeds 7, 8, 9: last-10% L_ret / ε, share of steps above ε after the first 10%, held-out
# action L1 on the target task set (raw action units, demo.heldout_l1), max λ
COEFFICIENT_RETENTION_CHECK: dict[str, dict[str, tuple[float, float, float]]] = {
    "exact k=1": {"last10_lret_eps": (0.0146, 0.0445, 0.0087), "share_above_eps": (0.074, 0.056, 0.130),
                  "heldout_l1": (0.0398, 0.0376, 0.0384), "max_lambda": (4.27, 3.18, 6.02)},
    "coefficient k=2": {"last10_lret_eps": (0.0261, 0.0119, 0.282), "share_above_eps": (0.111, 0.093, 0.037),
                        "heldout_l1": (0.0373, 0.0383, 0.0407), "max_lambda": (3.39, 5.98, 1.68)},
    "coefficient k=4": {"last10_lret_eps": (0.222, 0.0119, 0.347), "share_above_eps": (0.093, 0.093, 0.037),
                        "heldout_l1": (0.0395, 0.0383, 0.0375), "max_lambda": (1.86, 5.98, 1.59)},
    "coefficient k=8": {"last10_lret_eps": (0.228, 0.0119, 0.312), "share_above_eps": (0.111, 0.093, 0.037),
                        "heldout_l1": (0.0405, 0.0383, 0.0393), "max_lambda": (1.74, 5.98, 1.59)},
    "gradient k=4": {"last10_lret_eps": (1.576, 1.662, 1.617), "share_above_eps": (0.981, 1.000, 1.000),
                     "heldout_l1": (0.0395, 0.0368, 0.0386), "max_lambda": (66.0, 54.4, 77.9)},
}
