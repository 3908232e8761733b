import pickle

import pytest
import torch

from lightning_curv.data.collate import (
    IGNORE_INDEX,
    RowDataset,
    build_loader,
    generation_row,
    pad_generation_batch,
    pad_lm_batch,
    split_selection_test,
)

PAD = 0


def test_pad_lm_batch_right_pads_and_masks_labels():
    rows = [
        {"input_ids": [5, 6, 7], "index": 4},
        {"input_ids": torch.tensor([8], dtype=torch.int32), "index": 9},
    ]
    batch = pad_lm_batch(rows, pad_token_id=PAD)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["index"].tolist() == [4, 9]
    # Labels are -100 exactly where there is padding.
    assert torch.equal(batch["labels"] == IGNORE_INDEX, batch["attention_mask"] == 0)


def test_pad_lm_batch_keeps_given_labels():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "index": 0},
        {"input_ids": [1], "index": 1},
    ]
    batch = pad_lm_batch(rows, pad_token_id=3)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [1, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"][1].tolist() == [1, 3, 3]
    with pytest.raises(ValueError, match="labels have length"):
        pad_lm_batch([{"input_ids": [1, 2], "labels": [1], "index": 0}], pad_token_id=PAD)
    with pytest.raises(ValueError):
        pad_lm_batch([], pad_token_id=PAD)


def test_pad_generation_batch_left_pads_prompts():
    rows = [
        {"prompt_ids": [1, 2, 3], "target_ids": [4], "alt_target_ids": [5, 6], "group": 2, "index": 7},
        {"prompt_ids": [9], "target_ids": [4, 4, 4], "alt_target_ids": [5], "group": 0, "index": 8},
    ]
    batch = pad_generation_batch(rows, pad_token_id=PAD)
    assert batch["prompt_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 9]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    # Targets share one length L, right-padded with -100.
    assert batch["target_ids"].tolist() == [[4, -100, -100], [4, 4, 4]]
    assert batch["alt_target_ids"].tolist() == [[5, 6, -100], [5, -100, -100]]
    assert batch["group"].tolist() == [2, 0]
    assert batch["index"].tolist() == [7, 8]
    # The last prompt column is always a real token, so generation continues every row from there.
    assert bool(batch["prompt_mask"][:, -1].all())


def test_pad_generation_batch_without_alt_and_mixed_alt():
    batch = pad_generation_batch([{"prompt_ids": [1], "target_ids": [2], "index": 0}], pad_token_id=PAD)
    assert "alt_target_ids" not in batch
    assert batch["group"].tolist() == [0]
    mixed = [
        {"prompt_ids": [1], "target_ids": [2], "alt_target_ids": [3], "index": 0},
        {"prompt_ids": [1], "target_ids": [2], "index": 1},
    ]
    with pytest.raises(ValueError, match="alt_target_ids"):
        pad_generation_batch(mixed, pad_token_id=PAD)


def test_generation_row_cuts_prompt_and_target():
    row = generation_row([1, 2, 3, 4, 5, 6], prompt_len=2, index=3, group=1, target_len=3, alt_ids=[1, 2, 9, 9, 9, 9])
    assert row == {
        "prompt_ids": [1, 2],
        "target_ids": [3, 4, 5],
        "alt_target_ids": [9, 9, 9],
        "group": 1,
        "index": 3,
    }
    assert generation_row([1, 2, 3], prompt_len=1, index=0)["target_ids"] == [2, 3]
    with pytest.raises(ValueError, match="cannot give"):
        generation_row([1, 2, 3], prompt_len=2, index=0, target_len=2)
    with pytest.raises(ValueError):
        generation_row([1, 2], prompt_len=2, index=0)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 100])
def test_split_selection_test_is_a_partition(n):
    selection, test = split_selection_test(n, seed=3)
    assert set(selection).isdisjoint(test)
    assert sorted(selection + test) == list(range(n))
    assert len(selection) == n // 2
    assert selection == sorted(selection) and test == sorted(test)


def test_split_selection_test_is_seeded():
    assert split_selection_test(50, seed=1) == split_selection_test(50, seed=1)
    assert split_selection_test(50, seed=1) != split_selection_test(50, seed=2)
    with pytest.raises(ValueError):
        split_selection_test(-1, seed=0)


def test_build_loader_collates_and_pickles():
    rows = RowDataset([{"input_ids": [i + 1] * (i + 1), "index": i} for i in range(5)])
    loader = build_loader(rows, "lm", pad_token_id=PAD, batch_size=5)
    batch = next(iter(loader))
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["attention_mask"].sum(1).tolist() == [1, 2, 3, 4, 5]
    pickle.dumps(loader.collate_fn)  # worker processes need a picklable collate function
    shuffled = [b["index"].tolist() for b in build_loader(rows, "lm", PAD, batch_size=5, shuffle=True, seed=0)]
    again = [b["index"].tolist() for b in build_loader(rows, "lm", PAD, batch_size=5, shuffle=True, seed=0)]
    assert shuffled == again
    with pytest.raises(ValueError, match="kind"):
        build_loader(rows, "images", pad_token_id=PAD, batch_size=1)


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 3, 2), (7, 4, 2), (5, 2, 3), (1, 4, 2), (16, 4, 2)])
def test_unpadded_sampler_gives_each_rank_whole_single_process_batches(n, batch, world):
    from lightning_curv.data.collate import UnpaddedDistributedSampler

    rows = list(range(n))
    single = [rows[i : i + batch] for i in range(0, n, batch)]
    seen = []
    for rank in range(world):
        indices = list(UnpaddedDistributedSampler(rows, batch, num_replicas=world, rank=rank))
        assert len(indices) == len(UnpaddedDistributedSampler(rows, batch, num_replicas=world, rank=rank))
        batches = [indices[i : i + batch] for i in range(0, len(indices), batch)]
        assert batches == single[rank::world]  # the batches one process would read, no padding
        seen += indices
    assert sorted(seen) == rows  # every row exactly once
