"""Memorization metrics for language models: verbatim recitation of training text and TinyMem matches.

Definitions follow Merullo et al. 2025, *From Memorization to Reasoning in the Spectrum of Loss Curvature*
(arXiv 2510.24256): prompt with a training prefix, greedily generate a suffix of ``L`` tokens and compare it
with the true suffix by token-level Levenshtein distance ``d``. *Strict* = fraction with ``d = 0``; *Loose* =
fraction with ``1 - d/L >= 0.75``; *AvgLev* = mean ``d/L``; *quotes* = strict on the last 8 suffix tokens.
The TinyMem-style exact-match metrics follow Sakarvadia et al. (ICLR 2025), *Mitigating Memorization in
Language Models*.

All states are sums (float64 for fractional sums, long for counts) reduced with ``dist_reduce_fx="sum"``,
so results under DDP equal a single-process pass over the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rapidfuzz.distance import Levenshtein
from torch import Tensor
from torchmetrics import Metric

from lightning_curv.curvature.constants import IGNORE_INDEX

#: Slack for the float comparison ``1 - d/L >= loose_threshold`` (``d``, ``L`` are integers; ``1 - 3/10``
#: must count as ``>= 0.7``).
_THRESHOLD_EPS = 1e-9


def align_to_target(generated: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Cut ``generated`` and ``target`` to a common width.

    Args:
        generated: Generated tokens of shape [batch, gen_len].
        target: Expected tokens of shape [batch, target_len], right-padded with ``ignore_index``.
        ignore_index: Padding value in ``target``.

    Returns:
        ``(generated, target)`` of shape [batch, width] each. Extra generated tokens past the target width
        are dropped; target columns past ``gen_len`` are dropped if they are all padding.

    Raises:
        ValueError: If the batch sizes differ or ``target`` has real tokens past ``gen_len``.
    """
    if generated.ndim != 2 or target.ndim != 2 or generated.shape[0] != target.shape[0]:
        raise ValueError(
            f"generated {tuple(generated.shape)} and target {tuple(target.shape)} must be [batch, len] each."
        )
    gen_len, target_len = generated.shape[1], target.shape[1]
    if target_len > gen_len:
        if bool((target[:, gen_len:] != ignore_index).any()):
            raise ValueError(
                f"Only {gen_len} tokens were generated but the target has real tokens past column {gen_len}."
            )
        target = target[:, :gen_len]
    return generated[:, : target.shape[1]], target


def token_edit_distances(generated: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Token-level Levenshtein distance of each generation to its target over the target's real tokens.

    Args:
        generated: Generated tokens of shape [batch, gen_len].
        target: Expected tokens of shape [batch, target_len], padded with ``ignore_index``.
        ignore_index: Padding value in ``target``.

    Returns:
        ``(distances, lengths)``, both of shape [batch] (long, on CPU): ``d`` between the generated and the
        target tokens at the target's real positions, and the number ``L`` of those positions.

    Raises:
        ValueError: If shapes disagree or a target row has no real token.
    """
    generated, target = align_to_target(generated, target, ignore_index)
    valid = target != ignore_index  # [B, L]
    lengths = valid.sum(dim=1).cpu()
    if bool((lengths == 0).any()):
        raise ValueError("A target row has no real token (all positions are padding).")
    gen_rows, target_rows, valid_rows = generated.cpu().tolist(), target.cpu().tolist(), valid.cpu().tolist()
    distances = [
        Levenshtein.distance(
            [g for g, v in zip(gen_row, mask_row, strict=True) if v],
            [t for t, v in zip(target_row, mask_row, strict=True) if v],
        )
        for gen_row, target_row, mask_row in zip(gen_rows, target_rows, valid_rows, strict=True)
    ]
    return torch.tensor(distances, dtype=torch.long), lengths


def _last_tokens_match(generated: Tensor, target: Tensor, valid: Tensor, num_tokens: int) -> Tensor:
    """Whether the last ``num_tokens`` real target tokens are reproduced exactly.

    Args:
        generated: Generated tokens of shape [batch, L], aligned with ``target``.
        target: Expected tokens of shape [batch, L].
        valid: Real-token mask of ``target``, shape [batch, L].
        num_tokens: How many trailing real tokens to compare (all of them if a row has fewer).

    Returns:
        Boolean tensor of shape [batch].
    """
    # Rank of each real token counted from the end of its row: 1 for the last real token.
    from_end = valid.long().flip(1).cumsum(1).flip(1)  # [B, L]
    tail = valid & (from_end <= num_tokens)
    return ((generated == target) | ~tail).all(dim=1)


class TextMemorizationMetric(Metric):
    """Verbatim recitation of training suffixes: Strict, Loose, AvgLev and the quotes variant.

    ``update`` takes greedy generations and the true suffixes (right-padded with -100); per row, ``L`` is the
    number of real target tokens and ``d`` the token-level Levenshtein distance (``rapidfuzz``) between the
    generated and the true tokens at those positions.

    ``compute`` returns:

    * ``strict``: fraction of rows with ``d = 0``;
    * ``loose``: fraction with ``1 - d/L >= loose_threshold`` (paper: 0.75), so ``strict <= loose``;
    * ``avg_lev``: mean of ``d/L`` (0 = verbatim, 1 = nothing in common);
    * ``quotes_strict``: fraction whose last ``quotes_tokens`` suffix tokens are reproduced exactly (the
      whole suffix when ``L < quotes_tokens``).

    Args:
        quotes_tokens: Length of the tail scored by ``quotes_strict`` (paper: 8).
        loose_threshold: Minimum normalized similarity ``1 - d/L`` for ``loose`` (paper: 0.75).
        **kwargs: Passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: If ``quotes_tokens < 1`` or ``loose_threshold`` is outside [0, 1].
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    strict: Tensor
    loose: Tensor
    lev_sum: Tensor
    quotes_strict: Tensor
    total: Tensor

    def __init__(self, quotes_tokens: int = 8, loose_threshold: float = 0.75, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if quotes_tokens < 1:
            raise ValueError(f"quotes_tokens must be >= 1, got {quotes_tokens}.")
        if not 0.0 <= loose_threshold <= 1.0:
            raise ValueError(f"loose_threshold must be in [0, 1], got {loose_threshold}.")
        self.quotes_tokens = quotes_tokens
        self.loose_threshold = loose_threshold
        for name in ("strict", "loose", "quotes_strict", "total"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("lev_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated: Tensor, target: Tensor) -> None:
        """Score one batch.

        Args:
            generated: Generated tokens of shape [batch, gen_len] with ``gen_len`` >= the target's real width.
            target: True suffixes of shape [batch, L], right-padded with -100.
        """
        distances, lengths = token_edit_distances(generated, target)
        generated, target = align_to_target(generated, target)
        valid = target != IGNORE_INDEX
        normalized = distances.double() / lengths.double()  # [B], d/L in [0, 1]
        device = self.total.device
        self.strict += (distances == 0).sum().to(device)
        self.loose += (1.0 - normalized >= self.loose_threshold - _THRESHOLD_EPS).sum().to(device)
        self.lev_sum += normalized.sum().to(device)
        self.quotes_strict += _last_tokens_match(generated, target, valid, self.quotes_tokens).sum().to(device)
        self.total += distances.numel()

    def compute(self) -> dict[str, Tensor]:
        """Return ``strict``, ``loose``, ``avg_lev`` and ``quotes_strict`` (NaN before any update)."""
        total = self.total.double()
        return {
            "strict": self.strict.double() / total,
            "loose": self.loose.double() / total,
            "avg_lev": self.lev_sum / total,
            "quotes_strict": self.quotes_strict.double() / total,
        }


class SequenceMatchMetric(Metric):
    """Exact-match rates of generations against a target (and optionally a second target), per group.

    One class serves the TinyMem metrics:

    * noise memorization: ``target`` = the noised training continuation, ``alt_target`` = the rule's clean
      continuation; ``match`` = memorized, ``alt_match`` = rule following;
    * task accuracy: ``target`` = the rule's continuation, ``group`` = rule id; ``util/task_acc`` is
      ``match_group_mean``, the **mean over rules** of the per-rule match rate (each rule weighs the same
      whatever its number of held-out prompts), ``util/task_acc/<rule>`` is ``match/<rule>`` and
      ``util/task_token_acc`` is ``token_acc``;
    * backdoor: ``target`` = the junk continuation; ``match`` = trigger success rate.

    A row matches when every real (non -100) target token is reproduced at its position.

    ``compute`` returns ``match`` (over all rows), ``token_acc`` (correct real tokens / real tokens, pooled
    over rows), ``match/<name>`` per group (NaN for a group with no rows), ``match_group_mean`` (mean of the
    per-group rates over groups that have rows) and, if any update received ``alt_target``, ``alt_match``.

    Args:
        num_groups: Number of groups; group ids in updates must lie in ``[0, num_groups)``.
        group_names: Names used in the ``match/<name>`` keys (default ``"0"``, ``"1"``, ...).
        **kwargs: Passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: If ``num_groups < 1`` or ``group_names`` does not have ``num_groups`` unique entries.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    match: Tensor
    total: Tensor
    alt_match: Tensor
    alt_total: Tensor
    token_correct: Tensor
    token_total: Tensor
    group_match: Tensor
    group_total: Tensor

    def __init__(self, num_groups: int = 1, group_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
        names = [str(i) for i in range(num_groups)] if group_names is None else [str(n) for n in group_names]
        if len(names) != num_groups or len(set(names)) != num_groups:
            raise ValueError(f"group_names must hold {num_groups} unique names, got {list(names)}.")
        self.num_groups = num_groups
        self.group_names = tuple(names)
        for name in ("match", "total", "alt_match", "alt_total", "token_correct", "token_total"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("group_match", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("group_total", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _row_match(generated: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row exact match, plus per-position equality and the real-token mask of ``target``."""
        generated, target = align_to_target(generated, target)
        valid = target != IGNORE_INDEX  # [B, L]
        if bool((valid.sum(dim=1) == 0).any()):
            raise ValueError("A target row has no real token (all positions are padding).")
        equal = generated == target
        return (equal | ~valid).all(dim=1), equal & valid, valid

    def update(
        self, generated: Tensor, target: Tensor, alt_target: Tensor | None = None, group: Tensor | None = None
    ) -> None:
        """Score one batch.

        Args:
            generated: Generated tokens of shape [batch, gen_len].
            target: Expected continuation of shape [batch, L], right-padded with -100.
            alt_target: Optional second continuation of shape [batch, L'], right-padded with -100.
            group: Optional group ids of shape [batch] (long); all rows are group 0 when omitted.

        Raises:
            ValueError: If a group id is out of range or a target row is empty.
        """
        matched, correct, valid = self._row_match(generated, target)
        batch = matched.shape[0]
        if group is None:
            group = torch.zeros(batch, dtype=torch.long, device=matched.device)
        group = group.to(matched.device).long().reshape(-1)
        if group.shape[0] != batch:
            raise ValueError(f"group has {group.shape[0]} entries for a batch of {batch}.")
        if bool(((group < 0) | (group >= self.num_groups)).any()):
            raise ValueError(f"group ids must lie in [0, {self.num_groups}), got {group.tolist()}.")
        # One-hot sums instead of bincount/index_add: deterministic on every device.
        one_hot = torch.nn.functional.one_hot(group, self.num_groups)  # [B, G]
        self.group_match += (one_hot * matched.long()[:, None]).sum(dim=0)
        self.group_total += one_hot.sum(dim=0)
        self.match += matched.sum()
        self.total += batch
        self.token_correct += correct.sum()
        self.token_total += valid.sum()
        if alt_target is not None:
            alt_matched, _, _ = self._row_match(generated, alt_target)
            self.alt_match += alt_matched.sum()
            self.alt_total += batch

    def compute(self) -> dict[str, Tensor]:
        """Return ``match``, ``token_acc``, ``match/<name>``, ``match_group_mean`` and maybe ``alt_match``."""
        per_group = self.group_match.double() / self.group_total.double()  # [G], NaN for empty groups
        result = {
            "match": self.match.double() / self.total.double(),
            "token_acc": self.token_correct.double() / self.token_total.double(),
            "match_group_mean": per_group.nanmean(),
        }
        for name, value in zip(self.group_names, per_group, strict=True):
            result[f"match/{name}"] = value
        if int(self.alt_total) > 0:
            result["alt_match"] = self.alt_match.double() / self.alt_total.double()
        return result
