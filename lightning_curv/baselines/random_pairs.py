"""Random-direction control for the curvature edit: remove K-FAC eigen-pairs in a random order.

Control experiment for Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature*
(arXiv 2510.24256, 2025). The curvature edit removes the pairs ``(i, j)`` of the K-FAC eigenbases with the
lowest curvature ``Π_ij = λ_i μ_j``. This control removes pairs of the same eigenbases chosen in a seeded
random order instead, matched to a curvature edit either on the removed weight energy or on the number of
removed pairs. If the control removes much less memorization at the same removed energy, the curvature
ordering, not the amount of weight removed, is what matters.

With ``C = U_Gᵀ W U_A`` (orthonormal bases) the removed energy of a pair set ``R`` is
``‖W - W'‖_F² = Σ_{(i,j)∈R} C_ij²``, so the greedy matching works on ``C²`` directly, with no repeated
projections.

Precision of ``match="energy"``: pairs are removed in the random order up to the first count whose removed
energy reaches the target ``e* = removed_energy · ‖W‖_F²`` of the reference, so the removed energy in the
eigenbasis, ``e = Σ_removed C_ij²`` (computed in float64), satisfies ``e* ≤ e < e* + C_last²``, where
``C_last²`` is the energy of the last removed pair (at most ``max_ij C_ij²``). The ``removed_energy`` reported
in the stats is measured as ``‖W - W'‖_F² / ‖W‖_F²`` after ``W'`` is written in the weight's dtype (as the
curvature edit measures its own); it differs from ``e / ‖W‖_F²`` by that rounding (about 1e-8 for float32
weights) and by the orthonormality error of the stored eigenvectors (about 1e-7 for float32 eigenbases).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_curv.curvature import EditHandle, EditStats, KFACEigen, pair_curvature, replace_weight, weight_matrix
from lightning_curv.curvature.modules import find_modules
from lightning_curv.utils import name_seed

MatchMode = Literal["energy", "count"]
MATCH_MODES: tuple[str, ...] = ("energy", "count")


def eigenbasis_coefficients(weight: Tensor, eigen: KFACEigen) -> Tensor:
    """``C = U_Gᵀ W U_A`` in float64.

    Args:
        weight: Weight of shape ``[d_out, d_in]``.
        eigen: Eigenbases of the layer.

    Returns:
        ``C`` of shape ``[d_out, d_in]``; ``C[i, j]`` is the coefficient of pair ``(i, j)``.

    Raises:
        ValueError: If the shapes differ.
    """
    if tuple(weight.shape) != eigen.shape:
        raise ValueError(
            f"Weight of shape {tuple(weight.shape)} does not match eigenbases for [d_out, d_in] = "
            f"{eigen.shape}: the factors were collected on a different model."
        )
    U_A = eigen.eigenvectors_A.to(weight.device, torch.float64)
    U_G = eigen.eigenvectors_G.to(weight.device, torch.float64)
    return U_G.T @ weight.detach().double() @ U_A


def random_pair_order(shape: tuple[int, int], seed: int) -> Tensor:
    """A seeded random order of the flattened pair indices (row-major over ``[d_out, d_in]``).

    Args:
        shape: ``(d_out, d_in)``.
        seed: Seed of the permutation (CPU generator, so the order does not depend on the device).

    Returns:
        A permutation of ``range(d_out * d_in)``, shape ``[d_out * d_in]``.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(shape[0] * shape[1], generator=generator)


def random_pair_mask(
    coefficients: Tensor,
    seed: int,
    *,
    target_energy: float | None = None,
    num_removed: int | None = None,
) -> Tensor:
    """Keep-mask that removes pairs in a seeded random order, by energy or by count.

    Args:
        coefficients: ``C = U_Gᵀ W U_A`` of shape ``[d_out, d_in]``.
        seed: Seed of the order (see :func:`random_pair_order`).
        target_energy: Remove pairs until ``Σ_removed C²`` first reaches this absolute energy (all pairs if it
            is never reached; none if it is <= 0).
        num_removed: Remove exactly this many pairs. Give exactly one of the two.

    Returns:
        Boolean mask of shape ``[d_out, d_in]``, True on kept pairs.

    Raises:
        ValueError: If not exactly one target is given or ``num_removed`` is out of range.
    """
    if (target_energy is None) == (num_removed is None):
        raise ValueError("Give exactly one of target_energy and num_removed.")
    n = coefficients.numel()
    order = random_pair_order(tuple(coefficients.shape), seed).to(coefficients.device)
    if num_removed is not None:
        if not 0 <= num_removed <= n:
            raise ValueError(f"num_removed must be in [0, {n}], got {num_removed}.")
        k = num_removed
    elif target_energy <= 0:
        k = 0
    else:
        cumulative = coefficients.double().flatten()[order].pow(2).cumsum(0)
        # First count whose removed energy reaches the target; all pairs if round-off keeps it out of reach.
        k = min(
            int(torch.searchsorted(cumulative, torch.tensor(target_energy, dtype=torch.float64)).item()) + 1,
            n,
        )
    keep = torch.ones(n, dtype=torch.bool, device=coefficients.device)
    keep[order[:k]] = False
    return keep.view_as(coefficients)


def _reference_stats(reference: EditHandle | Mapping[str, EditStats], model: nn.Module) -> Mapping[str, EditStats]:
    if isinstance(reference, EditHandle):
        if reference.active and reference.model is model:
            raise ValueError(
                "The reference curvature edit is still applied to this model: call its undo() first, so the "
                "random control edits the original weights."
            )
        return reference.stats
    return reference


def apply_random_pair_edit(
    model: nn.Module,
    eigens: Mapping[str, KFACEigen],
    reference: EditHandle | Mapping[str, EditStats],
    match: MatchMode = "energy",
    seed: int = 0,
) -> EditHandle:
    """Remove randomly chosen eigen-pairs, matched per module to a curvature edit, in place.

    Each module's order comes from a seed derived from ``(seed, module name)``, so a module's choice does not
    depend on which other modules are edited.

    Args:
        model: The model (with its original weights: undo the reference edit first).
        eigens: Eigenbases per module name, the ones the reference edit used.
        reference: The curvature edit to match (its handle, or its ``stats``); every module in its stats is
            edited, the others are left alone.
        match: ``"energy"``: remove pairs in random order until ``‖W - W'‖_F² / ‖W‖_F²`` first reaches the
            reference's ``removed_energy`` (precision in the module docstring); ``"count"``: remove exactly as
            many pairs as the reference (``total_pairs - kept_pairs``).
        seed: Base seed of the random orders.

    Returns:
        A handle whose :meth:`~lightning_curv.curvature.EditHandle.undo` restores the weights bit-exactly.
        Stats per module: ``rho`` of the reference, ``kept_pairs``/``total_pairs`` of this edit, ``kept_mass``
        = the fraction of curvature mass ``Σ Π`` the random choice keeps (compare with the reference's), and
        the measured ``removed_energy``.

    Raises:
        ValueError: If ``match`` is unknown, a reference module has no eigenbases or is not in the model, the
            pair counts disagree, or the reference edit is still applied to ``model``.
    """
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}.")
    stats = _reference_stats(reference, model)
    no_eigens = [n for n in stats if n not in eigens]
    if no_eigens:
        raise ValueError(
            f"Reference modules {no_eigens} have no eigenbases: pass the eigens the curvature edit was made with."
        )
    modules = find_modules(model, stats, "pass the model the curvature edit was made with.")
    handle = EditHandle(model=model, originals={})
    try:
        for name, ref in stats.items():
            module, eigen = modules[name], eigens[name]
            W = weight_matrix(module)
            C = eigenbasis_coefficients(W, eigen)  # [d_out, d_in]
            if ref.total_pairs != C.numel():
                raise ValueError(
                    f"Reference stats of {name!r} count {ref.total_pairs} pairs, the layer has {C.numel()}: "
                    "match a curvature edit (apply_edit), not another kind of edit."
                )
            s = name_seed(seed, name)
            if match == "count":
                keep = random_pair_mask(C, s, num_removed=ref.total_pairs - ref.kept_pairs)
            else:
                target = ref.removed_energy * float(W.detach().double().pow(2).sum())
                keep = random_pair_mask(C, s, target_energy=target)
            if keep.all():
                new = W.detach().clone()  # nothing removed: keep the weight bit-exact
            else:
                U_A = eigen.eigenvectors_A.to(W.device, torch.float64)
                U_G = eigen.eigenvectors_G.to(W.device, torch.float64)
                new = U_G @ (C * keep) @ U_A.T
            removed = replace_weight(handle, name, module, new)
            pi = pair_curvature(eigen).to(keep.device)
            total = float(pi.sum())
            handle.stats[name] = EditStats(
                rho=ref.rho,
                kept_pairs=int(keep.sum()),
                total_pairs=keep.numel(),
                kept_mass=float(pi[keep].sum()) / total if total > 0 else 1.0,
                removed_energy=removed,
            )
    except Exception:
        handle.undo()
        raise
    return handle
