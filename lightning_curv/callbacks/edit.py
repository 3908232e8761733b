"""EditCallback: evaluate a model with its weights projected onto the high-curvature K-FAC pairs.

A thin adapter over :func:`lightning_curv.curvature.apply_edit`: it loads a factor file (checked against the
model), eigendecomposes once (or reads the cached eigenbases), and while ``rho`` is set, applies the edit at the
start of every validation/test run and undoes it at the end. Setting ``rho`` between runs sweeps values over the
same eigenbases.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_curv.curvature import (
    EditHandle,
    KFACEigen,
    KFACFactors,
    apply_edit,
    check_model,
    eigendecompose,
    load_eigens,
    load_factors,
    read_metadata,
    resolve_modules,
    save_eigens,
)
from lightning_curv.curvature.edit import Rho
from lightning_curv.curvature.modules import match_names


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EditCallback(Callback):
    """Apply the curvature edit around validation and test runs.

    Args:
        factors: Factor file written by ``collect`` (or set :attr:`factors` in code to use factors in memory).
        rho: ρ (or ``{module pattern: ρ}``) to apply; None evaluates the unedited model.
        modules: Patterns selecting which of the file's modules to edit; None edits all of them.
        eigen_cache: Where to keep the eigendecomposition; default ``<factors>.eigen.safetensors``. Reused when it
            was computed from the same factor file.
        undo: Restore the original weights after each run (False keeps the edit in place).
    """

    def __init__(
        self,
        factors: str | None = None,
        rho: Rho | None = None,
        modules: Sequence[str] | None = None,
        eigen_cache: str | None = None,
        undo: bool = True,
    ) -> None:
        self.factors_path = factors
        self.factors: dict[str, KFACFactors] | None = None
        self.rho = rho
        self.modules = list(modules) if modules else None
        self.eigen_cache = eigen_cache
        self.undo = undo
        self.eigens: dict[str, KFACEigen] | None = None
        self.handle: EditHandle | None = None
        self._masks: dict[tuple[str, float], Tensor] = {}

    # ------------------------------------------------------------------ preparation
    def prepare(self, model: Any) -> dict[str, KFACEigen]:
        """Load and check the factors against ``model`` (unedited), eigendecompose them once, return eigenbases."""
        if self.eigens is not None:
            return self.eigens
        if self.factors is None and self.factors_path is None:
            raise ValueError("EditCallback needs `factors`: the factor file written by `collect`.")
        cache = self._cache_path()
        digest = file_digest(self.factors_path) if self.factors_path else None
        if (
            cache is not None
            and digest is not None
            and cache.exists()
            and read_metadata(cache).get("source_sha256") == digest
        ):
            eigens = load_eigens(cache, model=model)
            rank_zero_info(f"Loaded cached eigenbases from {cache}")
        else:
            factors = self.factors if self.factors is not None else load_factors(self.factors_path, model=model)
            if self.factors is not None:
                check_model({"modules": {n: _shape_info(f) for n, f in factors.items()}}, model)
            eigens = {name: eigendecompose(f) for name, f in factors.items()}
            if cache is not None and digest is not None:
                save_eigens(eigens, cache, {"source": str(self.factors_path), "source_sha256": digest}, model=model)
        if self.modules:
            unknown = [p for p, hits in match_names(self.modules, list(eigens)).items() if not hits]
            if unknown:
                raise ValueError(
                    f"Edit modules {unknown} match none of the modules in the factor file: {list(eigens)}. Edit a "
                    "subset of the collected modules, or collect factors for these."
                )
            keep = set(resolve_modules(model, self.modules))
            eigens = {n: e for n, e in eigens.items() if n in keep}
        self.eigens = eigens
        return eigens

    def _cache_path(self) -> Path | None:
        if self.eigen_cache:
            return Path(self.eigen_cache)
        if self.factors_path:
            p = Path(self.factors_path)
            return p.with_name(p.name.removesuffix(".safetensors") + ".eigen.safetensors")
        return None

    # ------------------------------------------------------------------ edit around evaluation
    def edit(self, model: Any, rho: Rho) -> EditHandle:
        """Apply the edit for ``rho`` to ``model`` now and return its handle."""
        return apply_edit(model, self.prepare(model), rho, masks=self._masks)

    def _start(self, pl_module: pl.LightningModule) -> None:
        if self.rho is None:
            return
        self.handle = self.edit(pl_module.model, self.rho)

    def _end(self) -> None:
        if self.handle is not None and self.undo:
            self.handle.undo()
            self.handle = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"factors": self.factors_path, "rho": self.rho, "modules": self.modules}


def _shape_info(f: KFACFactors) -> Mapping[str, int]:
    return {"d_in": f.A.shape[0], "d_out": f.G.shape[0], "num_samples": f.num_samples}
