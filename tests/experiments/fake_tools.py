"""Stand-in for `python <script>` in the orchestration tests of the experiment grids: fakes finetune.py,
run_libero_eval.py, build_craft_cache.py and measure_drift.py by writing the files the real tools write (run dir,
final checkpoint with COMPLETE, summary.json naming its checkpoint, cache manifest, drift.json), with numbers derived
from the run's seed so they are known to the test. (The SMOKE tests run the real tools.)

It rejects what the real tools reject at the command line: every flag must be a field of the tool's real config
dataclass (read from the real source file with `ast`, so no heavy import), booleans must be True/False and integer
fields integers; otherwise it exits 2 like draccus.

Environment: FAKE_LOG (append one JSON line per invocation: {"script", "args"}), FAKE_FAIL_ON (a run id, or an eval
dir containing it, whose command exits 3).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from prismatic.training.checkpoint_identity import checkpoint_identity  # noqa: E402

CONFIGS = {"finetune.py": ("prismatic/training/finetune_config.py", "FinetuneConfig"),
           "run_libero_eval.py": ("LIBERO/run_libero_eval.py", "EvalConfig"),
           "build_craft_cache.py": ("vla-scripts/build_craft_cache.py", "BuildCacheConfig"),
           "measure_drift.py": ("vla-scripts/measure_drift.py", "DriftConfig")}


def config_fields(script: str) -> dict[str, str]:
    """{field: annotation source} of the real config dataclass of a tool."""
    path, cls = CONFIGS[Path(script).name]
    tree = ast.parse((REPO / path).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return {item.target.id: ast.unparse(item.annotation) for item in node.body
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}


def reject(message: str) -> None:
    print(f"fake_tools: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_flags(script: str, flags: dict[str, str]) -> None:
    fields = config_fields(script)
    for name, value in flags.items():
        if name not in fields:
            reject(f"{Path(script).name} has no flag --{name} (not a field of its config)")
        kind = fields[name].replace(" | None", "")
        if kind == "bool" and value not in ("True", "False", "true", "false"):
            reject(f"--{name} expects a bool, got {value!r}")
        if kind == "int" and not value.lstrip("-").isdigit():
            reject(f"--{name} expects an int, got {value!r}")


def parse_flags(args: list[str]) -> dict[str, str]:
    flags = {}
    it = iter(args)
    for token in it:
        if not token.startswith("--"):
            raise SystemExit(f"fake_tools: unexpected positional argument {token!r}")
        flags[token[2:]] = next(it)
    return flags


def typed(value: str):
    if value in ("True", "False"):
        return value == "True"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def fake_success(name: str) -> int:
    """Deterministic number of successes out of 10 for a run (from a hash of its name)."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 11


def finetune(flags: dict[str, str]) -> None:
    run_root = Path(flags["run_root_dir"])
    run_id = flags["run_id"]
    max_steps = int(flags["max_steps"])
    config = {k: typed(v) for k, v in flags.items()}
    config.setdefault("num_demos_per_task", None)
    run_dir = run_root / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    seed = int(flags["seed"])
    craft = flags.get("use_craft") == "True"
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in range(0, max_steps + 1, max(max_steps // 4, 1)):
            record = {"step": step, "VLA Train/Loss": 1.0 / (step + 1) + 0.01 * seed}
            monitor = "CRaFT/Retention Loss (monitor)" if craft else "CRaFT/Retention Loss"
            if flags.get("retention_monitor") == "True":
                record[monitor] = 0.07 + 0.001 * seed
            if craft:
                record.update({"CRaFT/Retention Loss": 0.05 + 0.001 * seed, "CRaFT/Lambda": 0.1 * seed,
                               "CRaFT/Conflict Ratio": 0.2 + 0.01 * seed, "CRaFT/Conflict Ratio Null": 0.5})
            f.write(json.dumps(record) + "\n")
    # checkpoints as the real loop writes them: every save_freq steps and the final step, older ones pruned when only
    # the latest is kept; weights that differ per training (FAKE_WEIGHTS_SALT: a retraining writes other weights)
    save_freq = int(flags.get("save_freq", max_steps))
    start = int(flags.get("resume_step", 0)) if flags.get("resume") == "True" else 0
    steps = sorted({s for s in range(save_freq, max_steps + 1, save_freq) if s > start} | {max_steps})
    for step in steps:
        chkpt = run_root / f"{run_id}--{step}_chkpt"
        chkpt.mkdir(parents=True, exist_ok=True)
        salt = os.environ.get("FAKE_WEIGHTS_SALT", "")
        (chkpt / f"action_head--{step}_checkpoint.pt").write_bytes(f"{run_id} {step} {salt}".encode())
        (chkpt / "COMPLETE").write_text("{}")
        if flags.get("save_latest_checkpoint_only") == "True":
            for old in run_root.glob(f"{run_id}--*_chkpt"):
                if old != chkpt:
                    shutil.rmtree(old)


def evaluate(flags: dict[str, str]) -> None:
    if not Path(flags["pretrained_checkpoint"]).is_dir():
        reject(f"--pretrained_checkpoint '{flags['pretrained_checkpoint']}' does not exist")
    out = Path(flags["local_log_dir"])
    out.mkdir(parents=True, exist_ok=True)
    name = Path(flags["pretrained_checkpoint"]).name
    successes = fake_success(name)
    # the real tool's identity of the evaluated checkpoint (path, step, weights_sha256)
    summary = {"task_suite_name": flags["task_suite_name"], "num_episodes": 10, "num_successes": successes,
               "success_rate": successes / 10, "per_task": {}, "pretrained_checkpoint": flags["pretrained_checkpoint"],
               "checkpoint": checkpoint_identity(flags["pretrained_checkpoint"])}
    (out / "summary.json").write_text(json.dumps(summary))


def build_cache(flags: dict[str, str]) -> None:
    out = Path(flags["cache_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(flags))


def measure_drift(flags: dict[str, str]) -> None:
    out = Path(flags["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    value = fake_success(Path(flags["finetuned_path"]).name) / 10
    if not Path(flags["finetuned_path"]).is_dir():
        reject(f"--finetuned_path '{flags['finetuned_path']}' does not exist")
    report = {"config": flags, "finetuned_checkpoint": checkpoint_identity(flags["finetuned_path"]),
              "craft_default_anchor": {"raw_layer": 0, "aq_layer": 0, "L_ret_concat": value},
              "groups": {"aq": {"cka": [1 - value], "probe_accuracy_finetuned": [0.5]}}}
    (out / "drift.json").write_text(json.dumps(report))


def main(argv: list[str]) -> int:
    script, args = argv[0], argv[1:]
    if os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({"script": script, "args": args}) + "\n")
    flags = parse_flags(args)
    check_flags(script, flags)
    print(f"fake_tools: {Path(script).name} chatter (a simulator / wandb line)")  # belongs in the per-run log
    fail_on = os.environ.get("FAKE_FAIL_ON")
    if fail_on and (flags.get("run_id") == fail_on or fail_on in flags.get("local_log_dir", "")):
        print(f"fake failure of {fail_on}", file=sys.stderr)
        return 3
    if script.endswith("finetune.py"):
        finetune(flags)
    elif script.endswith("run_libero_eval.py"):
        evaluate(flags)
    elif script.endswith("build_craft_cache.py"):
        build_cache(flags)
    elif script.endswith("measure_drift.py"):
        measure_drift(flags)
    else:
        raise SystemExit(f"fake_tools: unknown script {script}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
