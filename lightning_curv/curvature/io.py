"""Factor and eigenbasis files: one safetensors file per set, facts about its origin in the header.

A factor file holds ``<module>.activation_covariance`` and ``<module>.gradient_covariance`` per tracked module;
an eigen file holds ``<module>.activation_eigenvalues`` (and the other three eigen keys). The header metadata
(``__metadata__["lightning_curv"]``, JSON) records the kind of file, format and package versions, module
shapes and sample counts, dtype, the caller's arguments (fisher type, seed, ...) and the identity of the model:
its class, a hash of its config, a hash of its parameter names and shapes, and a hash of the tracked weights, so
factors from another checkpoint of the same architecture are caught at load time. Nothing is pickled, and every
file is written to a temporary name and renamed into place.

The raw sums and counts of an unfinished collection (to resume it) use the same layout, with ``kind``
``"accumulator_state"`` (:func:`save_accumulator_state`, :func:`load_accumulator_state`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_curv import __version__
from lightning_curv.curvature.constants import (
    ACCUMULATOR_STATE,
    ACTIVATION_COVARIANCE,
    ACTIVATION_EIGENVALUES,
    ACTIVATION_EIGENVECTORS,
    FORMAT_VERSION,
    GRADIENT_COVARIANCE,
    GRADIENT_EIGENVALUES,
    GRADIENT_EIGENVECTORS,
    METADATA_KEY,
)
from lightning_curv.curvature.eigen import KFACEigen
from lightning_curv.curvature.kfac import KFACFactors
from lightning_curv.curvature.modules import weight_matrix
from lightning_curv.utils import atomic_path, json_default, sha256_hex

#: Config fields that change when a model is saved and reloaded, and do not change what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
}


# ---------------------------------------------------------------------------- model identity
def model_config_hash(model: nn.Module) -> str | None:
    """Hash of ``model.config`` (Hugging Face models) without fields that change on save/reload, else None."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    fields = {k: v for k, v in to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return sha256_hex([json.dumps(fields, sort_keys=True, default=str).encode()])


def weights_hash(model: nn.Module, module_names: list[str]) -> str:
    """Hash of the tracked weights, as float32 ``[d_out, d_in]`` (so bf16 and fp32 loads of a checkpoint agree)."""
    modules = dict(model.named_modules())
    chunks = []
    for name in module_names:
        W = weight_matrix(modules[name]).detach().float().cpu().contiguous()
        chunks += [name.encode(), str(tuple(W.shape)).encode(), W.numpy().tobytes()]
    return sha256_hex(chunks)


def model_identity(model: nn.Module, module_names: list[str]) -> dict[str, str | None]:
    """Facts that tie a factor file to one model and checkpoint.

    Args:
        model: The model the factors were collected on.
        module_names: The tracked modules.

    Returns:
        ``class``, ``config_hash``, ``structure_hash`` (parameter names and shapes) and ``weights_hash``.
    """
    structure = [f"{n}:{tuple(p.shape)}".encode() for n, p in model.named_parameters()]
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config_hash": model_config_hash(model),
        "structure_hash": sha256_hex(structure),
        "weights_hash": weights_hash(model, module_names),
    }


def check_model(metadata: Mapping[str, Any], model: nn.Module, path: str | os.PathLike = "<factors>") -> None:
    """Raise if the file's recorded model identity does not match ``model``.

    Args:
        metadata: Header metadata of a factor or eigen file.
        model: The model the factors are about to be used on.
        path: The file, for the message.

    Raises:
        ValueError: Naming the first mismatch (modules, class, architecture, or weights) and the fix.
    """
    modules = dict(model.named_modules())
    for name, info in metadata["modules"].items():
        if name not in modules:
            raise ValueError(
                f"{path} has statistics for module {name!r}, which this model does not have: the file was "
                f"collected on a different model ({metadata.get('model', {}).get('class')}). Collect factors for "
                "this model."
            )
        d_out, d_in = weight_matrix(modules[name]).shape
        if (d_in, d_out) != (info["d_in"], info["d_out"]):
            raise ValueError(
                f"{path}: module {name!r} has [d_out, d_in] = [{info['d_out']}, {info['d_in']}] in the file but "
                f"[{d_out}, {d_in}] in this model: the factors belong to a different model. Collect them again."
            )
    recorded = metadata.get("model")
    if not recorded:
        return
    current = model_identity(model, list(metadata["modules"]))
    problems = {
        "class": "a different model class",
        "structure_hash": "a model with different parameter names or shapes",
        "config_hash": "a model with a different config",
        "weights_hash": "a different checkpoint (the tracked weights differ)",
    }
    for key, meaning in problems.items():
        if recorded.get(key) is not None and current[key] is not None and recorded[key] != current[key]:
            raise ValueError(
                f"{path} was collected on {meaning}: recorded {key}={str(recorded[key])[:16]}..., this model has "
                f"{str(current[key])[:16]}... Collect factors on this checkpoint, or load the checkpoint the "
                "factors came from (edits must start from the unedited weights)."
            )


# ---------------------------------------------------------------------------- files
def _header(
    kind: str,
    modules: dict[str, dict[str, int]],
    dtype: torch.dtype,
    metadata: Mapping[str, Any] | None,
    model: nn.Module | None,
) -> dict[str, str]:
    info = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "dtype": str(dtype).removeprefix("torch."),
        "modules": modules,
        "num_samples": max((m["num_samples"] for m in modules.values()), default=0),
        **dict(metadata or {}),
    }
    if model is not None:
        info["model"] = model_identity(model, list(modules))
    return {METADATA_KEY: json.dumps(info, default=json_default)}


def _write(
    tensors: dict[str, Tensor], path: str | os.PathLike, header: dict[str, str], *, check_finite: bool = True
) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for key, value in tensors.items():
        if check_finite and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"Refusing to write {key}: it contains NaN or Inf.")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


#: The reader of each kind of file, for error messages.
_LOADERS = {"factors": "load_factors", "eigen": "load_eigens", ACCUMULATOR_STATE: "load_accumulator_state"}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Header metadata of a factor or eigen file.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a file written by this package.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No factor file at {path}. Run `python -m lightning_curv collect` to create one.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a safetensors file ({err}).") from err
    if raw is None:
        raise ValueError(f"{path} has no '{METADATA_KEY}' header: it was not written by lightning_curv.")
    meta = json.loads(raw)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {meta['format_version']}, newer than this package understands "
            f"({FORMAT_VERSION}). Upgrade lightning_curv."
        )
    return meta


def _read(path: str | os.PathLike, kind: str, model: nn.Module | None) -> tuple[dict[str, Tensor], dict]:
    meta = read_metadata(path)
    if meta.get("kind") != kind:
        loader = _LOADERS.get(meta.get("kind"), "load_factors")
        raise ValueError(f"{path} holds {meta.get('kind')!r} data, not {kind!r}; read it with {loader}().")
    if model is not None:
        check_model(meta, model, path)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensors[key] = f.get_tensor(key)
    return tensors, meta


def save_factors(
    factors: Mapping[str, KFACFactors],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
) -> None:
    """Write factors to one safetensors file, atomically.

    Args:
        factors: Factors per module name.
        path: Destination (``.safetensors``).
        metadata: JSON-serializable facts to record (fisher type, seed, data, token budget, ...).
        model: The model the factors were collected on; its identity is recorded so that loading them for another
            model or checkpoint fails.
    """
    if not factors:
        raise ValueError("No factors to save.")
    tensors, modules = {}, {}
    for name, f in factors.items():
        tensors[f"{name}.{ACTIVATION_COVARIANCE}"] = f.A
        tensors[f"{name}.{GRADIENT_COVARIANCE}"] = f.G
        modules[name] = {"d_in": f.A.shape[0], "d_out": f.G.shape[0], "num_samples": int(f.num_samples)}
    dtype = next(iter(factors.values())).A.dtype
    _write(tensors, path, _header("factors", modules, dtype, metadata, model))


def load_factors(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, KFACFactors]:
    """Read a factor file.

    Args:
        path: File written by :func:`save_factors`.
        model: If given, the file must have been collected on this model and checkpoint.

    Returns:
        Factors per module name.

    Raises:
        ValueError: If the file does not belong to ``model`` or is not a factor file.
    """
    tensors, meta = _read(path, "factors", model)
    return {
        name: KFACFactors(
            A=tensors[f"{name}.{ACTIVATION_COVARIANCE}"],
            G=tensors[f"{name}.{GRADIENT_COVARIANCE}"],
            num_samples=info["num_samples"],
        )
        for name, info in meta["modules"].items()
    }


def save_eigens(
    eigens: Mapping[str, KFACEigen],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
) -> None:
    """Write eigendecompositions to one safetensors file, atomically (same header as factor files)."""
    if not eigens:
        raise ValueError("No eigendecompositions to save.")
    tensors, modules = {}, {}
    for name, e in eigens.items():
        tensors[f"{name}.{ACTIVATION_EIGENVALUES}"] = e.eigenvalues_A
        tensors[f"{name}.{ACTIVATION_EIGENVECTORS}"] = e.eigenvectors_A
        tensors[f"{name}.{GRADIENT_EIGENVALUES}"] = e.eigenvalues_G
        tensors[f"{name}.{GRADIENT_EIGENVECTORS}"] = e.eigenvectors_G
        d_out, d_in = e.shape
        modules[name] = {"d_in": d_in, "d_out": d_out, "num_samples": int(e.num_samples)}
    dtype = next(iter(eigens.values())).eigenvectors_A.dtype
    _write(tensors, path, _header("eigen", modules, dtype, metadata, model))


def load_eigens(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, KFACEigen]:
    """Read an eigen file written by :func:`save_eigens` (checked against ``model`` when given)."""
    tensors, meta = _read(path, "eigen", model)
    return {
        name: KFACEigen(
            eigenvalues_A=tensors[f"{name}.{ACTIVATION_EIGENVALUES}"],
            eigenvectors_A=tensors[f"{name}.{ACTIVATION_EIGENVECTORS}"],
            eigenvalues_G=tensors[f"{name}.{GRADIENT_EIGENVALUES}"],
            eigenvectors_G=tensors[f"{name}.{GRADIENT_EIGENVECTORS}"],
            num_samples=info["num_samples"],
        )
        for name, info in meta["modules"].items()
    }


def save_accumulator_state(
    path: str | os.PathLike, state: Mapping[str, Any], header: Mapping[str, Any] | None = None
) -> None:
    """Write the raw sums and counts of an unfinished collection to one safetensors file, atomically.

    Tensors are keyed ``<module>.activation_covariance`` / ``<module>.gradient_covariance`` as in a factor file,
    but hold unnormalized upper-triangle sums (see :meth:`KFACAccumulator.state_dict`); the counts and
    ``header`` go into the header metadata.

    Args:
        path: Destination (``.safetensors``).
        state: :meth:`KFACAccumulator.state_dict`: ``A_sums``/``G_sums`` (``[d, d]`` per module) and
            ``A_counts``/``G_counts``.
        header: JSON-serializable facts to keep with the sums (a fingerprint of the run, batches done, ...).
    """
    tensors = {f"{n}.{ACTIVATION_COVARIANCE}": t for n, t in state["A_sums"].items()}
    tensors.update({f"{n}.{GRADIENT_COVARIANCE}": t for n, t in state["G_sums"].items()})
    info = {
        **dict(header or {}),
        "kind": ACCUMULATOR_STATE,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "A_counts": dict(state["A_counts"]),
        "G_counts": dict(state["G_counts"]),
    }
    # Partial sums are written as they are; NaN/Inf is reported by KFACAccumulator.finalize with its cause.
    _write(tensors, path, {METADATA_KEY: json.dumps(info, default=json_default)}, check_finite=False)


def load_accumulator_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a file written by :func:`save_accumulator_state`.

    Returns:
        ``(state, header)``: the state for :meth:`KFACAccumulator.load_state_dict`, and the header metadata
        (the caller's ``header`` plus ``kind``, ``format_version``, ``package_version``).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not an accumulator state written by this package.
    """
    tensors, meta = _read(path, ACCUMULATOR_STATE, None)

    def sums(key: str) -> dict[str, Tensor]:
        return {k.removesuffix(f".{key}"): v for k, v in tensors.items() if k.endswith(f".{key}")}

    state = {
        "A_sums": sums(ACTIVATION_COVARIANCE),
        "G_sums": sums(GRADIENT_COVARIANCE),
        "A_counts": meta.pop("A_counts"),
        "G_counts": meta.pop("G_counts"),
    }
    return state, meta
