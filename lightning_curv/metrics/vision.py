"""Label-noise memorization metrics for image classifiers.

Setting of Maini et al. 2023, *Can Neural Network Memorization Be Localized?*, used by Merullo et al. 2025
(arXiv 2510.24256): a fraction of training labels is flipped; on those flipped examples, *memorized* is the
fraction predicted with the noisy (trained-on) label and *GT recovery* the fraction predicted with the
original label. Plain accuracy (validation, clean train) is torchmetrics' ``MulticlassAccuracy``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class LabelMemorizationMetric(Metric):
    """Fractions of (flipped) training examples predicted with their noisy and with their original label.

    Feed it only the flipped examples: on a clean example both labels agree and it would count for both.
    ``compute`` returns ``memorized`` and ``gt_recovery``; their sum is at most 1 on flipped examples.

    Args:
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    memorized: Tensor
    recovered: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("memorized", "recovered", "total"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, noisy_labels: Tensor, true_labels: Tensor) -> None:
        """Add one batch.

        Args:
            preds: Predicted classes of shape [batch], or logits of shape [batch, classes] (argmax taken).
            noisy_labels: Labels the model was trained on, shape [batch].
            true_labels: Original labels, shape [batch].

        Raises:
            ValueError: If the shapes disagree.
        """
        if preds.ndim == 2:
            preds = preds.argmax(dim=-1)
        if not preds.shape == noisy_labels.shape == true_labels.shape or preds.ndim != 1:
            raise ValueError(
                f"preds {tuple(preds.shape)}, noisy_labels {tuple(noisy_labels.shape)} and true_labels "
                f"{tuple(true_labels.shape)} must all be [batch]."
            )
        self.memorized += (preds == noisy_labels).sum()
        self.recovered += (preds == true_labels).sum()
        self.total += preds.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """Return ``memorized`` and ``gt_recovery`` (NaN before any update)."""
        total = self.total.double()
        return {"memorized": self.memorized.double() / total, "gt_recovery": self.recovered.double() / total}
