"""The contract between data modules and LightningModules.

Batches are dicts of tensors. Every batch carries ``index`` (``[B]``, the dataset index of each row), which
seeds the true-Fisher targets per example and identifies examples in per-example analyses.

Language-model batches (training, curvature collection, perplexity)::

    input_ids       [B, T] long
    attention_mask  [B, T] long   1 = real token
    labels          [B, T] long   Hugging Face convention (aligned with input_ids, shifted inside the loss);
                                  -100 where no loss is taken (padding, prompt tokens that should not count)
    index           [B]    long

Generation batches (memorization and task evaluation)::

    prompt_ids      [B, P] long   LEFT-padded prompts
    prompt_mask     [B, P] long   1 = real token
    target_ids      [B, L] long   expected continuation, right-padded with -100
    alt_target_ids  [B, L] long   optional second continuation (TinyMem: the rule's clean continuation)
    group           [B]    long   group id (TinyMem: rule id), indexes ``EvalSet.groups``
    index           [B]    long

Image batches::

    pixel_values    [B, C, H, W] float
    labels          [B] long      the label the model was trained on (noisy for flipped examples)
    true_labels     [B] long      the original label
    index           [B] long

A data module lists its evaluation sets in ``eval_sets``, in the order of the loaders that
``val_dataloader()`` (and ``test_dataloader()``) return; a LightningModule reads
``self.trainer.datamodule.eval_sets[dataloader_idx]`` to know which metrics a batch feeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EvalKind = Literal[
    "perplexity",  # LM batches of held-out text: util/ppl, util/ppl_batch_mean, util/ndcg10
    "text_memorization",  # generation batches: mem/strict, mem/loose, mem/avg_lev, mem/quotes_strict
    "noise_memorization",  # generation batches: mem/noise_memorized, mem/noise_rule_following
    "task",  # generation batches: util/task_acc, util/task_acc/<group>, util/task_token_acc
    "backdoor",  # generation batches: mem/backdoor
    "classification",  # image batches: accuracy against `labels` (util/val_acc, util/train_clean_acc)
    "label_memorization",  # image batches of flipped examples: mem/memorized, mem/gt_recovery
]
EVAL_KINDS: tuple[str, ...] = EvalKind.__args__

#: Metric-group prefix for each split of a memorized set: reports use the test half, edits are chosen on the
#: selection half.
SPLIT_GROUP = {"test": "mem", "selection": "mem_sel", None: "mem"}


@dataclass(frozen=True)
class EvalSet:
    """One evaluation loader.

    Attributes:
        name: Unique name, e.g. ``"heldout"``, ``"noise_test"``, ``"task"``, ``"val"``.
        kind: Which metrics its batches feed (see :data:`EvalKind`).
        split: For memorized sets: ``"selection"`` (used to choose an edit) or ``"test"`` (reported); None for
            sets that are not split.
        groups: Names of the group ids in generation batches (TinyMem: rule names), for per-group metrics.
        metric_name: Name of the accuracy key for ``classification`` sets (``"val_acc"``, ``"train_clean_acc"``).
    """

    name: str
    kind: EvalKind
    split: Literal["selection", "test"] | None = None
    groups: tuple[str, ...] = ()
    metric_name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVAL_KINDS:
            raise ValueError(f"Unknown eval kind {self.kind!r}; expected one of {EVAL_KINDS}.")
        if self.split not in SPLIT_GROUP:
            raise ValueError(f"split must be 'selection', 'test' or None, got {self.split!r}.")
