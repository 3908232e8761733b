"""Checks that need a CUDA device: ``python -m pytest -m gpu`` on a GPU machine (deselected by default).

They compare the curvature statistics and the edit on CUDA with the same computation on CPU, in float32 and
under bf16 autocast (the precision of the multi-GPU recipe in the README).
"""

import pytest
import torch

from lightning_curv.curvature import apply_edit, collect_factors, eigendecompose
from tests.cases import LLAMA_MLP, lm_batch, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP32_REL = 1e-4  # CUDA vs CPU float32 (TF32 off), relative Frobenius error of A and G
BF16_REL = 0.05  # bf16 autocast on CUDA vs float32 on CPU


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double().cpu() - b.double().cpu()) / torch.linalg.norm(b.double().cpu()))


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_cuda_factors_equal_cpu_factors():
    model = tiny_llama()
    batches = [lm_batch(batch_size=4, seed=s) for s in range(2)]
    ref = collect_factors(model, batches, LLAMA_MLP, fisher="true", seed=3)
    gpu = collect_factors(
        model.cuda(), [{k: v.cuda() for k, v in b.items()} for b in batches], LLAMA_MLP, fisher="true", seed=3
    )
    for name, f in ref.items():
        assert gpu[name].num_samples == f.num_samples
        assert gpu[name].A.device.type == "cuda"
        assert _rel(gpu[name].A, f.A) < FP32_REL
        assert _rel(gpu[name].G, f.G) < FP32_REL


def test_bf16_autocast_on_cuda_stays_close_and_float32():
    model = tiny_llama()
    batch = lm_batch(batch_size=4)
    ref = collect_factors(model, [batch], LLAMA_MLP, fisher="empirical")
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = collect_factors(model, [{k: v.cuda() for k, v in batch.items()}], LLAMA_MLP, fisher="empirical")
    for name, f in ref.items():
        assert got[name].A.dtype == torch.float32 and got[name].G.dtype == torch.float32
        assert _rel(got[name].A, f.A) < BF16_REL
        assert _rel(got[name].G, f.G) < BF16_REL


def test_edit_on_cuda_matches_cpu_and_undoes_exactly():
    model = tiny_llama()
    batch = lm_batch(batch_size=4)
    eigens = {n: eigendecompose(f) for n, f in collect_factors(model, [batch], LLAMA_MLP, fisher="empirical").items()}
    cpu_model = tiny_llama()
    cpu_model.load_state_dict(model.state_dict())
    model.cuda()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_edit(cpu_model, eigens, 0.8), apply_edit(model, eigens, 0.8):
        for (name, p_cpu), p_gpu in zip(cpu_model.named_parameters(), model.parameters(), strict=True):
            assert _rel(p_gpu, p_cpu) < FP32_REL or float(torch.linalg.norm(p_cpu)) == 0.0, name
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
