"""Per-example memorization scores from the K-FAC eigenbases, and how well they find memorized examples.

Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature* (arXiv 2510.24256, 2025)
argue that memorized examples live in low-curvature directions. Two scores turn that into a number per
training example; curvature-based detection of mislabeled examples is known to work (Garg and Roy, *Samples
with Low Loss Curvature Improve Data Efficiency*, CVPR 2023):

* **low-curvature activation energy**: the fraction of the example's activation energy in the bottom band of
  the eigenbasis of ``A`` (see :mod:`lightning_curv.analysis.bands`), averaged over modules;
* **low-curvature gradient mass**: for the example's loss gradient ``dW = Σ_t g_t a_tᵀ`` (``g_t`` the gradient
  of the example's summed loss with respect to the layer output at position ``t``, targets = the data labels
  it was trained on; for a causal LM ``t`` runs over all real tokens, so ``dW`` is the exact weight gradient),
  rotated into the eigenbasis ``C = U_Gᵀ dW U_A``, the fraction of ``‖C‖²`` on the pairs the edit at ρ drops
  (``~curvature_mask(eigen, ρ)``), pooled over modules as ``Σ dropped / Σ ‖C‖²``.

The baseline is the example's own training loss (mean cross-entropy over its loss positions). Separation is
measured by AUROC with memorized examples as the positive class and a higher score predicting "memorized"; an
AUROC below 0.5 means the score works in the other direction.

Warning:
    For a ViT with ``position=0`` the gradient score keeps only the class-token term of ``dW`` (the part the
    CLS-only curvature describes); the full weight gradient of earlier blocks also has patch-token terms,
    which ``position=None`` includes (at ``tokens`` times the cost).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_curv.analysis._plot import new_figure, save_png
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
from lightning_curv.analysis.bands import BandFractions, split_labels
from lightning_curv.curvature.constants import IGNORE_INDEX
from lightning_curv.curvature.edit import check_rho, curvature_mask
from lightning_curv.curvature.eigen import KFACEigen
from lightning_curv.curvature.hooks import GradHook, ModuleHooks
from lightning_curv.curvature.kfac import Selection, select_positions

#: Upper bound on the elements of one ``[chunk, d_out, d_in]`` block of rotated per-example gradients.
DEFAULT_MAX_CHUNK_ELEMENTS = 2**24

#: Score names of :func:`memorization_scores`.
LOSS_SCORE = "loss"
ENERGY_SCORE = "low_curvature_energy"
GRADIENT_SCORE = "low_curvature_gradient"


@dataclass
class GradientScores:
    """Per-example training loss and gradient mass in the low-curvature pairs, per module.

    Attributes:
        index: Dataset index of each example, shape ``[N]``, ascending.
        loss: Mean cross-entropy over the example's loss positions (its own training loss), shape ``[N]``.
        num_samples: Loss positions behind each row (next-token targets, or 1 per image), shape ``[N]``.
        rhos: The ρ values, in the order of the last dimension of ``dropped_energy``.
        grad_energy: ``‖dW‖_F² = ‖C‖_F²`` per module, shape ``[N]`` (float64).
        dropped_energy: ``‖C ⊙ (1 - M_ρ)‖_F²`` per module, shape ``[N, len(rhos)]`` (float64).
    """

    index: Tensor
    loss: Tensor
    num_samples: Tensor
    rhos: tuple[float, ...]
    grad_energy: dict[str, Tensor] = field(default_factory=dict)
    dropped_energy: dict[str, Tensor] = field(default_factory=dict)

    def low_curvature_fraction(self, modules: str | Sequence[str] | None = None) -> Tensor:
        """Fraction of the gradient energy on the dropped pairs, ``Σ_m dropped / Σ_m ‖C‖²`` over modules.

        Args:
            modules: One module, several, or None for all.

        Returns:
            Fractions of shape ``[N, len(rhos)]`` (NaN for an example whose gradient is exactly zero).
        """
        names = list(self.grad_energy) if modules is None else [modules] if isinstance(modules, str) else list(modules)
        dropped = sum(self.dropped_energy[n] for n in names)
        total = sum(self.grad_energy[n] for n in names)
        return dropped / total[:, None]


def _per_sample_loss(logits: Tensor, batch: Mapping[str, Tensor], task: Task, label_key: str) -> tuple[Tensor, Tensor]:
    """Cross-entropy of every loss position with the data targets, and its batch row.

    Returns:
        ``(losses [n], rows [n])``.
    """
    if task == "causal_lm":
        valid = sample_selection(batch, task)  # [B, T]: the positions that have a next-token target
        labels = batch.get("labels")
        targets = (labels if labels is not None else batch["input_ids"]).roll(-1, dims=1)  # target of t: t+1
        scores = logits[valid]  # [n, V]
        scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        return F.cross_entropy(scores, targets[valid], reduction="none"), valid.nonzero()[:, 0]
    labels = batch[label_key]
    keep = labels != IGNORE_INDEX
    scores = logits[keep]
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    return F.cross_entropy(scores, labels[keep], reduction="none"), keep.nonzero()[:, 0]


def _gradient_selection(batch: Mapping[str, Tensor], task: Task, position: int | None) -> Selection:
    """Positions whose ``g_t a_tᵀ`` terms make up an example's weight gradient.

    For a causal LM every real token (``attention_mask == 1``): a position without a target of its own (a
    masked label, the last token) still feeds later positions through attention, so its term belongs to the
    exact gradient; padding positions have ``g = 0``. For a classifier, the sample position(s).
    """
    if task == "causal_lm":
        mask = batch.get("attention_mask")
        return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    return position


def _pad_rows(x: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Samples ``[n, d]`` grouped by ascending ``rows``, laid out as ``[num_rows, max_per_row, d]`` ."""
    counts = torch.bincount(rows, minlength=num_rows)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    out = x.new_zeros(num_rows, max(int(counts.max()) if rows.numel() else 0, 1), x.shape[1])
    out[rows, slot] = x
    return out


def rotated_gradient_energy(
    a: Tensor,
    g: Tensor,
    rows: Tensor,
    num_rows: int,
    eigen: KFACEigen,
    dropped: Tensor,
    *,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Per-row ``‖C‖²`` and ``‖C ⊙ D_r‖²`` for ``C = U_Gᵀ (Σ_t g_t a_tᵀ) U_A`` summed over each row's samples.

    Args:
        a: Layer inputs at the samples, shape ``[n, d_in]``.
        g: Loss gradients with respect to the layer output at the same samples, shape ``[n, d_out]``.
        rows: Batch row of each sample, shape ``[n]``, ascending.
        num_rows: Rows in the batch ``B``.
        eigen: Eigenbases of the layer.
        dropped: Masks ``D_r`` of the dropped pairs, shape ``[R, d_out, d_in]`` (1 = dropped), compute dtype.
        max_chunk_elements: Memory bound of one ``[chunk, d_out, d_in]`` block.

    Returns:
        ``(total [B], dropped [B, R])`` in float64.
    """
    dtype = dropped.dtype
    a_rot = a.to(dtype) @ eigen.eigenvectors_A.to(a.device, dtype)  # [n, d_in] in the eigenbasis of A
    g_rot = g.to(dtype) @ eigen.eigenvectors_G.to(g.device, dtype)  # [n, d_out] in the eigenbasis of G
    a_pad = _pad_rows(a_rot, rows, num_rows)  # [B, T, d_in]
    g_pad = _pad_rows(g_rot, rows, num_rows)  # [B, T, d_out]
    d_out, d_in = eigen.shape
    chunk = max(1, max_chunk_elements // (d_out * d_in))
    totals, drops = [], []
    for lo in range(0, num_rows, chunk):
        C = torch.einsum("bto,bti->boi", g_pad[lo : lo + chunk], a_pad[lo : lo + chunk])  # [b, d_out, d_in]
        energy = C.square()
        totals.append(energy.sum(dim=(1, 2)))
        drops.append(torch.einsum("boi,roi->br", energy, dropped))
    return torch.cat(totals).double(), torch.cat(drops).double()


def gradient_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    eigens: Mapping[str, KFACEigen],
    rhos: Sequence[float],
    *,
    task: Task = "causal_lm",
    position: int | None = 0,
    input_key: str = "pixel_values",
    label_key: str = "labels",
    max_batches: int | None = None,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> GradientScores:
    """Per-example training loss and low-curvature gradient mass of every module in ``eigens``.

    One forward and one backward of the batch's summed data-label loss per batch (rows do not interact, so the
    gradient at a row's positions is that row's own loss gradient). Parameters are frozen for the pass (no
    parameter gradient is computed) and restored, hooks removed and train/eval mode restored at the end.

    Args:
        model: The backbone the eigenbases belong to (``LitCausalLM.model``, ``LitViT.model``).
        batches: Batches with ``index`` ``[B]``; LM batches for ``"causal_lm"`` (targets: the next data
            token), image batches with ``batch[input_key]`` and ``batch[label_key]`` ``[B]`` for
            ``"classifier"`` (targets: the labels trained on, flipped ones included).
        eigens: Eigenbases per module name.
        rhos: ρ values whose dropped pairs are measured.
        task: ``"causal_lm"`` or ``"classifier"``.
        position: Classifier position whose ``g_t a_tᵀ`` term is kept (0: a ViT's class token); None: every
            position (the exact gradient). Causal LMs always use every real token.
        input_key: Classifier input.
        label_key: Classifier labels.
        max_batches: Stop after this many batches.
        max_chunk_elements: Memory bound of the per-example rotated gradients (see
            :func:`rotated_gradient_energy`).

    Returns:
        The :class:`GradientScores`; examples without a loss position are left out.
    """
    check_task(task)
    rhos = tuple(check_rho(r) for r in rhos)
    inputs: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def on_forward(name: str, x: Tensor, output: Tensor) -> GradHook:
        inputs[name] = x.detach()

        def store_grad(grad: Tensor) -> None:
            grads[name] = grad.detach()

        return store_grad

    hooks = ModuleHooks(model, eigens, on_forward, needs_grad=True, purpose="Per-example analysis")
    device = model_device(model)
    dropped = {
        name: torch.stack([~curvature_mask(eigens[name], rho)[0] for rho in rhos]).to(
            device, compute_dtype(eigens[name])
        )
        for name in hooks.names
    }  # [R, d_out, d_in]
    parts: list[tuple[Tensor, ...]] = []
    module_parts: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in hooks.names}
    with hooks:
        for batch, index in iterate_batches(batches, device, max_batches):
            selection = _gradient_selection(batch, task, position)
            inputs.clear()
            grads.clear()
            hooks.new_forward()
            with torch.enable_grad():
                logits = forward_batch(model, batch, task, input_key)
                losses, loss_rows = _per_sample_loss(logits, batch, task, label_key)
                losses.sum().backward()
            num_rows = index.numel()
            loss_sum = torch.zeros(num_rows, dtype=torch.float64).index_add_(
                0, loss_rows.cpu(), losses.detach().double().cpu()
            )
            counts = torch.bincount(loss_rows.cpu(), minlength=num_rows)
            parts.append((index, loss_sum, counts))
            for name in hooks.names:
                x = inputs[name]
                grad = grads.get(name)
                if grad is None:  # the layer's output does not reach the loss
                    grad = torch.zeros((*x.shape[:-1], eigens[name].shape[0]), dtype=x.dtype, device=x.device)
                rows = sample_rows(x, selection)
                total, drop = rotated_gradient_energy(
                    select_positions(x, selection),
                    select_positions(grad, selection),
                    rows,
                    num_rows,
                    eigens[name],
                    dropped[name],
                    max_chunk_elements=max_chunk_elements,
                )
                module_parts[name].append((total.cpu(), drop.cpu()))

    if not parts:
        raise ValueError("No batches were given: the loader is empty.")
    all_index = torch.cat([p[0] for p in parts])
    index, loss_sum, counts = reduce_by_index(
        all_index, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    )
    keep = counts > 0
    scores = GradientScores(index=index[keep], loss=loss_sum[keep] / counts[keep], num_samples=counts[keep], rhos=rhos)
    for name, pieces in module_parts.items():
        _, total, drop = reduce_by_index(
            all_index, torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
        )
        scores.grad_energy[name] = total[keep]
        scores.dropped_energy[name] = drop[keep]
    return scores


def low_curvature_energy(
    bands: Mapping[str, BandFractions], modules: Sequence[str] | None = None
) -> tuple[Tensor, Tensor]:
    """Bottom-band activation-energy fraction per example, averaged over modules.

    Args:
        bands: :func:`activation_bands` results per module.
        modules: Modules to average; None for all.

    Returns:
        ``(index [N], score [N])``.

    Raises:
        ValueError: If the modules cover different examples.
    """
    names = list(bands) if modules is None else list(modules)
    if not names:
        raise ValueError("No modules to score.")
    index = bands[names[0]].index
    for name in names[1:]:
        if not torch.equal(bands[name].index, index):
            raise ValueError(f"Module {name!r} covers other examples than {names[0]!r}.")
    return index, torch.stack([bands[n].fractions[:, -1] for n in names]).mean(dim=0)


def memorization_scores(
    bands: Mapping[str, BandFractions] | None = None, gradients: GradientScores | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The standard per-example scores, on one index.

    Args:
        bands: :func:`activation_bands` results (gives ``"low_curvature_energy"``).
        gradients: :func:`gradient_scores` result (gives ``"loss"`` and ``"low_curvature_gradient/rho=<ρ>"``
            per ρ, pooled over modules).

    Returns:
        ``(index [N], {score name: values [N]})``; a higher value predicts "memorized".

    Raises:
        ValueError: If neither input is given or they cover different examples.
    """
    scores: dict[str, Tensor] = {}
    index = None
    if gradients is not None:
        index = gradients.index
        scores[LOSS_SCORE] = gradients.loss
        fractions = gradients.low_curvature_fraction()
        for r, rho in enumerate(gradients.rhos):
            scores[f"{GRADIENT_SCORE}/rho={rho:g}"] = fractions[:, r]
    if bands is not None:
        band_index, energy = low_curvature_energy(bands)
        if index is not None and not torch.equal(index, band_index):
            raise ValueError(
                "Band fractions and gradient scores cover different examples: run both over the same loader."
            )
        index = band_index
        scores[ENERGY_SCORE] = energy
    if index is None:
        raise ValueError("Give band fractions, gradient scores, or both.")
    return index, scores


# ---------------------------------------------------------------------------- separation
def score_auroc(scores: Tensor, labels: Tensor) -> float:
    """AUROC of ``scores`` for separating memorized (positive) from non-memorized examples.

    Computed with ``sklearn.metrics.roc_auc_score`` (exact, on the raw scores: unlike torchmetrics it applies
    no sigmoid to values outside [0, 1], which would merge large scores into ties).

    Args:
        scores: One score per example, shape ``[N]``; higher predicts "memorized".
        labels: Shape ``[N]``, see :func:`lightning_curv.analysis.bands.split_labels` (-1 rows are left out).

    Returns:
        The AUROC in [0, 1]: 1 when every memorized example scores above every other, 0.5 for chance, 0 when
        reversed; ties count one half.

    Raises:
        ValueError: If a group is empty or a used score is NaN.
    """
    scores = scores.detach().cpu().reshape(-1)
    memorized, other = split_labels(labels, scores.numel())
    used = memorized | other
    if not bool(memorized.any()) or not bool(other.any()):
        raise ValueError(
            f"AUROC needs memorized and non-memorized examples; got {int(memorized.sum())} and {int(other.sum())}."
        )
    values = scores[used].double()
    if bool(values.isnan().any()):
        raise ValueError("Scores contain NaN (e.g. an example with an exactly zero gradient).")
    from sklearn.metrics import roc_auc_score  # here: importing sklearn.metrics takes seconds, only this needs it

    return float(roc_auc_score(memorized[used].numpy(), values.numpy()))


def score_aurocs(scores: Mapping[str, Tensor], labels: Tensor) -> dict[str, float]:
    """:func:`score_auroc` of every score, keyed like ``scores``."""
    return {name: score_auroc(values, labels) for name, values in scores.items()}


def memorization_labels(datamodule: Any) -> Tensor:
    """Label of every training row of a lightning_curv data module, indexed by the batches' ``index``.

    Args:
        datamodule: A set-up :class:`~lightning_curv.data.TinyMemDataModule` (noise rows memorized, clean rows
            not, backdoor rows left out) or :class:`~lightning_curv.data.images.NoisyLabelImageDataModule`
            (flipped-label rows memorized, the rest not).

    Returns:
        Long labels of shape ``[n_train]``: 1 memorized, 0 not, -1 left out.

    Raises:
        TypeError: If the data module has neither ``train_sources`` nor ``noisy_indices``.
    """
    sources = getattr(datamodule, "train_sources", None)
    if sources is not None:
        code = {"noise": 1, "clean": 0}
        return torch.tensor([code.get(kind, -1) for kind, _ in sources], dtype=torch.long)
    if hasattr(datamodule, "noisy_indices"):
        labels = torch.zeros(datamodule.noisy_train_labels.numel(), dtype=torch.long)
        labels[datamodule.noisy_indices] = 1
        return labels
    raise TypeError(
        f"{type(datamodule).__name__} does not say which training rows are memorized (no `train_sources` or "
        "`noisy_indices`); build the labels yourself: 1 memorized, 0 not, -1 left out, indexed by `index`."
    )


def plot_score_histograms(
    scores: Mapping[str, Tensor], labels: Tensor, path: str | os.PathLike, *, bins: int = 30, ncols: int = 3
) -> Path:
    """Histograms of each score for memorized vs non-memorized examples, with the AUROC in the title.

    Args:
        scores: Scores per name, each of shape ``[N]`` (aligned with ``labels``).
        labels: See :func:`lightning_curv.analysis.bands.split_labels`.
        path: PNG destination (written atomically).
        bins: Histogram bins (shared by both groups of a score).
        ncols: Subplots per row.

    Returns:
        The path written.
    """
    if not scores:
        raise ValueError("No scores to plot.")
    names = list(scores)
    ncols = min(ncols, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = new_figure(nrows, ncols, size=(4.2, 3.3))
    flat = [axes] if len(names) == 1 else list(getattr(axes, "flat", axes))
    for ax, name in zip(flat, names, strict=False):
        values = scores[name].detach().double().cpu().reshape(-1)
        memorized, other = split_labels(labels, values.numel())
        finite = values.isfinite()
        lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 1.0)
        edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1, dtype=torch.float64).numpy()
        for mask, label, color in ((other, "non-memorized", "tab:blue"), (memorized, "memorized", "tab:red")):
            group = values[mask & finite].numpy()
            if group.size:
                ax.hist(group, bins=edges, density=True, alpha=0.5, color=color, label=f"{label} ({group.size})")
        try:
            auroc = f"AUROC {score_auroc(values, labels):.3f}"
        except ValueError:
            auroc = "AUROC n/a"
        ax.set_title(f"{name}\n{auroc}", fontsize=9)
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[len(names) :]:
        ax.set_visible(False)
    return save_png(fig, path)
