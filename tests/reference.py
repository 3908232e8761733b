"""Brute-force K-FAC statistics: each sequence alone, unpadded, per-position outer products in float64.

Deliberately simple and slow: no hooks on shared state, no masking tricks, no symmetric blocks. Nothing here
imports the implementation's sampler or seeding: the true-Fisher targets are redrawn from the documented contract
(:func:`reference_row_seed`, :func:`reference_sample`), and :func:`analytic_true_fisher_G` gives the expectation
of the true-Fisher ``G`` without drawing anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MASK64 = (1 << 64) - 1


def reference_row_seed(seed: int, index: int) -> int:
    """The documented seed of dataset row ``index``: the splitmix64 finalizer of the pair, in 63 bits.

    The pair enters as ``seed · 0x9E3779B97F4A7C15 + (index + 1) · 0xBF58476D1CE4E5B9 (mod 2⁶⁴)``; the result is the
    splitmix64 output mix of that state with the top bit cleared (a non-negative ``torch.Generator`` seed).
    """
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def reference_sample(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """The documented true-Fisher draw of one row's positions: Gumbel-max over a seeded CPU generator.

    One float32 uniform per logit (``torch.rand`` of the logits' shape ``[n, V]`` from a ``torch.Generator``
    seeded with ``seed``), turned into Gumbel noise ``-log(-log u)`` and added to the logits in float64.
    """
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (logits.double() - torch.log(-torch.log(u.double()))).argmax(dim=-1)


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


def _row(batch: dict[str, torch.Tensor], row: int) -> tuple[torch.Tensor, list[int]]:
    """Unpadded ``[1, L]`` input ids of one row and its sample positions (those with a next-token label)."""
    keep = batch["attention_mask"][row].bool()
    ids = batch["input_ids"][row][keep][None]
    labels = batch["labels"][row][keep]
    return ids, [t for t in range(ids.shape[1] - 1) if labels[t + 1] != -100]


def reference_lm_factors(
    model: nn.Module, batch: dict[str, torch.Tensor], names: list[str], fisher: str, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``(A, G, n)`` per module from one sequence at a time (the model should be float64)."""
    sums = {n: [0.0, 0.0, 0] for n in names}
    for row in range(batch["input_ids"].shape[0]):
        ids, positions = _row(batch, row)
        labels = batch["labels"][row][batch["attention_mask"][row].bool()]
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
            targets = reference_sample(logits[pos].detach(), reference_row_seed(seed, int(batch["index"][row])))
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


def analytic_true_fisher_G(
    model: nn.Module, batch: dict[str, torch.Tensor], names: list[str]
) -> dict[str, list[torch.Tensor]]:
    """Expected true-Fisher ``E[g_t g_tᵀ]`` of every sample position, with no sampling at all.

    For a row with sample positions ``t'`` (logits ``z_t'``, ``p_t' = softmax(z_t')``, targets ``y_t' ~ p_t'`` drawn
    independently), the gradient of the summed loss at a tracked layer's output ``s_t`` is
    ``g_t = Σ_t' J_t'tᵀ (p_t' − e_y_t')`` with ``J_t't = ∂z_t'/∂s_t``. The terms have mean zero and are independent,
    so ``E[g_t g_tᵀ] = Jᵀ (diag p − p pᵀ) J`` with ``J`` the stacked ``J_t't`` and ``diag p − p pᵀ`` block-diagonal.
    With ``diag p − p pᵀ = Bᵀ B``, ``B = diag(√p)(I − 1 pᵀ)`` (row ``k`` of ``B`` is ``√p_k (e_k − p)ᵀ``), this
    is ``Σ_{t', k} w w ᵀ`` with ``w = J_t'tᵀ √p_k (e_k − p_t')``: one vector-Jacobian product per ``(t', k)``,
    all computed in one backward pass over that many copies of the sequence.

    Returns:
        Per module, one ``[d_out, d_out]`` matrix per sample position (rows in order, positions in order).
    """
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for row in range(batch["input_ids"].shape[0]):
        ids, positions = _row(batch, row)
        if not positions:
            continue
        with torch.no_grad():
            p = torch.softmax(model(input_ids=ids).logits[0, positions].double(), dim=-1)  # [P, V]
        P, V = p.shape
        # cotangent[c] for copy c = (t', k): √p_k (e_k − p_t') at logits row t', zero elsewhere.
        cotangent = torch.zeros(P, V, P, V, dtype=torch.float64)
        for i in range(P):
            cotangent[i, :, i, :] = p[i].sqrt()[:, None] * (torch.eye(V, dtype=torch.float64) - p[i][None, :])
        cotangent = cotangent.reshape(P * V, P, V)
        store, handles = _capture(model, names)
        try:
            logits = model(input_ids=ids.expand(P * V, -1)).logits[:, positions].double()  # [P·V, P, V]
        finally:
            for h in handles:
                h.remove()
        (logits * cotangent).sum().backward()
        for name in names:
            w = store[name]["s"].grad.double()  # [P·V, L, d_out]: copy c holds w_c at every position t
            out[name].extend(w[:, t].T @ w[:, t] for t in positions)
        model.zero_grad(set_to_none=True)
    return out
