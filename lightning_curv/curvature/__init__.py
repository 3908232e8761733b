"""The maths of lightning_curv in plain PyTorch: K-FAC statistics, eigenbases, the curvature edit, files.

Nothing here imports Lightning, wandb, transformers or timm; ``tests/test_layering.py`` enforces it.
"""

from lightning_curv.curvature.constants import (
    ACTIVATION_COVARIANCE,
    ACTIVATION_EIGENVALUES,
    ACTIVATION_EIGENVECTORS,
    GRADIENT_COVARIANCE,
    GRADIENT_EIGENVALUES,
    GRADIENT_EIGENVECTORS,
    IGNORE_INDEX,
    FisherType,
)
from lightning_curv.curvature.edit import (
    EditHandle,
    EditStats,
    apply_edit,
    check_rho,
    curvature_mask,
    pair_curvature,
    project_weight,
    resolve_rho,
    summarize_stats,
)
from lightning_curv.curvature.eigen import KFACEigen, eigendecompose, symmetric_eigh
from lightning_curv.curvature.io import (
    check_model,
    load_eigens,
    load_factors,
    model_identity,
    read_metadata,
    save_eigens,
    save_factors,
)
from lightning_curv.curvature.kfac import (
    KFACAccumulator,
    KFACFactors,
    Selection,
    causal_lm_step,
    classifier_step,
    collect_factors,
    fisher_targets,
    select_positions,
    valid_positions,
)
from lightning_curv.curvature.modules import is_conv1d_like, is_linear_like, resolve_modules, weight_matrix

__all__ = [
    "ACTIVATION_COVARIANCE",
    "ACTIVATION_EIGENVALUES",
    "ACTIVATION_EIGENVECTORS",
    "GRADIENT_COVARIANCE",
    "GRADIENT_EIGENVALUES",
    "GRADIENT_EIGENVECTORS",
    "IGNORE_INDEX",
    "EditHandle",
    "EditStats",
    "FisherType",
    "KFACAccumulator",
    "KFACEigen",
    "KFACFactors",
    "Selection",
    "apply_edit",
    "causal_lm_step",
    "check_model",
    "check_rho",
    "classifier_step",
    "collect_factors",
    "curvature_mask",
    "eigendecompose",
    "fisher_targets",
    "is_conv1d_like",
    "is_linear_like",
    "load_eigens",
    "load_factors",
    "model_identity",
    "pair_curvature",
    "project_weight",
    "read_metadata",
    "resolve_modules",
    "resolve_rho",
    "summarize_stats",
    "save_eigens",
    "save_factors",
    "select_positions",
    "symmetric_eigh",
    "valid_positions",
    "weight_matrix",
]
