"""BalancedSubnet: exact mask ratio, only masked weights change, reversible, score updates follow the loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from lightning_curv.baselines import balanced_subnet, lm_loss, num_masked, score_mask
from lightning_curv.curvature import is_conv1d_like, weight_matrix
from lightning_curv.utils import name_seed
from tests.cases import LLAMA_MLP, LM_CASES, lm_batch, tiny_llama

RATIO = 0.05
#: One SGD step of float32 scores against the same maths done by hand.
STEP = {"rtol": 1e-5, "atol": 1e-7}
#: The pure-forgetting run must raise the memorized loss by at least this factor over the initial random mask.
MIN_FORGET_GAIN = 1.01


def _batches(vocab: int = 64):
    return [lm_batch(seed=1, vocab=vocab)], [lm_batch(seed=2, vocab=vocab), lm_batch(seed=3, vocab=vocab)]


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_mask_hits_the_ratio_exactly_and_only_masked_weights_change(case):
    build, patterns = LM_CASES[case]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    memorized, retain = _batches()
    scores: dict = {}
    handle = balanced_subnet(model, patterns, memorized, retain, ratio=RATIO, epochs=2, scores=scores)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in handle.stats}
    modules = dict(model.named_modules())
    for name, stats in handle.stats.items():
        assert not parametrize.is_parametrized(modules[name])
        old, new = before[f"{name}.weight"], after[f"{name}.weight"]
        assert new.shape == old.shape  # Conv1D keeps its [d_in, d_out] layout
        diff = new != old
        k = num_masked(old.numel(), RATIO)
        assert int(diff.sum()) == k == old.numel() - stats.kept_pairs  # exactly `ratio` of this matrix
        assert bool((new[diff] == 0).all()), "masked weights are zeroed"
        assert torch.equal(new[~diff], old[~diff]), "the other weights are bit-identical"
        # The zeros sit where the lowest |score|s are, read in the [d_out, d_in] convention.
        dropped = score_mask(scores[name], k) == 0
        assert bool((weight_matrix(modules[name])[dropped] == 0).all())
        assert stats.removed_energy == pytest.approx(float(old[diff].double().pow(2).sum() / old.double().pow(2).sum()))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    handle.undo()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ties_are_broken_by_flat_index():
    scores = torch.tensor([[0.5, -0.1, 0.1], [0.0, 0.1, -0.5]])
    # |score| = [.5 .1 .1 / 0 .1 .5]: zero first, then the three 0.1s in flat order.
    assert score_mask(scores, 1).tolist() == [[1, 1, 1], [0, 1, 1]]
    assert score_mask(scores, 3).tolist() == [[1, 0, 0], [0, 1, 1]]
    assert score_mask(torch.zeros(2, 3), 4).tolist() == [[0, 0, 0], [0, 1, 1]]
    assert num_masked(384, 0.0015) == 1 and num_masked(10, 0.25) == 3  # round half up: 2.5 -> 3


def _initial_scores(weight: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    scores = torch.empty(weight.shape)
    generator = torch.Generator().manual_seed(name_seed(seed, name))
    return nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)


@pytest.mark.parametrize(
    ("case", "name"), [("llama", "model.layers.1.mlp.down_proj"), ("gpt2", "transformer.h.1.mlp.c_fc")]
)
def test_one_step_moves_scores_against_the_straight_through_gradient(case, name):
    model = LM_CASES[case][0]()
    layer = dict(model.named_modules())[name]
    W = weight_matrix(layer).detach().clone()
    memorized, retain = _batches()
    alpha, lr, wd = 0.4, 0.3, 5e-4
    s0 = _initial_scores(W, name, seed=5)
    k = num_masked(W.numel(), RATIO)
    # By hand: L = -(1 - α) CE_mem + α CE_retain at W' = W ⊙ mask(s0); dL/ds = sign(s0) ⊙ W ⊙ dL/dW'.
    masked = W * score_mask(s0, k)
    with torch.no_grad():
        weight_matrix(layer).copy_(masked)
    layer.weight.grad = None
    loss = -(1 - alpha) * lm_loss(model, memorized[0]) + alpha * lm_loss(model, retain[0])
    loss.backward()
    grad_W = layer.weight.grad.T if is_conv1d_like(layer) else layer.weight.grad  # [d_out, d_in]
    grad = torch.sign(s0) * W * grad_W
    expected = s0 - lr * (grad + wd * s0)  # first SGD step: the momentum buffer is the gradient itself
    with torch.no_grad():
        weight_matrix(layer).copy_(W)
    layer.weight.grad = None
    scores: dict = {}
    history: list = []
    with balanced_subnet(
        model,
        name,
        memorized,
        retain,
        ratio=RATIO,
        alpha=alpha,
        lr=lr,
        epochs=1,
        seed=5,
        scores=scores,
        history=history,
    ):
        assert_close(scores[name], expected, **STEP)
        assert not torch.equal(scores[name], s0)
    assert history[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert torch.equal(weight_matrix(layer), W)


def test_forgetting_raises_the_memorized_loss_of_a_tiny_overfit_model():
    torch.manual_seed(0)
    model = tiny_llama(vocab=32)
    memorized = lm_batch(batch_size=4, seq_len=12, vocab=32, seed=1)
    retain = lm_batch(batch_size=4, seq_len=12, vocab=32, seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(10):  # partly memorize the 4 sequences
        optimizer.zero_grad()
        lm_loss(model, memorized).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        base, base_retain = lm_loss(model, memorized).item(), lm_loss(model, retain).item()
    assert base < 0.5 * base_retain, "the model memorized its sequences"
    history: list = []
    with balanced_subnet(
        model, LLAMA_MLP, [memorized], [retain], ratio=RATIO, alpha=0.0, lr=10.0, epochs=10, history=history
    ):
        with torch.no_grad():
            edited = lm_loss(model, memorized).item()
    initial_mask = history[0]["mem_loss"]  # the random kaiming-uniform mask before any step
    assert edited > MIN_FORGET_GAIN * initial_mask and edited > base
    assert history[-1]["mem_loss"] > history[0]["mem_loss"]


def test_bad_arguments_leave_the_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memorized, retain = _batches()
    with pytest.raises(ValueError, match="zeroes no weight"):
        balanced_subnet(model, LLAMA_MLP, memorized, retain, ratio=1e-4)
    with pytest.raises(ValueError, match="ratio must be"):
        balanced_subnet(model, LLAMA_MLP, memorized, retain, ratio=0.0)
    with pytest.raises(ValueError, match="memorized batches are empty"):
        balanced_subnet(model, LLAMA_MLP, [], retain, ratio=RATIO)
    with pytest.raises(KeyError):
        balanced_subnet(model, LLAMA_MLP, [{"attention_mask": memorized[0]["attention_mask"]}], retain, ratio=RATIO)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
