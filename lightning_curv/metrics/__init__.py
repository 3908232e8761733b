"""torchmetrics ``Metric`` subclasses for memorization and utility (see DESIGN.md section 2)."""

from lightning_curv.metrics.memorization import (
    SequenceMatchMetric,
    TextMemorizationMetric,
    align_to_target,
    token_edit_distances,
)
from lightning_curv.metrics.utility import (
    BatchMeanPerplexity,
    NDCGMetric,
    TokenPerplexity,
    reference_topk,
    summed_token_loss,
)
from lightning_curv.metrics.vision import LabelMemorizationMetric

__all__ = [
    "BatchMeanPerplexity",
    "LabelMemorizationMetric",
    "NDCGMetric",
    "SequenceMatchMetric",
    "TextMemorizationMetric",
    "TokenPerplexity",
    "align_to_target",
    "reference_topk",
    "summed_token_loss",
    "token_edit_distances",
]
