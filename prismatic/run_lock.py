"""One owner per output folder: an exclusive OS lock held for as long as a tool writes into the folder.

Every writer takes it before it writes anything: `finetune.py` (fresh and `--resume`; the run folder and its
`<run id>--<step>_chkpt` siblings), `merge_lora_weights_and_save.py` (its output folder), `build_craft_cache.py`
(`--cache_dir`), `run_libero_eval.py` (`--local_log_dir`) and `measure_drift.py` (`--output_dir`). A second process
asking for a held folder stops with one line naming the holder (host, pid, start time, command).

Mechanism. The lock file is a hidden sibling of the folder, `<parent>/.<folder name>.lock` (a sibling, so it exists
before the folder does, survives `--overwrite True` emptying the folder, and covers a run's checkpoint siblings).
It is `flock(LOCK_EX | LOCK_NB)`ed: the kernel drops the lock when its process ends in any way (exit, exception,
SIGKILL, OOM kill), so a lock left by a killed process never blocks. The holder writes its identity into the file
for the message; on release it removes the file while still holding the lock, and an acquirer checks after
locking that the path still names the file it locked (else it retries), so a removed file is never "held" twice.

Shared filesystems. On Linux NFS clients `flock` is carried out as a POSIX byte-range lock on the server (NFSv4, or
NFSv3 with lockd), so it holds across hosts. Where the filesystem refuses locks (ENOLCK / EOPNOTSUPP / ENOSYS: an
NFS mount with `nolock`, some FUSE filesystems) the fallback is an exclusively created lock file (O_CREAT | O_EXCL)
holding the same identity: a file left by a dead process of this host is taken over, one from another host cannot
be judged from here, so the message names it and says to delete it once that process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from prismatic.cli_errors import UserError

_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class FolderInUseError(UserError):
    """Another process holds the folder's lock."""


def lock_path(folder: Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _identity(tool: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tool": tool,
            "command": " ".join(sys.argv)[:300]}


def _describe(path: Path, holder: dict | None) -> str:
    if not holder:
        return f"another process (its identity is not yet written to {path})"
    return (f"{holder.get('tool', 'a process')} (pid {holder.get('pid')} on host {holder.get('host')}, since "
            f"{holder.get('started')} UTC: {holder.get('command', '')})")


def _read_holder(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # being written right now, or gone
    return record if isinstance(record, dict) else None


def _in_use(folder: Path, path: Path, holder: dict | None, fix: str) -> FolderInUseError:
    return FolderInUseError(f"'{folder}' is in use by {_describe(path, holder)}; lock file {path}", fix)


class FolderLock:
    """The held lock of one folder; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, folder: Path, path: Path, fd: int | None) -> None:
        self.folder, self.path, self._fd = folder, path, fd
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked: see the module docstring
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_folder_lock(folder: Path, tool: str, fix: str | None = None) -> FolderLock:
    """Lock `folder` for this process (its parent is created if needed); FolderInUseError when another holds it."""
    folder = Path(folder)
    path = lock_path(folder)
    fix = fix or "wait until that process ends (or stop it); two processes must never write one folder"
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(folder, path, _read_holder(path), fix) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKING:
                return _acquire_exclusive_file(folder, path, tool, fix)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our flock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_identity(tool)).encode())
    os.fsync(fd)
    return FolderLock(folder, path, fd)


def _open_lock_file(path: Path) -> int:
    """Open (create) the lock file; a folder nobody may write into is one line here, before anything is built."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except (PermissionError, OSError) as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
            raise
        raise UserError(f"cannot write into '{path.parent}': {exc.strerror}",
                        "pass an output folder this user can write to (not read-only)") from None


def _acquire_exclusive_file(folder: Path, path: Path, tool: str, fix: str) -> FolderLock:
    """Fallback where the filesystem has no locks: the lock is the existence of the file."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder and holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", 0))):
                path.unlink(missing_ok=True)  # left by a dead process of this host
                continue
            raise _in_use(folder, path, holder, f"{fix}; this filesystem has no file locks, so delete {path} if "
                                                "that process is gone") from None
        os.write(fd, json.dumps(_identity(tool) | {"mode": "exclusive-file"}).encode())
        os.fsync(fd)
        os.close(fd)
        return FolderLock(folder, path, None)
    raise _in_use(folder, path, _read_holder(path), fix)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, tool: str, fix: str | None = None) -> Iterator[FolderLock]:
    """`with folder_lock(out, "measure_drift"):` the folder is this process's until the block ends."""
    lock = acquire_folder_lock(folder, tool, fix)
    try:
        yield lock
    finally:
        lock.release()
