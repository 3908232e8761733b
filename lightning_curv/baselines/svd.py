"""Weight-SVD truncation: keep each weight's top singular directions by energy fraction ρ.

The SVD ablation of Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature* (arXiv
2510.24256, 2025): the same kind of low-rank projection as the curvature edit, but ordered by the weight's own
singular values instead of by loss curvature. For ``W = U diag(s) Vᵀ`` (``s`` descending) keep the smallest
``k`` with ``Σ_{r<k} s_r² ≥ ρ Σ_r s_r²`` and set ``W' = U_k diag(s_k) V_kᵀ``, the best rank-``k``
approximation of ``W``. ``ρ = 1`` returns ``W`` unchanged, bit for bit.

:func:`apply_svd_edit` has the call shape of :func:`lightning_curv.curvature.apply_edit` with module patterns
in place of eigenbases, and returns the same :class:`~lightning_curv.curvature.EditHandle`.

Warning:
    GPT-2 ``Conv1D`` stores its weight as ``[d_in, d_out]``; the SVD is taken of the ``[d_out, d_in]`` view
    from :func:`~lightning_curv.curvature.weight_matrix` (the singular values are the same either way, the
    written layout is the parameter's own). Biases are not edited.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_curv.curvature import (
    EditHandle,
    EditStats,
    check_rho,
    resolve_modules,
    resolve_rho,
    weight_matrix,
)
from lightning_curv.curvature.edit import Rho, replace_weight

#: Thin SVD factors ``(U [d_out, r], s [r], Vh [r, d_in])`` in float64, ``r = min(d_out, d_in)``.
SVDFactors = tuple[Tensor, Tensor, Tensor]


def svd_factors(weight: Tensor) -> SVDFactors:
    """Thin SVD of a weight in float64, singular values descending.

    Args:
        weight: Weight of shape ``[d_out, d_in]``.

    Returns:
        ``(U [d_out, r], s [r], Vh [r, d_in])`` with ``r = min(d_out, d_in)``.
    """
    U, s, Vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return U, s, Vh


def svd_rank(singular_values: Tensor, rho: float) -> tuple[int, float]:
    """Smallest number of top singular directions whose squared singular values reach ``rho`` of the total.

    Args:
        singular_values: ``s`` of shape ``[r]``, descending.
        rho: Energy fraction to keep, in (0, 1].

    Returns:
        ``(k, kept_fraction)``: ``k = r`` for ``rho = 1``; for an all-zero weight ``k = 0``.
    """
    rho = check_rho(rho)
    r = singular_values.numel()
    if rho == 1.0:
        return r, 1.0
    cumulative = singular_values.double().pow(2).cumsum(0)
    total = cumulative[-1] if r else torch.tensor(0.0, dtype=torch.float64)
    if total <= 0:
        return 0, 1.0
    # Smallest k with cumulative[k-1] >= rho * total; the total is the computed sum, so k <= r always.
    k = min(int(torch.searchsorted(cumulative, rho * total).item()) + 1, r)
    return k, float(cumulative[k - 1] / total)


def _truncate(weight: Tensor, rho: float, factors: SVDFactors | None = None) -> tuple[Tensor, int, float]:
    rho = check_rho(rho)
    if weight.ndim != 2:
        raise ValueError(f"Expected a weight of shape [d_out, d_in], got shape {tuple(weight.shape)}.")
    if rho == 1.0:
        return weight.detach().clone(), min(weight.shape), 1.0
    U, s, Vh = factors if factors is not None else svd_factors(weight)
    if tuple(U.shape[:1]) + tuple(Vh.shape[1:]) != tuple(weight.shape):
        raise ValueError(
            f"Cached SVD factors are for shape {(U.shape[0], Vh.shape[1])}, the weight has {tuple(weight.shape)}."
        )
    k, kept = svd_rank(s, rho)
    truncated = (U[:, :k] * s[:k]) @ Vh[:k]  # [d_out, d_in], best rank-k approximation
    return truncated.to(weight.device, weight.dtype), k, kept


def svd_truncate_weight(weight: Tensor, rho: float) -> Tensor:
    """Keep the top singular directions of ``weight`` holding a share ``rho`` of its squared Frobenius norm.

    Args:
        weight: Weight of shape ``[d_out, d_in]`` (any float dtype; the SVD runs in float64).
        rho: Fraction of ``Σ s²`` to keep, in (0, 1]. The kept set is the smallest prefix of the descending
            singular values whose squared sum is at least ``rho Σ s²``.

    Returns:
        The truncated weight, same shape, dtype and device as ``weight``; a bit-exact clone for ``rho = 1``.

    Raises:
        ValueError: If ``rho`` is outside (0, 1] or ``weight`` is not 2-D.
    """
    return _truncate(weight, rho)[0]


def apply_svd_edit(
    model: nn.Module,
    modules: str | Sequence[str],
    rho: Rho,
    *,
    cache: dict[str, SVDFactors] | None = None,
) -> EditHandle:
    """Replace the weights of the selected linear layers by their SVD truncation, in place.

    Args:
        model: The model.
        modules: Module names, fnmatch globs or ``re:`` regexes (see
            :func:`~lightning_curv.curvature.resolve_modules`).
        rho: One energy fraction for every module, or a mapping from names/patterns to ρ (see
            :func:`~lightning_curv.curvature.resolve_rho`; modules no key matches are not edited).
        cache: Optional dict of :func:`svd_factors` per module name, filled as a side effect, so a ρ sweep
            decomposes each weight once. Only valid while the weights are the ones it was filled from (undo
            each edit before the next).

    Returns:
        A handle whose :meth:`~lightning_curv.curvature.EditHandle.undo` restores the weights bit-exactly. Its
        :class:`~lightning_curv.curvature.EditStats` count singular directions instead of eigen-pairs:
        ``kept_pairs = k``, ``total_pairs = min(d_out, d_in)``, ``kept_mass`` = kept fraction of ``Σ s²``, and
        ``removed_energy = ‖W - W'‖_F² / ‖W‖_F²`` (``≈ 1 - kept_mass``).

    Raises:
        ValueError: If a pattern matches no linear layer or ``rho`` is invalid.
    """
    names = resolve_modules(model, modules)
    per_module = resolve_rho(rho, names)
    named = dict(model.named_modules())
    handle = EditHandle(model=model, originals={})
    try:
        for name, value in per_module.items():
            module = named[name]
            W = weight_matrix(module)
            factors = None
            if value < 1.0:
                factors = cache.get(name) if cache is not None else None
                if factors is None:
                    factors = svd_factors(W)
                    if cache is not None:
                        cache[name] = factors
            new, k, kept = _truncate(W, value, factors)
            removed = replace_weight(handle, name, module, new)
            handle.stats[name] = EditStats(
                rho=value, kept_pairs=k, total_pairs=min(W.shape), kept_mass=kept, removed_energy=removed
            )
    except Exception:
        handle.undo()
        raise
    return handle
