"""The true Fisher of the causal-LM path is the right distribution: seeds, draws, and its Monte-Carlo mean.

``tests/reference.py`` redraws the targets from the documented contract (a counter-based uniform per
``(seed, dataset index, position)``, inverse CDF of the float64 softmax), and computes the expectation of ``G``
with no sampling at all; here the implementation is held to both, and to draws that depend neither on batching
and padding nor on a device's random stream.
"""

from __future__ import annotations

import pytest
import torch

from lightning_curv.curvature import (
    KFACAccumulator,
    causal_lm_step,
    collect_factors,
    kfac,
    resolve_modules,
    valid_positions,
)
from lightning_curv.curvature.kfac import fisher_targets, position_uniforms, sample_from_logits
from lightning_curv.utils import row_seed
from tests.cases import LLAMA_MLP, lm_batch, split_batch, tiny_llama
from tests.reference import analytic_true_fisher_G, reference_row_seed, reference_sample, reference_uniform

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
#: 0.019-0.023 with the inverse-CDF sampler (seeds 11 and 12; it shrinks as 1/sqrt(COPIES)); the same draws at
#: temperature 1.5 are off by 0.12-0.13, uniform ones by 0.4-0.6, the argmax or the data token by more than 0.7.
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
    # Pinned: the row seeds key the true-Fisher targets and the example-tied dropout masks.
    assert reference_row_seed(0, 0) == 8286242343226680935
    assert reference_row_seed(3, 101) == 7977305197678754295


def test_uniforms_are_the_documented_splitmix64_stream():
    triples = [(0, 0, 0), (3, 101, 7), (7, 2**40 + 5, 511), (2**31, 2**32 - 1, 2**20), (11, 5, 0), (11, 5, 1)]
    seeds = {s for s, _, _ in triples}
    for seed in seeds:
        rows = [(i, t) for s, i, t in triples if s == seed]
        got = position_uniforms(seed, torch.tensor([i for i, _ in rows]), torch.tensor([t for _, t in rows]))
        assert got.dtype == torch.float64
        assert got.tolist() == [reference_uniform(seed, i, t) for i, t in rows]
    # Pinned: these uniforms define the targets of every true-Fisher factor file.
    assert reference_uniform(0, 0, 0) == 0.607404157580025
    all_u = position_uniforms(1, torch.arange(200).repeat_interleave(50), torch.arange(50).repeat(200))
    assert 0.0 <= float(all_u.min()) and float(all_u.max()) < 1.0
    assert abs(float(all_u.mean()) - 0.5) < 0.01  # 10⁴ draws: the mean's standard error is 0.003


def test_sampler_is_the_documented_inverse_cdf():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 11, generator=g, dtype=torch.float64) * 2
    logits[:5, 3] = -float("inf")  # a class of probability zero is never drawn
    uniforms = torch.rand(300, generator=g, dtype=torch.float64)
    uniforms[:5] = torch.tensor([0.0, 1.0 - 2.0**-53, 0.5, 1e-300, 0.999999])
    want = reference_sample(logits, uniforms.tolist())
    got = sample_from_logits(logits, uniforms)
    assert torch.equal(got, want)
    assert not (got[:5] == 3).any()
    assert torch.equal(
        sample_from_logits(logits.float(), uniforms), reference_sample(logits.float(), uniforms.tolist())
    )


def _record_targets(monkeypatch) -> dict[tuple[int, int], int]:
    """Record every true-Fisher draw of the causal-LM step as ``{(dataset index, position): target}``."""
    seen: dict[tuple[int, int], int] = {}
    original = kfac.fisher_targets

    def spy(logits, data_targets, *, fisher, seed, index, position):
        targets = original(logits, data_targets, fisher=fisher, seed=seed, index=index, position=position)
        for i, t, y in zip(index.tolist(), position.tolist(), targets.tolist(), strict=True):
            assert (i, t) not in seen, "a sample was drawn twice"
            seen[(i, t)] = y
        return targets

    monkeypatch.setattr(kfac, "fisher_targets", spy)
    return seen


def _pad_right(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """The same rows with ``extra`` more padding columns on the right."""
    out = dict(batch)
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        pad = torch.full((batch[key].shape[0], extra), fill, dtype=batch[key].dtype)
        out[key] = torch.cat([batch[key], pad], dim=1)
    return out


def test_labels_do_not_depend_on_batch_split_or_padding(monkeypatch):
    model = tiny_llama().double()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)  # peaked distributions: a wrong row or position changes draws
    batch = lm_batch(batch_size=6, seq_len=10, seed=3)
    draws = []
    for batches in (
        [batch],
        split_batch(batch, 1)[::-1],
        [_pad_right(b, extra) for b, extra in zip(split_batch(batch, 4), (3, 9), strict=True)],
    ):
        seen = _record_targets(monkeypatch)
        with KFACAccumulator(model, LLAMA_MLP, dtype=torch.float64) as acc:
            for b in batches:
                causal_lm_step(model, b, acc, fisher="true", seed=5)
        draws.append(seen)
        monkeypatch.undo()
    assert len(draws[0]) == int(valid_positions(batch["attention_mask"], batch["labels"]).sum())
    assert draws[1] == draws[0] and draws[2] == draws[0]
    assert len(set(draws[0].values())) > 3  # real draws, not one constant class


def test_labels_come_from_no_device_generator(monkeypatch):
    """The draws use no torch random generator (so no device stream) and equal the pure-Python contract."""
    logits = torch.randn(40, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    index, position = torch.arange(40) // 8 + 1000, torch.arange(40) % 8
    want = reference_sample(
        logits, [reference_uniform(4, int(i), int(t)) for i, t in zip(index, position, strict=True)]
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("the true-Fisher draw must not use a torch random generator")

    for name in ("Generator", "rand", "rand_like", "multinomial", "randint", "randn"):
        monkeypatch.setattr(torch, name, forbidden)
    targets = fisher_targets(logits, index, fisher="true", seed=4, index=index, position=position)
    monkeypatch.undo()
    assert torch.equal(targets, want)
    assert targets.device == logits.device


def test_true_fisher_needs_row_indices():
    logits = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="index"):
        fisher_targets(logits, torch.zeros(3, dtype=torch.long), fisher="true", seed=0, index=None, position=None)


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
