"""Memory and file sizes of a curvature collection, computed from the architecture alone (``plan`` command).

The model is built on the meta device (no weights are loaded or downloaded); its architecture comes from the
YAML (``model.init_args.config``), from a local ``save_pretrained`` directory, or, for the hub names listed in
:data:`SHIPPED_ARCHITECTURES`, from a ``config.json`` shipped with the package, so the planner runs offline.

Exact: accumulator bytes (one ``[d_in, d_in]`` and one ``[d_out, d_out]`` sum per tracked module, in the
accumulation dtype), tensor bytes of the factor and eigen files, and weight bytes. Estimated (a documented upper
bound, not a measurement): the activations of one collection step and so the peak per-device memory; the
formula is :func:`activation_bytes_per_token`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_curv.curvature import resolve_modules
from lightning_curv.curvature.modules import layer_dims

#: Hub names whose ``config.json`` ships with the package (``lightning_curv/models/architectures/``).
ARCHITECTURES_DIR = Path(__file__).resolve().parent.parent / "models" / "architectures"
SHIPPED_ARCHITECTURES = {
    "allenai/OLMo-2-0425-1B": "olmo2-1b.json",
    "allenai/OLMo-2-1124-7B": "olmo2-7b.json",
    "allenai/OLMo-2-1124-13B": "olmo2-13b.json",
}
_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
GIB = 1024**3


@dataclass
class PlanOptions:
    """The ``plan:`` section.

    Attributes:
        gpu_memory_gb: Memory of one accelerator (GiB) for the largest batch that fits.
        headroom: Share of that memory kept free (allocator fragmentation, CUDA context).
    """

    gpu_memory_gb: float = 80.0
    headroom: float = 0.1


def architecture_config(model_args: dict[str, Any]) -> Any:
    """The transformers config of a ``LitCausalLM``'s ``init_args``, without network access.

    Raises:
        ValueError: If the model is a hub name with no shipped ``config.json`` and no local directory.
    """
    from transformers import AutoConfig

    fields = model_args.get("config")
    if fields is not None:
        fields = dict(fields)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    name = model_args.get("pretrained")
    if name is not None and Path(name).is_dir():
        return AutoConfig.from_pretrained(name, local_files_only=True)
    if name in SHIPPED_ARCHITECTURES:
        fields = json.loads((ARCHITECTURES_DIR / SHIPPED_ARCHITECTURES[name]).read_text())
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    raise ValueError(
        f"No offline architecture for {name!r}: give model.init_args.config, a local save_pretrained directory, or "
        f"one of the shipped hub names {sorted(SHIPPED_ARCHITECTURES)}."
    )


def meta_model(config: Any) -> nn.Module:
    """The causal LM of ``config`` on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def activation_bytes_per_token(config: Any, layers_in_backward: int, dtype_bytes: int) -> int:
    """Upper estimate of the activation memory one token needs in a collection step.

    Per decoder layer that the backward passes through, autograd keeps about 16 hidden-sized and 4 MLP-sized
    vectors (attention inputs/outputs, norms, residuals; gate, up, their product and the MLP input gradient) in
    the model's dtype; the logits and their softmax/gradient are float32, three vocabulary-sized vectors.
    """
    hidden, mlp = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    per_layer = (16 * hidden + 4 * mlp) * dtype_bytes
    return layers_in_backward * per_layer + 3 * config.vocab_size * 4


def plan_collection(
    model_args: dict[str, Any],
    modules: list[str] | None,
    *,
    accumulation_dtype: str,
    batch_size: int,
    block_size: int,
    options: PlanOptions,
) -> dict[str, Any]:
    """Bytes of a collection of ``modules`` of the model described by ``model_args``.

    Args:
        model_args: A ``LitCausalLM``'s ``init_args`` (``config`` or ``pretrained``, ``torch_dtype``).
        modules: Tracked module patterns (None: every MLP projection of the architecture).
        accumulation_dtype: ``"float32"`` or ``"float64"``.
        batch_size: Sequences per device and step.
        block_size: Tokens per sequence.
        options: The ``plan:`` section.

    Returns:
        Per-module shapes and bytes, totals, the estimated peak per device and the largest batch that fits.
    """
    from lightning_curv.models.causal_lm import MLP_PATTERNS

    config = architecture_config(model_args)
    model = meta_model(config)
    patterns = modules or list(MLP_PATTERNS.get(config.model_type, ()))
    names = resolve_modules(model, patterns)
    acc = _DTYPE_BYTES[accumulation_dtype]
    dtype = model_args.get("torch_dtype") or "float32"
    weight_bytes_each = _DTYPE_BYTES.get(dtype, 4)
    per_module = {}
    for name in names:
        d_in, d_out = layer_dims(dict(model.named_modules())[name])
        per_module[name] = {
            "d_in": d_in,
            "d_out": d_out,
            "accumulator_bytes": (d_in * d_in + d_out * d_out) * acc,
            "eigen_bytes": (d_in * d_in + d_in + d_out * d_out + d_out) * acc,
        }
    accumulators = sum(m["accumulator_bytes"] for m in per_module.values())
    weights = sum(p.numel() for p in model.parameters()) * weight_bytes_each
    layer_index = [int(part) for n in names for part in n.split(".") if part.isdigit()][:1]
    depth = config.num_hidden_layers - (min(layer_index) if layer_index else 0)
    per_token = activation_bytes_per_token(config, depth, weight_bytes_each)
    fixed = weights + accumulators
    usable = options.gpu_memory_gb * GIB * (1 - options.headroom)
    largest = int((usable - fixed) // (per_token * block_size)) if usable > fixed else 0
    return {
        "architecture": config.model_type,
        "modules": per_module,
        "accumulator_bytes": accumulators,
        "factor_file_tensor_bytes": accumulators,
        "eigen_file_tensor_bytes": sum(m["eigen_bytes"] for m in per_module.values()),
        "weight_bytes": weights,
        "activation_bytes_per_token_estimate": per_token,
        "peak_bytes_per_device_estimate": fixed + per_token * block_size * batch_size,
        "batch_size": batch_size,
        "block_size": block_size,
        "gpu_memory_gb": options.gpu_memory_gb,
        "largest_batch_estimate": largest,
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as console lines (GiB with bytes)."""

    def size(b: int) -> str:
        return f"{b / GIB:8.2f} GiB ({b:,} B)"

    lines = [f"{plan['architecture']}: {len(plan['modules'])} tracked modules"]
    lines += [f"  {n}: [{m['d_out']} x {m['d_in']}]" for n, m in plan["modules"].items()]
    lines += [
        f"accumulators (per device):      {size(plan['accumulator_bytes'])}",
        f"factor file tensors:            {size(plan['factor_file_tensor_bytes'])}",
        f"eigen file tensors:             {size(plan['eigen_file_tensor_bytes'])}",
        f"weights (per device, DDP):      {size(plan['weight_bytes'])}",
        f"peak per device, batch {plan['batch_size']} x {plan['block_size']} (estimate): "
        f"{size(plan['peak_bytes_per_device_estimate'])}",
        f"largest batch in {plan['gpu_memory_gb']:g} GiB (estimate): {plan['largest_batch_estimate']}",
    ]
    return "\n".join(lines)
