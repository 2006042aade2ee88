"""Expected command-line errors of the evaluation CLI: one line `error: <what> — <how to fix>`, exit 2.

`UsageError(what, fix)` is raised by validation; `parse_or_exit` turns draccus / argparse failures (unknown flag,
`--num_envs two`) into the same one-line form; `exit_on_usage_error` wraps a CLI main. `--debug true` re-raises so
the traceback shows. (A minimal local version; a shared helper for every CLI may replace it.)
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
EXIT_USAGE = 2


class UsageError(ValueError):
    """An expected error caused by the user's input; `fix` says what to do about it."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what} — {fix}")
        self.what, self.fix = what, fix


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def print_usage_error(exc: BaseException) -> None:
    print(f"error: {_one_line(exc)}", file=sys.stderr)


def parse_or_exit(config_class: type[T], args: Sequence[str] | None = None) -> T:
    """draccus.parse, with parse failures reported in one line (exit 2) instead of a traceback / usage block."""
    import draccus
    from draccus.utils import DecodingError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return draccus.parse(config_class=config_class, args=args)
    except DecodingError as exc:
        what = re.sub(r"^`([^`]+)`:", r"--\1:", str(exc).strip())  # "`num_envs`: ..." -> "--num_envs: ..."
        print_usage_error(UsageError(f"bad value {what}", "see --help for the expected type"))
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        lines = [x for x in captured.getvalue().splitlines() if ": error: " in x]
        what = lines[-1].split(": error: ", 1)[1] if lines else _one_line(captured.getvalue())
        print_usage_error(UsageError(what, "see --help for the options"))
    raise SystemExit(EXIT_USAGE)


def exit_on_usage_error(fn: Callable[[], T], debug: bool = False) -> T:
    """Run `fn`; a UsageError becomes one line on stderr and exit 2 (re-raised with `debug`)."""
    try:
        return fn()
    except UsageError as exc:
        if debug:
            raise
        print_usage_error(exc)
        raise SystemExit(EXIT_USAGE) from None
