"""One analysis run: spectra, activation bands and per-example memorization scores of a model, as files.

The ``analyze`` command calls :func:`analyze_model`; notebooks can call it (or the functions it chains) directly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_curv.analysis.bands import activation_bands, compare_bands, mean_bands, plot_band_comparison
from lightning_curv.analysis.scores import (
    gradient_scores,
    memorization_scores,
    plot_score_histograms,
    score_aurocs,
)
from lightning_curv.analysis.spectra import plot_pair_curvature, plot_spectra, summarize_spectra
from lightning_curv.curvature import KFACEigen
from lightning_curv.utils import atomic_write_json


def analyze_model(
    model: nn.Module,
    eigens: Mapping[str, KFACEigen],
    batches: Iterable[Mapping[str, Any]],
    labels: Any,
    out_dir: str | Path,
    *,
    task: str,
    position: int | None = 0,
    rhos: Sequence[float] = (0.6, 0.75, 0.9),
    max_batches: int | None = None,
    with_gradients: bool = True,
) -> dict[str, Any]:
    """Write ``analysis.json`` and the plots for one model and its eigenbases.

    Args:
        model: The unedited backbone the eigenbases were computed on.
        eigens: Eigenbases per module.
        batches: Training batches in a fixed order, each row with its ``index``.
        labels: Memorization label per training row (1 memorized, 0 not, -1 ignored), indexed by ``index``.
        out_dir: Where ``analysis.json``, ``spectra.png``, ``pair_curvature.png``, ``bands.png`` and
            ``scores.png`` go.
        task: ``"causal_lm"`` or ``"classifier"``.
        position: Token position of a classifier's samples (the class token).
        rhos: ρ values for spectra and gradient scores.
        max_batches: Batch limit.
        with_gradients: Compute the gradient-mass scores.

    Returns:
        The ``analysis.json`` payload: ``spectra``, ``bands`` (per module and ``mean``), ``auroc``.
    """
    out_dir = Path(out_dir)
    batches = list(itertools.islice(batches, max_batches))
    kw: dict[str, Any] = {"task": task} if task == "causal_lm" else {"task": task, "position": position}
    plot_spectra(eigens, out_dir / "spectra.png")
    plot_pair_curvature(eigens, rhos, out_dir / "pair_curvature.png")
    bands = activation_bands(model, batches, eigens, **kw)
    grads = gradient_scores(model, batches, eigens, rhos, **kw) if with_gradients else None
    index, scores = memorization_scores(bands, grads)
    row_labels = labels[index]
    if not bool((row_labels == 1).any()) or not bool((row_labels == 0).any()):
        raise ValueError(
            f"The analysed rows hold {int((row_labels == 1).sum())} memorized and {int((row_labels == 0).sum())} "
            "other examples; both are needed. Training rows come in dataset order, so raise max_batches (or None)."
        )
    comparisons = {name: compare_bands(b, labels[b.index]) for name, b in bands.items()}
    mean = mean_bands(bands)
    comparisons["mean"] = compare_bands(mean, labels[mean.index])
    plot_band_comparison(comparisons, out_dir / "bands.png")
    plot_score_histograms(scores, row_labels, out_dir / "scores.png")
    payload = {
        "spectra": summarize_spectra(eigens, rhos),
        "bands": comparisons,
        "auroc": score_aurocs(scores, row_labels),
        "num_examples": int(len(index)),
        "num_memorized": int((row_labels == 1).sum()),
    }
    atomic_write_json(out_dir / "analysis.json", payload)
    return payload
