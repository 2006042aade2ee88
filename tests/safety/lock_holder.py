"""A second process for the lock tests: lock the folder given as argv[1], say "locked <pid>", then wait.

Run as `python lock_holder.py <folder>`; the test reads the line (so the lock is held before it goes on) and ends
the process by its pid (SIGKILL for a stale lock).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from prismatic.run_lock import acquire_folder_lock

if __name__ == "__main__":
    lock = acquire_folder_lock(Path(sys.argv[1]), "lock_holder")
    print(f"locked {os.getpid()}", flush=True)
    while True:
        time.sleep(60)
