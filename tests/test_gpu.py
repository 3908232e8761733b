"""Checks that need a CUDA device: ``python -m pytest -m gpu`` on a GPU machine (deselected otherwise).

They compare the curvature statistics and the edit computed on CUDA with the same computation on CPU, in float32
and under bf16 autocast (the precision of the multi-GPU recipe in the README). Whatever device collects them,
:meth:`~lightning_curv.curvature.KFACAccumulator.finalize` returns the factors on CPU in the accumulation dtype.

True-Fisher targets are a function of (seed, dataset index, position), hashed on CPU and drawn by inverse CDF of
the float64 softmax, so CUDA and CPU are compared value for value on both Fishers.
"""

import pytest
import torch

from lightning_curv.curvature import apply_edit, collect_factors, eigendecompose
from tests.cases import LLAMA_MLP, lm_batch, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP32_REL = 1e-4  # CUDA vs CPU float32 (TF32 off), relative Frobenius error of A, G and edited weights
BF16_REL = 0.05  # bf16 autocast on CUDA vs float32 on CPU, relative Frobenius error


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _cuda(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in batch.items()}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in CUDA matmuls
    yield
    torch.set_float32_matmul_precision(old)


def _assert_on_cpu_float32(factors) -> None:
    for name, f in factors.items():
        for label, mat in (("A", f.A), ("G", f.G)):
            assert mat.device.type == "cpu", f"{name}.{label}: finalize returns the factors on CPU"
            assert mat.dtype == torch.float32, f"{name}.{label}: accumulation dtype"


def test_cuda_factors_equal_cpu_factors():
    model = tiny_llama()
    batches = [lm_batch(batch_size=4, seed=s) for s in range(2)]
    ref = collect_factors(model, batches, LLAMA_MLP, fisher="empirical")
    gpu = collect_factors(model.cuda(), [_cuda(b) for b in batches], LLAMA_MLP, fisher="empirical")
    assert set(gpu) == set(ref)
    _assert_on_cpu_float32(gpu)
    for name, f in ref.items():
        assert gpu[name].num_samples == f.num_samples
        assert _rel(gpu[name].A, f.A) < FP32_REL, name
        assert _rel(gpu[name].G, f.G) < FP32_REL, name


def test_true_fisher_on_cuda_equals_cpu():
    model = tiny_llama()
    batches = [lm_batch(batch_size=4, seed=s) for s in range(2)]
    ref = collect_factors(model, batches, LLAMA_MLP, fisher="true", seed=3)
    gpu = collect_factors(model.cuda(), [_cuda(b) for b in batches], LLAMA_MLP, fisher="true", seed=3)
    _assert_on_cpu_float32(gpu)
    for name, f in ref.items():
        assert gpu[name].num_samples == f.num_samples
        assert _rel(gpu[name].A, f.A) < FP32_REL, name
        assert _rel(gpu[name].G, f.G) < FP32_REL, name


def test_bf16_autocast_on_cuda_stays_close_and_float32():
    model = tiny_llama()
    batch = lm_batch(batch_size=4)
    ref = collect_factors(model, [batch], LLAMA_MLP, fisher="empirical")
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = collect_factors(model, [_cuda(batch)], LLAMA_MLP, fisher="empirical")
    _assert_on_cpu_float32(got)
    for name, f in ref.items():
        assert _rel(got[name].A, f.A) < BF16_REL, name
        assert _rel(got[name].G, f.G) < BF16_REL, name


def test_edit_on_cuda_matches_cpu_and_undoes_exactly():
    model = tiny_llama()
    batch = lm_batch(batch_size=4)
    eigens = {n: eigendecompose(f) for n, f in collect_factors(model, [batch], LLAMA_MLP, fisher="empirical").items()}
    cpu_model = tiny_llama()
    cpu_model.load_state_dict(model.state_dict())
    model.cuda()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_edit(cpu_model, eigens, 0.8), apply_edit(model, eigens, 0.8):
        cpu_params = dict(cpu_model.named_parameters())
        for name, p_gpu in model.named_parameters():
            assert p_gpu.device.type == "cuda", name
            assert _rel(p_gpu, cpu_params[name]) < FP32_REL, name
            edited = name.removesuffix(".weight") in eigens
            assert torch.equal(p_gpu, original[name]) != edited, f"{name}: edited iff it has eigenbases"
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
