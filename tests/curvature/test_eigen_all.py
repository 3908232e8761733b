"""Eigendecomposition once per job: shared input factors once, modules split over ranks, one cache write."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_curv.curvature import (
    CurvatureOrder,
    KFACFactors,
    curvature_mask,
    eigendecompose,
    eigendecompose_all,
    save_factors,
)
from lightning_curv.curvature import eigen as eigen_module
from lightning_curv.curvature.cache import prepare_eigens

#: A 4096:11008 (OLMo-2 7B gate/up) aspect ratio, scaled down.
D_IN, D_OUT = 48, 129
EIG_TOL = 1e-12  # times λmax, float64


def _psd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=g, dtype=torch.float64)
    x[:, : d // 4] *= 1e-3  # a wide spectrum
    return x.T @ x / (3 * d)


class TwoLayers(nn.Module):
    """gate/up of two layers: the two projections of a layer read the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"gate": nn.Linear(D_IN, D_OUT, bias=False), "up": nn.Linear(D_IN, D_OUT, bias=False)})
            for _ in range(2)
        )


def _factors() -> dict[str, KFACFactors]:
    out = {}
    for layer in range(2):
        A = _psd(D_IN, 100 + layer)  # shared by gate and up of this layer
        for k, proj in enumerate(("gate", "up")):
            out[f"layers.{layer}.{proj}"] = KFACFactors(A=A.clone(), G=_psd(D_OUT, 10 * layer + k), num_samples=77)
    return out


def _model() -> TwoLayers:
    torch.manual_seed(0)
    return TwoLayers().double()


def test_shared_input_factor_is_decomposed_once_and_results_equal_per_layer():
    factors = _factors()
    with mock.patch.object(eigen_module, "symmetric_eigh", wraps=eigen_module.symmetric_eigh) as eigh:
        eigens = eigendecompose_all(factors)
    assert eigh.call_count == 2 + 4  # one A per layer, one G per module
    for name, f in factors.items():
        ref = eigendecompose(f)
        for field in ("eigenvalues_A", "eigenvectors_A", "eigenvalues_G", "eigenvectors_G"):
            assert torch.equal(getattr(eigens[name], field), getattr(ref, field)), (name, field)
        lam_ref = torch.linalg.eigvalsh(f.G).flip(0).clamp_min(0)
        assert (eigens[name].eigenvalues_G - lam_ref).abs().max() <= EIG_TOL * lam_ref[0]


def test_order_gives_the_masks_of_curvature_mask():
    e = eigendecompose(_factors()["layers.0.gate"])
    order = CurvatureOrder(e)
    for rho in (0.1, 0.5, 0.9, 0.999, 1.0):
        mask, kept = order.mask(rho)
        ref_mask, ref_kept = curvature_mask(e, rho)
        assert torch.equal(mask, ref_mask) and kept == ref_kept


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model()
        with (
            mock.patch.object(eigen_module, "symmetric_eigh", wraps=eigen_module.symmetric_eigh) as eigh,
            mock.patch("lightning_curv.curvature.cache.save_eigens") as save,
        ):
            eigens = prepare_eigens(
                model, os.path.join(out_dir, "factors.safetensors"), cache=os.path.join(out_dir, "eig")
            )
        masks = {n: curvature_mask(e, 0.7)[0] for n, e in eigens.items()}
        torch.save({"eigens": eigens, "calls": eigh.call_count, "saves": save.call_count, "masks": masks},
                   os.path.join(out_dir, f"{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_two_processes_split_the_work_and_write_the_cache_once(tmp_path):
    model = _model()
    factors = _factors()
    save_factors(factors, tmp_path / "factors.safetensors", {"fisher": "true"}, model=model)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    assert sum(r["calls"] for r in results) == 6, "each distinct matrix is decomposed once in the whole job"
    assert all(r["calls"] >= 2 for r in results), "both ranks take a share"
    assert [r["saves"] for r in results] == [1, 0], "rank 0 alone writes the eigen cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: LAPACK's result bits may depend on the thread count
    try:
        single = eigendecompose_all(factors)
    finally:
        torch.set_num_threads(threads)
    for name in factors:
        for field in ("eigenvalues_A", "eigenvectors_A", "eigenvalues_G", "eigenvectors_G"):
            a, b = (getattr(r["eigens"][name], field) for r in results)
            assert torch.equal(a, b), "identical eigenbases on both ranks"
            assert torch.equal(a, getattr(single[name], field)), "and equal to a single-process decomposition"
        assert torch.equal(results[0]["masks"][name], curvature_mask(single[name], 0.7)[0])
