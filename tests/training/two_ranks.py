"""`torchrun --standalone --nproc_per_node 2 <worker> ...` from a test: the distributed tests' one launcher.

The caller's own torchrun variables are dropped so the child starts a fresh 2-process group. `run_two_ranks` fails
the test on a non-zero exit with the tail of the workers' stderr; `launch_two_ranks` returns the finished process
for tests that expect a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_two_ranks(worker: Path, *args: object, timeout: float,
                     torchrun_options: tuple[object, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *map(str, torchrun_options),
                           str(worker), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_two_ranks(worker: Path, *args: object, timeout: float) -> None:
    proc = launch_two_ranks(worker, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
