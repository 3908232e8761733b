"""BalancedSubnet: learn a small weight mask that forgets the memorized set and keeps the rest.

Sakarvadia et al., *Mitigating Memorization in Language Models* (ICLR 2025), the method the paper of Merullo
et al. (arXiv 2510.24256, 2025) compares against. The model's weights are frozen. Each weight of the chosen
MLP matrices gets a learnable score (kaiming-uniform init, as in edge-popup); the forward pass uses
``W ⊙ M`` where ``M`` zeroes the ``k = round(ratio · numel)`` weights of each matrix with the smallest
``|score|`` (ties broken by flat index in the ``[d_out, d_in]`` layout, lowest first) and gradients pass
straight through the mask to the scores. The scores are trained with SGD on

    loss = -(1 - alpha) · CE(memorized batch) + alpha · CE(retain batch),

which pushes the mask towards weights whose removal raises the loss of the memorized sequences while keeping
the loss of the retain data low. At the end the mask is applied to the weights permanently.

Unlike the curvature edit, which only needs curvature statistics of ordinary training data, BalancedSubnet
**needs the memorized set itself** (the sequences to forget) and a retain set, and trains for several epochs.

Warning:
    GPT-2 ``Conv1D`` stores its weight as ``[d_in, d_out]``. Scores and masks live in the ``[d_out, d_in]``
    layout of :func:`~lightning_curv.curvature.weight_matrix` and are transposed into the parameter's layout
    in exactly one place (:class:`_ScoreMask`), so tie-breaking is the same for both layouts. Biases are not
    masked. Weights tied to another module are rejected by
    :func:`~lightning_curv.curvature.resolve_modules`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_curv.curvature import (
    EditHandle,
    EditStats,
    is_conv1d_like,
    replace_weight,
    resolve_modules,
    valid_positions,
    weight_matrix,
)
from lightning_curv.curvature.hooks import ModuleHooks
from lightning_curv.utils import name_seed

#: Paper defaults (best OLMo setting of Sakarvadia et al.).
DEFAULT_ALPHA = 0.7
DEFAULT_RATIO = 0.0015
DEFAULT_LR = 0.3
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def num_masked(numel: int, ratio: float) -> int:
    """Weights a matrix of ``numel`` entries loses at ``ratio``: ``round(ratio · numel)``, half up."""
    return int(math.floor(ratio * numel + 0.5))


def score_mask(scores: Tensor, k: int) -> Tensor:
    """0/1 mask that zeroes the ``k`` entries with the smallest ``|score|``.

    Args:
        scores: Scores of any shape.
        k: Number of entries to zero.

    Returns:
        A float mask of the shape and dtype of ``scores``. Ties in ``|score|`` are broken by flat index (the
        lower index is zeroed first), so the mask is deterministic.
    """
    flat = scores.detach().abs().flatten()
    order = torch.sort(flat, stable=True).indices
    mask = torch.ones_like(flat)
    mask[order[:k]] = 0
    return mask.view_as(scores)


class _StraightThroughMask(torch.autograd.Function):
    """Forward: :func:`score_mask` of ``|scores|``; backward: the gradient passes straight through."""

    @staticmethod
    def forward(ctx: object, abs_scores: Tensor, k: int) -> Tensor:
        return score_mask(abs_scores, k)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _ScoreMask(nn.Module):
    """Parametrization ``weight -> weight ⊙ mask(scores)`` with scores in the ``[d_out, d_in]`` layout.

    Args:
        scores: Learnable scores of shape ``[d_out, d_in]``.
        k: Number of weights to zero.
        transpose: Whether the parameter is stored as ``[d_in, d_out]`` (Conv1D).
    """

    def __init__(self, scores: nn.Parameter, k: int, transpose: bool) -> None:
        super().__init__()
        self.scores = scores
        self.k = k
        self.transpose = transpose

    def mask(self) -> Tensor:
        """Differentiable (straight-through) mask of shape ``[d_out, d_in]``."""
        return _StraightThroughMask.apply(self.scores.abs(), self.k)

    def forward(self, weight: Tensor) -> Tensor:
        mask = self.mask().to(weight.dtype)
        return weight * (mask.T if self.transpose else mask)  # the parameter's own layout


def lm_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the valid positions of an LM batch.

    Args:
        model: Causal LM called as ``model(input_ids=..., attention_mask=...)`` returning ``.logits``.
        batch: ``input_ids`` ``[B, T]``, optional ``attention_mask`` ``[B, T]`` and ``labels`` ``[B, T]``
            (-100 = no target).

    Returns:
        Scalar loss (float32 or wider).

    Raises:
        ValueError: If the batch has no valid position.
    """
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = batch.get("labels")
    labels = input_ids if labels is None else labels
    valid = valid_positions(attention_mask, labels)  # [B, T]
    if not valid.any():
        raise ValueError("An LM batch has no position with a next-token target.")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [B, T, V]
    scores = logits[valid]
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    return F.cross_entropy(scores, labels.roll(-1, dims=1)[valid])


def _cycle(batches: Iterable[Mapping[str, Tensor]]) -> Iterator[Mapping[str, Tensor]]:
    """Batches of a re-iterable, restarted whenever it is exhausted."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("The retain batches are empty (or a one-shot iterator already consumed).")


def balanced_subnet(
    model: nn.Module,
    modules: str | Sequence[str],
    memorized: Iterable[Mapping[str, Tensor]],
    retain: Iterable[Mapping[str, Tensor]],
    *,
    ratio: float = DEFAULT_RATIO,
    alpha: float = DEFAULT_ALPHA,
    lr: float = DEFAULT_LR,
    epochs: int = 5,
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    seed: int = 0,
    history: list[dict[str, float]] | None = None,
    scores: dict[str, Tensor] | None = None,
) -> EditHandle:
    """Learn a BalancedSubnet mask on ``memorized`` / ``retain`` batches and apply it to the weights in place.

    Unlike the curvature edit, this needs the memorized sequences themselves (and retain data).

    One optimizer step per memorized batch: each is paired with the next retain batch (the retain batches are
    cycled, restarting when exhausted). The model runs in eval mode (no dropout) with every parameter frozen;
    the modes and ``requires_grad`` flags are restored at the end, and the temporary parametrizations are
    removed even on error.

    Args:
        model: A causal LM called as ``model(input_ids=..., attention_mask=...)`` returning ``.logits``.
        modules: Module names, fnmatch globs or ``re:`` regexes of the matrices to mask (paper: MLP matrices).
        memorized: LM batches (``input_ids``/``attention_mask``/``labels``) of the sequences to forget;
            iterated once per epoch, so pass a list or a DataLoader.
        retain: LM batches of data whose loss should stay low (re-iterable).
        ratio: Fraction of each matrix's weights to zero, in (0, 1); each matrix loses exactly
            ``round(ratio · numel)`` weights (must be >= 1).
        alpha: Weight of the retain loss, in [0, 1]; the memorized loss has weight ``-(1 - alpha)``.
        lr: SGD learning rate of the scores.
        epochs: Passes over ``memorized``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay of the scores.
        seed: Seed of the kaiming-uniform score initialisation (per module, from ``(seed, module name)``).
        history: If a list, one dict per step is appended: ``{"loss", "mem_loss", "retain_loss"}`` (losses of
            the masked model before the step).
        scores: If a dict, filled with the learned scores per module name (``[d_out, d_in]``, float32), e.g.
            to compare the selected weights with the curvature edit's.

    Returns:
        A handle whose :meth:`~lightning_curv.curvature.EditHandle.undo` restores the weights bit-exactly.
        Stats per module: ``rho = kept_mass = 1 - k / numel`` (fraction of weights kept), ``kept_pairs`` =
        weights kept, ``total_pairs`` = ``numel``, and ``removed_energy = ‖W - W'‖_F² / ‖W‖_F²``.

    Raises:
        ValueError: If an argument is out of range, a matrix would lose no weight at ``ratio``, or
            ``memorized`` is empty.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1) (the fraction of weights to zero), got {ratio!r}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
    if epochs < 1 or lr <= 0:
        raise ValueError(f"epochs must be >= 1 and lr > 0, got epochs={epochs!r}, lr={lr!r}.")
    names = resolve_modules(model, modules)
    named = dict(model.named_modules())
    for name in names:
        if num_masked(weight_matrix(named[name]).numel(), ratio) < 1:
            raise ValueError(
                f"ratio={ratio} zeroes no weight of {name!r} ({weight_matrix(named[name]).numel()} weights); "
                "raise ratio or mask larger matrices."
            )

    masks: dict[str, _ScoreMask] = {}
    with ModuleHooks(model):  # every parameter frozen, eval mode; flags and modes restored at the end
        try:
            for name in names:
                module = named[name]
                W = weight_matrix(module)
                init = torch.empty(W.shape, device=W.device, dtype=torch.float32)  # [d_out, d_in]
                generator = torch.Generator(device=W.device).manual_seed(name_seed(seed, name))
                nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
                masks[name] = _ScoreMask(nn.Parameter(init), num_masked(W.numel(), ratio), is_conv1d_like(module))
                parametrize.register_parametrization(module, "weight", masks[name])
            optimizer = torch.optim.SGD(
                [m.scores for m in masks.values()], lr=lr, momentum=momentum, weight_decay=weight_decay
            )
            device = next(iter(masks.values())).scores.device
            retain_batches = _cycle(retain)
            for _ in range(epochs):
                steps = 0
                for mem_batch in memorized:
                    mem_loss = lm_loss(model, move_data_to_device(dict(mem_batch), device))
                    retain_loss = lm_loss(model, move_data_to_device(dict(next(retain_batches)), device))
                    loss = -(1 - alpha) * mem_loss + alpha * retain_loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    if history is not None:
                        history.append(
                            {"loss": loss.item(), "mem_loss": mem_loss.item(), "retain_loss": retain_loss.item()}
                        )
                if steps == 0:
                    raise ValueError("The memorized batches are empty (or a one-shot iterator already consumed).")
        finally:
            for name in masks:
                if parametrize.is_parametrized(named[name], "weight"):
                    parametrize.remove_parametrizations(named[name], "weight", leave_parametrized=False)

    if scores is not None:
        scores.update({name: m.scores.detach().clone() for name, m in masks.items()})
    handle = EditHandle(model=model, originals={})
    try:
        for name, score_module in masks.items():
            module = named[name]
            W = weight_matrix(module)
            keep = score_mask(score_module.scores, score_module.k).to(W.device, W.dtype)  # [d_out, d_in]
            removed = replace_weight(handle, name, module, W.detach() * keep)
            kept = W.numel() - score_module.k
            handle.stats[name] = EditStats(
                rho=kept / W.numel(),
                kept_pairs=kept,
                total_pairs=W.numel(),
                kept_mass=kept / W.numel(),
                removed_energy=removed,
            )
    except Exception:
        handle.undo()
        raise
    return handle
