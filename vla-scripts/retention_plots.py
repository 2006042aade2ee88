"""One plotting style for `make demo` and `make study`: L_ret curves on a log scale with the ε line, λ curves, and the
retention/plasticity front. Curves over seeds are drawn as the median with a min-max band (one seed: the line)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

L_RET_FLOOR = 1e-8  # L_ret is exactly 0 at θ0; a log axis needs a floor
RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7, "axes.grid": True,
      "grid.alpha": 0.3, "lines.linewidth": 1.3}


def pyplot():
    """matplotlib's pyplot on the Agg backend with the shared style applied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(RC)
    return plt


def colours(names: Sequence[str]) -> dict[str, tuple]:
    """A stable colour per name (tab20 in the given order)."""
    plt = pyplot()
    table = plt.get_cmap("tab20").colors
    return {name: table[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20] for i, name in enumerate(names)}


def aligned(curves: Sequence[tuple[Sequence[int], Sequence[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values[seed, step]) over the steps every curve logged."""
    common = sorted(set.intersection(*(set(s) for s, _ in curves))) if curves else []
    rows = [dict(zip(s, v, strict=True)) for s, v in curves]
    return np.asarray(common), np.asarray([[r[t] for t in common] for r in rows], dtype=np.float64)


def band(ax, curves: Sequence[tuple[Sequence[int], Sequence[float]]], colour, label: str, *, log: bool = False,
         linestyle: str = "-") -> None:
    """Median over the curves (seeds) and a min-max band; `log`: values floored for a log axis."""
    steps, values = aligned(curves)
    if steps.size == 0:
        return
    if log:  # steps where every curve is exactly 0 (θ0 itself, step 1) have no place on a log axis
        keep = (values > 0).any(axis=0)
        steps, values = steps[keep], np.maximum(values[:, keep], L_RET_FLOOR)
        if steps.size == 0:
            return
    n = len(values)
    ax.plot(steps, np.median(values, axis=0), color=colour, linestyle=linestyle,
            label=label if n == 1 else f"{label} (median of {n})")
    if n > 1:
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2, linewidth=0)


def epsilon_line(ax, epsilon: float) -> None:
    ax.axhline(epsilon, color="black", linestyle=":", linewidth=1.2, label=f"ε = {epsilon:g}")


def retention_axes(ax, title: str) -> None:
    """Log L_ret; the axis starts at 1e-5 (below it: the float noise of θ0 against its own cached features)."""
    ax.set(yscale="log", xlabel="optimizer step", ylabel="L_ret (vs θ0)", title=title)
    ax.set_ylim(bottom=1e-5)


def lambda_axes(ax, title: str) -> None:
    ax.set(xlabel="optimizer step", ylabel="λ (used in the step)", title=title)


def save(fig, path, dpi: int = 110):
    """Tight layout, write, close; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
