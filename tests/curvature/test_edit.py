"""Eigendecomposition, curvature mask, projection, and the reversible edit."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
from torch.testing import assert_close

import lightning_curv.curvature.edit as edit_module
from lightning_curv.callbacks import EditCallback
from lightning_curv.curvature import (
    KFACFactors,
    apply_edit,
    collect_factors,
    curvature_mask,
    eigendecompose,
    pair_curvature,
    project_weight,
    resolve_rho,
    summarize_stats,
    weight_matrix,
)
from tests.cases import GPT2_MLP, LLAMA_MLP, lm_batch, tiny_gpt2, tiny_llama

FP64 = {"rtol": 1e-9, "atol": 1e-10}


def _random_factors(d_out: int = 5, d_in: int = 4, seed: int = 0, zero_dirs: int = 0) -> KFACFactors:
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(30, d_in, generator=g, dtype=torch.float64)
    xg = torch.randn(30, d_out, generator=g, dtype=torch.float64)
    if zero_dirs:
        xg[:, :zero_dirs] = 0  # rank-deficient G: some zero-curvature pairs
    return KFACFactors(A=xa.T @ xa / 30, G=xg.T @ xg / 30, num_samples=30)


def test_eigenbasis_is_orthonormal_and_reconstructs():
    f = _random_factors()
    e = eigendecompose(f)
    for U, lam, C in ((e.eigenvectors_A, e.eigenvalues_A, f.A), (e.eigenvectors_G, e.eigenvalues_G, f.G)):
        assert_close(U.T @ U, torch.eye(U.shape[0], dtype=U.dtype), **FP64)
        assert_close(U @ torch.diag(lam) @ U.T, C, **FP64)
        assert torch.all(lam[:-1] >= lam[1:]), "eigenvalues are sorted in descending order"
        assert torch.all(lam >= 0)


def test_negative_round_off_eigenvalues_are_clamped():
    f = _random_factors(zero_dirs=2)
    f.G[0, 0] -= 1e-14  # push a zero eigenvalue slightly negative
    e = eigendecompose(f)
    assert e.eigenvalues_G.min() >= 0


def test_rho_one_is_exact_identity_including_zero_curvature_pairs():
    f = _random_factors(zero_dirs=2)
    e = eigendecompose(f)
    W = torch.randn(5, 4, dtype=torch.float64)
    mask, kept = curvature_mask(e, 1.0)
    assert mask.all() and kept == 1.0
    assert torch.equal(project_weight(W, e, 1.0), W)


def test_mask_is_the_smallest_set_reaching_rho():
    e = eigendecompose(_random_factors(d_out=6, d_in=5, seed=1))
    pi = pair_curvature(e)
    total = pi.sum()
    for rho in (0.05, 0.3, 0.6, 0.9, 0.99):
        mask, kept = curvature_mask(e, rho)
        assert pi[mask].sum() >= rho * total * (1 - 1e-12)
        assert_close(torch.tensor(kept, dtype=torch.float64), pi[mask].sum() / total)
        # Every kept pair is at least as curved as every dropped one.
        if (~mask).any():
            assert pi[mask].min() >= pi[~mask].max()
        # Dropping the least curved kept pair falls below rho: the set is the smallest.
        assert pi[mask].sum() - pi[mask].min() < rho * total


def test_smallest_rho_keeps_only_the_top_pair():
    e = eigendecompose(_random_factors(seed=2))
    mask, _ = curvature_mask(e, 1e-9)
    assert int(mask.sum()) == 1
    assert bool(mask[0, 0])  # eigenvalues are sorted, so (0, 0) is the top pair


def test_projection_equals_dense_kronecker_construction():
    f = _random_factors(d_out=4, d_in=3, seed=3)
    e = eigendecompose(f)
    W = torch.randn(4, 3, dtype=torch.float64)
    rho = 0.7
    mask, _ = curvature_mask(e, rho)
    # Row-major vec: vec(U_G C U_A^T) = (U_G ⊗ U_A) vec(C).
    U = torch.kron(e.eigenvectors_G, e.eigenvectors_A)  # [12, 12]
    P = U @ torch.diag(mask.flatten().double()) @ U.T
    expected = (P @ W.flatten()).view(4, 3)
    assert_close(project_weight(W, e, rho), expected, **FP64)
    # P is an orthogonal projector, hence idempotent.
    assert_close(P @ P, P, **FP64)


def test_projection_is_idempotent():
    e = eigendecompose(_random_factors(seed=4))
    W = torch.randn(5, 4, dtype=torch.float64)
    once = project_weight(W, e, 0.5)
    assert_close(project_weight(once, e, 0.5), once, **FP64)


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.01, float("nan"), True])
def test_rho_out_of_range(rho):
    e = eigendecompose(_random_factors())
    with pytest.raises(ValueError, match=r"rho must be a number in \(0, 1\]"):
        curvature_mask(e, rho)


def test_apply_edit_changes_only_edited_modules_and_undo_is_bit_exact():
    model = tiny_llama()
    factors = collect_factors(model, [lm_batch()], "model.layers.1.mlp.*")
    eigens = {n: eigendecompose(f) for n, f in factors.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_edit(model, eigens, 0.5)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in eigens}
    assert all(0 < s.kept_pairs < s.total_pairs for s in handle.stats.values())
    assert all(0 < s.removed_energy < 1 for s in handle.stats.values())
    handle.undo()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_summarize_stats_pools_pairs_and_averages_energy():
    model = tiny_llama()
    factors = collect_factors(model, [lm_batch()], "model.layers.1.mlp.*")
    eigens = {n: eigendecompose(f) for n, f in factors.items()}
    with apply_edit(model, eigens, 0.5) as handle:
        modules = dict(model.named_modules())
        kept = total = 0
        energies = []
        for name, eigen in eigens.items():
            mask = curvature_mask(eigen, 0.5)[0]
            kept, total = kept + int(mask.sum()), total + mask.numel()
            W = weight_matrix(modules[name]).detach().double()
            W0 = handle.originals[name].double()  # Llama linear: parameter layout is [d_out, d_in]
            energies.append(float((W0 - W).square().sum() / W0.square().sum()))
        summary = summarize_stats(handle.stats)
    assert summary["kept_pairs_fraction"] == pytest.approx(kept / total)
    assert summary["removed_energy"] == pytest.approx(sum(energies) / len(energies), rel=1e-4)
    assert summarize_stats({}) == {"kept_pairs_fraction": 0.0, "removed_energy": 0.0}


def test_apply_edit_on_conv1d_layers_matches_project_weight():
    model = tiny_gpt2()
    factors = collect_factors(model, [lm_batch()], GPT2_MLP)
    eigens = {n: eigendecompose(f) for n, f in factors.items()}
    modules = dict(model.named_modules())
    expected = {n: project_weight(weight_matrix(modules[n]).detach().clone(), e, 0.8) for n, e in eigens.items()}
    with apply_edit(model, eigens, 0.8):
        for n in eigens:
            assert_close(weight_matrix(modules[n]), expected[n])
    assert modules["transformer.h.0.mlp.c_fc"].weight.shape == (16, 64)  # layout untouched


def test_per_module_rho_mapping():
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert resolve_rho({"model.layers.1.*": 0.5}, names) == {names[1]: 0.5, names[2]: 0.5}
    assert resolve_rho({"*up_proj": 0.3, names[2]: 0.9}, names) == {names[0]: 0.3, names[1]: 0.3, names[2]: 0.9}
    with pytest.raises(ValueError, match="matched by rho keys"):
        resolve_rho({"*up_proj": 0.3, "model.layers.1.*": 0.5}, names)
    with pytest.raises(ValueError, match="matches none"):
        resolve_rho({"lm_head": 0.3}, names)
    with pytest.raises(ValueError, match="rho must be"):
        resolve_rho({"*": 2.0}, names)


def test_edit_rejects_eigens_of_another_model():
    model = tiny_llama()
    eigens = {n: eigendecompose(f) for n, f in collect_factors(model, [lm_batch()], LLAMA_MLP).items()}
    other = tiny_gpt2()
    with pytest.raises(ValueError, match="not in the model"):
        apply_edit(other, eigens, 0.5)
    wider = tiny_llama(num_layers=2)
    # Layer 0's up_proj no longer fits; gate_proj, before it, does: the edit has written a weight when it fails.
    wider.model.layers[0].mlp.up_proj = torch.nn.Linear(16, 30, bias=False)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="does not match eigenbases"):
        apply_edit(wider, eigens, 0.5)
    # A failed edit leaves no module edited: every weight is bit-for-bit the original.
    after = wider.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert not changed, f"a failed edit left {changed} edited"


def test_masks_cache_reused_in_sweep():
    model = tiny_llama()
    eigens = {n: eigendecompose(f) for n, f in collect_factors(model, [lm_batch()], LLAMA_MLP).items()}
    cache: dict = {}
    with patch.object(edit_module, "curvature_mask", wraps=edit_module.curvature_mask) as masks_computed:
        first = apply_edit(model, eigens, 0.5, masks=cache)
        assert masks_computed.call_count == len(eigens), "an empty cache computes every module's mask once"
        edited = {n: p.clone() for n, p in model.named_parameters()}
        first.undo()
        assert set(cache) == {(n, 0.5) for n in eigens}
        with apply_edit(model, eigens, 0.5, masks=cache):
            assert masks_computed.call_count == len(eigens), "a filled cache computes no mask again"
            assert all(torch.equal(edited[n], p) for n, p in model.named_parameters())
        with apply_edit(model, eigens, 0.3, masks=cache):
            assert masks_computed.call_count == 2 * len(eigens), "a new rho computes its own masks"
        assert set(cache) == {(n, rho) for n in eigens for rho in (0.5, 0.3)}


def test_edit_callback_computes_each_mask_once_over_runs():
    model = tiny_llama()
    eigens = {n: eigendecompose(f) for n, f in collect_factors(model, [lm_batch()], LLAMA_MLP).items()}
    callback = EditCallback(rho=0.5, eigens=eigens)
    pl_module = SimpleNamespace(model=model)
    originals = {n: p.clone() for n, p in model.named_parameters()}
    with patch.object(edit_module, "curvature_mask", wraps=edit_module.curvature_mask) as masks_computed:
        for run in range(3):
            callback.on_validation_start(None, pl_module)
            assert any(not torch.equal(originals[n], p) for n, p in model.named_parameters()), run
            callback.on_validation_end(None, pl_module)
            assert all(torch.equal(originals[n], p) for n, p in model.named_parameters()), run
    assert masks_computed.call_count == len(eigens), "the callback keeps its masks across validation runs"
