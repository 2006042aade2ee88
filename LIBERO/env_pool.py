"""Simulator workers: `num_envs` processes, each owning one LIBERO environment, feeding one policy process.

Messages on a worker's pipe: ("start", EpisodeSpec), ("act", actions (K, 7)) and ("abort", traceback: the policy
raised on this episode's observation) from the policy process; ("obs", request) / ("done", record) back, or
("error", traceback) for a protocol error (an exception inside an episode is a "done" failure record instead).
Workers use the `spawn` start method so no OpenGL / EGL context or torch thread pool is inherited through fork.
`num_envs=0` runs the simulator inline in the calling process (same protocol; handy for debugging and for tests
that inject a fake environment).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from multiprocessing.connection import wait

from LIBERO.libero_env import EpisodeRunner, SimSettings


def _handle(runner: EpisodeRunner, kind: str, payload) -> tuple[str, object]:
    if kind == "start":
        return runner.start(payload)
    if kind == "act":
        return runner.act(payload)
    if kind == "abort":
        return runner.abort(payload)
    raise ValueError(f"unknown worker message '{kind}'")


def worker_main(conn, settings: SimSettings) -> None:
    """Entry point of a simulator process: serve messages until ("close", None) or the pipe closes."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # physics is single-threaded; leave the cores to the policy
    runner = EpisodeRunner(settings)
    try:
        while True:
            try:
                kind, payload = conn.recv()
            except EOFError:
                break
            if kind == "close":
                break
            try:
                conn.send(_handle(runner, kind, payload))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        runner.close()
        conn.close()


class InlineWorker:
    """A worker running in the calling process (num_envs=0)."""

    def __init__(self, index: int, runner: EpisodeRunner):
        self.index = index
        self.runner = runner
        self._reply = None

    def send(self, kind: str, payload) -> None:
        try:
            self._reply = _handle(self.runner, kind, payload)
        except Exception:
            self._reply = ("error", traceback.format_exc())

    def has_reply(self) -> bool:
        return self._reply is not None

    def recv(self):
        reply, self._reply = self._reply, None
        return reply

    def close(self) -> None:
        self.runner.close()


class ProcessWorker:
    def __init__(self, index: int, settings: SimSettings, ctx):
        self.index = index
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, settings), name=f"libero-sim-{index}",
                                   daemon=True)
        self.process.start()
        child.close()

    def send(self, kind: str, payload) -> None:
        self.conn.send((kind, payload))

    def recv(self):
        try:
            return self.conn.recv()
        except EOFError as exc:
            raise RuntimeError(f"simulator worker {self.index} died (exit code {self.process.exitcode})") from exc

    def close(self) -> None:
        try:
            self.conn.send(("close", None))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


class EnvPool:
    """`num_envs` simulator workers (processes), or one inline worker when num_envs == 0."""

    def __init__(self, num_envs: int, settings: SimSettings, runner_factory=None):
        if num_envs < 0:
            raise ValueError(f"num_envs must be >= 0 (0 = simulate in this process), got {num_envs}")
        if num_envs == 0:
            runner = runner_factory(settings) if runner_factory else EpisodeRunner(settings)
            self.workers = [InlineWorker(0, runner)]
        else:
            ctx = mp.get_context("spawn")
            self.workers = [ProcessWorker(i, settings, ctx) for i in range(num_envs)]

    def wait(self, busy: list) -> list[tuple[object, tuple[str, object]]]:
        """Block until at least one busy worker replied; return every (worker, reply) available now."""
        inline = [w for w in busy if isinstance(w, InlineWorker) and w.has_reply()]
        procs = [w for w in busy if isinstance(w, ProcessWorker)]
        if inline:
            ready_conns = wait([w.conn for w in procs], timeout=0) if procs else []
        else:
            ready_conns = wait([w.conn for w in procs]) if procs else []
        ready = inline + [w for w in procs if w.conn in ready_conns]
        replies = []
        for worker in ready:
            kind, payload = worker.recv()
            if kind == "error":
                raise RuntimeError(f"simulator worker {worker.index} failed:\n{payload}")
            replies.append((worker, (kind, payload)))
        return replies

    def close(self) -> None:
        for worker in self.workers:
            worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
