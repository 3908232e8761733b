"""Label-noise memorization metrics for image classifiers.

Setting of Maini et al. 2023, *Can Neural Network Memorization Be Localized?*, used by Merullo et al. 2025
(arXiv 2510.24256): a fraction of training labels is flipped; on those flipped examples, *memorized* is the
fraction predicted with the noisy (trained-on) label and *GT recovery* the fraction predicted with the
original label. Both are torchmetrics' micro ``MulticlassAccuracy`` (against the noisy and against the
original labels), kept in float64; plain accuracy (validation, clean train) is the same torchmetrics class.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.wrappers import MultitaskWrapper

#: Output keys of :class:`LabelMemorizationMetric` and the labels each accuracy is taken against.
MEMORIZED, GT_RECOVERY = "memorized", "gt_recovery"


def _accuracy(num_classes: int | None) -> MulticlassAccuracy:
    # float64 states: the counts are exact integers either way, and the fractions come out in float64.
    return MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False).set_dtype(torch.float64)


class LabelMemorizationMetric(MultitaskWrapper):
    """Fractions of (flipped) training examples predicted with their noisy and with their original label.

    Feed it only the flipped examples: on a clean example both labels agree and it would count for both.
    ``compute`` returns ``memorized`` and ``gt_recovery`` (float64); their sum is at most 1 on flipped
    examples. Before any update torchmetrics warns and returns 0; check ``update_called`` first.

    Args:
        num_classes: Number of classes (optional: micro accuracy does not need it).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__({MEMORIZED: _accuracy(num_classes), GT_RECOVERY: _accuracy(num_classes)})

    def update(self, preds: Tensor, noisy_labels: Tensor, true_labels: Tensor) -> None:  # type: ignore[override]
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
        super().update({MEMORIZED: preds, GT_RECOVERY: preds}, {MEMORIZED: noisy_labels, GT_RECOVERY: true_labels})

    @property
    def update_called(self) -> bool:
        """Whether any batch was added since the last reset (the wrapper itself does not count updates)."""
        return any(metric.update_called for metric in self.task_metrics.values())

    def merge_state(self, incoming_state: dict | Metric) -> None:
        """Add the counts of another :class:`LabelMemorizationMetric` (e.g. another rank's) to this one."""
        if not isinstance(incoming_state, LabelMemorizationMetric):
            raise TypeError(f"Expected a LabelMemorizationMetric, got {type(incoming_state).__name__}.")
        for key, metric in self.task_metrics.items():
            incoming = incoming_state.task_metrics[key]
            metric.merge_state(incoming)
            metric._update_count += incoming._update_count  # torchmetrics' merge_state leaves the count alone
