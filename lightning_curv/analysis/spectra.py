"""Eigenvalue spectra of the K-FAC factors and the distribution of pair curvature, per module.

Method of Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature* (arXiv
2510.24256, 2025): with ``A = U_A diag(μ) U_Aᵀ`` and ``G = U_G diag(λ) U_Gᵀ`` the eigen-pair ``(i, j)`` has
curvature ``Π_ij = λ_i μ_j``; the edit at ρ keeps the smallest set of pairs, taken in descending ``Π``,
whose summed curvature is at least ``ρ Σλ Σμ`` (:func:`lightning_curv.curvature.curvature_mask`). This module
summarises those spectra as numbers (:func:`spectrum_summary`) and plots (:func:`plot_spectra`,
:func:`plot_pair_curvature`).

Definitions used in the summaries (``v`` a non-negative spectrum sorted in descending order):

* ``effective_rank``: ``exp(H(p))`` with ``p = v / Σv`` and ``H`` the Shannon entropy (Roy and Vetterli,
  2007); between 1 (one direction) and ``len(v)`` (flat spectrum). For pairs it equals the product of the
  factors' effective ranks.
* ``participation_ratio``: ``(Σv)² / Σv²``.
* ``band_mass``: fraction of ``Σv`` in each rank band (top 10 %, 10-25 %, 25-50 %, bottom 50 % by default;
  see :func:`lightning_curv.analysis.bands.band_bounds`). For ``μ`` this is the mean activation energy by band
  of the data the factors were collected on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_curv.analysis._plot import MAX_LEGEND_ENTRIES, new_figure, save_png
from lightning_curv.analysis.bands import BAND_EDGES, band_bounds, band_names
from lightning_curv.curvature.edit import check_rho, pair_curvature
from lightning_curv.curvature.eigen import KFACEigen

#: ρ values summarised when none are given: the paper's LM (0.6) and ViT (0.75) settings and a mild one.
DEFAULT_RHOS: tuple[float, ...] = (0.6, 0.75, 0.9)


def effective_rank(values: Tensor) -> float:
    """``exp`` of the Shannon entropy of ``values / Σ values`` (0 for an all-zero spectrum).

    Args:
        values: Non-negative spectrum of shape ``[d]`` (any order).

    Returns:
        The effective rank, in ``[1, d]`` unless every value is zero.
    """
    v = values.double().clamp_min(0).flatten()
    total = v.sum()
    if total <= 0:
        return 0.0
    p = v[v > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(values: Tensor) -> float:
    """``(Σv)² / Σv²`` of a non-negative spectrum of shape ``[d]`` (0 for an all-zero spectrum)."""
    v = values.double().clamp_min(0).flatten()
    square_sum = v.square().sum()
    return float(v.sum().square() / square_sum) if square_sum > 0 else 0.0


def band_mass(values: Tensor, edges: Sequence[float] = BAND_EDGES) -> dict[str, float]:
    """Fraction of ``Σv`` in each rank band of a spectrum sorted in DESCENDING order.

    Args:
        values: Spectrum of shape ``[d]``, descending (as :class:`KFACEigen` stores it).
        edges: Upper edges of the bands except the last, as fractions of ``d`` (see :func:`band_bounds`).

    Returns:
        Mass fraction per band name (``"0-10%"``, ...); all zeros for an all-zero spectrum.
    """
    v = values.double().clamp_min(0).flatten()
    bounds = band_bounds(v.numel(), edges)
    total = float(v.sum())
    masses = [float(v[lo:hi].sum()) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return {name: (m / total if total > 0 else 0.0) for name, m in zip(band_names(edges), masses, strict=True)}


def _factor_summary(values: Tensor, edges: Sequence[float]) -> dict[str, Any]:
    v = values.double().clamp_min(0)
    trace = float(v.sum())
    return {
        "dim": int(v.numel()),
        "trace": trace,
        "max": float(v.max()),
        "min": float(v.min()),
        "num_zero": int((v == 0).sum()),
        "top1_mass": float(v.max()) / trace if trace > 0 else 0.0,
        "effective_rank": effective_rank(v),
        "participation_ratio": participation_ratio(v),
        "band_mass": band_mass(v, edges),
    }


def sorted_pair_curvature(eigen: KFACEigen) -> tuple[Tensor, Tensor]:
    """Pair curvatures in descending order and their cumulative sum, sorted as :func:`curvature_mask` sorts.

    Args:
        eigen: Eigenbases of one layer.

    Returns:
        ``(values [d_out * d_in], cumulative [d_out * d_in])`` in float64.
    """
    values = pair_curvature(eigen).flatten().sort(descending=True, stable=True).values
    return values, values.cumsum(0)


def kept_pairs(eigen: KFACEigen, rhos: Sequence[float]) -> list[dict[str, float]]:
    """What the edit keeps at each ρ, with one sort for the whole sweep.

    Uses exactly the selection rule of :func:`lightning_curv.curvature.curvature_mask` (the same sort and
    cumulative sum), so ``kept_pairs`` equals ``mask.sum()`` and ``kept_mass`` its kept fraction.

    Args:
        eigen: Eigenbases of one layer.
        rhos: Curvature-mass fractions in (0, 1].

    Returns:
        One dict per ρ, in order: ``rho``, ``kept_pairs`` (count), ``kept_pair_fraction`` (of
        ``d_out * d_in``), ``kept_mass`` (fraction of ``Σλ Σμ`` kept) and ``threshold`` (smallest kept
        ``Π``; 0 at ρ = 1).

    Raises:
        ValueError: If a ρ is outside (0, 1], or every pair curvature is zero and some ρ < 1.
    """
    rhos = [check_rho(r) for r in rhos]
    values, cumulative = sorted_pair_curvature(eigen)
    n = values.numel()
    total = cumulative[-1]
    rows = []
    for rho in rhos:
        if rho == 1.0:
            k, mass = n, 1.0
        else:
            if total <= 0:
                raise ValueError("All pair curvatures are zero: the factors are degenerate (empty statistics).")
            k = min(int(torch.searchsorted(cumulative, rho * total).item()) + 1, n)
            mass = float(cumulative[k - 1] / total)
        rows.append(
            {
                "rho": rho,
                "kept_pairs": k,
                "kept_pair_fraction": k / n,
                "kept_mass": mass,
                "threshold": float(values[k - 1]) if rho < 1.0 else 0.0,
            }
        )
    return rows


def spectrum_summary(
    eigen: KFACEigen, rhos: Sequence[float] = DEFAULT_RHOS, edges: Sequence[float] = BAND_EDGES
) -> dict[str, Any]:
    """Numbers that describe one module's spectra and what the edit keeps at each ρ (JSON-serialisable).

    Args:
        eigen: Eigenbases of the module (eigenvalues descending, as :func:`eigendecompose` returns them).
        rhos: ρ values to report.
        edges: Rank-band edges of ``band_mass`` (see :func:`band_bounds`).

    Returns:
        ``{"d_out", "d_in", "num_samples", "A": {...}, "G": {...}, "pairs": {...}, "rho": [...]}`` where ``A``
        (spectrum ``μ``) and ``G`` (spectrum ``λ``) hold ``dim``, ``trace``, ``max``, ``min``, ``num_zero``,
        ``top1_mass``, ``effective_rank``, ``participation_ratio`` and ``band_mass`` (per band name);
        ``pairs`` (spectrum ``Π``) holds ``num_pairs``, ``num_zero``, ``effective_rank``, ``band_mass``
        (band of the pairs by rank of ``Π``); ``rho`` is the list :func:`kept_pairs` returns.
    """
    values, cumulative = sorted_pair_curvature(eigen)
    total = float(cumulative[-1])
    bounds = band_bounds(values.numel(), edges)
    pair_bands = {
        name: (float(values[lo:hi].sum()) / total if total > 0 else 0.0)
        for name, lo, hi in zip(band_names(edges), bounds[:-1], bounds[1:], strict=True)
    }
    d_out, d_in = eigen.shape
    return {
        "d_out": d_out,
        "d_in": d_in,
        "num_samples": int(eigen.num_samples),
        "A": _factor_summary(eigen.eigenvalues_A, edges),
        "G": _factor_summary(eigen.eigenvalues_G, edges),
        "pairs": {
            "num_pairs": int(values.numel()),
            "num_zero": int((values == 0).sum()),
            "effective_rank": effective_rank(values),
            "band_mass": pair_bands,
        },
        "rho": kept_pairs(eigen, rhos),
    }


def summarize_spectra(
    eigens: Mapping[str, KFACEigen], rhos: Sequence[float] = DEFAULT_RHOS, edges: Sequence[float] = BAND_EDGES
) -> dict[str, dict[str, Any]]:
    """:func:`spectrum_summary` of every module, keyed by module name (in the order of ``eigens``)."""
    return {name: spectrum_summary(eigen, rhos, edges) for name, eigen in eigens.items()}


# ---------------------------------------------------------------------------- plots
def _legend(ax: Any, count: int) -> None:
    if 0 < count <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize=7)


def plot_spectra(
    eigens: Mapping[str, KFACEigen], path: str | os.PathLike, *, edges: Sequence[float] = BAND_EDGES
) -> Path:
    """Eigenvalue spectra of A (``μ``) and G (``λ``), one line per module, saved as a PNG.

    The x axis is the normalised rank ``k / d`` (so layers of different width share it, with the band edges as
    dotted lines), the y axis the eigenvalue as a fraction of the trace, on a log scale (zero eigenvalues are
    not drawn).

    Args:
        eigens: Eigenbases per module name.
        path: PNG destination (written atomically).
        edges: Band edges to mark.

    Returns:
        The path written.
    """
    fig, axes = new_figure(1, 2, size=(5.2, 4.0))
    for ax, attr, label in (
        (axes[0], "eigenvalues_A", "A (activations), μ"),
        (axes[1], "eigenvalues_G", "G (gradients), λ"),
    ):
        for name, eigen in eigens.items():
            v = getattr(eigen, attr).double().clamp_min(0).cpu()
            total = float(v.sum())
            if total <= 0:
                continue
            ranks = (torch.arange(v.numel(), dtype=torch.float64) + 0.5) / v.numel()
            keep = v > 0
            ax.plot(ranks[keep].numpy(), (v[keep] / total).numpy(), lw=1.2, label=name)
        for edge in edges:
            ax.axvline(edge, color="grey", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("normalised eigenvalue rank k / d (descending)")
        ax.set_ylabel("eigenvalue / trace")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        _legend(ax, len(eigens))
    return save_png(fig, path)


def plot_pair_curvature(
    eigens: Mapping[str, KFACEigen],
    rhos: Sequence[float],
    path: str | os.PathLike,
    *,
    max_points: int = 2000,
    bins: int = 60,
) -> Path:
    """Distribution of pair curvature ``Π = λ μᵀ`` and the mass kept at each ρ, saved as a PNG.

    Left: cumulative fraction of curvature mass against the fraction of pairs kept (pairs in descending
    ``Π``, log x axis), one line per module, with a marker where each ρ cuts. Right: histogram of
    ``log10(Π / ΣΠ)`` over the non-zero pairs of each module.

    Args:
        eigens: Eigenbases per module name.
        rhos: ρ values to mark (in (0, 1]).
        path: PNG destination (written atomically).
        max_points: Points per cumulative curve (log-spaced ranks; the full curve can have ``d_out d_in``).
        bins: Histogram bins.

    Returns:
        The path written.
    """
    rhos = [check_rho(r) for r in rhos]
    fig, axes = new_figure(1, 2, size=(5.2, 4.0))
    markers = "ovs^Dp*hX"
    for name, eigen in eigens.items():
        values, cumulative = sorted_pair_curvature(eigen)
        total = float(cumulative[-1])
        if total <= 0:
            continue
        n = values.numel()
        points = torch.unique(torch.logspace(0, math.log10(n), min(max_points, n), dtype=torch.float64).round().long())
        line = axes[0].plot((points / n).numpy(), (cumulative[points - 1] / total).numpy(), lw=1.2, label=name)
        color = line[0].get_color()
        for i, row in enumerate(kept_pairs(eigen, rhos)):
            axes[0].plot(row["kept_pair_fraction"], row["kept_mass"], markers[i % len(markers)], color=color, ms=5)
        nonzero = values[values > 0]
        axes[1].hist(
            (nonzero / total).log10().numpy(),
            bins=bins,
            histtype="step",
            density=True,
            color=color,
            label=name,
        )
    for i, rho in enumerate(rhos):
        axes[0].axhline(rho, color="grey", ls=":", lw=0.8)
        axes[0].plot([], [], markers[i % len(markers)], color="black", label=f"ρ = {rho:g}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("fraction of eigen-pairs kept (descending Π)")
    axes[0].set_ylabel("fraction of curvature mass kept")
    axes[0].set_title("Curvature mass kept vs pairs kept")
    axes[0].grid(alpha=0.3)
    _legend(axes[0], len(eigens) + len(rhos))
    axes[1].set_xlabel("log10(λ_i μ_j / Σ Π)")
    axes[1].set_ylabel("density of pairs")
    axes[1].set_title("Pair curvature distribution")
    axes[1].grid(alpha=0.3)
    _legend(axes[1], len(eigens))
    return save_png(fig, path)
