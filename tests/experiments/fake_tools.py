"""Stand-in for `python <script>` in the experiment-script tests: fakes finetune.py, run_libero_eval.py and
build_craft_cache.py by writing the files the real tools write (run dir, final checkpoint with COMPLETE,
summary.json, cache manifest), with numbers derived from the run's seed so they are known to the test.

Environment: FAKE_LOG (append one JSON line per invocation: {"script", "args"}), FAKE_FAIL_ON (a run id, or an eval
dir containing it, whose command exits 3), FAKE_SUPPORTS (space-separated extra flags listed by `--help`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

BASE_FLAGS = ["--vlm_path", "--use_craft", "--craft_retention_budget", "--num_demos_per_task"]


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
            if craft:
                record.update({"CRaFT/Retention Loss": 0.05 + 0.001 * seed, "CRaFT/Lambda": 0.1 * seed,
                               "CRaFT/Conflict Ratio": 0.2 + 0.01 * seed})
            f.write(json.dumps(record) + "\n")
    chkpt = run_root / f"{run_id}--{max_steps}_chkpt"
    chkpt.mkdir(parents=True, exist_ok=True)
    (chkpt / "COMPLETE").write_text("{}")


def evaluate(flags: dict[str, str]) -> None:
    out = Path(flags["local_log_dir"])
    out.mkdir(parents=True, exist_ok=True)
    name = Path(flags["pretrained_checkpoint"]).name
    successes = fake_success(name)
    summary = {"task_suite_name": flags["task_suite_name"], "num_episodes": 10, "num_successes": successes,
               "success_rate": successes / 10, "per_task": {}}
    (out / "summary.json").write_text(json.dumps(summary))


def build_cache(flags: dict[str, str]) -> None:
    out = Path(flags["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(flags))


def main(argv: list[str]) -> int:
    script, args = argv[0], argv[1:]
    if args == ["--help"]:
        extra = os.environ.get("FAKE_SUPPORTS", "").split()
        print("usage: finetune.py " + " ".join(f"[{flag} X]" for flag in BASE_FLAGS + extra))
        return 0
    if os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({"script": script, "args": args}) + "\n")
    flags = parse_flags(args)
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
    else:
        raise SystemExit(f"fake_tools: unknown script {script}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
