import math

import pytest
import torch
from torch.testing import assert_close

from lightning_curv.metrics import (
    BatchMeanPerplexity,
    NDCGMetric,
    TokenPerplexity,
    reference_topk,
    summed_token_loss,
)

EXACT = {"rtol": 0.0, "atol": 1e-12}
# float32 cross-entropy of a uniform model, exponentiated.
PPL_TOL = {"rtol": 1e-5, "atol": 0.0}
HF_LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


class _Both:
    """Token-weighted and batch-mean perplexity fed the same batches; ``compute`` as the module reports them."""

    def __init__(self) -> None:
        self.token, self.batch = TokenPerplexity(), BatchMeanPerplexity()

    def update(self, loss_sum, num_tokens) -> None:
        self.token.update(loss_sum, num_tokens)
        self.batch.update(loss_sum, num_tokens)

    def merge_state(self, other: "_Both") -> None:
        self.token.merge_state(other.token)
        self.batch.merge_state(other.batch)

    def reset(self) -> None:
        self.token.reset()
        self.batch.reset()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"ppl": self.token.compute(), "ppl_batch_mean": self.batch.compute(), "loss": self.token.mean_loss()}


def test_perplexity_of_uniform_model_is_vocab_size():
    vocab = 37
    labels = torch.randint(0, vocab, (3, 9))
    labels[0, 5:] = -100
    labels[2, :3] = -100
    logits = torch.zeros(3, 9, vocab)
    metric = _Both()
    for row in range(3):  # batches with different token counts
        metric.update(*summed_token_loss(logits[row : row + 1], labels[row : row + 1]))
    out = metric.compute()
    assert_close(out["ppl"], _scalar(vocab), **PPL_TOL)
    assert_close(out["ppl_batch_mean"], _scalar(vocab), **PPL_TOL)
    assert_close(out["loss"], _scalar(math.log(vocab)), **PPL_TOL)


def test_summed_token_loss_matches_hf_mean_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    input_ids = torch.randint(0, 50, (2, 8))
    labels = input_ids.clone()
    labels[1, 6:] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    loss_sum, num_tokens = summed_token_loss(out.logits, labels)
    assert int(num_tokens) == 7 + 5
    assert_close(loss_sum / num_tokens, out.loss, **HF_LOSS_TOL)


def test_token_weighted_and_batch_mean_perplexity_differ():
    metric = _Both()
    metric.update(torch.tensor(2.0), 2)  # mean loss 1 over 2 tokens
    metric.update(torch.tensor(3.0), 1)  # mean loss 3 over 1 token
    metric.update(torch.tensor(0.0), 0)  # empty batch: skipped
    out = metric.compute()
    assert_close(out["loss"], _scalar(5 / 3), **EXACT)
    assert_close(out["ppl"], _scalar(math.exp(5 / 3)), **EXACT)
    assert_close(out["ppl_batch_mean"], _scalar((math.e + math.exp(3)) / 2), **EXACT)
    assert out["ppl_batch_mean"] > out["ppl"] + 1.0


def test_perplexity_merge_and_reset():
    whole, rank0, rank1 = _Both(), _Both(), _Both()
    batches = [(torch.tensor(4.0), 2), (torch.tensor(1.5), 3), (torch.tensor(9.0), 4)]
    for loss_sum, n in batches:
        whole.update(loss_sum, n)
    rank0.update(*batches[0])
    for batch in batches[1:]:
        rank1.update(*batch)
    rank0.merge_state(rank1)
    for key, value in whole.compute().items():
        assert_close(rank0.compute()[key], value, **EXACT)
    whole.reset()
    whole.update(torch.tensor(0.0), 5)
    assert_close(whole.compute()["ppl"], _scalar(1.0), **EXACT)
    with pytest.raises(ValueError, match="num_tokens"):
        whole.update(torch.tensor(1.0), -1)


def test_reference_topk():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    indices, probs = reference_topk(logits, 2)
    assert indices.tolist() == [[1, 2]]
    assert_close(probs, torch.softmax(logits, -1)[:, [1, 2]])
    with pytest.raises(ValueError, match="k must be"):
        reference_topk(logits, 5)


def test_ndcg_of_model_against_itself_is_exactly_one():
    logits = torch.randn(50, 100)
    metric = NDCGMetric(k=10)
    metric.update(logits, *reference_topk(logits, 10))
    assert metric.compute()["ndcg"].item() == 1.0


def test_ndcg_hand_computed_swap_partial_and_disjoint():
    ref_indices = torch.tensor([[0, 1, 2]])
    ref_probs = torch.tensor([[0.5, 0.3, 0.1]])
    ideal = 0.5 + 0.3 / math.log2(3) + 0.1 / math.log2(4)

    def ndcg(model_order: list[int]) -> torch.Tensor:
        # Logits that rank the tokens of model_order first, in that order (vocab of 6).
        logits = torch.zeros(1, 6)
        logits[0, model_order] = torch.tensor([3.0, 2.0, 1.0])
        metric = NDCGMetric(k=3)
        metric.update(logits - 10 * (logits == 0), ref_indices, ref_probs)
        return metric.compute()["ndcg"]

    swapped = (0.3 + 0.5 / math.log2(3) + 0.1 / math.log2(4)) / ideal
    partial = (0.1 + 0.0 / math.log2(3) + 0.5 / math.log2(4)) / ideal
    # Gains are float32 probabilities used in float64.
    tol = {"rtol": 1e-7, "atol": 1e-7}
    assert_close(ndcg([1, 0, 2]), _scalar(swapped), **tol)
    assert_close(ndcg([2, 4, 0]), _scalar(partial), **tol)
    assert_close(ndcg([3, 4, 5]), _scalar(0.0), **EXACT)
    assert_close(ndcg([0, 1, 2]), _scalar(1.0), **EXACT)


def test_ndcg_accumulates_over_positions():
    ref_indices = torch.tensor([[0, 1], [0, 1]])
    ref_probs = torch.tensor([[0.6, 0.2], [0.6, 0.2]])
    logits = torch.tensor([[5.0, 4.0, 0.0], [0.0, 1.0, 5.0]])  # position 0 ideal, position 1: [2, 1]
    second = (0.0 + 0.2 / math.log2(3)) / (0.6 + 0.2 / math.log2(3))
    whole = NDCGMetric(k=2)
    whole.update(logits, ref_indices, ref_probs)
    rank0, rank1 = NDCGMetric(k=2), NDCGMetric(k=2)
    rank0.update(logits[:1], ref_indices[:1], ref_probs[:1])
    rank1.update(logits[1:], ref_indices[1:], ref_probs[1:])
    rank0.merge_state(rank1)
    tol = {"rtol": 1e-7, "atol": 1e-7}
    assert_close(whole.compute()["ndcg"], _scalar((1.0 + second) / 2), **tol)
    assert_close(rank0.compute()["ndcg"], whole.compute()["ndcg"], **EXACT)
    with pytest.raises(ValueError, match="Expected logits"):
        whole.update(logits, ref_indices[:, :1], ref_probs[:, :1])
