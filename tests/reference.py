"""Brute-force K-FAC statistics: each sequence alone, unpadded, per-position outer products in float64.

Deliberately simple and slow: no hooks on shared state, no masking tricks, no symmetric blocks. Nothing here
imports the implementation's sampler or seeding: the true-Fisher targets are redrawn from the documented contract
(:func:`reference_row_seed`, :func:`reference_uniform`, :func:`reference_sample`) in plain Python integers and
floats, and :func:`analytic_true_fisher_G` gives the expectation of the true-Fisher ``G`` without drawing anything.
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


def reference_uniform(seed: int, index: int, position: int) -> float:
    """The documented uniform of one sample: output ``position + 1`` of splitmix64 seeded with the row seed.

    Python integers throughout: the state is ``reference_row_seed(seed, index) + (position + 1) · 0x9E3779B97F4A7C15
    (mod 2⁶⁴)``, mixed by the splitmix64 finalizer; its top 53 bits over ``2⁵³`` give ``u`` in ``[0, 1)``.
    """
    z = (reference_row_seed(seed, index) + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & _MASK64
    z ^= z >> 31
    return (z >> 11) / 2.0**53


def reference_sample(logits: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """The documented true-Fisher draw: inverse CDF of the float64 softmax, one class per row of ``[n, V]`` logits.

    Row ``i`` takes the first class ``k`` whose running sum of probabilities exceeds ``u_i`` times the total.
    """
    out = []
    for row, u in zip(torch.softmax(logits.double(), dim=-1).tolist(), uniforms, strict=True):
        running = [0.0]
        for p in row:
            running.append(running[-1] + p)
        x = u * running[-1]
        out.append(next((k for k in range(len(row)) if x < running[k + 1]), len(row) - 1))
    return torch.tensor(out, dtype=torch.long)


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
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    names: list[str],
    fisher: str,
    seed: int = 0,
    max_samples: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``(A, G, n)`` per module from one sequence at a time (the model should be float64).

    With ``max_samples``, the data ends after that many sample positions (rows in order, positions in order): the
    row where the budget runs out is cut right after its last counted position, later rows are dropped.
    """
    sums = {n: [0.0, 0.0, 0] for n in names}
    left = max_samples
    for row in range(batch["input_ids"].shape[0]):
        ids, positions = _row(batch, row)
        labels = batch["labels"][row][batch["attention_mask"][row].bool()]
        if left is not None:
            positions = positions[:left]
            left -= len(positions)
        if not positions:
            continue
        ids = ids[:, : positions[-1] + 2]  # the data ends after the last counted position's target
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
            index = int(batch["index"][row])
            targets = reference_sample(logits[pos].detach(), [reference_uniform(seed, index, t) for t in positions])
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
