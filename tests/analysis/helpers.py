"""Shared pieces of the analysis tests: explicit eigenbases and dense per-row forwards (float64)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_curv.curvature import KFACEigen

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def explicit_eigen(A: torch.Tensor, G: torch.Tensor, num_samples: int = 1) -> KFACEigen:
    """Eigenbases by a plain ``torch.linalg.eigh`` in float64, re-sorted descending by an explicit argsort."""
    out = {}
    for key, mat in (("A", A), ("G", G)):
        values, vectors = torch.linalg.eigh(mat.double())
        order = values.argsort(descending=True)
        out[key] = (values[order].clamp_min(0), vectors[:, order])
    return KFACEigen(
        eigenvalues_A=out["A"][0],
        eigenvectors_A=out["A"][1],
        eigenvalues_G=out["G"][0],
        eigenvectors_G=out["G"][1],
        num_samples=num_samples,
    )


def random_spd(dim: int, seed: int, zero_dirs: int = 0) -> torch.Tensor:
    """A random PSD matrix in float64 (rank ``dim - zero_dirs``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * dim, dim, generator=g, dtype=torch.float64)
    if zero_dirs:
        x[:, :zero_dirs] = 0
    return x.T @ x / x.shape[0]


def capture_inputs(model: nn.Module, names: list[str]):
    """Forward hooks that store each module's input and (retained-grad) output; returns (store, handles)."""
    modules = dict(model.named_modules())
    store: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name in names:

        def hook(module, inputs, output, name=name):
            if output.requires_grad:
                output.retain_grad()
            store[name] = {"a": inputs[0].detach(), "s": output}

        handles.append(modules[name].register_forward_hook(hook))
    return store, handles
