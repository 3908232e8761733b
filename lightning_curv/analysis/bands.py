"""Activation energy by spectrum band: where in the eigenbasis of ``A`` an example's activations live.

Analysis of Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature* (arXiv
2510.24256, 2025): for a tracked layer with input activations ``a`` and ``A = U_A diag(μ) U_Aᵀ`` (``μ``
descending), split the eigenvectors by rank into bands (top 10 %, 10-25 %, 25-50 %, bottom 50 % by default)
and measure the fraction of ``‖U_Aᵀ a‖² = ‖a‖²`` that falls in each band. Memorized examples put more of their
energy in the low-curvature (bottom) band than non-memorized ones; the paper reports about 23 % more.

Samples are the positions the curvature statistics use (:func:`lightning_curv.curvature.valid_positions` for a
causal LM, the head's token for a ViT). An example's band fractions are the mean over its samples of the
per-sample fractions; the summed energy per band is kept as well, so energy-weighted fractions
(:meth:`BandFractions.energy_fractions`) are available too.

Warning:
    Fractions are computed in the eigenbasis of the factors given, so the model must be the checkpoint the
    factors were collected on (``load_eigens(path, model=model)`` checks it). Samples whose activation is
    exactly zero have no defined fraction and are skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curv.analysis._plot import MAX_LEGEND_ENTRIES, new_figure, save_png
from lightning_curv.analysis._runner import (
    Task,
    check_task,
    compute_dtype,
    forward_batch,
    iterate_batches,
    model_device,
    reduce_by_index,
    sample_rows,
    sample_selection,
)
from lightning_curv.curvature.eigen import KFACEigen
from lightning_curv.curvature.hooks import ModuleHooks
from lightning_curv.curvature.kfac import select_positions

#: Upper edges of the rank bands except the last, as fractions of the dimension: top 10 %, 10-25 %, 25-50 %,
#: bottom 50 % (the paper's bands).
BAND_EDGES: tuple[float, ...] = (0.1, 0.25, 0.5)


# ---------------------------------------------------------------------------- bands
def _check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(e) for e in edges)
    if not edges or any(not 0 < e < 1 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"Band edges must be strictly increasing fractions in (0, 1), got {edges}.")
    return edges


def band_bounds(dim: int, edges: Sequence[float] = BAND_EDGES) -> list[int]:
    """Rank boundaries ``[0, k_1, ..., k_m, dim]`` of the bands of a ``dim``-dimensional eigenbasis.

    ``k_i = round(edges[i] * dim)`` (halves rounded up), moved just enough that every band holds at least one
    eigenvector when ``dim >= len(edges) + 1``. Band ``b`` covers the eigenvectors of ranks
    ``bounds[b] <= k < bounds[b + 1]`` (rank 0 = largest eigenvalue).

    Args:
        dim: Dimension of the eigenbasis.
        edges: Strictly increasing fractions in (0, 1).

    Returns:
        ``len(edges) + 2`` non-decreasing integers from 0 to ``dim``.

    Raises:
        ValueError: If ``dim < 1`` or the edges are not strictly increasing fractions in (0, 1).
    """
    edges = _check_edges(edges)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}.")
    num_bands = len(edges) + 1
    bounds = [0]
    for i, edge in enumerate(edges, start=1):
        k = math.floor(edge * dim + 0.5)
        k = max(k, bounds[-1] + 1)  # non-empty band above
        k = min(k, dim - (num_bands - i))  # room for a non-empty band per remaining band
        bounds.append(min(max(k, bounds[-1]), dim))
    bounds.append(dim)
    return bounds


def band_names(edges: Sequence[float] = BAND_EDGES) -> tuple[str, ...]:
    """Names of the bands, by rank from the top: ``("0-10%", "10-25%", "25-50%", "50-100%")`` by default."""
    edges = _check_edges(edges)
    cuts = [0.0, *edges, 1.0]
    return tuple(f"{100 * lo:g}-{100 * hi:g}%" for lo, hi in zip(cuts[:-1], cuts[1:], strict=True))


def band_energy(x: Tensor, eigenvectors: Tensor, bounds: Sequence[int]) -> Tensor:
    """Energy ``‖U_bᵀ x‖²`` of each sample in each band ``b`` of an eigenbasis.

    Args:
        x: Samples of shape ``[n, d]``.
        eigenvectors: ``U`` of shape ``[d, d]``, column ``k`` the eigenvector of rank ``k`` (descending).
        bounds: Band boundaries from :func:`band_bounds`.

    Returns:
        Energies of shape ``[n, num_bands]``; their sum over bands is ``‖x‖²`` (``U`` is orthonormal).
    """
    energy = (x @ eigenvectors).square()  # [n, d] in the eigenbasis
    cumulative = torch.nn.functional.pad(energy.cumsum(dim=1), (1, 0))  # [n, d + 1]
    idx = torch.as_tensor(list(bounds), device=x.device)
    return cumulative[:, idx[1:]] - cumulative[:, idx[:-1]]


# ---------------------------------------------------------------------------- per-example band fractions
@dataclass
class BandFractions:
    """Per-example activation energy by spectrum band of one module.

    Attributes:
        index: Dataset index of each example, shape ``[N]``, ascending.
        fractions: Mean over the example's samples of the per-sample energy fraction in each band, shape
            ``[N, num_bands]`` (float64); each row sums to 1.
        energy: Summed activation energy of the example's samples in each band, shape ``[N, num_bands]``.
        num_samples: Samples (token positions, images) behind each row, shape ``[N]``.
        names: Band names, from the top of the spectrum (see :func:`band_names`).
    """

    index: Tensor
    fractions: Tensor
    energy: Tensor
    num_samples: Tensor
    names: tuple[str, ...]

    def energy_fractions(self) -> Tensor:
        """Energy-weighted fractions ``energy / energy.sum(1)`` of shape ``[N, num_bands]``."""
        return self.energy / self.energy.sum(dim=1, keepdim=True)

    def aggregate(self) -> Tensor:
        """Fraction of all the examples' energy in each band, shape ``[num_bands]``.

        On the data the factors were collected on, this equals the band mass of the eigenvalues ``μ``.
        """
        total = self.energy.sum(dim=0)
        return total / total.sum()


def activation_bands(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    eigens: Mapping[str, KFACEigen],
    *,
    task: Task = "causal_lm",
    position: int | None = 0,
    edges: Sequence[float] = BAND_EDGES,
    input_key: str = "pixel_values",
    max_batches: int | None = None,
) -> dict[str, BandFractions]:
    """Per-example band fractions of the input activations of every module in ``eigens``.

    Runs ``model`` over ``batches`` under ``torch.no_grad()`` in eval mode with forward hooks on the modules
    (removed at the end, train/eval mode restored). Samples are chosen as the curvature pass chooses them
    (see :func:`sample_selection`).

    Args:
        model: The backbone the eigenbases belong to (``LitCausalLM.model``, ``LitViT.model``); module names
            are relative to it.
        batches: Batches with ``index`` ``[B]``: LM batches (``input_ids``, ``attention_mask``, ``labels``,
            ``[B, T]``) for ``"causal_lm"``, or batches with ``batch[input_key]`` for ``"classifier"``.
        eigens: Eigenbases per module name (from :func:`load_eigens` or :func:`eigendecompose`).
        task: ``"causal_lm"`` or ``"classifier"``.
        position: Classifier sample position (0: a ViT's class token); None: every position.
        edges: Band edges (see :func:`band_bounds`).
        input_key: Classifier input.
        max_batches: Stop after this many batches.

    Returns:
        :class:`BandFractions` per module name. Examples without any sample (one-token sequences) are left
        out.
    """
    check_task(task)
    edges = _check_edges(edges)
    names = band_names(edges)
    bounds = {n: band_bounds(eigens[n].shape[1], edges) for n in eigens}
    bases: dict[str, Tensor] = {}
    stored: dict[str, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {n: [] for n in eigens}
    state: dict[str, Any] = {}

    def on_forward(name: str, inputs: Tensor, output: Tensor) -> None:
        x = inputs.detach()
        eigen = eigens[name]
        dtype = compute_dtype(eigen)
        if name not in bases:
            bases[name] = eigen.eigenvectors_A.to(x.device, dtype)
        selection, num_rows = state["selection"], x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            a = select_positions(x, selection).to(dtype)  # [n, d_in]
            rows = sample_rows(x, selection)  # [n]
            energy = band_energy(a, bases[name], bounds[name])  # [n, num_bands]
        total = energy.sum(dim=1)
        ok = total > 0
        fraction = energy[ok] / total[ok, None]
        frac_sum = torch.zeros(num_rows, len(names), dtype=torch.float64, device=x.device)
        frac_sum.index_add_(0, rows[ok], fraction.double())
        energy_sum = torch.zeros_like(frac_sum).index_add_(0, rows, energy.double())
        counts = torch.bincount(rows[ok], minlength=num_rows)
        stored[name].append((state["index"], frac_sum.cpu(), energy_sum.cpu(), counts.cpu()))

    hooks = ModuleHooks(model, eigens, on_forward, freeze=False, purpose="Per-example analysis")
    with torch.no_grad(), hooks:
        for batch, index in iterate_batches(batches, model_device(model), max_batches):
            state["index"] = index
            state["selection"] = sample_selection(batch, task, position)
            hooks.new_forward()
            forward_batch(model, batch, task, input_key)

    result = {}
    for name, parts in stored.items():
        if not parts:
            raise ValueError("No batches were given: the loader is empty.")
        index, frac_sum, energy, counts = reduce_by_index(*(torch.cat(p) for p in zip(*parts, strict=True)))
        keep = counts > 0
        result[name] = BandFractions(
            index=index[keep],
            fractions=frac_sum[keep] / counts[keep, None],
            energy=energy[keep],
            num_samples=counts[keep],
            names=names,
        )
    return result


def mean_bands(bands: Mapping[str, BandFractions]) -> BandFractions:
    """Average of the band fractions (and sum of the energies) of several modules over the same examples.

    Args:
        bands: Results of :func:`activation_bands` for several modules.

    Returns:
        One :class:`BandFractions` (``num_samples`` of the first module).

    Raises:
        ValueError: If ``bands`` is empty or the modules cover different examples or bands.
    """
    items = list(bands.values())
    if not items:
        raise ValueError("No band fractions to average.")
    first = items[0]
    for other in items[1:]:
        if not torch.equal(other.index, first.index) or other.names != first.names:
            raise ValueError("Band fractions of different examples or bands cannot be averaged.")
    return BandFractions(
        index=first.index,
        fractions=torch.stack([b.fractions for b in items]).mean(dim=0),
        energy=torch.stack([b.energy for b in items]).sum(dim=0),
        num_samples=first.num_samples,
        names=first.names,
    )


# ---------------------------------------------------------------------------- memorized vs not
def split_labels(labels: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """Masks of memorized and non-memorized rows from labels.

    Args:
        labels: Shape ``[num]``: bool (True = memorized), or integers 1 (memorized), 0 (not) and -1 (left out,
            e.g. TinyMem backdoor rows; see :func:`lightning_curv.analysis.memorization_labels`).
        num: Expected number of rows.

    Returns:
        ``(memorized [num], non_memorized [num])`` boolean masks.

    Raises:
        ValueError: On a wrong shape or values outside {-1, 0, 1}.
    """
    labels = labels.detach().cpu().reshape(-1)
    if labels.numel() != num:
        raise ValueError(
            f"Got {labels.numel()} labels for {num} examples: index the per-row labels with the result's "
            "`index` (labels = memorization_labels(datamodule)[bands.index])."
        )
    if labels.dtype == torch.bool:
        return labels, ~labels
    if labels.is_floating_point() or not bool(((labels == 1) | (labels == 0) | (labels == -1)).all()):
        raise ValueError("Integer labels must be 1 (memorized), 0 (not memorized) or -1 (left out).")
    return labels == 1, labels == 0


def compare_bands(bands: BandFractions, labels: Tensor) -> dict[str, Any]:
    """Mean band fractions of memorized vs non-memorized examples and their ratio per band.

    Args:
        bands: Per-example fractions of one module (or :func:`mean_bands` of several).
        labels: One label per row of ``bands`` (aligned with ``bands.index``), see :func:`split_labels`.

    Returns:
        ``{"bands": names, "memorized": {band: mean}, "non_memorized": {band: mean}, "ratio": {band:
        memorized / non_memorized}, "memorized_std": {...}, "non_memorized_std": {...}, "num_memorized": int,
        "num_non_memorized": int}``; means of an empty group are NaN.
    """
    memorized, other = split_labels(labels, bands.index.numel())
    out: dict[str, Any] = {"bands": list(bands.names)}
    for key, mask in (("memorized", memorized), ("non_memorized", other)):
        values = bands.fractions[mask]
        mean = values.mean(dim=0) if values.shape[0] else torch.full((len(bands.names),), math.nan)
        std = values.std(dim=0) if values.shape[0] > 1 else torch.full((len(bands.names),), math.nan)
        out[key] = dict(zip(bands.names, mean.tolist(), strict=True))
        out[f"{key}_std"] = dict(zip(bands.names, std.tolist(), strict=True))
    out["ratio"] = {
        name: (out["memorized"][name] / out["non_memorized"][name] if out["non_memorized"][name] else math.nan)
        for name in bands.names
    }
    out["num_memorized"] = int(memorized.sum())
    out["num_non_memorized"] = int(other.sum())
    return out


def plot_band_comparison(comparisons: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Band fractions of memorized vs non-memorized examples, saved as a PNG.

    Left: the ratio memorized / non-memorized per band, one line per module. Right: the mean fraction per band
    of each group, averaged over the modules, as grouped bars.

    Args:
        comparisons: :func:`compare_bands` results per module name (same bands).
        path: PNG destination (written atomically).

    Returns:
        The path written.
    """
    if not comparisons:
        raise ValueError("No band comparisons to plot.")
    names = next(iter(comparisons.values()))["bands"]
    x = torch.arange(len(names)).double()
    fig, axes = new_figure(1, 2, size=(5.2, 4.0))
    for module, comp in comparisons.items():
        axes[0].plot(x.numpy(), [comp["ratio"][b] for b in names], marker="o", lw=1.2, label=module)
    axes[0].axhline(1.0, color="grey", ls=":", lw=0.8)
    axes[0].set_xticks(x.numpy(), names)
    axes[0].set_xlabel("eigenbasis band of A (by eigenvalue rank)")
    axes[0].set_ylabel("memorized / non-memorized")
    axes[0].set_title("Energy-fraction ratio per band")
    axes[0].grid(alpha=0.3)
    if len(comparisons) <= MAX_LEGEND_ENTRIES:
        axes[0].legend(fontsize=7)
    width = 0.38
    for shift, key, label in (
        (-width / 2, "memorized", "memorized"),
        (width / 2, "non_memorized", "non-memorized"),
    ):
        means = [sum(c[key][b] for c in comparisons.values()) / len(comparisons) for b in names]
        axes[1].bar((x + shift).numpy(), means, width=width, label=label)
    axes[1].set_xticks(x.numpy(), names)
    axes[1].set_xlabel("eigenbasis band of A (by eigenvalue rank)")
    axes[1].set_yscale("log")  # the low bands hold orders of magnitude less energy than the top one
    axes[1].set_ylabel("mean fraction of activation energy")
    axes[1].set_title("Mean over modules")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3, axis="y")
    return save_png(fig, path)
