"""Brute-force K-FAC statistics: each sequence alone, unpadded, per-position outer products in float64.

Deliberately simple and slow: no hooks on shared state, no masking tricks, no symmetric blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_curv.utils import row_seed
from lightning_curv.curvature.kfac import sample_from_logits


def _capture(model: nn.Module, names: list[str]):
    modules = dict(model.named_modules())
    store: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name in names:

        def hook(module, inputs, output, name=name):
            output.retain_grad()
            store[name] = {"a": inputs[0].detach(), "s": output}

        handles.append(modules[name].register_forward_hook(hook))
    return store, handles


def reference_lm_factors(
    model: nn.Module, batch: dict[str, torch.Tensor], names: list[str], fisher: str, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``(A, G, n)`` per module from one sequence at a time (the model should be float64)."""
    sums = {n: [0.0, 0.0, 0] for n in names}
    for row in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][keep][None]  # [1, L] unpadded
        labels = batch["labels"][row][keep]
        length = ids.shape[1]
        positions = [t for t in range(length - 1) if labels[t + 1] != -100]
        if not positions:
            continue
        store, handles = _capture(model, names)
        try:
            logits = model(input_ids=ids).logits[0].double()  # [L, V]
        finally:
            for h in handles:
                h.remove()
        pos = torch.tensor(positions)
        if fisher == "empirical":
            targets = labels[pos + 1]
        else:
            gen = torch.Generator().manual_seed(row_seed(seed, int(batch["index"][row])))
            targets = sample_from_logits(logits[pos].detach(), gen)
        loss = F.cross_entropy(logits[pos], targets, reduction="sum")
        loss.backward()
        for name in names:
            a = store[name]["a"][0]  # [L, d_in]
            g = store[name]["s"].grad[0]  # [L, d_out]
            for t in positions:
                sums[name][0] = sums[name][0] + torch.outer(a[t], a[t]).double()
                sums[name][1] = sums[name][1] + torch.outer(g[t], g[t]).double()
                sums[name][2] += 1
        model.zero_grad(set_to_none=True)
    return {n: (s[0] / s[2], s[1] / s[2], s[2]) for n, s in sums.items()}
