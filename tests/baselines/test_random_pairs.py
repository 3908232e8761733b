"""Random-direction control: matched removed energy or pair count, seeded order, not the curvature order.

The expected edits are built here from the documented contract, not from the implementation's helpers: the order
of a module's pairs is ``torch.randperm(d_out * d_in)`` over a CPU ``torch.Generator`` seeded with the module's
seed (the splitmix64 of ``(seed, crc32(name))``), the coefficients are ``C = U_Gᵀ W U_A``, and the edited weight
is ``U_G (C ⊙ keep) U_Aᵀ``.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.testing import assert_close

from lightning_curv.baselines import apply_random_pair_edit, random_pair_mask
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
from tests.reference import reference_row_seed

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


def _order_of_seed(seed: int, n: int) -> torch.Tensor:
    """The documented order of ``n`` flattened pairs (row-major over ``[d_out, d_in]``) for one seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _order(name: str, seed: int, n: int) -> torch.Tensor:
    """The order of a module's pairs: its seed is the splitmix64 of ``(seed, crc32(name))``."""
    return _order_of_seed(reference_row_seed(seed, zlib.crc32(name.encode())), n)


def _coefficients(W: torch.Tensor, eigen) -> torch.Tensor:
    return eigen.eigenvectors_G.T @ W.double() @ eigen.eigenvectors_A


def _keep_first_removed(order: torch.Tensor, k: int, shape) -> torch.Tensor:
    """Keep-mask that removes the first ``k`` pairs of ``order``."""
    keep = torch.ones(order.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view(shape)


def _first_count_reaching(energies: torch.Tensor, target: float) -> int:
    """Smallest ``k`` with ``energies[:k].sum() >= target`` (a plain loop), all of them if never reached."""
    removed = 0.0
    for k, e in enumerate(energies.tolist(), start=1):
        removed += e
        if removed >= target:
            return k
    return energies.numel()


def _project(W, eigen, keep):
    """``U_G ((U_Gᵀ W U_A) ⊙ keep) U_Aᵀ`` in float64, cast back to the dtype of ``W``."""
    U_A, U_G = eigen.eigenvectors_A, eigen.eigenvectors_G
    return (U_G @ (_coefficients(W, eigen) * keep.view(W.shape)) @ U_A.T).to(W.dtype)


def _edited(model, names):
    modules = dict(model.named_modules())
    return {n: weight_matrix(modules[n]).detach().clone() for n in names}


def test_energy_match_removes_the_seeded_order_up_to_the_target(setup):
    model, eigens, reference, originals = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_random_pair_edit(model, eigens, reference, "energy", seed=0) as handle:
        assert set(handle.stats) == set(reference.stats)
        got = _edited(model, eigens)
        for name, stats in handle.stats.items():
            W, eigen = originals[name], eigens[name]
            total = float(W.double().pow(2).sum())
            target = reference.stats[name].removed_energy  # the input the control is matched to
            C = _coefficients(W, eigen)
            order = _order(name, 0, C.numel())
            removed_energy = C.flatten()[order].pow(2) / total  # [n], fractions of ‖W‖² in removal order
            k = _first_count_reaching(removed_energy, target)
            assert 0 < k < C.numel()
            # The weight is exactly the projection that drops the first k pairs of the seeded order ...
            keep = _keep_first_removed(order, k, C.shape)
            assert_close(got[name], _project(W, eigen, keep))
            # ... k is the first count that reaches the target (stated precision) ...
            assert removed_energy[:k].sum() >= target - ENERGY_ATOL
            assert removed_energy[: k - 1].sum() < target
            # ... and the measured ‖W - W'‖² / ‖W‖² is that energy, up to the float32 rounding of W'.
            measured = float((got[name].double() - W.double()).pow(2).sum()) / total
            assert_close(torch.tensor(measured, dtype=torch.float64), removed_energy[:k].sum(), **MEASURED)
            assert stats.removed_energy == pytest.approx(measured, rel=1e-9, abs=1e-12)
            assert (stats.kept_pairs, stats.total_pairs) == (int(keep.sum()), C.numel())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "undo is bit-exact"


@pytest.mark.parametrize("seed", [0, 3])
def test_count_match_removes_the_first_pairs_of_the_seeded_order(setup, seed):
    model, eigens, reference, originals = setup
    with apply_random_pair_edit(model, eigens, reference.stats, "count", seed=seed) as handle:
        got = _edited(model, eigens)
        for name, stats in handle.stats.items():
            W, eigen = originals[name], eigens[name]
            # As many pairs as the curvature edit drops, counted from its own mask.
            k = int((~curvature_mask(eigen, RHO)[0]).sum())
            keep = _keep_first_removed(_order(name, seed, W.numel()), k, W.shape)
            assert_close(got[name], _project(W, eigen, keep))
            pi = pair_curvature(eigen)
            assert (stats.kept_pairs, stats.total_pairs) == (W.numel() - k, W.numel())
            assert stats.kept_mass == pytest.approx(float(pi[keep].sum() / pi.sum()), rel=1e-12)


@pytest.mark.parametrize("match", ["energy", "count"])
def test_random_control_is_not_the_curvature_ordering(setup, match):
    model, eigens, reference, originals = setup
    with apply_random_pair_edit(model, eigens, reference, match, seed=0):
        got = _edited(model, eigens)
    for name in reference.stats:
        eigen, W = eigens[name], originals[name]
        C = _coefficients(W, eigen)
        order = _order(name, 0, C.numel())
        curvature_keep = curvature_mask(eigen, RHO)[0]
        if match == "count":
            k = int((~curvature_keep).sum())
        else:
            energies = C.flatten()[order].pow(2) / W.double().pow(2).sum()
            k = _first_count_reaching(energies, reference.stats[name].removed_energy)
        keep = _keep_first_removed(order, k, C.shape)
        assert_close(got[name], _project(W, eigen, keep))
        pi = pair_curvature(eigen)
        assert not torch.equal(keep, curvature_keep)
        # The curvature edit removes only pairs flatter than every kept pair; the random one also removes
        # curved ones.
        assert pi[~keep].max() > pi[~curvature_keep].max()
        if match == "count":
            # Same number of pairs, less curvature mass kept than the curvature edit (which keeps the most).
            assert pi[keep].sum() / pi.sum() < pi[curvature_keep].sum() / pi.sum()


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
        for idx in _order_of_seed(7, C.numel()).tolist():
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
