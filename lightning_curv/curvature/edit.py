"""Weight editing in the K-FAC eigenbasis: keep the high-curvature pairs, drop the rest.

Method of Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature* (arXiv 2510.24256,
2025). For a layer with weight ``W`` (``[d_out, d_in]``) and eigenbases ``A = U_A diag(μ) U_Aᵀ``,
``G = U_G diag(λ) U_Gᵀ``:

* rotate ``C = U_Gᵀ W U_A``; pair ``(i, j)`` has curvature ``Π_ij = λ_i μ_j``;
* keep the smallest set of pairs, taken in descending ``Π``, whose summed ``Π`` is at least ``ρ Σλ Σμ``;
* ``W' = U_G (C ⊙ M) U_Aᵀ`` with ``M`` the 0/1 mask of kept pairs.

``ρ = 1`` keeps every pair (zero-curvature ones included) and returns ``W`` unchanged, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_curv.curvature.eigen import KFACEigen
from lightning_curv.curvature.modules import find_modules, match_names, weight_matrix

#: ρ for one layer, or per module name / pattern.
Rho = float | Mapping[str, float]


def check_rho(rho: float) -> float:
    """Validate one ρ value.

    Raises:
        ValueError: If ``rho`` is not a finite number in (0, 1].
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or not 0 < rho <= 1:
        raise ValueError(
            f"rho must be a number in (0, 1] (the fraction of curvature mass to keep; 1 keeps the weights "
            f"unchanged), got {rho!r}."
        )
    return float(rho)


def pair_curvature(eigen: KFACEigen) -> Tensor:
    """``Π = λ μᵀ`` in float64, shape ``[d_out, d_in]``."""
    return torch.outer(eigen.eigenvalues_G.double().clamp_min(0), eigen.eigenvalues_A.double().clamp_min(0))


class CurvatureOrder:
    """The pairs of one layer sorted by curvature once; the mask for any ρ is then a search, not a sort.

    A ρ sweep over a 11008 x 4096 layer would otherwise sort 45M pair curvatures for every ρ.

    Args:
        eigen: Eigenbases of the layer.

    Raises:
        ValueError: If all curvature is zero.
    """

    def __init__(self, eigen: KFACEigen) -> None:
        pi = pair_curvature(eigen)
        self.shape = pi.shape
        values, self.order = pi.flatten().sort(descending=True, stable=True)
        self.cumulative = values.cumsum(0)
        self.total = self.cumulative[-1]
        if self.total <= 0:
            raise ValueError("All pair curvatures are zero: the factors are degenerate (empty or all-zero statistics).")

    def mask(self, rho: float) -> tuple[Tensor, float]:
        """``(mask, kept_mass_fraction)`` at ``rho``, as :func:`curvature_mask` returns them."""
        rho = check_rho(rho)
        if rho == 1.0:
            return torch.ones(self.shape, dtype=torch.bool, device=self.order.device), 1.0
        # Smallest k with cumulative[k-1] >= rho * total; the total is the computed sum, so k <= n always.
        k = min(int(torch.searchsorted(self.cumulative, rho * self.total).item()) + 1, self.order.numel())
        mask = torch.zeros(self.order.numel(), dtype=torch.bool, device=self.order.device)
        mask[self.order[:k]] = True
        return mask.view(self.shape), float(self.cumulative[k - 1] / self.total)


def curvature_mask(eigen: KFACEigen, rho: float) -> tuple[Tensor, float]:
    """Mask of the pairs kept at curvature-mass fraction ``rho``.

    Args:
        eigen: Eigenbases of the layer.
        rho: Fraction of ``Σλ Σμ`` to keep, in (0, 1].

    Returns:
        ``(mask, kept_mass_fraction)``: a boolean mask of shape ``[d_out, d_in]`` over pairs ``(i, j)`` (row
        ``i`` indexes ``λ``, column ``j`` indexes ``μ``) and the fraction of curvature mass it keeps.

    Raises:
        ValueError: If ``rho`` is outside (0, 1] or all curvature is zero.
    """
    rho = check_rho(rho)
    if rho == 1.0:
        return torch.ones(eigen.shape, dtype=torch.bool, device=eigen.eigenvalues_G.device), 1.0
    return CurvatureOrder(eigen).mask(rho)


def _compute_dtype(weight: Tensor, eigen: KFACEigen) -> torch.dtype:
    return torch.promote_types(torch.promote_types(weight.dtype, eigen.eigenvectors_A.dtype), torch.float32)


def project_weight(weight: Tensor, eigen: KFACEigen, rho: float, mask: Tensor | None = None) -> Tensor:
    """Edited weight ``W' = U_G ((U_Gᵀ W U_A) ⊙ M) U_Aᵀ``.

    Args:
        weight: Weight of shape ``[d_out, d_in]``.
        eigen: Eigenbases of the layer.
        rho: Curvature-mass fraction to keep, in (0, 1].
        mask: Precomputed :func:`curvature_mask` for ``rho`` (saves the sort in a sweep).

    Returns:
        The edited weight, same shape, dtype and device as ``weight``; a clone of it for ``rho = 1``.
    """
    rho = check_rho(rho)
    if tuple(weight.shape) != eigen.shape:
        raise ValueError(
            f"Weight of shape {tuple(weight.shape)} does not match eigenbases for [d_out, d_in] = {eigen.shape}: "
            "the factors were collected on a different model."
        )
    if rho == 1.0:
        return weight.detach().clone()
    if mask is None:
        mask = curvature_mask(eigen, rho)[0]
    dtype = _compute_dtype(weight, eigen)
    U_A = eigen.eigenvectors_A.to(weight.device, dtype)
    U_G = eigen.eigenvectors_G.to(weight.device, dtype)
    C = U_G.T @ weight.detach().to(dtype) @ U_A  # [d_out, d_in] in the eigenbasis
    C = C * mask.to(weight.device, dtype)
    return (U_G @ C @ U_A.T).to(weight.dtype)


@dataclass
class EditStats:
    """What an edit did to one layer.

    Attributes:
        rho: The ρ applied.
        kept_pairs: Number of kept eigen-pairs.
        total_pairs: ``d_out * d_in``.
        kept_mass: Fraction of curvature mass kept.
        removed_energy: ``‖W - W'‖_F² / ‖W‖_F²``.
    """

    rho: float
    kept_pairs: int
    total_pairs: int
    kept_mass: float
    removed_energy: float


def summarize_stats(stats: Mapping[str, EditStats]) -> dict[str, float]:
    """One row for an edit of several layers: the share of all eigen-pairs kept, and the mean removed energy.

    Args:
        stats: Per-module :class:`EditStats` (e.g. :attr:`EditHandle.stats`).

    Returns:
        ``{"kept_pairs_fraction": Σ kept / Σ total, "removed_energy": mean of ‖W − W'‖² / ‖W‖² over modules}``
        (0 for both when ``stats`` is empty).
    """
    values = list(stats.values())
    return {
        "kept_pairs_fraction": sum(s.kept_pairs for s in values) / max(sum(s.total_pairs for s in values), 1),
        "removed_energy": sum(s.removed_energy for s in values) / max(len(values), 1),
    }


@dataclass
class EditHandle:
    """Undo handle returned by :func:`apply_edit`; also a context manager that undoes on exit.

    Attributes:
        model: The edited model.
        originals: Original parameter data per module name (in the parameter's own layout).
        stats: Per-module :class:`EditStats`.
    """

    model: nn.Module
    originals: dict[str, Tensor]
    stats: dict[str, EditStats] = field(default_factory=dict)
    active: bool = True

    def undo(self) -> None:
        """Restore the original weights bit-exactly (idempotent)."""
        if not self.active:
            return
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, original in self.originals.items():
                modules[name].weight.copy_(original)
        self.active = False

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def replace_weight(handle: EditHandle, name: str, module: nn.Module, new: Tensor) -> float:
    """Write ``new`` into the weight of ``module``, keeping the original in ``handle`` for undo.

    The one weight write of every post-hoc edit (:func:`apply_edit` and the baselines).

    Args:
        handle: The handle that will restore the weight.
        name: Module name (the key in ``handle.originals``).
        module: A linear layer (``nn.Linear`` or Conv1D-style).
        new: The new weight of shape ``[d_out, d_in]``.

    Returns:
        The removed energy ``‖W - W'‖_F² / ‖W‖_F²`` (0 for an all-zero ``W``), measured in float64 after
        casting ``new`` to the weight's dtype.

    Raises:
        ValueError: If the module was already edited through this handle.
    """
    if name in handle.originals:
        raise ValueError(f"Module {name!r} is edited twice in one edit; list every module once.")
    W = weight_matrix(module)
    new = new.to(W.device, W.dtype)
    handle.originals[name] = module.weight.detach().clone()
    energy = W.detach().double().pow(2).sum()
    removed = (W.detach().double() - new.double()).pow(2).sum()
    with torch.no_grad():
        W.copy_(new)
    return float(removed / energy) if energy > 0 else 0.0


def resolve_rho(rho: Rho, names: Sequence[str]) -> dict[str, float]:
    """ρ per module.

    Args:
        rho: One value for every module, or a mapping whose keys are module names or patterns (exact, glob or
            ``re:``); modules no key matches are left out (not edited).
        names: Modules that have eigenbases.

    Returns:
        ρ per module to edit.

    Raises:
        ValueError: If a value is outside (0, 1], a key matches no module, or a module is matched by two keys
            with different values.
    """
    if not isinstance(rho, Mapping):
        value = check_rho(rho)
        return dict.fromkeys(names, value)
    resolved: dict[str, tuple[str, float]] = {}
    for key, hits in match_names(list(rho), names).items():
        value = check_rho(rho[key])
        if not hits:
            raise ValueError(f"rho key {key!r} matches none of the modules with eigenbases: {list(names)}.")
        for name in hits:
            if name in resolved and resolved[name][1] != value:
                raise ValueError(
                    f"Module {name!r} is matched by rho keys {resolved[name][0]!r} (rho={resolved[name][1]}) and "
                    f"{key!r} (rho={value}); make the keys disjoint or give them the same value."
                )
            resolved[name] = (key, value)
    return {name: resolved[name][1] for name in names if name in resolved}


def apply_edit(
    model: nn.Module,
    eigens: Mapping[str, KFACEigen],
    rho: Rho,
    *,
    masks: Mapping[tuple[str, float], Tensor] | None = None,
    orders: dict[str, CurvatureOrder] | None = None,
) -> EditHandle:
    """Project the weights of ``model`` onto their kept eigen-pairs, in place.

    Args:
        model: The model whose modules are named in ``eigens``.
        eigens: Eigenbases per module name.
        rho: One ρ for every module, or a mapping from names/patterns to ρ (see :func:`resolve_rho`).
        masks: Optional cache of :func:`curvature_mask` results keyed by ``(module, rho)``; filled as a side
            effect when it is a dict.
        orders: Optional cache of each module's :class:`CurvatureOrder`, filled as a side effect, so a ρ sweep
            sorts each module's pair curvatures once for all its values.

    Returns:
        A handle whose :meth:`EditHandle.undo` restores the original weights bit-exactly.

    Raises:
        ValueError: If a module named in ``eigens`` is missing or its shape differs, or ``rho`` is invalid.
    """
    per_module = resolve_rho(rho, list(eigens))
    modules = find_modules(
        model,
        per_module,
        "they have eigenbases, so the factors belong to another architecture. Collect factors for this model.",
    )
    handle = EditHandle(model=model, originals={})
    try:
        for name, value in per_module.items():
            eigen = eigens[name]
            W = weight_matrix(modules[name])
            mask = None
            if value < 1.0:
                mask = masks.get((name, value)) if masks is not None else None
                if mask is None:
                    if orders is None:
                        mask = curvature_mask(eigen, value)[0]
                    else:
                        if name not in orders:
                            orders[name] = CurvatureOrder(eigen)
                        mask = orders[name].mask(value)[0]
                    if isinstance(masks, dict):
                        masks[(name, value)] = mask
            removed = replace_weight(handle, name, modules[name], project_weight(W, eigen, value, mask=mask))
            kept_pairs, kept_mass = W.numel(), 1.0
            if mask is not None:
                pi = pair_curvature(eigen)
                kept_pairs, kept_mass = int(mask.sum()), float(pi[mask].sum() / pi.sum())
            handle.stats[name] = EditStats(
                rho=value,
                kept_pairs=kept_pairs,
                total_pairs=W.numel(),
                kept_mass=kept_mass,
                removed_energy=removed,
            )
    except Exception:
        handle.undo()
        raise
    return handle
