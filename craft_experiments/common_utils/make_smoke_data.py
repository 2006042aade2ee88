"""Write what SMOKE=1 runs of the experiment grids need: tiny LIBERO-schema datasets and a tiny θ0 policy folder.

    python craft_experiments/common_utils/make_smoke_data.py --output_dir runs/smoke_data
    SMOKE=1 SMOKE_DATA_ROOT=runs/smoke_data/rlds SMOKE_VLM_PATH=runs/smoke_data/tiny_vla \
        bash craft_experiments/01_main_results/run_table1_experiments.sh

`{output_dir}/rlds/<suite>_no_noops/1.0.0/` for the four LIBERO suites (synthetic scenes, 2 tasks x 2 episodes x 12
steps each: enough for 1- and 2-shot few-shot runs) and `{output_dir}/tiny_vla/` (the tiny-preset policy, fixed by
--seed: the θ0 of every SMOKE run, of the offline-anchor cache and of measure_drift.py). Existing folders are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


def make_smoke_data(output_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """(data root, θ0 folder); each is written only if it is not there yet."""
    from prismatic.data.synthetic_libero import make_synthetic_libero_dataset

    data_root, theta0 = Path(output_dir) / "rlds", Path(output_dir) / "tiny_vla"
    for i, suite in enumerate(SUITES):
        if not (data_root / f"{suite}_no_noops").is_dir():
            make_synthetic_libero_dataset(data_root, f"{suite}_no_noops", num_tasks=2, episodes_per_task=2, steps=12,
                                          seed=seed + i)
    if not (theta0 / "policy_config.json").is_file():
        from prismatic.training.policy_setup import build_base_policy

        policy = build_base_policy({"vlm_path": None, "config_file_path": None, "model_preset": "tiny", "seed": seed,
                                    "use_pro_version": True, "use_proprio": True, "num_images_in_input": 2})
        policy.norm_stats = {}
        policy.save_pretrained(theta0, step=0)
    return data_root, theta0


def main(argv: list[str] | None = None) -> int:
    from prismatic.cli_errors import OneLineArgumentParser, UserError

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    blocked = next((p for p in (args.output_dir, *args.output_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(f"--output_dir '{args.output_dir}': '{blocked}' is a file", "pass a folder path")
    data_root, theta0 = make_smoke_data(args.output_dir, args.seed)
    print(f"SMOKE_DATA_ROOT={data_root} SMOKE_VLM_PATH={theta0}")
    return 0


if __name__ == "__main__":
    from prismatic.cli_errors import cli_entry  # one-line errors, exit 2 (`--debug True`: traceback)

    sys.exit(cli_entry("make_smoke_data")(main)())
