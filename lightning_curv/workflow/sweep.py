"""The ρ sweep of the ``edit`` and ``pipeline`` commands: apply each edit, evaluate, undo; then choose one.

Each edit is a context (``with apply_edit(...)``) around one evaluation, so the weights are restored bit-exactly
whether the evaluation finishes or fails. The pair curvatures of every module are sorted once for all ρ
(:class:`~lightning_curv.curvature.CurvatureOrder`), and each ρ's mask is kept for the final application of the
selected edit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_curv.curvature import CurvatureOrder, EditHandle, KFACEigen, apply_edit, summarize_stats
from lightning_curv.curvature.edit import Rho
from lightning_curv.workflow.selection import select_edit


class RhoSweep:
    """Evaluate a model at every ρ of a sweep over fixed eigenbases, and apply the chosen one.

    Args:
        model: The backbone whose modules the eigenbases name (unedited).
        eigens: Eigenbases per module to edit.
    """

    def __init__(self, model: nn.Module, eigens: Mapping[str, KFACEigen]) -> None:
        self.model = model
        self.eigens = eigens
        self.masks: dict[tuple[str, float], Tensor] = {}
        self.orders: dict[str, CurvatureOrder] = {}

    def edit(self, rho: Rho) -> EditHandle:
        """Apply the edit for ``rho`` now; the handle undoes it (also as a context manager)."""
        return apply_edit(self.model, self.eigens, rho, masks=self.masks, orders=self.orders)

    def run(self, rhos: Sequence[Rho], evaluate: Callable[[], dict[str, float]]) -> list[dict[str, Any]]:
        """One row per ρ: the edit's statistics (kept pairs, removed energy) and the metrics while it is applied.

        Args:
            rhos: The sweep.
            evaluate: Scores the current weights (stage-less metric keys).

        Returns:
            Rows ``{"rho", "modules", "kept_pairs_fraction", "removed_energy", ...metrics, "per_module"}`` where
            ``per_module`` holds each module's kept-pair share and removed energy.
        """
        rows = []
        for rho in rhos:
            with self.edit(rho) as handle:
                metrics = evaluate()
                per_module = {
                    name: {"kept_pairs_fraction": st.kept_pairs / st.total_pairs, "removed_energy": st.removed_energy}
                    for name, st in handle.stats.items()
                }
                rows.append(
                    {
                        "rho": rho,
                        "modules": list(handle.stats),
                        **summarize_stats(handle.stats),
                        **metrics,
                        "per_module": per_module,
                    }
                )
        return rows


def choose(
    before: Mapping[str, float],
    rows: Sequence[Mapping[str, Any]],
    max_drop: Mapping[str, float],
    max_increase: Mapping[str, float],
) -> tuple[dict[str, Any] | None, str]:
    """The selected row (with ``index`` and ``criterion``) or None, and the reason."""
    index, why = select_edit(before, rows, max_drop, max_increase)
    return (None if index is None else {**rows[index], "index": index, "criterion": why}), why
