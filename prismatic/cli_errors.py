"""How every command-line entry point reports an expected error: one line, exit code 2, no traceback.

    @cli_entry("finetune")
    def main(argv=None) -> None:
        cfg = parse_config(FinetuneConfig, argv, raw_string_fields=("run_id",))
        ...

An expected error is a `UserError` (or a subclass, e.g. `ConfigError`), a draccus / argparse parse error, a missing
file, or a full disk. It is printed as `error: <what> — <how to fix>` on stderr and the process exits with code 2.
`--debug True` (removed from argv before parsing, so no config needs the field) prints the traceback first.
Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import io
import json
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

EXIT_USER_ERROR = 2
DASH = "—"
T = TypeVar("T")
_debug_requested = False  # sticky: a script may run a light pre-check entry and then its main entry


class UserError(Exception):
    """An expected error the user can fix: `what` went wrong and `fix` says how."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what, self.fix = what, fix
        super().__init__(f"{what} {DASH} {fix}" if fix else what)


class DiskFullError(UserError, OSError):
    """A write failed for lack of space: names the path and the space needed."""

    def __init__(self, path: Path | str, needed_bytes: int | None = None, fix: str | None = None) -> None:
        free = _free_bytes(path)
        need = f"about {_human(needed_bytes)} needed, " if needed_bytes else ""
        super().__init__(f"writing '{path}' failed: No space left on device ({need}{_human(free)} free)",
                         fix or "free disk space (or point the output elsewhere) and run the same command again")
        self.path, self.needed_bytes = path, needed_bytes
        self.errno = errno.ENOSPC

    def with_fix(self, fix: str) -> DiskFullError:
        """The same error with the advice of the tool that knows how to continue (finetune: --resume)."""
        what = self.what
        err = DiskFullError.__new__(DiskFullError)
        UserError.__init__(err, what, fix)
        err.path, err.needed_bytes, err.errno = self.path, self.needed_bytes, errno.ENOSPC
        return err


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


LOW_SPACE_BYTES = 64 << 20  # a write error with less free space than this is taken for a full disk


def disk_full_error(exc: BaseException, path: Path | str, needed_bytes: int | None = None) -> BaseException:
    """`DiskFullError` naming `path` if `exc` is (or wraps) a disk-full OSError, else `exc` unchanged.

    torch.save reports ENOSPC as a RuntimeError ("unexpected pos ...", "file write failed") whose cause chain may
    hold the OSError or only its text; when neither does, an I/O error with almost no free space left at `path`
    counts as a full disk too.
    """
    seen = exc
    while seen is not None:
        if is_disk_full(seen) or "No space left on device" in str(seen):
            return DiskFullError(path, needed_bytes)
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, (OSError, RuntimeError)):
        free = _free_bytes(path)
        if free is not None and free < LOW_SPACE_BYTES:
            return DiskFullError(path, needed_bytes)
    return exc


def _free_bytes(path: Path | str) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def one_line(text: str) -> str:
    """Collapse a multi-line message ("problems:\\n  - a\\n  - b") into one line ("problems: a; b")."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    head, items = lines[0], [line[2:] if line.startswith("- ") else line for line in lines[1:]]
    return head + (" " + "; ".join(items) if items else "")


def _expected_message(exc: BaseException) -> str | None:
    """The one-line message of an expected error, None for a bug."""
    try:
        from draccus.utils import DraccusException
    except ImportError:  # pragma: no cover - draccus is a hard dependency
        DraccusException = ()  # noqa: N806
    if isinstance(exc, UserError):
        text = one_line(str(exc))
        return text if DASH in text else f"{text} {DASH} fix the input named above and run the command again"
    if is_disk_full(exc):
        return one_line(str(DiskFullError(getattr(exc, "filename", None) or "?")))
    if isinstance(exc, (DraccusException, argparse.ArgumentError)):
        return f"bad command-line flag or config file entry: {one_line(str(exc))} {DASH} see --help for the flags " \
               "and their types (booleans are True / False)"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return f"{one_line(str(exc))} {DASH} check the path"
    return None


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for `cli_entry` tools: a bad flag (unknown, missing, wrong type) raises UserError, printed as one
    line with exit 2, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"bad command-line flags: {message}", "see --help for the flags and their types")


def _pop_debug(argv: list[str]) -> bool:
    """Remove `--debug [True|False]` / `--debug=...` from argv; True if the traceback should be shown."""
    debug = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--debug":
            value = "true"
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv.pop(i + 1).lower()
            argv.pop(i)
            debug = value in ("true", "1", "yes")
            continue
        if arg.startswith("--debug="):
            argv.pop(i)
            debug = arg.split("=", 1)[1].lower() in ("true", "1", "yes")
            continue
        i += 1
    return debug


def report_and_exit(exc: BaseException, prog: str, debug: bool) -> None:
    """Print the one-line error (after the traceback with --debug) and exit 2; re-raise bugs."""
    message = _expected_message(exc)
    if message is None:
        raise exc
    if debug:
        traceback.print_exception(exc)
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USER_ERROR) from None


def cli_entry(prog: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a `main(argv: list[str] | None = None)` entry point: expected errors -> one line + exit 2.

    `--debug True` is taken out of argv (sys.argv when argv is None) before `main` sees it.
    """

    def decorate(main: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(main)
        def wrapper(argv: Sequence[str] | None = None, *args, **kwargs) -> T:
            explicit = argv is not None
            args_list = list(argv) if explicit else sys.argv[1:]
            global _debug_requested
            _debug_requested = _pop_debug(args_list) or _debug_requested
            debug = _debug_requested
            if not explicit:
                sys.argv[1:] = args_list
            try:
                return main(args_list if explicit else None, *args, **kwargs)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - sorted into expected (one line) and bugs (re-raised)
                report_and_exit(exc, prog, debug)
                raise  # unreachable: report_and_exit exits or re-raises

        return wrapper

    return decorate


# ---- draccus parsing that never exits on its own and keeps raw strings raw -----------------------------------
def parse_config(config_class: type[T], argv: Sequence[str] | None = None,
                 raw_string_fields: Sequence[str] = ()) -> T:
    """draccus.parse, with every parse error raised (not printed + sys.exit) and `raw_string_fields` kept verbatim.

    draccus reads each value as YAML, so `--run_id off` would become the bool False and then the string "False";
    these fields are quoted on the command line and read with YAML's all-strings loader from --config_path.
    """
    import draccus

    args = list(sys.argv[1:] if argv is None else argv)
    given: set[str] = set()
    for i, arg in enumerate(args):
        for name in raw_string_fields:
            if arg == f"--{name}" and i + 1 < len(args):
                args[i + 1] = json.dumps(args[i + 1])
                given.add(name)
            elif arg.startswith(f"--{name}="):
                args[i] = f"--{name}=" + json.dumps(arg.split("=", 1)[1])
                given.add(name)
    config_path = _config_path_arg(args)
    if config_path is not None:
        check_config_file(config_class, config_path)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cfg = draccus.parse(config_class=config_class, args=args, exit_on_error=False)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            sys.stderr.write(captured.getvalue())
            raise
        lines = [line for line in captured.getvalue().splitlines() if "error:" in line]
        detail = lines[-1].split("error:", 1)[1].strip() if lines else captured.getvalue().strip()
        raise UserError(f"bad command-line flags: {detail}", "see --help for the flags and their types") from None
    sys.stderr.write(captured.getvalue())
    if config_path is not None:
        import yaml

        with open(config_path) as f:
            raw = yaml.load(f, Loader=yaml.BaseLoader) or {}  # every scalar a string, as written
        for name in raw_string_fields:
            if name not in given and isinstance(raw, dict) and name in raw and raw[name] not in ("null", "~", ""):
                setattr(cfg, name, str(raw[name]))
    return cfg


def check_config_file(config_class: type, config_path: str) -> None:
    """A --config_path YAML, before draccus reads it: valid YAML (errors name the file and line), a mapping of flag:
    value, and every value of the type of its flag, also when the command line gives the flag again."""
    import draccus
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"--config_path '{config_path}' does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"--config_path '{config_path}' is not valid YAML ({problem}{where})",
                        "fix the file (a truncated copy?): one `flag: value` per line") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"--config_path '{config_path}' holds a YAML {type(loaded).__name__}, not a mapping",
                        "write one `flag: value` per line (e.g. `max_steps: 5000`)")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # the file's values alone, so each is type-checked
            draccus.parse(config_class=config_class, args=["--config_path", str(path)], exit_on_error=False)
    except SystemExit:
        lines = [line for line in captured.getvalue().splitlines() if "error:" in line]
        detail = lines[-1].split("error:", 1)[1].strip() if lines else captured.getvalue().strip()
        raise UserError(f"--config_path '{config_path}': {detail}",
                        "fix the entry in the file (see --help for the flags and their types)") from None
    except draccus.utils.DraccusException as exc:
        raise UserError(f"--config_path '{config_path}': {one_line(str(exc))}",
                        "fix the entry in the file (see --help for the flags and their types)") from None


def _config_path_arg(args: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--config_path" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config_path="):
            return arg.split("=", 1)[1]
    return None
