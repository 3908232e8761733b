"""Random-direction control: matched removed energy or pair count, seeded order, not the curvature order."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lightning_curv.baselines import (
    apply_random_pair_edit,
    eigenbasis_coefficients,
    random_pair_mask,
    random_pair_order,
)
from lightning_curv.utils import name_seed
from lightning_curv.curvature import (
    EditStats,
    apply_edit,
    collect_factors,
    curvature_mask,
    eigendecompose,
    pair_curvature,
    weight_matrix,
)
from tests.cases import GPT2_MLP, lm_batch, tiny_gpt2, tiny_llama

MODULES = "model.layers.1.mlp.*"
RHO = 0.6
#: Energies are fractions of ‖W‖². In the float64 eigenbasis only round-off separates them from the target.
ENERGY_ATOL = 1e-12
#: The measured ‖W - W'‖² of a float32 weight carries the rounding of W' to float32.
MEASURED = {"rtol": 1e-6, "atol": 1e-7}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_llama()
    factors = collect_factors(model, [lm_batch(seed=0), lm_batch(seed=1)], MODULES, dtype=torch.float64)
    eigens = {n: eigendecompose(f) for n, f in factors.items()}
    reference = apply_edit(model, eigens, RHO)
    reference.undo()
    originals = {n: weight_matrix(m).detach().clone() for n, m in model.named_modules() if n in eigens}
    return model, eigens, reference, originals


def _project(W, eigen, keep):
    """``U_G ((U_Gᵀ W U_A) ⊙ keep) U_Aᵀ`` in float64, cast back to the dtype of ``W``."""
    U_A, U_G = eigen.eigenvectors_A, eigen.eigenvectors_G
    return (U_G @ ((U_G.T @ W.double() @ U_A) * keep.view(W.shape)) @ U_A.T).to(W.dtype)


def test_energy_match_reaches_the_target_within_one_pair(setup):
    model, eigens, reference, originals = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_random_pair_edit(model, eigens, reference, "energy", seed=0) as handle:
        assert set(handle.stats) == set(reference.stats)
        for name, stats in handle.stats.items():
            W = originals[name]
            total = W.double().pow(2).sum()
            target = reference.stats[name].removed_energy
            C = eigenbasis_coefficients(W, eigens[name])
            order = random_pair_order(tuple(C.shape), name_seed(0, name))
            k = stats.total_pairs - stats.kept_pairs
            removed_energy = C.flatten()[order].pow(2) / total  # [n], in removal order
            # The removed set is exactly the first k pairs of the seeded order ...
            keep = torch.ones(C.numel(), dtype=torch.bool)
            keep[order[:k]] = False
            assert_close(weight_matrix(dict(model.named_modules())[name]), _project(W, eigens[name], keep))
            # ... and k is the first count whose removed energy reaches the target (stated precision).
            assert removed_energy[:k].sum() >= target - ENERGY_ATOL
            assert removed_energy[: k - 1].sum() < target
            # The measured ‖W - W'‖² equals the eigenbasis energy (orthonormal bases) up to float32 rounding.
            measured = torch.tensor(stats.removed_energy, dtype=torch.float64)
            assert_close(measured, removed_energy[:k].sum(), **MEASURED)
            assert target - MEASURED["atol"] <= stats.removed_energy
            assert stats.removed_energy <= target + removed_energy[k - 1] + MEASURED["atol"]
            assert 0 < stats.kept_pairs < stats.total_pairs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "undo is bit-exact"


def test_count_match_removes_exactly_as_many_pairs(setup):
    model, eigens, reference, _ = setup
    with apply_random_pair_edit(model, eigens, reference.stats, "count", seed=3) as handle:
        for name, stats in handle.stats.items():
            ref = reference.stats[name]
            assert (stats.kept_pairs, stats.total_pairs) == (ref.kept_pairs, ref.total_pairs)


@pytest.mark.parametrize("match", ["energy", "count"])
def test_random_control_is_not_the_curvature_ordering(setup, match):
    model, eigens, reference, originals = setup
    for name in reference.stats:
        eigen, W = eigens[name], originals[name]
        C = eigenbasis_coefficients(W, eigen)
        ref = reference.stats[name]
        if match == "count":
            keep = random_pair_mask(C, name_seed(0, name), num_removed=ref.total_pairs - ref.kept_pairs)
        else:
            keep = random_pair_mask(C, name_seed(0, name), target_energy=ref.removed_energy * float(W.pow(2).sum()))
        curvature_keep = curvature_mask(eigen, RHO)[0]
        pi = pair_curvature(eigen)
        assert not torch.equal(keep, curvature_keep)
        # The curvature edit removes only pairs flatter than every kept pair; the random one also removes
        # curved ones.
        assert pi[~keep].max() > pi[~curvature_keep].max()
        if match == "count":
            # Same number of pairs, less curvature mass kept than the curvature edit (which keeps the most).
            assert pi[keep].sum() / pi.sum() < ref.kept_mass
    with apply_random_pair_edit(model, eigens, reference, match, seed=0) as handle:
        if match == "count":
            assert all(handle.stats[n].kept_mass < reference.stats[n].kept_mass for n in handle.stats)


def test_different_seeds_remove_different_pairs(setup):
    model, eigens, reference, _ = setup
    results = []
    for seed in (0, 1, 0):
        with apply_random_pair_edit(model, eigens, reference, "count", seed=seed):
            results.append({n: weight_matrix(m).detach().clone() for n, m in model.named_modules() if n in eigens})
    assert all(torch.equal(results[0][n], results[2][n]) for n in eigens), "same seed, same edit"
    assert all(not torch.equal(results[0][n], results[1][n]) for n in eigens), "another seed, other pairs"
    C = torch.randn(6, 5, dtype=torch.float64)
    masks = [random_pair_mask(C, s, num_removed=10) for s in range(5)]
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 5


def test_mask_matches_a_brute_force_greedy_loop():
    g = torch.Generator().manual_seed(4)
    C = torch.randn(5, 4, generator=g, dtype=torch.float64)
    energies = C.pow(2).flatten()
    for target in (0.0, 1e-3, 0.5 * energies.sum().item(), energies.sum().item(), 2 * energies.sum().item()):
        keep = random_pair_mask(C, 7, target_energy=target)
        expected = torch.ones(C.numel(), dtype=torch.bool)
        removed = 0.0
        for idx in random_pair_order((5, 4), 7).tolist():
            if removed >= target or target <= 0:
                break
            expected[idx] = False
            removed += energies[idx].item()
        assert torch.equal(keep.flatten(), expected), target
    with pytest.raises(ValueError, match="exactly one"):
        random_pair_mask(C, 0)
    with pytest.raises(ValueError, match="num_removed"):
        random_pair_mask(C, 0, num_removed=21)


def test_nothing_removed_keeps_weights_bit_exact_and_conv1d_works():
    model = tiny_gpt2()
    factors = collect_factors(model, [lm_batch()], GPT2_MLP, dtype=torch.float64)
    eigens = {n: eigendecompose(f) for n, f in factors.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = {
        n: EditStats(rho=1.0, kept_pairs=16 * 64, total_pairs=16 * 64, kept_mass=1.0, removed_energy=0.0)
        for n in eigens
    }
    with apply_random_pair_edit(model, eigens, full, "energy"):
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    reference = apply_edit(model, eigens, 0.5)
    with pytest.raises(ValueError, match="undo"):
        apply_random_pair_edit(model, eigens, reference)
    reference.undo()
    with apply_random_pair_edit(model, eigens, reference, "energy") as handle:
        for name, stats in handle.stats.items():
            assert stats.removed_energy >= reference.stats[name].removed_energy - MEASURED["atol"]
        assert model.transformer.h[0].mlp.c_fc.weight.shape == (16, 64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments(setup):
    model, eigens, reference, _ = setup
    with pytest.raises(ValueError, match="match must be"):
        apply_random_pair_edit(model, eigens, reference, "mass")
    with pytest.raises(ValueError, match="no eigenbases"):
        apply_random_pair_edit(model, {}, reference)
