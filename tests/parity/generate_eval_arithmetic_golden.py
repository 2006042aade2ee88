"""Golden numbers of upstream VLA-Adapter's evaluation arithmetic, computed by upstream's own functions.

Run against a checkout of upstream at the pinned commit (838a36da195daf3e8b8a53520c8c7ce86231b6d9), outside this
repository; the functions involved are plain numpy, so any Python with numpy runs them (no torch/TF import):

    git clone https://github.com/OpenHelix-Team/VLA-Adapter /tmp/VLA-Adapter   # or any snapshot of that commit
    git -C /tmp/VLA-Adapter checkout 838a36da195daf3e8b8a53520c8c7ce86231b6d9
    python tests/parity/generate_eval_arithmetic_golden.py --upstream_dir /tmp/VLA-Adapter \
        --output tests/libero/upstream_eval_arithmetic.json

It loads, from upstream's files and without copying them, `normalize_proprio` (experiments/robot/openvla_utils.py),
`normalize_gripper_action` and `invert_gripper_action` (experiments/robot/robot_utils.py) and the model's
`_unnormalize_actions` (prismatic/extern/hf/modeling_prismatic.py), with LIBERO's constants from
prismatic/vla/constants.py (BOUNDS_Q99), runs them on edge cases (masked dims outside [-1, 1], a constant dim, the
gripper at exactly 0.5) and writes inputs and outputs as JSON. tests/libero/test_libero_processing.py reads it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

PINNED_COMMIT = "838a36da195daf3e8b8a53520c8c7ce86231b6d9"


def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(path.read_text(), node)
    _fail(f"{path} defines no function {name!r}: is --upstream_dir a VLA-Adapter checkout at {PINNED_COMMIT[:7]}?")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load_upstream(upstream: Path) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("upstream_constants", upstream / "prismatic/vla/constants.py")
    constants = importlib.util.module_from_spec(spec)
    saved_argv, sys.argv = sys.argv, ["run_libero_eval.py"]  # upstream picks its constants from the command line
    try:
        spec.loader.exec_module(constants)
    finally:
        sys.argv = saved_argv
    namespace: dict[str, Any] = {"np": np, "Dict": dict, "Any": Any,
                                 "NormalizationType": constants.NormalizationType,
                                 "ACTION_PROPRIO_NORMALIZATION_TYPE": constants.ACTION_PROPRIO_NORMALIZATION_TYPE}
    for file, name in (("experiments/robot/openvla_utils.py", "normalize_proprio"),
                       ("experiments/robot/robot_utils.py", "normalize_gripper_action"),
                       ("experiments/robot/robot_utils.py", "invert_gripper_action"),
                       ("prismatic/extern/hf/modeling_prismatic.py", "_unnormalize_actions")):
        exec(compile(_function_source(upstream / file, name), str(upstream / file), "exec"), namespace)
    namespace["normalization_type"] = str(constants.ACTION_PROPRIO_NORMALIZATION_TYPE.value)
    return namespace


def _cases() -> dict[str, Any]:
    proprio_stats = {"q01": [-0.5, -0.2, 0.0, -1.0, 0.1, 0.3, -0.04, 0.0],
                     "q99": [0.5, 0.4, 1.2, 1.0, 0.1, 0.9, 0.04, 0.05],
                     "min": [-0.6, -0.3, -0.1, -1.1, 0.1, 0.2, -0.05, -0.01],
                     "max": [0.6, 0.5, 1.3, 1.1, 0.1, 1.0, 0.05, 0.06],  # dim 4: min == max, a constant dim
                     "mask": [True, True, True, True, True, True, False, False]}
    states = [[0.0, 0.1, 0.6, 0.0, 0.1, 0.6, 1.7, -2.5],   # masked dims outside [-1, 1]; dim 4 at its constant
              [0.7, -0.4, 1.5, 2.0, 0.2, 0.3, 0.03, 0.02],  # bounds exceeded; dim 4 off its constant
              [-0.5, 0.4, 0.0, -1.0, 0.0999, 0.9, -0.9, 0.5]]
    action_stats = {"q01": [-0.9, -0.8, -0.7, -0.1, -0.2, -0.3, 0.0],
                    "q99": [0.9, 0.85, 0.95, 0.1, 0.25, 0.3, 1.0],
                    "min": [-1.0, -0.9, -0.8, -0.2, -0.3, -0.4, 0.0],
                    "max": [1.0, 0.9, 1.0, 0.2, 0.3, 0.4, 1.0],
                    "mask": [True, True, True, True, True, True, False]}
    normalized_actions = np.linspace(-1.2, 1.2, 8 * 7).reshape(8, 7).round(6).tolist()
    gripper = [1.0, 0.9, 0.51, 0.5, 0.49, 0.1, 0.0, -0.3, 1.4, 0.5000001, 0.4999999]
    return {"proprio_stats": proprio_stats, "states": states, "action_stats": action_stats,
            "normalized_actions": normalized_actions, "gripper": gripper}


class _Model:
    """The one attribute `_unnormalize_actions` reads from its model."""

    def __init__(self, stats: dict) -> None:
        self.stats = stats

    def get_action_stats(self, unnorm_key: str | None = None) -> dict:
        return self.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream_dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if not (args.upstream_dir / "experiments/robot/openvla_utils.py").is_file():
        _fail(f"{args.upstream_dir} is not a VLA-Adapter checkout (no experiments/robot/openvla_utils.py): pass the "
              "folder of a checkout of upstream at the pinned commit")
    up = _load_upstream(args.upstream_dir)
    cases = _cases()
    proprio = [up["normalize_proprio"](np.array(s), {k: np.array(v) for k, v in cases["proprio_stats"].items()})
               for s in cases["states"]]
    chunk = np.zeros((len(cases["gripper"]), 7))
    chunk[:, -1] = cases["gripper"]
    gripper = up["invert_gripper_action"](up["normalize_gripper_action"](chunk, binarize=True))[:, -1]
    actions = up["_unnormalize_actions"](_Model(cases["action_stats"]), np.array(cases["normalized_actions"]))
    golden = {"upstream_commit": PINNED_COMMIT, "normalization_type": up["normalization_type"],
              "numpy": np.__version__, "python": sys.version.split()[0], "inputs": cases,
              "normalize_proprio": [p.tolist() for p in proprio],
              "gripper_env": [float(g) for g in gripper],
              "gripper_env_signbit": [bool(np.signbit(g)) for g in gripper],
              "unnormalize_actions": actions.tolist()}
    args.output.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {args.output} (upstream {PINNED_COMMIT[:7]}, numpy {np.__version__})")


if __name__ == "__main__":
    main()
