"""Eigendecomposition of K-FAC factors in float64.

``A = U_A diag(μ) U_Aᵀ`` and ``G = U_G diag(λ) U_Gᵀ``; the pair ``(i, j)`` of eigenvectors has curvature
``Π_ij = λ_i μ_j`` (Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature*, 2025).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_curv.curvature.kfac import KFACFactors


@dataclass
class KFACEigen:
    """Eigenbases of one layer's K-FAC factors, eigenvalues in descending order and clamped at zero.

    Attributes:
        eigenvalues_A: ``μ``, shape ``[d_in]``.
        eigenvectors_A: ``U_A``, shape ``[d_in, d_in]``; column ``j`` belongs to ``μ_j``.
        eigenvalues_G: ``λ``, shape ``[d_out]``.
        eigenvectors_G: ``U_G``, shape ``[d_out, d_out]``; column ``i`` belongs to ``λ_i``.
        num_samples: Samples behind the factors.
    """

    eigenvalues_A: Tensor
    eigenvectors_A: Tensor
    eigenvalues_G: Tensor
    eigenvectors_G: Tensor
    num_samples: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the layer the eigenbases belong to."""
        return self.eigenvalues_G.shape[0], self.eigenvalues_A.shape[0]


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix, in float64.

    Args:
        matrix: Square matrix of shape ``[d, d]``; it is symmetrized as ``(C + Cᵀ) / 2`` first.

    Returns:
        ``(values [d], vectors [d, d])`` in float64; ``vectors[:, k]`` belongs to ``values[k]``.

    Raises:
        ValueError: If the matrix is not square or holds NaN/Inf.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"Expected a square matrix, got shape {tuple(matrix.shape)}.")
    if not torch.isfinite(matrix).all():
        raise ValueError("The factor holds NaN or Inf values; recollect the statistics (see KFACAccumulator).")
    c = matrix.double()
    c = (c + c.T) / 2
    values, vectors = torch.linalg.eigh(c)
    return values.flip(0).clamp_min(0.0), vectors.flip(1)


def eigendecompose(factors: KFACFactors, *, dtype: torch.dtype | None = None) -> KFACEigen:
    """Eigendecompose both factors of a layer (computed in float64, on the factors' device).

    Args:
        factors: Means ``A`` and ``G``.
        dtype: Dtype of the stored result; defaults to the factors' dtype. The edit computes in at least
            float32, so float64 factors give float64-exact projections.

    Returns:
        The eigenbases.
    """
    dtype = dtype or factors.A.dtype
    mu, U_A = symmetric_eigh(factors.A)
    lam, U_G = symmetric_eigh(factors.G)
    return KFACEigen(
        eigenvalues_A=mu.to(dtype),
        eigenvectors_A=U_A.to(dtype),
        eigenvalues_G=lam.to(dtype),
        eigenvectors_G=U_G.to(dtype),
        num_samples=factors.num_samples,
    )


def _unique_matrices(factors: Mapping[str, KFACFactors]) -> tuple[list[Tensor], dict[tuple[str, str], int]]:
    """The distinct factor matrices and, per ``(module, "A"|"G")``, the index of its matrix.

    Layers that read the same input (``gate_proj`` and ``up_proj``) have bit-equal ``A``; it is kept once.
    """
    unique: list[Tensor] = []
    index: dict[tuple[str, str], int] = {}
    for name, f in factors.items():
        for which, matrix in (("A", f.A), ("G", f.G)):
            same = next(
                (
                    i
                    for i, u in enumerate(unique)
                    if u.shape == matrix.shape and u.dtype == matrix.dtype and torch.equal(u, matrix)
                ),
                None,
            )
            if same is None:
                unique.append(matrix)
                same = len(unique) - 1
            index[(name, which)] = same
    return unique, index


def _assign(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank per matrix: largest first, each to the least-loaded rank (cost ``d³``)."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i] ** 3
    return owner


def eigendecompose_all(
    factors: Mapping[str, KFACFactors], *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, KFACEigen]:
    """Eigendecompose every layer's factors, each distinct matrix once, shared across processes.

    A factor shared by several layers (the input factor of ``gate_proj`` and ``up_proj``) is decomposed once.
    Under an initialized ``torch.distributed`` process group, the distinct matrices are split across the ranks
    (largest first, balanced by ``d³``); each rank decomposes its share in float64 on ``device`` and broadcasts it,
    so every rank ends with the same eigenbases. Every rank must call this with the same factors.

    Args:
        factors: Factors per module name.
        device: Where the decompositions run (an accelerator when there is one); None: the factors' device.
        dtype: Dtype of the results; defaults to each factor's dtype.

    Returns:
        Eigenbases per module name, on CPU, equal to :func:`eigendecompose` of each layer.
    """
    unique, index = _unique_matrices(factors)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
    owner = _assign([m.shape[0] for m in unique], world)
    out_dtype = [dtype or m.dtype for m in unique]
    comm = device
    if distributed and torch.distributed.get_backend() == "nccl":
        comm = torch.device("cuda", torch.cuda.current_device())
    results: list[tuple[Tensor, Tensor]] = []
    for i, matrix in enumerate(unique):
        if owner[i] == rank:
            values, vectors = symmetric_eigh(matrix.to(device) if device is not None else matrix)
            # contiguous: eigh returns column-major vectors, and a broadcast sends the storage as it lies
            values, vectors = values.to(out_dtype[i]).contiguous(), vectors.to(out_dtype[i]).contiguous()
        else:
            d = matrix.shape[0]
            values = torch.empty(d, dtype=out_dtype[i], device=comm or matrix.device)
            vectors = torch.empty(d, d, dtype=out_dtype[i], device=comm or matrix.device)
        if distributed:
            values, vectors = values.to(comm or values.device), vectors.to(comm or vectors.device)
            torch.distributed.broadcast(values, src=owner[i])
            torch.distributed.broadcast(vectors, src=owner[i])
        results.append((values.cpu(), vectors.cpu()))
    used: set[int] = set()

    def take(key: tuple[str, str]) -> tuple[Tensor, Tensor]:
        # Layers that share a factor get their own copy: a file of eigenbases must not alias tensors.
        i = index[key]
        values, vectors = results[i]
        if i in used:
            values, vectors = values.clone(), vectors.clone()
        used.add(i)
        return values, vectors

    eigens = {}
    for name, f in factors.items():
        (mu, U_A), (lam, U_G) = take((name, "A")), take((name, "G"))
        eigens[name] = KFACEigen(
            eigenvalues_A=mu, eigenvectors_A=U_A, eigenvalues_G=lam, eigenvectors_G=U_G, num_samples=f.num_samples
        )
    return eigens
