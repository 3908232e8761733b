"""Methods the curvature edit is compared with.

Post-hoc edits share the call shape of :func:`lightning_curv.curvature.apply_edit` and return its
:class:`~lightning_curv.curvature.EditHandle` (``undo()``, per-module ``stats``):

* :func:`apply_svd_edit`: weight-SVD truncation by energy fraction ρ (SVD ablation of Merullo et al., 2025);
* :func:`apply_random_pair_edit`: random-direction control, K-FAC eigen-pairs removed in a seeded random
  order, matched to a curvature edit on removed energy or pair count;
* :func:`balanced_subnet`: BalancedSubnet (Sakarvadia et al., ICLR 2025), a learned weight mask; unlike the
  others it needs the memorized set.

Training-time method (its own call shape): :class:`ExampleTiedDropout` (Maini et al., ICML 2023), wired into a
LightningModule from outside by :func:`add_example_tied_dropout` (on a fresh :func:`untrained_copy`).
"""

from lightning_curv.baselines.balanced_subnet import balanced_subnet, lm_loss, num_masked, score_mask
from lightning_curv.baselines.example_tied_dropout import (
    DROPOUT_MODES,
    DropoutMode,
    ExampleTiedDropout,
    ExampleTiedDropoutTraining,
    add_example_tied_dropout,
    resolve_hidden_layers,
    untrained_copy,
)
from lightning_curv.baselines.random_pairs import (
    MATCH_MODES,
    MatchMode,
    apply_random_pair_edit,
    eigenbasis_coefficients,
    random_pair_mask,
    random_pair_order,
)
from lightning_curv.baselines.svd import (
    SVDFactors,
    apply_svd_edit,
    svd_factors,
    svd_rank,
    svd_truncate_weight,
)

__all__ = [
    "DROPOUT_MODES",
    "MATCH_MODES",
    "DropoutMode",
    "ExampleTiedDropout",
    "ExampleTiedDropoutTraining",
    "MatchMode",
    "SVDFactors",
    "add_example_tied_dropout",
    "apply_random_pair_edit",
    "apply_svd_edit",
    "balanced_subnet",
    "eigenbasis_coefficients",
    "lm_loss",
    "num_masked",
    "random_pair_mask",
    "random_pair_order",
    "resolve_hidden_layers",
    "score_mask",
    "svd_factors",
    "svd_rank",
    "svd_truncate_weight",
    "untrained_copy",
]
