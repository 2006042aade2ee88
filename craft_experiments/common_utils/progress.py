"""Where a grid is: `[k/N]`, the time of every step of a run and of the run, the elapsed time and an ETA.

The ETA is the mean time of the runs that did work so far (runs found finished and skipped cost nothing and are
not counted) times the runs still to come; before the first such run there is no estimate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass
class Progress:
    total: int
    clock: Callable[[], float] = time.monotonic
    index: int = 0
    started: float = field(default=0.0)
    worked: list[float] = field(default_factory=list)  # durations of the runs that ran something
    _run_start: float = 0.0
    _steps: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def begin_run(self) -> str:
        """Start the next run; returns its `[k/N]` tag."""
        self.index += 1
        self._run_start = self.clock()
        self._steps = []
        return self.tag

    @property
    def tag(self) -> str:
        return f"[{self.index}/{self.total}]"

    def step(self, kind: str, seconds: float) -> None:
        """One command of the current run (train, drift, eval, cache) took `seconds`."""
        self._steps.append((kind, seconds))

    def end_run(self) -> str:
        """The run's summary of times: `train 2m10s, eval 40s | run 2m50s | elapsed 9m00s | ETA 1h04m`."""
        took = self.clock() - self._run_start
        if self._steps:
            self.worked.append(took)
        parts = ", ".join(f"{kind} {duration(s)}" for kind, s in self._steps) or "nothing to do"
        return f"{parts} | run {duration(took)} | elapsed {duration(self.clock() - self.started)} | {self.eta()}"

    def eta(self) -> str:
        left = self.total - self.index
        if left == 0:
            return "ETA 0s (last run)"
        if not self.worked:
            return f"ETA – ({left} run(s) left, none timed yet)"
        return f"ETA {duration(left * sum(self.worked) / len(self.worked))} ({left} run(s) left)"
