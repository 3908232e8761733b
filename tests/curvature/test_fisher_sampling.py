"""The true Fisher of the causal-LM path is the right distribution: seeds, draws, and its Monte-Carlo mean.

``tests/reference.py`` redraws the targets from the documented contract, and computes the expectation of ``G``
with no sampling at all; here the implementation is held to both.
"""

from __future__ import annotations

import torch

from lightning_curv.curvature import collect_factors, resolve_modules
from lightning_curv.curvature.kfac import sample_from_logits
from lightning_curv.utils import row_seed
from tests.cases import tiny_llama
from tests.reference import analytic_true_fisher_G, reference_row_seed, reference_sample

#: Layers whose G is checked: layer 0's output gradient also flows through layer 1's attention from later
#: positions, so its expectation has cross-position terms; layer 1's up_proj is a wider d_out.
MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
#: Copies of one sequence, each its own dataset row (own index, so own seeded draws), and rows per batch.
COPIES = 6000
ROWS_PER_BATCH = 500
#: The freshly initialised head gives nearly uniform next-token probabilities, which a wrong sampler (uniform
#: draws, a temperature) would match by accident; scaling it gives logits of standard deviation about 1.5.
HEAD_SCALE = 20.0
#: Relative Frobenius error of the Monte-Carlo mean of G over COPIES rows against its exact expectation. Measured
#: 0.011-0.024 over seeds at this size (it shrinks as 1/sqrt(COPIES)); targets drawn at temperature 1.5 are off
#: by 0.18-0.26, uniform ones by 0.4-0.6, the argmax or the data token by more than 0.7.
MC_RTOL = 0.05
SEQ_LEN, PADDED_LEN = 8, 10


def _copies(ids: torch.Tensor, copies: int, start: int) -> dict[str, torch.Tensor]:
    """``copies`` rows holding the same right-padded sequence, with a masked label, indices from ``start``."""
    input_ids = torch.zeros(copies, PADDED_LEN, dtype=torch.long)
    input_ids[:, :SEQ_LEN] = ids
    attention_mask = (torch.arange(PADDED_LEN) < SEQ_LEN).long().expand(copies, -1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 3] = -100  # position 2 predicts nothing: it is no sample, and its logits enter no loss
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": torch.arange(start, start + copies),
    }


def test_row_seed_is_the_documented_splitmix64():
    pairs = [(0, 0), (3, 101), (7, 2**40 + 5), (2**31, 2**32 - 1)]
    assert [row_seed(s, i) for s, i in pairs] == [reference_row_seed(s, i) for s, i in pairs]
    # Pinned: the seeds define the targets of every factor file collected so far.
    assert reference_row_seed(0, 0) == 8286242343226680935
    assert reference_row_seed(3, 101) == 7977305197678754295


def test_sampler_is_the_documented_gumbel_max():
    logits = torch.randn(7, 11, dtype=torch.float64)
    for seed in (0, 1, 12345):
        want = reference_sample(logits, seed)
        assert torch.equal(sample_from_logits(logits, torch.Generator().manual_seed(seed)), want)


def test_true_fisher_lm_mean_approaches_the_analytic_expectation():
    model = tiny_llama().double()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    names = resolve_modules(model, MODULES)
    ids = torch.randint(0, model.config.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(1))
    one = _copies(ids, 1, 0)
    analytic = analytic_true_fisher_G(model, one, names)  # [d_out, d_out] per sample position
    assert all(len(per_position) == SEQ_LEN - 2 for per_position in analytic.values())
    expected = {n: torch.stack(per_position).mean(0) for n, per_position in analytic.items()}
    batches = [_copies(ids, ROWS_PER_BATCH, start) for start in range(0, COPIES, ROWS_PER_BATCH)]
    got = collect_factors(model, batches, names, fisher="true", seed=11, dtype=torch.float64)
    for name in names:
        assert got[name].num_samples == COPIES * (SEQ_LEN - 2)
        rel = float(torch.linalg.norm(got[name].G - expected[name]) / torch.linalg.norm(expected[name]))
        assert rel < MC_RTOL, f"{name}: true-Fisher G deviates from J^T (diag p - p p^T) J by {rel:.3f}"
