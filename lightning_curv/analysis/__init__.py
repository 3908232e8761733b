"""Analyses of where memorization lives in the K-FAC curvature spectrum.

Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature* (arXiv 2510.24256, 2025):

* :mod:`~lightning_curv.analysis.spectra`: spectra of A and G, pair curvature and what each ρ keeps;
* :mod:`~lightning_curv.analysis.bands`: per-example activation energy by eigenbasis band, memorized vs not;
* :mod:`~lightning_curv.analysis.scores`: per-example memorization scores and their AUROC.

Everything here is plain PyTorch (plus matplotlib for the PNGs and torchmetrics for the AUROC); functions take
the backbone (``lit_module.model``), an iterable of batches and the eigenbases from
:func:`lightning_curv.curvature.load_eigens` or :func:`lightning_curv.curvature.eigendecompose`.
"""

from lightning_curv.analysis._runner import TASKS, Task
from lightning_curv.analysis.bands import (
    BAND_EDGES,
    BandFractions,
    activation_bands,
    band_bounds,
    band_energy,
    band_names,
    compare_bands,
    mean_bands,
    plot_band_comparison,
    split_labels,
)
from lightning_curv.analysis.scores import (
    ENERGY_SCORE,
    GRADIENT_SCORE,
    LOSS_SCORE,
    GradientScores,
    gradient_scores,
    low_curvature_energy,
    memorization_labels,
    memorization_scores,
    plot_score_histograms,
    rotated_gradient_energy,
    score_auroc,
    score_aurocs,
)
from lightning_curv.analysis.spectra import (
    DEFAULT_RHOS,
    band_mass,
    effective_rank,
    kept_pairs,
    participation_ratio,
    plot_pair_curvature,
    plot_spectra,
    sorted_pair_curvature,
    spectrum_summary,
    summarize_spectra,
)

__all__ = [
    "BAND_EDGES",
    "DEFAULT_RHOS",
    "ENERGY_SCORE",
    "GRADIENT_SCORE",
    "LOSS_SCORE",
    "TASKS",
    "BandFractions",
    "GradientScores",
    "Task",
    "activation_bands",
    "band_bounds",
    "band_energy",
    "band_mass",
    "band_names",
    "compare_bands",
    "effective_rank",
    "gradient_scores",
    "kept_pairs",
    "low_curvature_energy",
    "mean_bands",
    "memorization_labels",
    "memorization_scores",
    "participation_ratio",
    "plot_band_comparison",
    "plot_pair_curvature",
    "plot_score_histograms",
    "plot_spectra",
    "rotated_gradient_energy",
    "score_auroc",
    "score_aurocs",
    "sorted_pair_curvature",
    "spectrum_summary",
    "split_labels",
    "summarize_spectra",
]
