"""K-FAC statistics of linear layers: hooks that accumulate ``A = E[a aᵀ]`` and ``G = E[g gᵀ]``.

Reference: Martens and Grosse, *Optimizing Neural Networks with Kronecker-factored Approximate Curvature*
(ICML 2015); the "expand" convention for sequence models follows Eschenhagen et al., *Kronecker-Factored
Approximate Curvature for Modern Neural Network Architectures* (NeurIPS 2023), as used by Merullo et al.,
*From Memorization to Reasoning in the Spectrum of Loss Curvature* (arXiv 2510.24256, 2025).

For a layer ``s = W a`` the Fisher block is approximated as ``G ⊗ A``. Every selected position (a token of a
language model, the CLS token of a ViT, a row of a plain batch) is one sample: ``a`` is the layer input at that
position and ``g`` the gradient of the summed loss of its sequence with respect to the layer output there.

Conventions:
    * Sums and an integer count are accumulated; :meth:`KFACAccumulator.finalize` divides once, after the
      optional all-reduce, so results do not depend on batch size or device count.
    * Sums are float32 (or float64) whatever the autocast dtype; products run with autocast disabled and
      exploit symmetry (only the upper block triangle is computed).
    * No parameter gradient is computed: parameters are frozen during the pass and the backward pass starts
      its graph at the outputs of the tracked layers, so it ends at the lowest one (both done by
      :class:`~lightning_curv.curvature.hooks.ModuleHooks`).

Warning:
    A tracked module that runs more than once per forward (weight sharing, activation checkpointing that
    recomputes the forward) has no single K-FAC block; the accumulator raises instead of mixing the calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_curv.curvature.constants import FISHER_TYPES, IGNORE_INDEX, FisherType
from lightning_curv.curvature.hooks import Attachable, GradHook, ModuleHooks
from lightning_curv.curvature.modules import layer_dims, resolve_modules

#: Which positions of a layer's ``[..., d]`` input count as samples: a boolean mask over the leading
#: dimensions, an integer position along dimension 1 (CLS-only mode), or None for every position.
Selection = Tensor | int | None

#: Block size of the symmetric (upper block triangle) accumulation; measured in benchmarks/kfac_overhead.py.
DEFAULT_BLOCK_SIZE = 128


@dataclass
class KFACFactors:
    """Kronecker factors of one linear layer.

    Attributes:
        A: Activation covariance ``E[a aᵀ]``, shape ``[d_in, d_in]`` (a mean over samples).
        G: Gradient covariance ``E[g gᵀ]``, shape ``[d_out, d_out]`` (a mean over samples).
        num_samples: Number of samples (token positions or images) behind the means.
    """

    A: Tensor
    G: Tensor
    num_samples: int


def select_positions(x: Tensor, selection: Selection) -> Tensor:
    """Rows of ``x`` that count as samples.

    Args:
        x: Layer inputs or output gradients of shape ``[..., d]``.
        selection: Boolean mask of shape ``x.shape[:-1]``, an integer position along dim 1, or None.

    Returns:
        Samples of shape ``[n, d]``.
    """
    if selection is None:
        return x.reshape(-1, x.shape[-1])
    if isinstance(selection, int):
        if x.ndim != 3:
            raise ValueError(f"Position selection needs inputs of shape [batch, tokens, d]; got {tuple(x.shape)}.")
        return x[:, selection, :]
    if selection.shape != x.shape[:-1]:
        raise ValueError(
            f"Selection mask of shape {tuple(selection.shape)} does not fit a layer input of shape "
            f"{tuple(x.shape)}; it must cover every dimension but the last."
        )
    return x[selection.to(x.device)]


def symmetric_accumulate_(acc: Tensor, x: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Add ``xᵀ x`` to the upper block triangle of ``acc`` in place.

    One product per block row, over the columns from the diagonal block rightwards, so about half the flops of
    ``xᵀ x`` for ``d`` much larger than ``block_size``. Entries below the diagonal blocks are left untouched;
    :func:`symmetrize_upper` restores the full matrix once at the end.

    Args:
        acc: Accumulator of shape ``[d, d]``.
        x: Samples of shape ``[n, d]``, same dtype as ``acc``.
        block_size: Edge of the square blocks.
    """
    d = x.shape[1]
    if d <= block_size:
        acc.addmm_(x.T, x)
        return
    for i in range(0, d, block_size):
        acc[i : i + block_size, i:].addmm_(x[:, i : i + block_size].T, x[:, i:])  # [b, n] @ [n, d - i]


def symmetrize_upper(acc: Tensor) -> Tensor:
    """Full symmetric matrix from an accumulator whose upper triangle (diagonal included) is valid."""
    return torch.triu(acc) + torch.triu(acc, diagonal=1).T


class KFACAccumulator(Attachable):
    """Forward and tensor hooks that accumulate K-FAC sums for a set of linear layers.

    Any loop can drive it: call :meth:`select` before each forward to say which positions count, run the forward
    and a backward of the summed loss, and call :meth:`finalize` at the end. Use it as a context manager so
    hooks are removed and parameters unfrozen in all cases::

        with KFACAccumulator(model, ["model.layers.*.mlp.*_proj"]) as acc:
            for batch in batches:
                acc.select(mask)          # [B, T] bool
                loss = ...                # summed per sequence
                loss.backward()
        factors = acc.finalize()

    Layers that read the same input tensor in one forward (``gate_proj`` and ``up_proj``) share one ``aᵀa``
    product per forward.

    Args:
        model: The model whose layers are tracked.
        modules: Module names, fnmatch globs or ``re:`` regexes (see :func:`resolve_modules`).
        dtype: Accumulation dtype, float32 or float64.
        block_size: Block edge of the symmetric accumulation.
        eval_mode: Put the model in eval mode while attached (every submodule's flag is restored on detach).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: str | Sequence[str],
        *,
        dtype: torch.dtype = torch.float32,
        block_size: int = DEFAULT_BLOCK_SIZE,
        eval_mode: bool = False,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Accumulation dtype must be torch.float32 or torch.float64, got {dtype}.")
        self.model = model
        self.names = resolve_modules(model, modules)
        self.dtype = dtype
        self.block_size = block_size
        self._hooks = ModuleHooks(
            model, self.names, self._on_forward, eval_mode=eval_mode, needs_grad=True, purpose="K-FAC collection"
        )
        self.modules = self._hooks.modules
        self.dims = {name: layer_dims(m) for name, m in self.modules.items()}
        self._A_sums: dict[str, Tensor] = {}
        self._G_sums: dict[str, Tensor] = {}
        self.A_counts = dict.fromkeys(self.names, 0)
        self.G_counts = dict.fromkeys(self.names, 0)
        self._selection: Selection = None
        self._input_cache: dict[int, tuple[Tensor, Tensor, int]] = {}

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> None:
        """Freeze all parameters (and set eval mode if asked) and register the forward hooks (idempotent)."""
        self._hooks.attach()

    def detach(self) -> None:
        """Remove every hook and restore ``requires_grad`` of the parameters (and the modes, if changed)."""
        self._hooks.detach()
        self._input_cache.clear()

    # ------------------------------------------------------------------ per batch
    def select(self, selection: Selection) -> None:
        """Set the positions that count for the next forward pass and start a new forward.

        Args:
            selection: Boolean mask over the leading dimensions of the tracked layers' inputs (``[B, T]`` for
                a causal LM), an integer position along dim 1 (CLS-only mode) or None (every position).
        """
        self._selection = selection
        self._hooks.new_forward()
        self._input_cache.clear()

    def _sum(self, store: dict[str, Tensor], name: str, dim: int, device: torch.device) -> Tensor:
        acc = store.get(name)
        if acc is None:
            acc = store[name] = torch.zeros(dim, dim, dtype=self.dtype, device=device)
        return acc

    def _on_forward(self, name: str, x: Tensor, output: Tensor) -> GradHook:
        """Add the layer input's ``aᵀa`` now; return the hook that adds ``gᵀg`` of its output gradient."""
        selection = self._selection
        self._accumulate_A(name, x, selection)
        return lambda grad: self._accumulate_G(name, grad, selection)

    @torch.no_grad()
    def _accumulate_A(self, name: str, x: Tensor, selection: Selection) -> None:
        acc = self._sum(self._A_sums, name, self.dims[name][0], x.device)
        cached = self._input_cache.get(id(x))
        if cached is not None and cached[0] is x:
            # A sibling layer read this very tensor in this forward (gate_proj/up_proj): reuse its product.
            acc.add_(cached[1])
            self.A_counts[name] += cached[2]
            return
        with torch.autocast(device_type=x.device.type, enabled=False):
            a = select_positions(x.detach(), selection).to(self.dtype)  # [n, d_in]
            product = torch.zeros_like(acc)
            symmetric_accumulate_(product, a, self.block_size)
        acc.add_(product)
        self.A_counts[name] += a.shape[0]
        self._input_cache[id(x)] = (x, product, a.shape[0])  # keeps x alive, so its id stays unique

    @torch.no_grad()
    def _accumulate_G(self, name: str, grad: Tensor, selection: Selection) -> None:
        d_out = self.dims[name][1]
        acc = self._sum(self._G_sums, name, d_out, grad.device)
        with torch.autocast(device_type=grad.device.type, enabled=False):
            g = select_positions(grad, selection).to(self.dtype)  # [n, d_out]
            symmetric_accumulate_(acc, g, self.block_size)
        self.G_counts[name] += g.shape[0]

    # ------------------------------------------------------------------ results
    @property
    def num_samples(self) -> int:
        """Samples seen so far by the first tracked layer (all layers see the same positions)."""
        return self.A_counts[self.names[0]]

    def all_reduce(self) -> None:
        """Sum the accumulators and counts over all processes of ``torch.distributed`` (no-op otherwise).

        Every rank must call this, even a rank that saw no data.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        device = next((t.device for t in self._A_sums.values()), None)
        if device is None or torch.distributed.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        device = device or torch.device("cpu")
        for name in self.names:
            d_in, d_out = self.dims[name]
            for store, dim in ((self._A_sums, d_in), (self._G_sums, d_out)):
                acc = self._sum(store, name, dim, device)
                torch.distributed.all_reduce(acc)
        counts = torch.tensor(
            [self.A_counts[n] for n in self.names] + [self.G_counts[n] for n in self.names],
            dtype=torch.float64,
            device=device,
        )
        torch.distributed.all_reduce(counts)
        k = len(self.names)
        for i, name in enumerate(self.names):
            self.A_counts[name] = int(round(counts[i].item()))
            self.G_counts[name] = int(round(counts[k + i].item()))

    def finalize(self) -> dict[str, KFACFactors]:
        """Divide the sums by the counts once and return the factors (on CPU, accumulation dtype).

        Returns:
            Factors keyed by module name.

        Raises:
            ValueError: If no sample was collected, the gradient hooks did not see every sample, or a sum holds
                NaN/Inf.
        """
        factors = {}
        for name in self.names:
            n_a, n_g = self.A_counts[name], self.G_counts[name]
            if n_a == 0:
                raise ValueError(
                    f"No samples were collected for {name!r}: the data is empty or every position was masked "
                    "(padding, labels=-100, sequences of one token). Check the dataset and the attention mask."
                )
            if n_a != n_g:
                raise ValueError(
                    f"{name!r} saw {n_a} activation samples but {n_g} gradient samples: the backward pass did "
                    "not reach this layer for every forward. Call backward on the loss of every batch."
                )
            A = symmetrize_upper(self._A_sums[name]) / n_a
            G = symmetrize_upper(self._G_sums[name]) / n_g
            for label, mat in (("A", A), ("G", G)):
                if not torch.isfinite(mat).all():
                    raise ValueError(
                        f"The {label} statistics of {name!r} contain NaN or Inf: the forward or backward pass "
                        "overflowed. Collect in float32/bf16 instead of fp16, or check the model for NaNs."
                    )
            factors[name] = KFACFactors(A=A.cpu(), G=G.cpu(), num_samples=n_a)
        return factors

    def state_dict(self) -> dict[str, Any]:
        """Raw sums and counts, to resume an interrupted collection."""
        return {
            "A_sums": {n: t.cpu() for n, t in self._A_sums.items()},
            "G_sums": {n: t.cpu() for n, t in self._G_sums.items()},
            "A_counts": dict(self.A_counts),
            "G_counts": dict(self.G_counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore sums and counts saved by :meth:`state_dict` (same modules required)."""
        if set(state["A_counts"]) != set(self.names):
            raise ValueError(
                f"Saved accumulator tracks {sorted(state['A_counts'])}, this one tracks {self.names}: the partial "
                "collection belongs to another configuration. Delete it or use the original module list."
            )
        device = next(self.model.parameters()).device
        self._A_sums = {n: t.to(device, self.dtype) for n, t in state["A_sums"].items()}
        self._G_sums = {n: t.to(device, self.dtype) for n, t in state["G_sums"].items()}
        self.A_counts = dict(state["A_counts"])
        self.G_counts = dict(state["G_counts"])


# ---------------------------------------------------------------------------- targets and positions
def valid_positions(attention_mask: Tensor, labels: Tensor | None = None) -> Tensor:
    """Positions of a causal LM batch that are K-FAC samples.

    Position ``t`` is valid iff ``t < T-1``, ``attention_mask[t] == 1``, ``attention_mask[t+1] == 1`` and, when
    labels are given, ``labels[t+1] != -100`` (labels follow the Hugging Face convention: aligned with the
    inputs, shifted inside the loss).

    Args:
        attention_mask: Mask of shape ``[B, T]``.
        labels: Optional labels of shape ``[B, T]``.

    Returns:
        Boolean mask of shape ``[B, T]``.
    """
    mask = attention_mask.bool()
    valid = torch.zeros_like(mask)
    valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
    if labels is not None:
        valid[:, :-1] &= labels[:, 1:] != IGNORE_INDEX
    return valid


#: splitmix64 constants: the stream increment (golden ratio) and the two multipliers of the output mix.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _as_int64(value: int) -> int:
    """The int64 with the bits of ``value mod 2⁶⁴`` (two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """The splitmix64 output mix of int64 bit patterns (products wrap modulo 2⁶⁴)."""
    z = (z ^ _shr(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shr(z, 27)) * _as_int64(_MIX2)
    return z ^ _shr(z, 31)


def position_uniforms(seed: int, index: Tensor, position: Tensor) -> Tensor:
    """One uniform in ``[0, 1)`` per sample, a pure function of ``(seed, dataset index, position)``.

    The contract (``tests/reference.py`` re-implements it): with all arithmetic modulo 2⁶⁴,

    * the row key is ``k = mix(seed · 0x9E3779B97F4A7C15 + (index + 1) · 0xBF58476D1CE4E5B9)`` with its top bit
      cleared (the value of :func:`lightning_curv.utils.row_seed`);
    * the uniform of ``position`` ``t`` is ``u = (mix(k + (t + 1) · 0x9E3779B97F4A7C15) >> 11) · 2⁻⁵³``, the
      ``(t + 1)``-th output of a splitmix64 generator seeded with ``k``, reduced to its top 53 bits;

    where ``mix(z)`` is the splitmix64 finalizer ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
    z *= 0x94D049BB133111EB; z ^= z >> 31`` (logical shifts). No random generator is involved, and the integers
    are hashed on CPU, so the uniforms depend neither on batching nor on the device.

    Args:
        seed: Base seed.
        index: Dataset index of each sample's row, integer tensor of shape ``[n]``.
        position: Position of each sample within its row, integer tensor of shape ``[n]``.

    Returns:
        float64 uniforms of shape ``[n]`` on CPU.
    """
    index = index.detach().to("cpu", torch.int64)
    position = position.detach().to("cpu", torch.int64)
    key = _mix64(_as_int64(seed * _GOLDEN) + (index + 1) * _as_int64(_MIX1)) & ((1 << 63) - 1)  # [n]
    z = _mix64(key + (position + 1) * _as_int64(_GOLDEN))
    return _shr(z, 11).to(torch.float64) * 2.0**-53


def sample_from_logits(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw of one class per row of ``softmax(logits)``, in float64.

    With ``p = softmax(logits.double())`` and ``c = cumsum(p)``, row ``i`` draws the smallest ``k`` with
    ``u_i · c_{V-1} < c_k`` (``u`` scaled by the computed total so round-off in the sum never leaves it past the
    last class; classes of probability zero are never drawn).

    Args:
        logits: Logits of shape ``[n, V]``.
        uniforms: Uniforms in ``[0, 1)`` of shape ``[n]`` (see :func:`position_uniforms`).

    Returns:
        Class indices of shape ``[n]`` on ``logits.device``.
    """
    cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum(dim=-1)  # [n, V]
    u = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]  # [n, 1]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)


def fisher_targets(
    logits: Tensor,
    data_targets: Tensor,
    *,
    fisher: FisherType,
    seed: int,
    index: Tensor | None,
    position: Tensor,
) -> Tensor:
    """Targets of the loss whose gradients define ``G``.

    True-Fisher targets are seeded per sample from ``(seed, dataset index, position)`` (see
    :func:`position_uniforms` and :func:`sample_from_logits`): the same row gets the same targets whatever the
    batch it comes in, its padding, the process that reads it and the device type.

    Args:
        logits: Logits at the sample positions, shape ``[n, V]``.
        data_targets: Data labels at the same positions, shape ``[n]``.
        fisher: ``"empirical"`` returns ``data_targets``; ``"true"`` samples from ``softmax(logits)``.
        seed: Base seed of the true Fisher.
        index: Dataset index of each sample's row, shape ``[n]`` (required for the true Fisher).
        position: Position of each sample within its row, shape ``[n]`` (the token column of a right-padded LM
            batch; 0 for a classifier).

    Returns:
        Targets of shape ``[n]``.

    Raises:
        ValueError: If the true Fisher is asked for without row indices.
    """
    if fisher == "empirical":
        return data_targets
    if index is None:
        raise ValueError(
            "The true Fisher seeds its targets by dataset row: the batch needs an `index` tensor of shape [B] (the "
            "data modules of lightning_curv add it; collect_factors numbers rows in order when it is missing)."
        )
    return sample_from_logits(logits, position_uniforms(seed, index, position))


def _upcast(t: Tensor) -> Tensor:
    """At least float32, so the loss of an fp16/bf16 forward is computed in float32 (float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_fisher(fisher: str) -> None:
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")


def _trim_to_budget(mask: Tensor, budget: int | None) -> Tensor:
    """Keep only the first ``budget`` True entries of ``mask`` in row-major order (rows, then positions in order)."""
    if budget is None or int(mask.sum()) <= budget:
        return mask
    flat = mask.flatten()
    keep = flat & (flat.cumsum(0) <= budget)
    return keep.view_as(mask)


def budget_prefix(sample_counts: Iterable[int], budget: int | None) -> tuple[int, int | None]:
    """How many leading rows hold the first ``budget`` samples of a dataset, and how many of the last row count.

    Args:
        sample_counts: Samples of each row, in dataset order (read lazily: only the prefix is consumed).
        budget: Sample budget; None takes everything.

    Returns:
        ``(num_rows, last_row_samples)``: the rows that the budget reaches and the samples of its last row that
        fit (None when the budget is None or the data ends first: every row counts whole).
    """
    rows = total = 0
    for count in sample_counts:
        if budget is not None and total >= budget:
            break
        rows += 1
        total += count
        if budget is not None and total >= budget:
            return rows, count - (total - budget)
    return rows, None


def causal_lm_step(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    accumulator: KFACAccumulator,
    *,
    fisher: FisherType = "true",
    seed: int = 0,
    max_samples: int | None = None,
) -> int:
    """One K-FAC step of a causal LM in token "expand" mode: forward, summed next-token loss, backward.

    With ``max_samples`` only the first that many valid positions count, rows in order and positions in order
    within a row; positions past the budget also leave the loss (as if the data ended there), and rows with none
    left are not run at all.

    Args:
        model: A Hugging Face causal LM (``model(input_ids=..., attention_mask=...).logits``).
        batch: ``input_ids`` ``[B, T]`` (right-padded), optional ``attention_mask`` ``[B, T]``, ``labels``
            ``[B, T]`` (-100 = no target) and ``index`` ``[B]`` (the dataset row of each batch row; required for
            the true Fisher).
        accumulator: The attached accumulator.
        fisher: ``"true"`` (targets sampled from the model) or ``"empirical"`` (the next data token).
        seed: Base seed of the true Fisher (see :func:`fisher_targets`).
        max_samples: Count at most this many positions (the rest of a token budget).

    Returns:
        The number of positions counted.
    """
    _check_fisher(fisher)
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels, index = batch.get("labels"), batch.get("index")
    valid = _trim_to_budget(valid_positions(attention_mask, labels), max_samples)  # [B, T]
    n = int(valid.sum())
    if n == 0:
        return 0
    rows_used = int(valid.any(dim=1).nonzero().max()) + 1
    if rows_used < valid.shape[0]:  # rows past the budget: not run
        valid, input_ids, attention_mask = valid[:rows_used], input_ids[:rows_used], attention_mask[:rows_used]
        labels = labels[:rows_used] if labels is not None else None
        index = index[:rows_used] if index is not None else None
    accumulator.select(valid)
    next_tokens = (labels if labels is not None else input_ids).roll(-1, dims=1)  # target of position t is t+1
    rows, positions = valid.nonzero(as_tuple=True)  # [n] each, row-major like logits[valid]
    with torch.enable_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = _upcast(logits[valid])  # [n, V]
        targets = fisher_targets(
            logits,
            next_tokens[valid],
            fisher=fisher,
            seed=seed,
            index=index.to(rows.device)[rows] if index is not None else None,
            position=positions,
        )
        F.cross_entropy(logits, targets, reduction="sum").backward()
    return n


def classifier_step(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    accumulator: KFACAccumulator,
    *,
    position: int | None = 0,
    fisher: FisherType = "true",
    seed: int = 0,
    max_samples: int | None = None,
    input_key: str = "pixel_values",
    label_key: str = "labels",
) -> int:
    """One K-FAC step of a classifier, one sample per input (CLS-only mode for a ViT).

    Args:
        model: Maps ``batch[input_key]`` to logits of shape ``[B, C]``.
        batch: Inputs, labels ``[B]`` and ``index`` ``[B]`` (the dataset row of each input; required for the true
            Fisher, whose target of an input is drawn at position 0 of its row, see :func:`fisher_targets`).
        accumulator: The attached accumulator.
        position: Token position whose statistics count (0: a ViT's class token) or None when the tracked layers
            see ``[B, d]`` inputs (or every token counts).
        fisher: ``"true"`` (labels sampled from the model) or ``"empirical"`` (the data labels).
        seed: Base seed of the true Fisher.
        max_samples: Count at most this many inputs (the first ones).
        input_key: Batch key of the model input.
        label_key: Batch key of the data labels (the empirical-Fisher targets).

    Returns:
        The number of inputs counted.
    """
    _check_fisher(fisher)
    inputs, labels = batch[input_key], batch[label_key]
    index = batch.get("index")
    if max_samples is not None and max_samples < inputs.shape[0]:
        inputs, labels = inputs[:max_samples], labels[:max_samples]
        index = index[:max_samples] if index is not None else None
    if inputs.shape[0] == 0:
        return 0
    accumulator.select(position)
    with torch.enable_grad():
        logits = _upcast(model(inputs))  # [B, C]
        targets = fisher_targets(
            logits,
            labels,
            fisher=fisher,
            seed=seed,
            index=index,
            position=torch.zeros(logits.shape[0], dtype=torch.long),
        )
        F.cross_entropy(logits, targets, reduction="sum").backward()
    return int(inputs.shape[0])


def collect_factors(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    modules: str | Sequence[str],
    fisher: FisherType = "true",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    max_tokens: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, KFACFactors]:
    """K-FAC factors of linear layers of a Hugging Face causal LM over a pass of ``batches``.

    Every valid token position is a sample (see :func:`valid_positions`); ``g`` is the gradient of the row's
    summed next-token cross-entropy. The model is put in eval mode for the pass (every submodule's own flag is
    restored at the end), no parameter gradient is computed, and all hooks are removed at the end. Under
    ``torch.distributed`` sums and counts are all-reduced, so every rank returns the factors of the union of the
    shards. A batch without ``index`` has its rows numbered in the order they arrive (0, 1, ... over the pass).

    Args:
        model: A causal LM called as ``model(input_ids=..., attention_mask=...)`` returning ``.logits``.
        batches: Dicts with ``input_ids`` ``[B, T]`` and optional ``attention_mask``, ``labels`` and ``index``.
        modules: Module names, fnmatch globs or ``re:`` regexes.
        fisher: ``"true"`` (sampled targets, the default) or ``"empirical"`` (data targets).
        seed: Seed of the true-Fisher targets.
        dtype: Accumulation dtype (float32 or float64).
        max_tokens: Count the first this many positions of ``batches`` (rows in order, positions in order) and
            stop iterating; per process (give each process its rows of a global prefix).
        block_size: Block edge of the symmetric accumulation.

    Returns:
        Factors keyed by module name.
    """
    _check_fisher(fisher)
    rows_seen = 0
    with KFACAccumulator(model, modules, dtype=dtype, block_size=block_size, eval_mode=True) as acc:
        device = next(model.parameters()).device
        for batch in batches:
            remaining = None if max_tokens is None else max_tokens - acc.num_samples
            if remaining is not None and remaining <= 0:
                break
            batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            num_rows = batch["input_ids"].shape[0]
            if "index" not in batch:
                batch["index"] = torch.arange(rows_seen, rows_seen + num_rows, device=device)
            rows_seen += num_rows
            causal_lm_step(model, batch, acc, fisher=fisher, seed=seed, max_samples=remaining)
        acc.all_reduce()
        return acc.finalize()
