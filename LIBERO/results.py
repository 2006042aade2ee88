"""Evaluation output: `episodes.jsonl` (one record per finished episode, appended as it ends) and `summary.json`.

An interrupted evaluation resumes from `episodes.jsonl`: finished episodes are skipped. `eval_config.json`
pins the settings that change results; resuming into a directory written with different ones is refused.
A last line cut by the interruption (no trailing newline / invalid JSON) is dropped; any other bad line is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

EPISODES_FILE = "episodes.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "eval_config.json"
RECORD_KEYS = ("suite", "task_id", "task_name", "instruction", "trial", "success", "steps", "seconds")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class ResultsStore:
    def __init__(self, out_dir: str | Path, identity: Mapping[str, object]):
        """`identity`: the settings an eval directory is tied to (checkpoint, suite, seed, budgets, ...)."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.episodes_path = self.out_dir / EPISODES_FILE
        config_path = self.out_dir / CONFIG_FILE
        identity = json.loads(json.dumps(dict(identity)))  # normalise (tuples -> lists, paths -> str)
        if config_path.is_file():
            previous = json.loads(config_path.read_text())
            changed = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
            if changed:
                raise ValueError(f"{self.out_dir} holds an evaluation run with different settings "
                                 f"(key: (before, now)) {changed}; use another --local_log_dir")
        else:
            write_json_atomic(config_path, identity)
        self.records: dict[tuple[str, int, int], dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.episodes_path.is_file():
            return
        raw = self.episodes_path.read_bytes()
        cut = raw.rfind(b"\n") + 1  # a record is complete once its newline is written
        for i, line in enumerate(raw[:cut].split(b"\n")[:-1]):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.episodes_path} line {i + 1} is not valid JSON ({exc}): "
                                 f"{line[:200]!r}") from exc
            missing = [k for k in RECORD_KEYS if k not in record]
            if missing:
                raise ValueError(f"{self.episodes_path} line {i + 1} lacks keys {missing}")
            self.records[(record["suite"], int(record["task_id"]), int(record["trial"]))] = record
        if cut < len(raw):  # the last line was cut by an interruption: drop it, its episode runs again
            with open(self.episodes_path, "r+b") as f:
                f.truncate(cut)

    def is_done(self, suite: str, task_id: int, trial: int) -> bool:
        return (suite, task_id, trial) in self.records

    def add(self, record: Mapping) -> None:
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"episode record lacks keys {missing}: {dict(record)}")
        line = json.dumps(dict(record)) + "\n"
        with open(self.episodes_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[(record["suite"], int(record["task_id"]), int(record["trial"]))] = dict(record)

    def summary(self, task_suite_name: str, selected: Iterable[tuple[int, int]] | None = None) -> dict:
        """Summary over the records of `task_suite_name` (optionally only the (task_id, trial) pairs selected)."""
        keep = None if selected is None else set(selected)
        records = [r for (s, t, k), r in sorted(self.records.items())
                   if s == task_suite_name and (keep is None or (t, k) in keep)]
        per_task: dict[str, dict] = {}
        for r in records:
            entry = per_task.setdefault(r["task_name"], {"task_id": r["task_id"], "episodes": 0, "successes": 0,
                                                         "success_rate": 0.0, "instruction": r["instruction"]})
            entry["episodes"] += 1
            entry["successes"] += int(bool(r["success"]))
        for entry in per_task.values():
            entry["success_rate"] = entry["successes"] / entry["episodes"]
        n, s = len(records), sum(int(bool(r["success"])) for r in records)
        errors = sum(1 for r in records if r.get("error"))  # episodes that raised (counted as failures)
        return {"task_suite_name": task_suite_name, "num_episodes": n, "num_successes": s,
                "success_rate": s / n if n else 0.0, "num_errors": errors, "per_task": per_task}

    def write_summary(self, summary: Mapping) -> Path:
        path = self.out_dir / SUMMARY_FILE
        write_json_atomic(path, dict(summary))
        return path


def success_rate_key(suite: str) -> str:
    """The wandb key of a suite's final success rate (one per suite, so several suites share a run/group)."""
    return f"Eval/Success Rate/{suite}"
