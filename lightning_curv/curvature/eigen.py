"""Eigendecomposition of K-FAC factors in float64.

``A = U_A diag(μ) U_Aᵀ`` and ``G = U_G diag(λ) U_Gᵀ``; the pair ``(i, j)`` of eigenvectors has curvature
``Π_ij = λ_i μ_j`` (Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature*, 2025).
"""

from __future__ import annotations

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
