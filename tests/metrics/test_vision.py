import pytest
import torch
from torch.testing import assert_close

from lightning_curv.metrics import LabelMemorizationMetric

EXACT = {"rtol": 0.0, "atol": 1e-12}


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def test_label_memorization_hand_made():
    true = torch.tensor([0, 1, 2, 3, 4])
    noisy = torch.tensor([1, 2, 3, 4, 0])
    preds = torch.tensor([1, 2, 2, 0, 3])  # noisy, noisy, true, neither, neither
    metric = LabelMemorizationMetric()
    assert not metric.update_called
    metric.update(preds, noisy, true)
    assert metric.update_called
    out = metric.compute()
    assert out["memorized"].dtype == torch.float64
    assert_close(out["memorized"], _scalar(2 / 5), **EXACT)
    assert_close(out["gt_recovery"], _scalar(1 / 5), **EXACT)


def test_label_memorization_logits_accumulation_and_merge():
    true = torch.tensor([0, 1, 2, 0])
    noisy = torch.tensor([1, 2, 0, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([1, 1, 0, 0]), 3).float()  # argmax = [1, 1, 0, 0]
    whole = LabelMemorizationMetric()
    whole.update(logits, noisy, true)
    rank0, rank1 = LabelMemorizationMetric(), LabelMemorizationMetric()
    rank0.update(logits[:1], noisy[:1], true[:1])
    rank1.update(logits[1:], noisy[1:], true[1:])
    rank0.merge_state(rank1)
    assert rank0.update_called
    out = whole.compute()
    assert_close(out["memorized"], _scalar(2 / 4), **EXACT)
    assert_close(out["gt_recovery"], _scalar(2 / 4), **EXACT)
    for key, value in out.items():
        assert_close(rank0.compute()[key], value, **EXACT)
    whole.reset()
    assert not whole.update_called
    whole.update(torch.tensor([2]), torch.tensor([2]), torch.tensor([1]))
    assert_close(whole.compute()["memorized"], _scalar(1.0), **EXACT)


def test_label_memorization_shape_mismatch():
    with pytest.raises(ValueError, match="must all be"):
        LabelMemorizationMetric().update(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1]))
