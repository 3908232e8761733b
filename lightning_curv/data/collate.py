"""Helpers shared by the data modules: batch collation, seeded splits and the on-disk cache.

Batches follow the contract of :mod:`lightning_curv.data.base`: language-model batches are right-padded with
``labels = -100`` on padding; generation batches have LEFT-padded prompts (so that greedy decoding appends
to the last column of every row) and right-padded targets filled with ``-100``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lightning_curv.curvature.constants import IGNORE_INDEX

#: A token sequence as stored in a row: a list of ids or a 1-D integer tensor.
TokenSeq = Sequence[int] | Tensor


class RowDataset(Dataset):
    """A map-style dataset over a list of rows (dicts), returned as they are.

    Args:
        rows: One dict per example, e.g. ``{"input_ids": [...], "index": 3}``.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.rows[i]


def _as_long(seq: TokenSeq) -> Tensor:
    return torch.as_tensor(seq, dtype=torch.long).reshape(-1)


def pad_lm_batch(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Collate language-model rows into a right-padded batch.

    Args:
        rows: Each row has ``input_ids`` (a token sequence), ``index`` (int) and optionally ``labels`` (same
            length as ``input_ids``, ``-100`` where no loss is taken); without ``labels`` every real token
            is a label.
        pad_token_id: Id written into padded positions of ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` of shape ``[B, T]`` (``T`` the longest row) and
        ``index`` of shape ``[B]``; ``labels`` is ``-100`` on padding.

    Raises:
        ValueError: If ``rows`` is empty, a row is empty, or ``labels`` and ``input_ids`` differ in length.
    """
    if not rows:
        raise ValueError("Cannot collate an empty list of rows.")
    ids = [_as_long(row["input_ids"]) for row in rows]
    if any(len(x) == 0 for x in ids):
        raise ValueError("Cannot collate an empty token sequence.")
    length = max(len(x) for x in ids)
    batch = len(ids)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for i, (row, x) in enumerate(zip(rows, ids, strict=True)):
        n = len(x)
        input_ids[i, :n] = x
        attention_mask[i, :n] = 1
        if row.get("labels") is None:
            labels[i, :n] = x
        else:
            y = _as_long(row["labels"])
            if len(y) != n:
                raise ValueError(f"Row {i}: labels have length {len(y)} but input_ids have length {n}.")
            labels[i, :n] = y
    index = torch.tensor([int(row["index"]) for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


def _right_pad(seqs: Sequence[Tensor], length: int, value: int) -> Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, : len(x)] = x
    return out


def pad_generation_batch(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Collate prompt/continuation rows into a generation batch.

    Args:
        rows: Each row has ``prompt_ids`` and ``target_ids`` (token sequences), ``index`` (int), optionally
            ``group`` (int, default 0) and ``alt_target_ids`` (a token sequence; all rows or none).
        pad_token_id: Id written into the left padding of ``prompt_ids``.

    Returns:
        ``prompt_ids`` and ``prompt_mask`` of shape ``[B, P]`` (prompts LEFT-padded, mask 1 on real
        tokens); ``target_ids`` (and ``alt_target_ids`` when given) of shape ``[B, L]``, right-padded with
        ``-100`` to the longest of all targets; ``group`` and ``index`` of shape ``[B]``.

    Raises:
        ValueError: If ``rows`` is empty, a prompt or target is empty, or only some rows have
            ``alt_target_ids``.
    """
    if not rows:
        raise ValueError("Cannot collate an empty list of rows.")
    prompts = [_as_long(row["prompt_ids"]) for row in rows]
    targets = [_as_long(row["target_ids"]) for row in rows]
    if any(len(p) == 0 for p in prompts) or any(len(t) == 0 for t in targets):
        raise ValueError("Generation rows need a non-empty prompt and a non-empty target.")
    has_alt = [row.get("alt_target_ids") is not None for row in rows]
    if any(has_alt) and not all(has_alt):
        raise ValueError("Either every row of a generation batch has alt_target_ids or none does.")
    alts = [_as_long(row["alt_target_ids"]) for row in rows] if all(has_alt) else []

    batch = len(rows)
    prompt_len = max(len(p) for p in prompts)
    prompt_ids = torch.full((batch, prompt_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch, prompt_len), dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, prompt_len - len(p) :] = p
        prompt_mask[i, prompt_len - len(p) :] = 1
    target_len = max(len(t) for t in [*targets, *alts])
    out = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "target_ids": _right_pad(targets, target_len, IGNORE_INDEX),
    }
    if alts:
        out["alt_target_ids"] = _right_pad(alts, target_len, IGNORE_INDEX)
    out["group"] = torch.tensor([int(row.get("group", 0)) for row in rows], dtype=torch.long)
    out["index"] = torch.tensor([int(row["index"]) for row in rows], dtype=torch.long)
    return out


def generation_row(
    ids: TokenSeq,
    prompt_len: int,
    index: int,
    group: int = 0,
    target_len: int | None = None,
    alt_ids: TokenSeq | None = None,
) -> dict[str, Any]:
    """Cut one sequence into a generation row: the prompt is its head, the target what follows.

    Args:
        ids: The full sequence.
        prompt_len: Number of prompt tokens.
        index: The row's ``index``.
        group: The row's ``group``.
        target_len: Number of target tokens after the prompt; None takes the rest of the sequence.
        alt_ids: A second full sequence with the same prompt (e.g. a clean twin) whose continuation becomes
            ``alt_target_ids`` (same ``target_len``).

    Returns:
        A row for :func:`pad_generation_batch`.

    Raises:
        ValueError: If the sequence is too short for a non-empty prompt and the requested target.
    """
    end = len(ids) if target_len is None else prompt_len + target_len
    if prompt_len < 1 or end > len(ids) or end <= prompt_len:
        raise ValueError(
            f"A sequence of {len(ids)} tokens cannot give a {prompt_len}-token prompt and a "
            f"{'non-empty' if target_len is None else target_len}-token target."
        )
    row = {"prompt_ids": ids[:prompt_len], "target_ids": ids[prompt_len:end], "group": group, "index": index}
    if alt_ids is not None:
        row["alt_target_ids"] = alt_ids[prompt_len:end]
    return row


def generation_to_lm_rows(dataset: Dataset) -> RowDataset:
    """Language-model rows from generation rows: prompt + target, with the loss on the target tokens only.

    Used where a method trains on the memorized set itself (BalancedSubnet needs ``CE(memorized)``).

    Args:
        dataset: Rows built by :func:`generation_row`.

    Returns:
        Rows for :func:`pad_lm_batch` (``labels`` is -100 on the prompt).
    """
    rows = []
    for i in range(len(dataset)):
        row = dataset[i]
        prompt, target = _as_long(row["prompt_ids"]), _as_long(row["target_ids"])
        target = target[target != IGNORE_INDEX]
        rows.append(
            {
                "input_ids": torch.cat([prompt, target]),
                "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), target]),
                "index": int(row["index"]),
            }
        )
    return RowDataset(rows)


class UnpaddedDistributedSampler(DistributedSampler):
    """Every row exactly once over the processes, in whole batches: rank ``r`` of ``R`` takes batches ``r, r + R, ...``.

    ``DistributedSampler`` pads each rank's share to equal length with repeated rows, which biases evaluation
    metrics (a 500-row set becomes 504), and interleaves rows, which changes the batches. Here each rank reads the
    same batches a single process would read (same padding, so the same generations and per-batch values), and
    torchmetrics sums the states over ranks at ``compute``; shares may differ by one batch. (Lightning has an
    unpadded sampler for its predict loop, but only as a private class, and it interleaves rows.)

    Args:
        dataset: The rows.
        batch_size: Rows per batch of the loader this sampler feeds.
        num_replicas: Number of processes; None: the process group's world size.
        rank: This process's rank; None: from the process group.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)
        starts = range(self.rank * batch_size, n, self.num_replicas * batch_size)
        self.indices = [i for start in starts for i in range(start, min(start + batch_size, n))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_sampler(dataset: Dataset, batch_size: int) -> Sampler | None:
    """An :class:`UnpaddedDistributedSampler` in a multi-process job (Lightning keeps it), else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return UnpaddedDistributedSampler(dataset, batch_size)
    return None


def build_loader(
    dataset: Dataset,
    kind: Literal["lm", "generation"],
    pad_token_id: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    shard: bool = False,
) -> DataLoader:
    """Build a DataLoader over rows with the collate function of the batch ``kind``.

    Args:
        dataset: A dataset of rows (see :func:`pad_lm_batch` and :func:`pad_generation_batch`).
        kind: ``"lm"`` for language-model batches, ``"generation"`` for prompt/target batches.
        pad_token_id: Padding id of the tokenizer.
        batch_size: Rows per batch.
        shuffle: Shuffle every epoch (with a generator seeded from ``seed``, so runs are reproducible).
        seed: Seed of the shuffle.
        num_workers: Worker processes (the collate functions are picklable).
        shard: An evaluation loader: in a multi-process job each process reads its rows once, unpadded
            (:func:`eval_sampler`).

    Returns:
        The DataLoader.

    Raises:
        ValueError: On an unknown ``kind``.
    """
    if kind not in ("lm", "generation"):
        raise ValueError(f"kind must be 'lm' or 'generation', got {kind!r}.")
    collate = pad_lm_batch if kind == "lm" else pad_generation_batch
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=eval_sampler(dataset, batch_size) if shard and not shuffle else None,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=partial(collate, pad_token_id=pad_token_id),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def split_selection_test(num_examples: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(num_examples)`` into a selection half and a test half, deterministically from a seed.

    The selection half has ``num_examples // 2`` examples, the test half the rest; both are sorted.

    Args:
        num_examples: Number of examples to split.
        seed: Seed of the permutation; the same seed always gives the same halves.

    Returns:
        ``(selection, test)``: disjoint sorted index lists whose union is ``range(num_examples)``.

    Raises:
        ValueError: If ``num_examples`` is negative.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
    # A dedicated stream (salted seed) so that the split does not move when generation draws more numbers.
    perm = np.random.default_rng([seed, 0x5E1EC7]).permutation(num_examples)
    half = num_examples // 2
    return sorted(int(i) for i in perm[:half]), sorted(int(i) for i in perm[half:])
