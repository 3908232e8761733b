"""Batched greedy decoding for memorization tests, and the prompt perturbations of the stress test.

Memorization is scored by prompting with a training prefix and greedily generating a suffix (Merullo et al.
2025, *From Memorization to Reasoning in the Spectrum of Loss Curvature*, arXiv 2510.24256, section on
memorization metrics). :func:`greedy_generate` does that for a batch of LEFT-padded prompts with a key/value
cache. The stress-test helpers (:func:`prepend_context`, :func:`shift_split`, :func:`longest_prefix_match`)
implement the paper's positional perturbations: prepend extra context, or move the prefix/suffix split, and
measure how long the exact recitation lasts.

Why an explicit loop and not ``model.generate``: ``generate`` merges the model's own ``generation_config``
into every call (``eos_token_id``, ``repetition_penalty``, ``no_repeat_ngram_size``, ... of a pretrained
checkpoint), and ``min_new_tokens`` works by banning EOS, so its output is not the plain argmax continuation.
The loop below is exactly "argmax of the next-token logits, ``max_new_tokens`` times", and on small models on
CPU it was as fast as or faster than ``generate`` (B=32, 64-token prompts, 48 new tokens).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curv.curvature.hooks import ModuleHooks


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword argument ``name``."""
    return name in inspect.signature(model.forward).parameters


def _output_field(output: Any, key: str) -> Any:
    """``output[key]`` of a ``ModelOutput`` (a mapping of its non-None fields), or the attribute of another object."""
    if isinstance(output, Mapping):
        if key not in output:
            raise KeyError(f"The model returned no {key!r}; greedy_generate needs a KV cache (use_cache=True).")
        return output[key]
    return getattr(output, key)


def _check_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
    """Raise ``ValueError`` unless the shapes agree and every mask row is ``0 ... 0 1 ... 1`` (not all 0)."""
    if prompt_ids.shape != prompt_mask.shape or prompt_mask.ndim != 2:
        raise ValueError(
            f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must both be "
            "[batch, prompt_len]."
        )
    mask = prompt_mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("Every prompt needs a real token and must be LEFT-padded (last column all 1).")
    # Left padding: once a row turns 1 it stays 1, i.e. the mask never decreases along the row.
    if bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
        raise ValueError("prompt_mask is not left-padded: a padding position follows a real token.")


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    pad_token_id: int,
) -> Tensor:
    """Greedily continue a batch of left-padded prompts with a key/value cache.

    The result equals running each prompt alone, unpadded, through ``argmax`` of the next-token logits
    ``max_new_tokens`` times without a cache (up to floating-point differences between the batched and the
    single-row forward, which matter only at exact ties). Generation does not stop at EOS: exactly
    ``max_new_tokens`` tokens come back for every row.

    Position ids are derived from the mask (``cumsum(mask) - 1``), so a left-padded row sees the same
    positions as when it runs alone. The model is put in eval mode for the call and every submodule's
    train/eval flag is restored afterwards.

    Args:
        model: A Hugging Face causal LM (any module whose forward takes ``input_ids``, ``attention_mask``,
            ``cache`` (``past_key_values`` in transformers < 5.2x), ``use_cache`` and returns ``.logits``
            [batch, seq, vocab] and the cache under the same name; ``position_ids`` and ``logits_to_keep`` are
            passed when accepted).
        prompt_ids: Prompt tokens of shape [batch, prompt_len], LEFT-padded.
        prompt_mask: Mask of shape [batch, prompt_len], 1 for real tokens; every row ends with a real token.
        max_new_tokens: Number of tokens to generate per row (0 returns an empty [batch, 0] tensor).
        pad_token_id: Written into the padding positions of the prompt before the forward, so placeholders
            such as -100 there are harmless.

    Returns:
        Generated token ids of shape [batch, max_new_tokens] (long, on ``prompt_ids.device``).

    Raises:
        ValueError: If shapes disagree, ``max_new_tokens`` is negative or the prompts are not left-padded.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    _check_prompts(prompt_ids, prompt_mask)
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return out

    use_positions = _accepts(model, "position_ids")
    keep_last = _accepts(model, "logits_to_keep")
    # transformers >= 5.2x names the KV cache `cache` (argument and output); earlier versions `past_key_values`.
    cache_key = "cache" if _accepts(model, "cache") else "past_key_values"
    # Restores each submodule's own flag: a model may arrive with mixed modes (e.g. frozen parts in eval).
    with ModuleHooks(model, freeze=False, eval_mode=True):
        mask = torch.ones(batch, prompt_len + max_new_tokens, dtype=torch.long, device=device)
        mask[:, :prompt_len] = prompt_mask.long()
        ids = prompt_ids.long().masked_fill(prompt_mask == 0, pad_token_id)
        kwargs: dict = {"attention_mask": mask[:, :prompt_len], "use_cache": True}
        if use_positions:
            # Padding positions get 0 (they are masked out anyway); real tokens count from 0.
            positions = (mask[:, :prompt_len].cumsum(-1) - 1).clamp_min(0)  # [B, P]
            kwargs["position_ids"] = positions
            next_position = positions[:, -1:]  # [B, 1]
        if keep_last:
            kwargs["logits_to_keep"] = 1  # the prompt pass only needs the last position's logits
        output = model(input_ids=ids, **kwargs)
        for step in range(max_new_tokens):
            token = output.logits[:, -1].argmax(dim=-1)  # [B]
            out[:, step] = token
            if step == max_new_tokens - 1:
                break
            kwargs = {
                "attention_mask": mask[:, : prompt_len + step + 1],
                cache_key: _output_field(output, cache_key),
                "use_cache": True,
            }
            if use_positions:
                next_position = next_position + 1
                kwargs["position_ids"] = next_position
            output = model(input_ids=token[:, None], **kwargs)
    return out


def prepend_context(
    prompt_ids: Tensor, prompt_mask: Tensor, context_ids: Tensor, pad_token_id: int = 0
) -> tuple[Tensor, Tensor]:
    """Insert ``t`` context tokens right before each left-padded prompt's first real token.

    Stress test of the paper: the memorized prefix is preceded by unrelated text, which shifts every position
    by ``t``. Rows stay left-padded, so the result feeds :func:`greedy_generate` directly.

    Args:
        prompt_ids: Prompts of shape [batch, prompt_len], LEFT-padded.
        prompt_mask: Mask of shape [batch, prompt_len], 1 for real tokens.
        context_ids: Context of shape [t] (same for every row) or [batch, t].
        pad_token_id: Token written into the ``t`` new padding columns on the left.

    Returns:
        ``(ids, mask)``, both of shape [batch, prompt_len + t]: row ``b`` is its old padding, the context,
        then its old real tokens.

    Raises:
        ValueError: If the prompts are not left-padded or ``context_ids`` has the wrong shape.
    """
    _check_prompts(prompt_ids, prompt_mask)
    batch, prompt_len = prompt_ids.shape
    if context_ids.ndim == 1:
        context_ids = context_ids.expand(batch, -1)
    if context_ids.ndim != 2 or context_ids.shape[0] != batch:
        raise ValueError(f"context_ids must have shape [t] or [{batch}, t], got {tuple(context_ids.shape)}.")
    t = context_ids.shape[1]
    width = prompt_len + t
    ids = torch.cat([prompt_ids.new_full((batch, t), pad_token_id), prompt_ids], dim=1)  # [B, P + t]
    mask = torch.cat([prompt_mask.new_zeros(batch, t), prompt_mask], dim=1)  # [B, P + t]
    lengths = prompt_mask.long().sum(dim=1)  # [B]
    # Context token j of row b goes to column width - len_b - t + j (that column is padding before).
    columns = (width - lengths - t)[:, None] + torch.arange(t, device=prompt_ids.device)  # [B, t]
    ids = ids.scatter(1, columns, context_ids.to(ids.dtype))
    mask = mask.scatter(1, columns, torch.ones_like(columns, dtype=mask.dtype))
    return ids, mask


def shift_split(sequence_ids: Tensor, prefix_len: int, suffix_len: int, shift: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut full sequences into prompt and target with the prefix/suffix split moved right by ``shift``.

    Stress test of the paper: the prompt is the first ``prefix_len + shift`` tokens and the target the next
    ``suffix_len`` tokens, so a recitation that only works from the original split point is exposed.

    Args:
        sequence_ids: Full training sequences of shape [batch, seq_len] without padding.
        prefix_len: Prompt length before the shift (paper: 64).
        suffix_len: Target length (paper: 48); unchanged by the shift.
        shift: Tokens to move the split by (negative moves it left).

    Returns:
        ``(prompt_ids, prompt_mask, target_ids)`` of shapes [batch, prefix_len + shift] (twice, the mask all
        ones) and [batch, suffix_len], in the generation-batch layout of ``lightning_curv.data.base``.

    Raises:
        ValueError: If the prompt would be empty or the sequences are too short for the shifted split.
    """
    start = prefix_len + shift
    if start < 1:
        raise ValueError(f"prefix_len + shift must be >= 1, got {prefix_len} + {shift}.")
    if suffix_len < 1:
        raise ValueError(f"suffix_len must be >= 1, got {suffix_len}.")
    if sequence_ids.ndim != 2:
        raise ValueError(f"sequence_ids must have shape [batch, seq_len], got {tuple(sequence_ids.shape)}.")
    if sequence_ids.shape[1] < start + suffix_len:
        raise ValueError(
            f"Sequences of length {sequence_ids.shape[1]} are shorter than prefix_len + shift + suffix_len "
            f"= {start + suffix_len}."
        )
    prompt_ids = sequence_ids[:, :start]
    target_ids = sequence_ids[:, start : start + suffix_len]
    return prompt_ids, torch.ones_like(prompt_ids), target_ids


def longest_prefix_match(generated: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Length of the longest prefix of each target that the generation reproduces exactly.

    Args:
        generated: Generated tokens of shape [batch, gen_len].
        target: Expected tokens of shape [batch, target_len], right-padded with ``ignore_index``; only the
            first ``min(gen_len, target_len)`` columns are compared.
        ignore_index: Padding value in ``target``; a padded position ends the match.

    Returns:
        Match lengths of shape [batch] (long): the number of leading positions where both agree.

    Raises:
        ValueError: If the batch sizes differ.
    """
    if generated.ndim != 2 or target.ndim != 2 or generated.shape[0] != target.shape[0]:
        raise ValueError(
            f"generated {tuple(generated.shape)} and target {tuple(target.shape)} must be [batch, len] each."
        )
    width = min(generated.shape[1], target.shape[1])
    target = target[:, :width]
    equal = (generated[:, :width] == target) & (target != ignore_index)  # [B, width]
    # cumprod stays 1 while every position so far matched; its sum is the prefix length.
    return equal.long().cumprod(dim=1).sum(dim=1)
