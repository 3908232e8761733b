"""Choosing an edit on the selection half, and showing the memorization-utility trade-off (table and plot)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Memorization keys measured on the selection half, in order of preference; lower is less memorization.
SELECTION_KEYS = ("mem_sel/noise_memorized", "mem_sel/strict", "mem_sel/memorized")
#: Utility keys to plot against memorization, in order of preference, with whether higher is better.
UTILITY_KEYS = (("util/task_acc", True), ("util/val_acc", True), ("util/ppl", False))
#: Default utility limits: absolute drops for accuracies, relative increases for perplexity.
DEFAULT_MAX_DROP = {"util/task_acc": 0.05, "util/val_acc": 0.015}
DEFAULT_MAX_INCREASE = {"util/ppl": 0.10}


def selection_key(metrics: Mapping[str, float]) -> str:
    """The selection-half memorization key present in ``metrics``.

    Raises:
        ValueError: If none is present (the data module has no memorized set with a selection split).
    """
    for key in SELECTION_KEYS:
        if key in metrics:
            return key
    raise ValueError(
        f"No selection-half memorization metric among {list(metrics)}; the data module needs a memorized set "
        f"with a 'selection' split (one of {SELECTION_KEYS})."
    )


def report_key(selection: str) -> str:
    """Test-half key that corresponds to a selection-half key (``mem_sel/x`` -> ``mem/x``)."""
    return "mem/" + selection.split("/", 1)[1]


def utility_key(metrics: Mapping[str, float]) -> tuple[str, bool] | None:
    """The main utility key present in ``metrics`` and whether higher is better."""
    return next(((k, hi) for k, hi in UTILITY_KEYS if k in metrics), None)


def within_limits(
    before: Mapping[str, float],
    row: Mapping[str, float],
    max_drop: Mapping[str, float],
    max_increase: Mapping[str, float],
) -> list[str]:
    """Names of the utility limits ``row`` violates relative to ``before`` (empty: all satisfied)."""
    broken = []
    for key, limit in max_drop.items():
        if key in before and key in row and before[key] - row[key] > limit + 1e-12:
            broken.append(f"{key} dropped {before[key] - row[key]:.4f} > {limit}")
    for key, limit in max_increase.items():
        if key in before and key in row and row[key] > before[key] * (1 + limit) + 1e-12:
            broken.append(f"{key} rose {row[key] / before[key] - 1:.2%} > {limit:.0%}")
    return broken


def select_edit(
    before: Mapping[str, float],
    edits: Sequence[Mapping[str, Any]],
    max_drop: Mapping[str, float] | None = None,
    max_increase: Mapping[str, float] | None = None,
    key: str | None = None,
) -> tuple[int | None, str]:
    """Index of the edit that removes the most selection-half memorization within the utility limits.

    Ties go to the edit that removes the least weight energy (``removed_energy``), then to the earlier one.

    Args:
        before: Metrics of the unedited model.
        edits: One metrics row per edit (with ``removed_energy`` when known).
        max_drop: Allowed absolute drops of accuracy metrics; default :data:`DEFAULT_MAX_DROP`.
        max_increase: Allowed relative increases (perplexity); default :data:`DEFAULT_MAX_INCREASE`.
        key: Selection metric; default :func:`selection_key`.

    Returns:
        ``(index or None, explanation)``.
    """
    max_drop = DEFAULT_MAX_DROP if max_drop is None else max_drop
    max_increase = DEFAULT_MAX_INCREASE if max_increase is None else max_increase
    key = key or selection_key(before)
    allowed = [(i, row) for i, row in enumerate(edits) if not within_limits(before, row, max_drop, max_increase)]
    if not allowed:
        return None, f"no edit keeps utility within the limits (drop {dict(max_drop)}, increase {dict(max_increase)})"
    best_i, best = min(allowed, key=lambda ir: (ir[1][key], ir[1].get("removed_energy", 0.0), ir[0]))
    return best_i, f"lowest {key} ({best[key]:.4f}, before {before[key]:.4f}) within the utility limits"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``columns`` (missing values shown as ``-``)."""
    cells = [[_fmt(row.get(c, "-")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def plot_tradeoff(
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    mem_key: str,
    util_key: str,
    path: str | Path,
    *,
    before: Mapping[str, float] | None = None,
    selected: Mapping[str, Any] | None = None,
    label_key: str = "rho",
    title: str = "Memorization vs utility",
) -> Path:
    """Scatter/line plot of memorization against utility, one line per method, saved as PNG.

    Args:
        series: Rows per method name; each row has ``mem_key``, ``util_key`` and optionally ``label_key``.
        mem_key: Memorization metric (y axis).
        util_key: Utility metric (x axis).
        path: PNG destination (written atomically).
        before: Unedited model's metrics, drawn as a star.
        selected: The selected row, circled.
        label_key: Row field used to annotate points.
        title: Plot title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_curv.curvature.io import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    for name, rows in series.items():
        pts = [(r[util_key], r[mem_key], r.get(label_key)) for r in rows if util_key in r and mem_key in r]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, lab in pts:
            if lab is not None and not isinstance(lab, Mapping):
                ax.annotate(
                    _fmt(lab) if isinstance(lab, float) else str(lab),
                    (x, y),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    if before and util_key in before and mem_key in before:
        ax.scatter([before[util_key]], [before[mem_key]], marker="*", s=160, color="black", zorder=5, label="before")
    if selected and util_key in selected and mem_key in selected:
        ax.scatter(
            [selected[util_key]],
            [selected[mem_key]],
            s=220,
            facecolors="none",
            edgecolors="red",
            linewidths=2,
            zorder=6,
            label="selected",
        )
    ax.set_xlabel(util_key)
    ax.set_ylabel(mem_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
