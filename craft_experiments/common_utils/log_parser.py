"""Collect CRaFT experiment runs and turn them into tables (CSV, Markdown, LaTeX/booktabs) and training-curve plots.

    python craft_experiments/common_utils/log_parser.py --wandb_project vla-craft-training --output_dir results/ \
        --generate_latex_table                                    # the local runs of that project, no network
    python craft_experiments/common_utils/log_parser.py --runs_dir runs/craft_experiments/table1 \
        --output_dir results/ --generate_latex_table              # every run below a folder
    ... --wandb_project P --wandb_online True [--wandb_entity E]   # also the wandb API (needs network / login)

Sources (run_reading.py): run directories written by `vla-scripts/finetune.py` (`config.yaml`, `metrics.jsonl`) with
the grid's `eval/summary.json` (LIBERO success rate of the final checkpoint; a stale one is ignored) and
`drift/drift.json` (measure_drift.py). `--wandb_project P` alone reads the local runs of project P below `runs/`
(or below each `--runs_dir`): offline runs need no network. `--wandb_online True` adds the wandb API.

Groups (run_aggregation.py): experiment root × preset × method (from the resolved config) × suite × shots; seeds are
aggregated as mean ± std (`--ddof`, default 1). Roots and presets are never mixed; a seed used twice in a group is
refused (exit 2). Per run: success rate, final action loss, final L_ret (the retention monitor, for every method),
mean conflict ratio, final λ, measure_drift's L_ret / CKA / probe accuracy.

Outputs (table_rendering.py): runs.csv, summary.csv, summary.md, issues.txt, with --generate_latex_table
table_success_<experiment>.tex and table_metrics_<experiment>.tex, plots/<experiment>_<suite>_<full|kshot>.{png,pdf}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_aggregation import (  # noqa: E402,F401  (re-exported: the parser's public names)
    GROUP_KEYS,
    METRIC_KEYS,
    METRICS,
    SeedCollisionError,
    aggregate_runs,
    method_label,
    run_keys,
    summarize_run,
)
from run_reading import (  # noqa: E402,F401
    CURVE_KEYS,
    Issue,
    RunDataError,
    RunRecord,
    discover_runs,
    load_local_project_runs,
    load_run_dir,
    load_wandb_runs,
    read_config,
    read_eval_summary,
    read_metrics_jsonl,
)
from table_rendering import (  # noqa: E402,F401
    RUN_COLUMNS,
    aggregate_columns,
    format_cell,
    latex_escape,
    latex_metrics_table,
    latex_success_table,
    markdown_table,
    plot_training_curves,
    root_tags,
    write_csv,
    write_latex_tables,
)

DEFAULT_LOCAL_ROOT = Path("runs")  # finetune.py's default --run_root_dir; the grids write below it


@dataclass
class Results:
    records: list[RunRecord]
    run_rows: list[dict]
    aggregate: list[dict]
    issues: list[Issue]
    smoke_left_out: int = 0  # SMOKE (tiny preset) runs of the project not aggregated (--include_smoke False)


def collect(runs_dirs: Sequence[Path] = (), wandb_project: str | None = None, wandb_entity: str | None = None,
            ddof: int = 1, final_window: int = 1, include_incomplete: bool = False,
            api_factory: Callable[[], Any] | None = None, wandb_online: bool | None = None,
            include_smoke: bool = False) -> Results:
    """Read every source, summarise each run, aggregate per group; all problems end up in `Results.issues`.

    `wandb_project` without `wandb_online`: the local runs of that project (below `runs_dirs`, default runs/).
    `wandb_online` (default: True when `api_factory` is given): also the wandb API.
    """
    online = bool(api_factory is not None) if wandb_online is None else wandb_online
    smoke_left_out = 0
    records: list[RunRecord] = []
    issues: list[Issue] = []
    if wandb_project and not (online and runs_dirs):
        roots = list(runs_dirs) or ([DEFAULT_LOCAL_ROOT] if not online else [])
        if roots:
            records, issues = load_local_project_runs(wandb_project, [Path(r) for r in roots])
        if not include_smoke:  # a project's runs: the real ones unless SMOKE is asked for
            smoke = [r for r in records if r.config is not None and r.config.get("model_preset") == "tiny"]
            records = [r for r in records if not any(r is s for s in smoke)]
            kept = {r.name for r in records}
            issues = [i for i in issues if i.run in kept or i.run not in {s.name for s in smoke}]
            smoke_left_out = len(smoke)
    else:
        for runs_dir in runs_dirs:
            found, dir_issues = discover_runs(Path(runs_dir))
            records += found
            issues += dir_issues
    if wandb_project and online:
        # A run present both locally and in wandb is read once, from disk (which also has its evaluation).
        local_names = {r.name for r in records}
        for record in load_wandb_runs(wandb_project, wandb_entity, api_factory=api_factory):
            if record.name not in local_names:
                records.append(record)
    if include_incomplete:
        for record in records:
            for issue in record.issues:
                if issue.message.startswith("training unfinished"):
                    issue.severity = "warning"
    run_rows = []
    for record in records:
        row = summarize_run(record, final_window=final_window)
        if row is not None:
            run_rows.append(row)
    for record in records:
        issues += record.issues
    aggregate, agg_issues = aggregate_runs(run_rows, ddof=ddof)
    return Results(records, run_rows, aggregate, issues + agg_issues, smoke_left_out)


MANIFEST = ".log_parser_outputs.json"  # what the last aggregation wrote here: removed before the next one writes
OUTPUT_PATTERNS = ("runs.csv", "summary.csv", "summary.md", "issues.txt", "table_*.tex", "plots/*.png", "plots/*.pdf")


class OutputFolderError(ValueError):
    """The output folder holds tables or plots this parser cannot tell apart from the new ones."""


def check_output_dir(output_dir: Path) -> list[Path]:
    """The files of the previous aggregation into `output_dir` (from its manifest), to be removed before writing;
    OutputFolderError when the folder holds table / plot files without a manifest (stale outputs of unknown age)."""
    output_dir = Path(output_dir)
    manifest = output_dir / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            listed = None
        if not isinstance(listed, list):
            raise OutputFolderError(f"{manifest} is unreadable — remove the folder's tables and plots, or pass "
                                    "another --output_dir")
        return [output_dir / name for name in listed if (output_dir / name).is_file()]
    strangers = sorted(p for pattern in OUTPUT_PATTERNS for p in output_dir.glob(pattern))
    if strangers:
        raise OutputFolderError(f"--output_dir {output_dir} already holds {len(strangers)} table / plot file(s) "
                                f"(e.g. {strangers[0].name}) not written by a recorded aggregation — pass an empty "
                                "or new --output_dir, or remove them")
    return []


def write_outputs(results: Results, output_dir: Path, ddof: int = 1, latex: bool = False, plots: bool = True
                  ) -> list[Path]:
    """runs.csv, summary.csv, summary.md, issues.txt, [table_*_<experiment>.tex], plots/*.{png,pdf}; the outputs of
    the previous aggregation into the folder are removed first (its manifest), so nothing stale stays beside them."""
    output_dir = Path(output_dir)
    stale = check_output_dir(output_dir)
    if latex or plots:  # refuse colliding roots before anything is removed or written
        root_tags(results.aggregate, for_files=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.unlink()
    written = [write_csv(results.run_rows, output_dir / "runs.csv", RUN_COLUMNS),
               write_csv(results.aggregate, output_dir / "summary.csv", aggregate_columns())]
    (output_dir / "summary.md").write_text(markdown_table(results.aggregate, ddof=ddof))
    written.append(output_dir / "summary.md")
    (output_dir / "issues.txt").write_text("".join(f"{issue}\n" for issue in results.issues))
    written.append(output_dir / "issues.txt")
    if latex:
        written += write_latex_tables(results.aggregate, output_dir, ddof=ddof)
    if plots:
        written += plot_training_curves(results.records, output_dir / "plots")
    (output_dir / MANIFEST).write_text(json.dumps(sorted(str(p.relative_to(output_dir)) for p in written), indent=1))
    return written


def _bool(text: str) -> bool:
    if text not in ("True", "False", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected True or False, got '{text}'")
    return text in ("True", "true", "1")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", type=Path, action="append", default=[],
                        help="folder of run directories (repeatable); e.g. runs/craft_experiments/table1")
    parser.add_argument("--wandb_project", default=None,
                        help="the runs of this wandb project: local ones (offline, below runs/ or --runs_dir)")
    parser.add_argument("--wandb_online", type=_bool, default=False,
                        help="True: also read the project through the wandb API (network, `wandb login`)")
    parser.add_argument("--wandb_entity", default=None)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--generate_latex_table", action="store_true", help="also write booktabs LaTeX tables")
    parser.add_argument("--ddof", type=int, default=1, help="std degrees of freedom (1: sample std over seeds)")
    parser.add_argument("--final_window", type=int, default=1,
                        help="'final' values are the mean of this many last logged values")
    parser.add_argument("--include_incomplete", action="store_true",
                        help="keep runs whose training did not reach max_steps (reported as warnings)")
    parser.add_argument("--include_smoke", type=_bool, default=False,
                        help="with --wandb_project: also aggregate the project's SMOKE runs (tiny preset); a "
                             "--runs_dir is always read whole")
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any problem was found")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if not args.runs_dir and not args.wandb_project:
        print("error: no source given — pass --runs_dir <folder of runs> and/or --wandb_project <project>",
              file=sys.stderr)
        return 2
    try:
        results = collect(args.runs_dir, args.wandb_project, args.wandb_entity, ddof=args.ddof,
                          final_window=args.final_window, include_incomplete=args.include_incomplete,
                          wandb_online=args.wandb_online, include_smoke=args.include_smoke)
        written = write_outputs(results, args.output_dir, ddof=args.ddof, latex=args.generate_latex_table,
                                plots=not args.no_plots)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if results.smoke_left_out:
        print(f"note: {results.smoke_left_out} SMOKE run(s) (tiny preset) of the project left out; --include_smoke "
              "True aggregates them")
    print(markdown_table(results.aggregate, ddof=args.ddof))
    for issue in results.issues:
        print(f"PROBLEM {issue}", file=sys.stderr)
    used = len(results.run_rows)
    print(f"{used} run(s) used, {len(results.records) - used} left out, {len(results.issues)} problem(s); wrote "
          f"{len(written)} file(s) to {args.output_dir}")
    if not results.run_rows:
        print("error: no usable run found — check the --runs_dir / --wandb_project given (see issues.txt)",
              file=sys.stderr)
        return 1
    return 1 if args.strict and results.issues else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
    from prismatic.cli_errors import cli_entry  # one-line errors, exit 2 (`--debug True`: traceback)

    sys.exit(cli_entry("log_parser")(main)())
