"""Utility metrics for language models: perplexity and nDCG@k against a reference model.

Merullo et al. 2025, *From Memorization to Reasoning in the Spectrum of Loss Curvature* (arXiv 2510.24256)
report perplexity as the mean over batches of ``exp(batch mean loss)`` (:class:`BatchMeanPerplexity`, a
``MeanMetric``); :class:`TokenPerplexity` (torchmetrics' ``Perplexity``) reports the token-weighted
``exp(mean loss)``, which does not depend on how the data is batched. :class:`NDCGMetric` measures how well an
edited model keeps the original model's next-token ranking. Hand-written on purpose: :meth:`TokenPerplexity.update`
(torchmetrics' takes ``log`` of a float32 softmax of the logits, which underflows) and :class:`NDCGMetric`
(torchmetrics' ``RetrievalNormalizedDCG`` scores one ranked list per query id against given relevances, not a
model's top-``k`` against a reference model's probabilities at every position).

All states are sums reduced with ``dist_reduce_fx="sum"`` and kept in float64 (counts: long in
:class:`NDCGMetric`, float64 in the torchmetrics-based perplexities, exact below 2**53).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import Perplexity

from lightning_curv.curvature.constants import IGNORE_INDEX


def summed_token_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy and token count, Hugging Face label convention.

    Args:
        logits: Logits of shape [batch, seq, vocab].
        labels: Labels of shape [batch, seq], aligned with the inputs (shifted here: position ``t`` predicts
            ``labels[:, t + 1]``); ``ignore_index`` marks positions without a loss.
        ignore_index: Label value excluded from the loss and the count.

    Returns:
        ``(loss_sum, num_tokens)``: float32 scalar sum of the token losses and long scalar token count, the
        inputs of :meth:`TokenPerplexity.update`.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (shift_labels != ignore_index).sum()


class TokenPerplexity(Perplexity):
    """Token-weighted perplexity ``exp(Σ loss_sum / Σ num_tokens)``, independent of how the data is batched.

    torchmetrics' :class:`~torchmetrics.text.Perplexity` with its states (float64 here) and ``compute``; only
    ``update`` is replaced: it takes the summed cross-entropy the module already computed for its loss
    (:func:`summed_token_loss`) instead of the logits, because torchmetrics' own update takes ``log`` of a
    float32 softmax (``inf`` for tokens whose probability underflows) and would run the vocabulary softmax a
    second time. ``compute`` returns the perplexity and :meth:`mean_loss` the loss it exponentiates (NaN
    before any non-empty update).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__(ignore_index=IGNORE_INDEX)
        self.set_dtype(torch.float64)

    def update(self, loss_sum: Tensor | float, num_tokens: Tensor | int) -> None:  # type: ignore[override]
        """Add one batch.

        Args:
            loss_sum: Scalar sum of the batch's token cross-entropies (nats); detached here.
            num_tokens: Number of tokens in that sum.

        Raises:
            ValueError: If ``num_tokens`` is a negative int.
        """
        loss_sum, num_tokens = _as_batch(loss_sum, num_tokens, self.total_log_probs.device)
        # torch.where instead of an `if`: no host sync per batch on accelerators.
        nonempty = num_tokens > 0
        self.total_log_probs += torch.where(nonempty, loss_sum, torch.zeros_like(loss_sum))
        self.count += num_tokens.clamp_min(0)

    def mean_loss(self) -> Tensor:
        """Token-weighted mean loss ``Σ loss_sum / Σ num_tokens`` (float64, over all ranks under DDP)."""
        with self.sync_context():
            return self.total_log_probs / self.count


class BatchMeanPerplexity(MeanMetric):
    """The paper's perplexity: mean over batches of ``exp(batch mean loss)``; batches with no tokens are skipped.

    It depends on the batching and is at least the token-weighted perplexity when batches hold equal token
    counts (Jensen). Under DDP it is the mean over all batches of all ranks. States are float64.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.set_dtype(torch.float64)

    def update(self, loss_sum: Tensor | float, num_tokens: Tensor | int) -> None:  # type: ignore[override]
        """Add one batch (same arguments as :meth:`TokenPerplexity.update`).

        Raises:
            ValueError: If ``num_tokens`` is a negative int.
        """
        loss_sum, num_tokens = _as_batch(loss_sum, num_tokens, self.mean_value.device)
        nonempty = num_tokens > 0
        super().update(torch.exp(loss_sum / num_tokens.clamp_min(1)), weight=nonempty.double())


def _as_batch(loss_sum: Tensor | float, num_tokens: Tensor | int, device: torch.device) -> tuple[Tensor, Tensor]:
    """A batch's detached float64 loss sum and long token count on ``device``, both scalars."""
    if isinstance(num_tokens, int) and num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}.")
    loss_sum = torch.as_tensor(loss_sum).detach().to(device=device, dtype=torch.float64).reshape(())
    num_tokens = torch.as_tensor(num_tokens).detach().to(device=device, dtype=torch.long).reshape(())
    return loss_sum, num_tokens


def reference_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` next tokens of a reference model and their probabilities.

    Args:
        logits: Reference logits of shape [N, vocab].
        k: List length.

    Returns:
        ``(indices, probs)`` of shape [N, k] each, in descending order; ``probs`` come from a float32
        softmax over the full vocabulary (not renormalized over the top ``k``).

    Raises:
        ValueError: If ``k`` is not in ``[1, vocab]``.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}.")
    # topk on the logits as given, like NDCGMetric does for the evaluated model, so a model compared
    # against itself picks the same list even at ties.
    indices = logits.topk(k, dim=-1).indices  # [N, k]
    probs = torch.softmax(logits.float(), dim=-1).gather(-1, indices)  # [N, k]
    return indices, probs


class NDCGMetric(Metric):
    """nDCG@k of a model's next-token ranking against a reference model's, averaged over positions.

    Per position: the gain of a token is the reference model's probability of it if it is in the reference
    top-``k``, else 0. ``DCG = Σ_{r=1..k} gain(model's r-th token) / log2(r + 1)``; the ideal DCG puts the
    reference top-``k`` in the reference order. ``nDCG = DCG / ideal DCG`` lies in [0, 1]; a model compared
    with itself scores exactly 1, and 0 if its top-``k`` shares no token with the reference top-``k``.

    ``compute`` returns ``{"ndcg": mean over positions}``.

    Args:
        k: List length (the paper's nDCG@10).
        **kwargs: Passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: If ``k < 1``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    ndcg_sum: Tensor
    total: Tensor

    def __init__(self, k: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        self.k = k
        self.add_state("ndcg_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, ref_indices: Tensor, ref_probs: Tensor) -> None:
        """Score the evaluated model's logits at ``N`` positions.

        Args:
            logits: Evaluated model's logits of shape [N, vocab] (select the real positions beforehand).
            ref_indices: Reference top-``k`` token ids of shape [N, k] (from :func:`reference_topk`).
            ref_probs: Reference probabilities of those tokens, shape [N, k].

        Raises:
            ValueError: If the shapes do not match ``[N, k]``.
        """
        n = logits.shape[0]
        if logits.ndim != 2 or ref_indices.shape != (n, self.k) or ref_probs.shape != (n, self.k):
            raise ValueError(
                f"Expected logits [N, vocab] and reference tensors [N, {self.k}], got {tuple(logits.shape)}, "
                f"{tuple(ref_indices.shape)}, {tuple(ref_probs.shape)}."
            )
        if n == 0:
            return
        ref_probs = ref_probs.double()
        top = logits.topk(self.k, dim=-1).indices  # [N, k]
        # gains[i, r] = reference prob of the model's r-th token, 0 if outside the reference top-k.
        hits = top[:, :, None] == ref_indices.to(top.device)[:, None, :]  # [N, k, k]
        gains = (hits * ref_probs[:, None, :]).sum(dim=-1)  # [N, k]
        discount = 1.0 / torch.log2(torch.arange(2, self.k + 2, device=gains.device, dtype=torch.float64))  # [k]
        dcg = (gains * discount).sum(dim=-1)
        ideal = (ref_probs.sort(dim=-1, descending=True).values * discount).sum(dim=-1)
        ndcg = dcg / ideal.clamp_min(torch.finfo(torch.float64).tiny)
        self.ndcg_sum += ndcg.sum().to(self.ndcg_sum.device)
        self.total += n

    def compute(self) -> dict[str, Tensor]:
        """Return ``{"ndcg": mean nDCG over positions}`` (NaN before any update)."""
        return {"ndcg": self.ndcg_sum / self.total.double()}
