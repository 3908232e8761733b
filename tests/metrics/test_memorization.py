import math

import pytest
import torch
from torch.testing import assert_close

from lightning_curv.metrics import SequenceMatchMetric, TextMemorizationMetric, token_edit_distances

# Every value here is a ratio of small integers computed in float64.
EXACT = {"rtol": 0.0, "atol": 1e-12}
PAD = -100

TARGET = [1, 2, 3, 4, 5, 6, 7, 8]
# name -> (generated, expected distance)
CASES = {
    "exact": ([1, 2, 3, 4, 5, 6, 7, 8], 0),
    "substitution": ([9, 2, 3, 4, 5, 6, 7, 8], 1),
    # One inserted token at fixed length L: insert 99, and 8 falls off the end -> d = 2.
    "insertion": ([1, 99, 2, 3, 4, 5, 6, 7], 2),
    "all_wrong": ([101, 102, 103, 104, 105, 106, 107, 108], 8),
}


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _levenshtein_reference(a: list[int], b: list[int]) -> int:
    """Textbook dynamic programme."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@pytest.mark.parametrize("name", list(CASES))
def test_text_memorization_single_cases(name):
    generated, distance = CASES[name]
    metric = TextMemorizationMetric(quotes_tokens=8, loose_threshold=0.75)
    metric.update(torch.tensor([generated]), torch.tensor([TARGET]))
    out = metric.compute()
    length = len(TARGET)
    assert_close(out["strict"], _scalar(float(distance == 0)), **EXACT)
    # The insertion case sits exactly on the boundary 1 - 2/8 = 0.75 and must count as loose.
    assert_close(out["loose"], _scalar(float(1 - distance / length >= 0.75)), **EXACT)
    assert_close(out["avg_lev"], _scalar(distance / length), **EXACT)
    assert_close(out["quotes_strict"], _scalar(float(distance == 0)), **EXACT)


def test_text_memorization_batch_and_quotes():
    generated = torch.tensor([case[0] for case in CASES.values()])
    target = torch.tensor([TARGET] * len(CASES))
    metric = TextMemorizationMetric(quotes_tokens=4)
    metric.update(generated, target)
    out = metric.compute()
    assert_close(out["strict"], _scalar(1 / 4), **EXACT)
    assert_close(out["loose"], _scalar(3 / 4), **EXACT)
    assert_close(out["avg_lev"], _scalar((0 + 1 / 8 + 2 / 8 + 1) / 4), **EXACT)
    # Last 4 tokens: exact and substitution (at position 0) reproduce them; insertion and all-wrong do not.
    assert_close(out["quotes_strict"], _scalar(2 / 4), **EXACT)


def test_text_memorization_ignores_padding():
    target = torch.tensor([[1, 2, 3, 4, PAD, PAD], [5, 6, 7, 8, 9, 10]])
    generated = torch.tensor([[1, 2, 3, 4, 77, 77, 77], [5, 6, 7, 0, 9, 10, 77]])  # wider than the target
    metric = TextMemorizationMetric(quotes_tokens=2)
    metric.update(generated, target)
    out = metric.compute()
    assert_close(out["strict"], _scalar(1 / 2), **EXACT)
    assert_close(out["avg_lev"], _scalar((0 + 1 / 6) / 2), **EXACT)
    # quotes on the last 2 REAL tokens: row 0 -> [3, 4] (not the padded columns), row 1 -> [9, 10].
    assert_close(out["quotes_strict"], _scalar(1.0), **EXACT)
    distances, lengths = token_edit_distances(generated, target)
    assert distances.tolist() == [0, 1]
    assert lengths.tolist() == [4, 6]


def test_text_memorization_quotes_longer_than_suffix_uses_whole_suffix():
    metric = TextMemorizationMetric(quotes_tokens=8)
    metric.update(torch.tensor([[1, 2, 3], [1, 2, 0]]), torch.tensor([[1, 2, 3], [1, 2, 3]]))
    assert_close(metric.compute()["quotes_strict"], _scalar(1 / 2), **EXACT)


def test_text_memorization_target_longer_than_generation():
    metric = TextMemorizationMetric()
    # Extra target columns that are all padding are fine.
    metric.update(torch.tensor([[1, 2]]), torch.tensor([[1, 2, PAD, PAD]]))
    assert_close(metric.compute()["strict"], _scalar(1.0), **EXACT)
    with pytest.raises(ValueError, match="generated"):
        metric.update(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="no real token"):
        metric.update(torch.tensor([[1, 2]]), torch.tensor([[PAD, PAD]]))


def test_text_memorization_bad_arguments():
    with pytest.raises(ValueError, match="quotes_tokens"):
        TextMemorizationMetric(quotes_tokens=0)
    with pytest.raises(ValueError, match="loose_threshold"):
        TextMemorizationMetric(loose_threshold=1.5)


def test_strict_le_loose_and_distances_on_random_cases():
    g = torch.Generator().manual_seed(1)
    batch, width, vocab = 64, 12, 5
    target = torch.randint(0, vocab, (batch, width), generator=g)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    target[torch.arange(width)[None, :] >= lengths[:, None]] = PAD
    # Perturb a random number of positions (including none) so all regimes occur.
    generated = target.clamp_min(0).clone()
    flips = torch.rand(batch, width, generator=g) < torch.rand(batch, 1, generator=g) * 0.6
    generated[flips] = torch.randint(0, vocab, (int(flips.sum()),), generator=g)
    distances, lens = token_edit_distances(generated, target)
    for row in range(batch):
        n = int(lens[row])
        expected = _levenshtein_reference(generated[row, :n].tolist(), target[row, :n].tolist())
        assert int(distances[row]) == expected
    for threshold in (0.5, 0.75, 0.9, 1.0):
        metric = TextMemorizationMetric(loose_threshold=threshold)
        metric.update(generated, target)
        out = metric.compute()
        assert out["strict"] <= out["loose"]
        assert 0.0 < out["strict"] < 1.0  # the construction hits both outcomes
    assert_close(out["strict"], out["loose"], **EXACT)  # threshold 1 means exact


def test_text_memorization_accumulation_reset_and_merge():
    generated = torch.tensor([case[0] for case in CASES.values()])
    target = torch.tensor([TARGET] * len(CASES))
    whole = TextMemorizationMetric()
    whole.update(generated, target)
    parts = TextMemorizationMetric()
    parts.update(generated[:1], target[:1])
    parts.update(generated[1:], target[1:])
    # Two "ranks" merged with the metric's own reductions (what DDP sync applies).
    rank0, rank1 = TextMemorizationMetric(), TextMemorizationMetric()
    rank0.update(generated[:3], target[:3])
    rank1.update(generated[3:], target[3:])
    rank0.merge_state(rank1)
    for other in (parts, rank0):
        for key, value in whole.compute().items():
            assert_close(other.compute()[key], value, **EXACT)
    whole.reset()
    assert int(whole.total) == 0
    whole.update(generated[:1], target[:1])
    assert_close(whole.compute()["strict"], _scalar(1.0), **EXACT)


def test_sequence_match_hand_made():
    target = torch.tensor([[1, 2, 3], [1, 2, PAD], [4, 5, 6], [4, 5, 6]])
    alt = torch.tensor([[1, 2, 0], [1, 2, PAD], [4, 0, 0], [4, 5, 6]])
    generated = torch.tensor(
        [
            [1, 2, 3],  # matches target (group 0)
            [1, 2, 9],  # matches target: the differing column is padding (group 0)
            [4, 5, 0],  # one token wrong (group 1)
            [0, 0, 0],  # all wrong (group 1)
        ]
    )
    group = torch.tensor([0, 0, 1, 1])
    metric = SequenceMatchMetric(num_groups=2, group_names=["add7", "double"])
    metric.update(generated, target, alt_target=alt, group=group)
    out = metric.compute()
    assert set(out) == {"match", "token_acc", "match_group_mean", "match/add7", "match/double", "alt_match"}
    assert_close(out["match"], _scalar(2 / 4), **EXACT)
    assert_close(out["alt_match"], _scalar(1 / 4), **EXACT)  # only row 1 equals its alt target
    assert_close(out["token_acc"], _scalar((3 + 2 + 2 + 0) / 11), **EXACT)
    assert_close(out["match/add7"], _scalar(1.0), **EXACT)
    assert_close(out["match/double"], _scalar(0.0), **EXACT)
    assert_close(out["match_group_mean"], _scalar(0.5), **EXACT)


def test_sequence_match_group_mean_differs_from_pooled_and_skips_empty_groups():
    target = torch.tensor([[1, 2]] * 4)
    generated = torch.tensor([[1, 2], [1, 2], [1, 2], [0, 0]])
    metric = SequenceMatchMetric(num_groups=3)
    metric.update(generated, target, group=torch.tensor([0, 0, 0, 1]))
    out = metric.compute()
    assert "alt_match" not in out
    assert_close(out["match"], _scalar(3 / 4), **EXACT)
    assert_close(out["match_group_mean"], _scalar((1.0 + 0.0) / 2), **EXACT)  # group 2 has no rows
    assert math.isnan(out["match/2"])


def test_sequence_match_defaults_accumulation_and_merge():
    target = torch.tensor([[1, 2], [3, 4], [5, 6]])
    generated = torch.tensor([[1, 2], [3, 0], [5, 6]])
    group = torch.tensor([0, 1, 1])
    whole = SequenceMatchMetric(num_groups=2)
    whole.update(generated, target, group=group)
    rank0, rank1 = SequenceMatchMetric(num_groups=2), SequenceMatchMetric(num_groups=2)
    rank0.update(generated[:1], target[:1], group=group[:1])
    rank1.update(generated[1:], target[1:], group=group[1:])
    rank0.merge_state(rank1)
    expected = whole.compute()
    assert_close(expected["match/1"], _scalar(1 / 2), **EXACT)
    for key, value in expected.items():
        assert_close(rank0.compute()[key], value, **EXACT)
    single = SequenceMatchMetric()
    single.update(generated, target)  # no group: everything is group "0"
    assert_close(single.compute()["match/0"], _scalar(2 / 3), **EXACT)
    single.reset()
    assert int(single.total) == 0 and int(single.group_total.sum()) == 0


def test_sequence_match_bad_input():
    with pytest.raises(ValueError, match="group_names"):
        SequenceMatchMetric(num_groups=2, group_names=["a"])
    with pytest.raises(ValueError, match="num_groups"):
        SequenceMatchMetric(num_groups=0)
    metric = SequenceMatchMetric(num_groups=2)
    with pytest.raises(ValueError, match="group ids"):
        metric.update(torch.tensor([[1]]), torch.tensor([[1]]), group=torch.tensor([2]))
