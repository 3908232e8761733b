"""Helpers shared by the baseline edits: writing a weight through an :class:`EditHandle`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_curv.curvature import EditHandle, weight_matrix


def replace_weight(handle: EditHandle, name: str, module: nn.Module, new: Tensor) -> float:
    """Write ``new`` into the weight of ``module``, keeping the original in ``handle`` for undo.

    Args:
        handle: The handle that will restore the weight.
        name: Module name (the key in ``handle.originals``).
        module: A linear layer (``nn.Linear`` or Conv1D-style).
        new: The new weight in the ``[d_out, d_in]`` convention.

    Returns:
        The removed energy ``‖W - W'‖_F² / ‖W‖_F²`` (0 for an all-zero ``W``), measured in float64 after
        casting ``new`` to the weight's dtype.

    Raises:
        ValueError: If the module was already edited through this handle.
    """
    if name in handle.originals:
        raise ValueError(f"Module {name!r} is edited twice in one edit; list every module once.")
    W = weight_matrix(module)
    new = new.to(W.device, W.dtype)
    handle.originals[name] = module.weight.detach().clone()
    energy = W.detach().double().pow(2).sum()
    removed = (W.detach().double() - new.double()).pow(2).sum()
    with torch.no_grad():
        W.copy_(new)
    return float(removed / energy) if energy > 0 else 0.0
