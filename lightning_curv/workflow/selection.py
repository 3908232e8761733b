"""Choosing an edit on the selection half: which metric decides, which utility limits hold, which row wins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
