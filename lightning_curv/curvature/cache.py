"""Eigenbases for an edit, read from a factor file and cached in an eigen file.

Eigendecomposition is the expensive step of an edit; :func:`prepare_eigens` does it once per job (split across
the processes of a distributed job, on their accelerators: :func:`~lightning_curv.curvature.eigendecompose_all`)
and keeps the result in an eigen file tagged with the SHA-256 of the factor file it came from, so a later edit of
the same factors (another ρ sweep, ``compare``, ``analyze``) reads it back instead. Rank 0 alone writes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_curv.curvature.eigen import KFACEigen, eigendecompose_all
from lightning_curv.curvature.io import load_eigens, load_factors, read_metadata, save_eigens
from lightning_curv.curvature.modules import match_names, resolve_modules
from lightning_curv.utils import file_digest

log = logging.getLogger(__name__)


def default_eigen_cache(factors: str | os.PathLike) -> Path:
    """``<factors stem>.eigen.safetensors`` beside the factor file."""
    p = Path(factors)
    return p.with_name(p.name.removesuffix(".safetensors") + ".eigen.safetensors")


def prepare_eigens(
    model: nn.Module,
    factors: str | os.PathLike,
    *,
    modules: Sequence[str] | None = None,
    cache: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> dict[str, KFACEigen]:
    """Load a factor file (checked against ``model``), eigendecompose it once, and select the modules to edit.

    Args:
        model: The unedited model the factors were collected on.
        factors: Factor file written by ``collect``.
        modules: Patterns selecting which of the file's modules to edit; None keeps all of them.
        cache: Eigen file to reuse or write; default :func:`default_eigen_cache`. Reused only when it was
            computed from a factor file with the same bytes.
        device: Where the eigendecompositions run (the accelerator of this process); None: on CPU.

    Returns:
        Eigenbases per module name.

    Raises:
        ValueError: If the factors belong to another model, or a pattern matches none of the file's modules.
    """
    cache = Path(cache) if cache is not None else default_eigen_cache(factors)
    digest = file_digest(factors)
    if cache.exists() and read_metadata(cache).get("source_sha256") == digest:
        eigens = load_eigens(cache, model=model)
        log.info(f"Loaded cached eigenbases from {cache}")
    else:
        eigens = eigendecompose_all(load_factors(factors, model=model), device=device)
        if _rank() == 0:
            save_eigens(eigens, cache, {"source": str(factors), "source_sha256": digest}, model=model)
    return select_modules(model, eigens, modules)


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def select_modules(
    model: nn.Module, eigens: dict[str, KFACEigen], modules: Sequence[str] | None
) -> dict[str, KFACEigen]:
    """The eigenbases of the modules that ``modules`` (patterns) name; all of them when None.

    Raises:
        ValueError: If a pattern matches none of the modules that have eigenbases.
    """
    if not modules:
        return eigens
    unknown = [p for p, hits in match_names(list(modules), list(eigens)).items() if not hits]
    if unknown:
        raise ValueError(
            f"Edit modules {unknown} match none of the modules in the factor file: {list(eigens)}. Edit a "
            "subset of the collected modules, or collect factors for these."
        )
    keep = set(resolve_modules(model, list(modules)))
    return {n: e for n, e in eigens.items() if n in keep}
