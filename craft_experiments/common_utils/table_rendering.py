"""Rendering aggregated CRaFT results: CSV, Markdown, LaTeX (booktabs; one file and unique labels per experiment
root) and training-curve plots (mean ± std bands over seeds, PNG and PDF)."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from run_aggregation import (
    GROUP_KEYS,
    METRIC_KEYS,
    METRICS,
    SUITE_ORDER,
    SUITE_TITLES,
    Metric,
    _group_sort_key,
    _series,
    run_keys,
)
from run_reading import (
    KEY_ACTION_LOSS,
    KEY_CONFLICT_NULL,
    KEY_CONFLICT_RATIO,
    KEY_LAMBDA,
    KEY_RETENTION_LOSS,
    KEY_RETENTION_MONITOR,
    RunRecord,
)


def aggregate_columns() -> list[str]:
    cols = [*GROUP_KEYS, "runs", "seeds", "episodes", "epsilon"]
    for metric in METRIC_KEYS:
        cols += [f"{metric}_mean", f"{metric}_std", f"{metric}_n"]
    return cols


RUN_COLUMNS = [*GROUP_KEYS, "seed", "run", "epsilon", "eval_episodes", *METRIC_KEYS, "best_step",
               "checkpoints_evaluated"]
BEST_NOTE = ("Best-ckpt success: the best of the final and every k-th earlier checkpoint per run (EVAL_EVERY_KTH_"
             "CHECKPOINT), selected on the evaluation episodes themselves, so optimistic; Success is the final "
             "checkpoint's.")


SMOKE_NOTE = ("SMOKE runs (tiny preset, a few training steps, one short episode): the numbers are placeholders that "
              "show the pipeline works, not results.")


def smoke_note(rows: Sequence[dict]) -> str:
    """The placeholder warning when any row comes from the tiny (SMOKE) preset, else ''."""
    return SMOKE_NOTE if any(r.get("preset") == "tiny" for r in rows) else ""


def shown_metrics(rows: Sequence[dict]) -> list[Metric]:
    """Every metric, without the best-checkpoint column when no run evaluated earlier checkpoints."""
    return [m for m in METRICS if m.key != "best_success_pct" or any(r.get("best_success_pct_n") for r in rows)]


def sample_sizes(rows: Sequence[dict]) -> str:
    """`n = 3 seeds per cell, 500 episodes per evaluation` (ranges when they differ), for captions."""
    seeds = sorted({int(r["runs"]) for r in rows})
    if not seeds:
        return "no runs."
    episodes = sorted({int(r["episodes"]) for r in rows if str(r.get("episodes", "")).strip()})

    def span(values: list[int]) -> str:
        return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"

    text = f"n = {span(seeds)} seed{'s' if seeds != [1] else ''} per cell"
    if episodes:
        text += f", {span(episodes)} episodes per evaluation"
    if seeds == [1]:
        text += " (one seed: no std)"
    return text + "."


class TagCollisionError(ValueError):
    """Two experiment roots would write the same table / plot files."""


def root_tags(rows: Sequence[dict], for_files: bool = False) -> dict[str, str]:
    """A name per experiment root: the experiment (table1, ...) plus the preset when it is not `real` (a SMOKE root
    gives `table1-tiny`), whatever else was read. Two roots with the same name are told apart by their parent folder
    in the Markdown summary; for file names and LaTeX labels (`for_files`) they are refused (TagCollisionError)."""
    presets: dict[str, set[str]] = {}
    experiments: dict[str, str] = {}
    for row in rows:
        presets.setdefault(row["root"], set()).add(row["preset"])
        experiments[row["root"]] = row["experiment"]
    base = {root: experiments[root] + "".join(f"-{p}" for p in sorted(presets[root]) if p != "real")
            for root in experiments}
    tags = {}
    for root, tag in base.items():
        same = sorted(r for r, t in base.items() if t == tag)
        if len(same) > 1:
            if for_files:
                raise TagCollisionError(f"{len(same)} roots would write the tables of '{tag}' ({', '.join(same)}) — "
                                        "aggregate one root per --output_dir (one --runs_dir each)")
            tag = f"{tag}@{Path(root).parent.name}"
        tags[root] = tag
    return tags


def _label_safe(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", tag).strip("-")


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str]) -> Path:
    """CSV with full-precision floats; missing values are empty cells."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def format_cell(row: dict, metric: Metric, pm: str = " ± ") -> str:
    """'mean ± std' in the metric's format; '–' when no value; '(n=k)' when fewer values than runs."""
    n = row[f"{metric.key}_n"]
    if n == 0:
        return "–"
    text = format(row[f"{metric.key}_mean"], metric.fmt)
    std = row[f"{metric.key}_std"]
    if n >= 2 and not math.isnan(std):  # one seed has no spread: no "± 0.0"
        text += pm + format(std, metric.fmt)
    if n < row["runs"]:
        text += f" (n={n})"
    return text


def latex_escape(text: str) -> str:
    for char, repl in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("$", "\\$"), ("#", "\\#"),
                       ("_", "\\_"), ("{", "\\{"), ("}", "\\}")):
        text = text.replace(char, repl)
    return text


def _latex_cell(row: dict, metric: Metric) -> str:
    return format_cell(row, metric, pm=" $\\pm$ ").replace("–", "--")


def markdown_table(rows: Sequence[dict], ddof: int = 1) -> str:
    tags = root_tags(rows)
    metrics = shown_metrics(rows)
    header = ["Experiment", "Preset", "Method", "Suite", "Shots", "Runs", "Episodes", *[m.title for m in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [tags[row["root"]], row["preset"], row["method"], row["suite"], row["shots"], str(row["runs"]),
                 str(row.get("episodes", "")), *[format_cell(row, m) for m in metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± std over seeds (std with ddof={ddof}; no ± for one seed); {sample_sizes(rows)} "
                 "(n=k): only k runs had that number. Conflict null: the conflict share between unrelated gradients. "
                 "Final L_ret: the "
                 "retention monitor (CRaFT's L_ret against θ0, every method); Drift / CKA / probe: measure_drift.py on "
                 "the final checkpoint (ActionQuery features at layer M).")
    if len(metrics) == len(METRICS):
        lines.append(BEST_NOTE)
    if smoke_note(rows):
        lines.append(f"**{smoke_note(rows)}**")
    for root, tag in sorted(tags.items(), key=lambda kv: kv[1]):
        lines.append(f"- {tag}: {root}")
    return "\n".join(lines) + "\n"


def latex_metrics_table(rows: Sequence[dict], tag: str, ddof: int = 1) -> str:
    """Every group and metric of one experiment root, booktabs style, label `tab:<tag>-metrics`."""
    metrics = shown_metrics(rows)
    caption = f"{latex_escape(tag)}: mean $\\pm$ std over seeds (ddof={ddof}); {sample_sizes(rows)}"
    caption += " Conflict null: the conflict share between unrelated gradients, the value to compare with."
    if smoke_note(rows):
        caption += " " + latex_escape(smoke_note(rows))
    if len(metrics) == len(METRICS):
        caption += " " + latex_escape(BEST_NOTE)
    cols = "lllrr" + "r" * len(metrics)
    head = ["Method", "Suite", "Shots", "Seeds", "Episodes", *[m.latex for m in metrics]]
    lines = ["\\begin{table}[t]", "\\centering", "\\small", "\\resizebox{\\linewidth}{!}{%",
             f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
    for row in rows:
        cells = ([latex_escape(str(row[k])) for k in ("method", "suite", "shots", "runs", "episodes")]
                 + [_latex_cell(row, m) for m in metrics])
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}}", f"\\caption{{{caption}}}",
              f"\\label{{tab:{_label_safe(tag)}-metrics}}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def latex_success_table(rows: Sequence[dict], tag: str, ddof: int = 1, best: bool = False) -> str:
    """Table-1 layout for one experiment root: one row per (method, shots), one column per suite (success rate
    mean ± std) and the average of the suite means when every suite has a value; label `tab:<tag>-success`.
    `best`: the best-checkpoint success instead (label `tab:<tag>-success-best`, said in the caption)."""
    suites = [s for s in SUITE_ORDER if any(r["suite"] == s for r in rows)]
    suites += sorted({r["suite"] for r in rows} - set(suites))
    metric = next(m for m in METRICS if m.key == ("best_success_pct" if best else "success_pct"))
    table: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        table.setdefault((row["method"], row["shots"]), {})[row["suite"]] = row
    caption = (f"{latex_escape(tag)}: LIBERO success rate (\\%), mean $\\pm$ std over seeds (ddof={ddof}); "
               f"{sample_sizes(rows)}")
    if smoke_note(rows):
        caption += " " + latex_escape(smoke_note(rows))
    if best:
        caption += " " + latex_escape(BEST_NOTE)
    else:
        caption += " Final checkpoint of every run."
    lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\begin{{tabular}}{{ll{'r' * (len(suites) + 1)}}}",
             "\\toprule",
             " & ".join(["Method", "Shots", *[SUITE_TITLES.get(s, latex_escape(s)) for s in suites], "Avg."])
             + " \\\\", "\\midrule"]
    first = rows[0] if rows else None
    for key in sorted(table, key=lambda k: _group_sort_key((first["experiment"], first["root"], first["preset"], k[0],
                                                            suites[0] if suites else "", k[1]))):
        by_suite = table[key]
        cells = [latex_escape(str(k)) for k in key]
        means = []
        for suite in suites:
            row = by_suite.get(suite)
            cells.append(_latex_cell(row, metric) if row else "--")
            if row and row[f"{metric.key}_n"]:
                means.append(row[f"{metric.key}_mean"])
        cells.append(format(float(np.mean(means)), metric.fmt) if means and len(means) == len(suites) else "--")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{caption}}}",
              f"\\label{{tab:{_label_safe(tag)}-success{'-best' if best else ''}}}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_latex_tables(rows: Sequence[dict], output_dir: Path, ddof: int = 1) -> list[Path]:
    """table_success_<tag>.tex and table_metrics_<tag>.tex per experiment root (labels unique across files)."""
    tags = root_tags(rows, for_files=True)
    written = []
    for root, tag in sorted(tags.items(), key=lambda kv: kv[1]):
        mine = [r for r in rows if r["root"] == root]
        for kind, render in (("success", latex_success_table), ("metrics", latex_metrics_table)):
            path = Path(output_dir) / f"table_{kind}_{_label_safe(tag)}.tex"
            path.write_text(render(mine, tag, ddof=ddof))
            written.append(path)
        if any(r.get("best_success_pct_n") for r in mine):  # a separate, labelled table: never "best" silently
            path = Path(output_dir) / f"table_success_best_{_label_safe(tag)}.tex"
            path.write_text(latex_success_table(mine, tag, ddof=ddof, best=True))
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------
LINESTYLES = ("-", "--", "-.", ":")


def method_style(index: int) -> dict[str, Any]:
    """A distinct (colour, line style) per method: tab10 colours, then the same colours with other line styles."""
    import matplotlib.pyplot as plt

    return {"color": plt.cm.tab10(index % 10), "linestyle": LINESTYLES[(index // 10) % len(LINESTYLES)]}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (window shrinks at the ends, so the curve keeps its length and end points' scale)."""
    if window <= 1 or values.size < 3:
        return values
    kernel = np.ones(window)
    num = np.convolve(values, kernel, mode="same")
    den = np.convolve(np.ones_like(values), kernel, mode="same")
    return num / den


def seed_band(series: Sequence[tuple[np.ndarray, np.ndarray]], smooth_fraction: float = 0.04
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, std) over seeds on the steps every seed covers (each seed interpolated onto the union of the
    logged steps, then lightly smoothed); std is 0 for a single seed."""
    series = [(s, v) for s, v in series if s.size]
    if not series:
        return None
    lo, hi = max(s[0] for s, _ in series), min(s[-1] for s, _ in series)
    grid = np.unique(np.concatenate([s for s, _ in series]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if grid.size == 0:
        return None
    window = max(1, int(round(smooth_fraction * grid.size)))
    curves = np.stack([smooth(np.interp(grid, s, v), window) for s, v in series])
    return grid, curves.mean(axis=0), curves.std(axis=0)


def _retention_series(record: RunRecord) -> tuple[np.ndarray, np.ndarray]:
    steps, values = _series(record.metrics, KEY_RETENTION_MONITOR)
    return (steps, values) if steps.size else _series(record.metrics, KEY_RETENTION_LOSS)


# (key, title, y axis label with unit)
PANELS = ((KEY_ACTION_LOSS, "action loss $L_{act}$", "L1 on normalised actions"),
          ("retention", "retention loss $L_{ret}$ vs $\\theta_0$ (log scale)", "sum of squared feature diff."),
          (KEY_LAMBDA, "dual variable $\\lambda$", "$\\lambda$ (weight of $L_{ret}$)"),
          (KEY_CONFLICT_RATIO, "conflict ratio, null dotted", "share of parameters"))


def _curve_label(method: str, shots: str, n: int) -> str:
    setting = "all demos" if shots == "all" else f"{shots} demo{'s' if shots != '1' else ''}/task"
    return f"{method}, {setting} (n={n} seed{'s' if n != 1 else ''})"


def plot_training_curves(records: Sequence[RunRecord], output_dir: Path) -> list[Path]:
    """Per (experiment root, suite), every shot setting in the same figure: action loss, retention loss on a log
    axis (with each CRaFT method's ε as a dashed line), λ and the conflict ratio (its null, the share between
    unrelated gradients, dotted) against the step; per (method, shots) the mean over seeds with a ± std band. PNG
    and PDF, legend outside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    keyed = [(run_keys(r), r) for r in records]
    keyed = [(row, r) for row, r in keyed if row is not None and r.metrics]
    tags = root_tags([row for row, _ in keyed], for_files=True)
    figures: dict[tuple, list[tuple[dict, RunRecord]]] = {}
    for row, record in keyed:
        figures.setdefault((tags[row["root"]], row["suite"]), []).append((row, record))
    written = []
    for (tag, suite), members in sorted(figures.items()):
        curves = sorted({(row["method"], row["shots"]) for row, _ in members},
                        key=lambda c: ({"baseline": 0, "craft": 1}.get(c[0], 2), c[0],
                                       -1 if c[1] == "all" else int(c[1]) if str(c[1]).isdigit() else 0))
        styles = {c: method_style(i) for i, c in enumerate(curves)}
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
        handles: dict[str, Any] = {}
        for ax, (key, title, unit) in zip(axes.flat, PANELS, strict=True):
            plotted_positive = True
            for curve in curves:
                runs = [r for row, r in members if (row["method"], row["shots"]) == curve]
                series = [_retention_series(r) if key == "retention" else _series(r.metrics, key) for r in runs]
                band = seed_band(series)
                if band is None:
                    continue
                steps, mean, std = band
                plotted_positive &= bool(np.all(mean > 0))
                (line,) = ax.plot(steps, mean, linewidth=1.6, label=_curve_label(*curve, len(series)),
                                  **styles[curve])
                ax.fill_between(steps, mean - std, mean + std, color=styles[curve]["color"], alpha=0.18,
                                linewidth=0)
                handles.setdefault(line.get_label(), line)
                if key == KEY_CONFLICT_RATIO:
                    null = seed_band([_series(r.metrics, KEY_CONFLICT_NULL) for r in runs])
                    if null is not None:
                        (ref,) = ax.plot(null[0], null[1], color=styles[curve]["color"], linestyle=":",
                                         linewidth=1.2, label="null: unrelated gradients (dotted)")
                        handles.setdefault(ref.get_label(), ref)
            if key == "retention":  # one dashed ε line per value: the method's colour, grey when shared
                users: dict[float, set[str]] = {}
                for row, _ in members:
                    if not math.isnan(row["epsilon"]):
                        users.setdefault(row["epsilon"], set()).add(row["method"])
                for value, names in sorted(users.items()):
                    only = next(iter(names))
                    colour = (styles[next(c for c in curves if c[0] == only)]["color"] if len(names) == 1
                              else "0.35")
                    label = f"ε = {value:g}" + (f" ({only})" if len(names) == 1 else "")
                    ref = ax.axhline(value, color=colour, linestyle=(0, (4, 3)), linewidth=0.9, label=label)
                    handles.setdefault(ref.get_label(), ref)
                if plotted_positive and ax.lines:
                    ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3, which="both" if key == "retention" else "major")
        fig.suptitle(f"{tag}: {suite} — mean ± std over seeds")
        fig.tight_layout()
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                       fontsize=8, frameon=False)
        stem = f"{_label_safe(tag)}_{suite}"
        for ext in ("png", "pdf"):
            path = output_dir / f"{stem}.{ext}"
            fig.savefig(path, dpi=150, bbox_inches="tight")
            written.append(path)
        plt.close(fig)
    return written
