"""Running a backbone over batches for per-example analyses: sample positions, rows, hooks' bookkeeping.

Samples are the positions the curvature pass uses (:func:`lightning_curv.curvature.valid_positions` for a
causal LM, the head's token of a ViT), chosen with the curvature core's own helpers so the analyses see
exactly what the factors were collected on. Hooks, frozen parameters and eval mode come from
:class:`lightning_curv.curvature.hooks.ModuleHooks`, the context the curvature pass uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_curv.curvature.eigen import KFACEigen
from lightning_curv.curvature.kfac import Selection, select_positions, valid_positions

#: How a batch is run and which positions are samples: ``"causal_lm"`` (a Hugging Face causal LM on LM
#: batches; samples are the valid next-token positions) or ``"classifier"`` (a model mapping
#: ``batch[input_key]`` to logits ``[B, C]``; samples are the token at ``position``, or every row/position
#: when it is None).
Task = Literal["causal_lm", "classifier"]
TASKS: tuple[str, ...] = ("causal_lm", "classifier")


def sample_selection(batch: Mapping[str, Tensor], task: Task, position: int | None = 0) -> Selection:
    """Which positions of the tracked layers' inputs are samples, as the curvature pass counts them.

    Args:
        batch: An LM batch (``input_ids``, optional ``attention_mask`` and ``labels``) or an image batch.
        task: ``"causal_lm"``: :func:`valid_positions`; ``"classifier"``: ``position``.
        position: Token position of a classifier's samples (0: a ViT's class token); None: every position.

    Returns:
        A selection for :func:`select_positions`.
    """
    if task == "causal_lm":
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(batch["input_ids"])
        return valid_positions(attention_mask, batch.get("labels"))
    return position


def sample_rows(x: Tensor, selection: Selection) -> Tensor:
    """Batch row of each sample that :func:`select_positions` takes from ``x``, in the same order.

    Args:
        x: Layer inputs of shape ``[B, ..., d]``.
        selection: The selection applied to ``x``.

    Returns:
        Row indices of shape ``[n]``.
    """
    lead = x.shape[:-1]
    rows = torch.arange(lead[0], device=x.device).view(lead[0], *([1] * (len(lead) - 1))).expand(lead)
    return select_positions(rows.unsqueeze(-1), selection).reshape(-1)


def forward_batch(model: nn.Module, batch: Mapping[str, Tensor], task: Task, input_key: str = "pixel_values") -> Tensor:
    """Logits of ``model`` on ``batch``: ``[B, T, V]`` for a causal LM, ``[B, C]`` for a classifier.

    Args:
        model: The backbone (a Hugging Face causal LM, or a module mapping ``batch[input_key]`` to logits).
        batch: The batch, already on the model's device.
        task: See :data:`Task`.
        input_key: Input of a classifier.

    Returns:
        The logits.
    """
    if task == "causal_lm":
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
    return model(batch[input_key])


def check_task(task: str) -> None:
    """Raise ``ValueError`` unless ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch to ``device``; other values are kept."""
    return move_data_to_device(dict(batch), device)


def batch_index(batch: Mapping[str, Tensor]) -> Tensor:
    """The dataset ``index`` of each row (``[B]``, long, on CPU).

    Raises:
        KeyError: If the batch has no ``index`` (every lightning_curv batch carries one).
    """
    if "index" not in batch:
        raise KeyError(
            "Per-example analysis needs batch['index'] (the dataset index of each row); every lightning_curv "
            "data module provides it. Add it to custom batches."
        )
    return batch["index"].detach().long().cpu().reshape(-1)


def iterate_batches(
    batches: Iterable[Mapping[str, Any]], device: torch.device, max_batches: int | None = None
) -> Iterator[tuple[dict[str, Any], Tensor]]:
    """The first ``max_batches`` batches (all when None), moved to ``device``, each with its :func:`batch_index`."""
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        batch = to_device(batch, device)
        yield batch, batch_index(batch)


def reduce_by_index(index: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Sum rows with equal ``index`` (a dataset row seen twice counts its samples twice).

    Args:
        index: Dataset indices of shape ``[M]``.
        values: Tensors of shape ``[M, ...]``.

    Returns:
        ``(unique_index [N] sorted ascending, *sums [N, ...])``.
    """
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    sums = tuple(torch.zeros((unique.numel(), *v.shape[1:]), dtype=v.dtype).index_add_(0, inverse, v) for v in values)
    return (unique, *sums)


def compute_dtype(eigen: KFACEigen) -> torch.dtype:
    """At least float32: float64 eigenbases give float64 analyses."""
    return torch.promote_types(eigen.eigenvectors_A.dtype, torch.float32)


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
