"""Weight-SVD truncation: identity at ρ = 1, minimal kept set, reversible edit, Conv1D layout."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lightning_curv.baselines import apply_svd_edit, svd_factors, svd_rank, svd_truncate_weight
from lightning_curv.curvature import weight_matrix
from tests.cases import GPT2_MLP, LLAMA_MLP, tiny_gpt2, tiny_llama

FP64 = {"rtol": 1e-10, "atol": 1e-10}
#: float32 weights rebuilt from a float64 SVD: round-off of a few ulps of the largest entries.
FP32 = {"rtol": 1e-5, "atol": 1e-6}
RHOS = (1e-6, 0.1, 0.5, 0.8, 0.95, 0.999)


def _weight(d_out: int = 7, d_in: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rho_one_is_bit_exact_identity(dtype):
    W = _weight(dtype=dtype)
    out = svd_truncate_weight(W, 1.0)
    assert out.dtype == dtype and torch.equal(out, W)
    assert out.data_ptr() != W.data_ptr()  # a copy, not the same storage


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("shape", [(7, 5), (4, 9)])
def test_kept_set_is_minimal_and_is_the_best_rank_k_approximation(rho, shape):
    W = _weight(*shape, seed=1)
    s = torch.linalg.svdvals(W)
    energy = s.pow(2)
    k, kept = svd_rank(s, rho)
    assert energy[:k].sum() >= rho * energy.sum() * (1 - 1e-12)
    assert energy[: k - 1].sum() < rho * energy.sum(), "dropping the smallest kept direction falls below rho"
    assert_close(torch.tensor(kept, dtype=torch.float64), energy[:k].sum() / energy.sum(), **FP64)
    out = svd_truncate_weight(W, rho)
    # Exactly rank k, with the top k singular values of W.
    s_out = torch.linalg.svdvals(out)
    assert_close(s_out[:k], s[:k], **FP64)
    assert_close(s_out[k:], torch.zeros_like(s_out[k:]), **FP64)
    # Eckart-Young: the residual holds exactly the dropped energy.
    assert_close((W - out).pow(2).sum(), energy[k:].sum(), **FP64)
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    assert_close(out, U[:, :k] @ torch.diag(s[:k]) @ Vh[:k], **FP64)


def test_smallest_rho_keeps_one_direction_and_float32_keeps_dtype():
    W = _weight(dtype=torch.float32)
    assert svd_rank(svd_factors(W)[1], 1e-9)[0] == 1
    out = svd_truncate_weight(W, 0.5)
    assert out.dtype == torch.float32 and out.shape == W.shape
    assert_close(out, svd_truncate_weight(W.double(), 0.5).float(), **FP32)


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.5, float("nan"), True])
def test_invalid_rho_raises(rho):
    with pytest.raises(ValueError, match=r"rho must be a number in \(0, 1\]"):
        svd_truncate_weight(_weight(), rho)


def test_apply_edit_changes_only_selected_weights_and_undo_is_bit_exact():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_svd_edit(model, LLAMA_MLP, 0.7)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.weight" for n in handle.stats} and len(changed) == 6
    modules = dict(model.named_modules())
    for name, stats in handle.stats.items():
        W0 = before[f"{name}.weight"]
        assert_close(weight_matrix(modules[name]), svd_truncate_weight(W0, 0.7))
        k, kept = svd_rank(torch.linalg.svdvals(W0.double()), 0.7)
        assert (stats.kept_pairs, stats.total_pairs) == (
            k,
            min(W0.shape),
        ) and stats.kept_pairs < stats.total_pairs
        assert stats.kept_mass == pytest.approx(kept, rel=1e-12)
        assert stats.removed_energy == pytest.approx(1 - kept, abs=1e-6)
    handle.undo()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    handle.undo()  # idempotent
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rho_one_edit_leaves_the_model_bit_exact():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_svd_edit(model, LLAMA_MLP, 1.0) as handle:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(s.removed_energy == 0 and s.kept_pairs == s.total_pairs for s in handle.stats.values())


def test_conv1d_edit_truncates_the_d_out_by_d_in_view_and_keeps_the_layout():
    model = tiny_gpt2()
    modules = dict(model.named_modules())
    name = "transformer.h.0.mlp.c_fc"
    original = modules[name].weight.detach().clone()  # [d_in, d_out] = [16, 64]
    expected = svd_truncate_weight(original.T, 0.6)  # [d_out, d_in]
    with apply_svd_edit(model, GPT2_MLP, 0.6) as handle:
        assert modules[name].weight.shape == (16, 64)
        assert_close(modules[name].weight, expected.T)
        assert handle.stats[name].total_pairs == 16
    assert torch.equal(modules[name].weight, original)


def test_per_module_rho_and_cache():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache: dict = {}
    handle = apply_svd_edit(model, LLAMA_MLP, {"model.layers.1.*": 0.5}, cache=cache)
    assert set(handle.stats) == {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert set(cache) == set(handle.stats)
    assert torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    )
    first = {k: v.clone() for k, v in model.state_dict().items()}
    handle.undo()
    with apply_svd_edit(model, LLAMA_MLP, {"model.layers.1.*": 0.5}, cache=cache):  # reuses the factors
        assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="matches no linear layer"):
        apply_svd_edit(model, "model.layers.*.mlp.nope", 0.5)
