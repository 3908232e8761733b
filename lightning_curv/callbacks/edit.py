"""EditCallback: evaluate a model with its weights projected onto the high-curvature K-FAC pairs.

A thin adapter over :func:`lightning_curv.curvature.apply_edit` for users who evaluate with their own
``Trainer``: it applies the edit at the start of every validation/test run and undoes it at the end. The
``edit`` command does not need it (its sweep wraps each evaluation in ``with apply_edit(...)``); eigenbases come
from :func:`lightning_curv.curvature.cache.prepare_eigens`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_curv.curvature import EditHandle, KFACEigen, apply_edit
from lightning_curv.curvature.cache import prepare_eigens, select_modules
from lightning_curv.curvature.edit import Rho


class EditCallback(Callback):
    """Apply the curvature edit around validation and test runs.

    Args:
        rho: ρ (or ``{module pattern: ρ}``) to apply.
        factors: Factor file written by ``collect`` (eigendecomposed on first use, see ``prepare_eigens``).
        eigens: Eigenbases in memory instead of a factor file.
        modules: Patterns selecting which modules to edit; None edits all of them.
        eigen_cache: Where to keep the eigendecomposition of ``factors``; default beside the factor file.
    """

    def __init__(
        self,
        rho: Rho,
        factors: str | None = None,
        eigens: Mapping[str, KFACEigen] | None = None,
        modules: Sequence[str] | None = None,
        eigen_cache: str | None = None,
    ) -> None:
        if (factors is None) == (eigens is None):
            raise ValueError("EditCallback needs exactly one of `factors` (a factor file) or `eigens`.")
        self.rho = rho
        self.factors = factors
        self.eigens = dict(eigens) if eigens is not None else None
        self.modules = list(modules) if modules else None
        self.eigen_cache = eigen_cache
        self.handle: EditHandle | None = None
        self._masks: dict[tuple[str, float], Tensor] = {}
        self._selected: dict[str, KFACEigen] | None = None

    def _eigens(self, model: Any) -> dict[str, KFACEigen]:
        if self._selected is None:
            if self.eigens is not None:
                self._selected = select_modules(model, self.eigens, self.modules)
            else:
                self._selected = prepare_eigens(model, self.factors, modules=self.modules, cache=self.eigen_cache)
        return self._selected

    def _start(self, pl_module: pl.LightningModule) -> None:
        self.handle = apply_edit(pl_module.model, self._eigens(pl_module.model), self.rho, masks=self._masks)

    def _end(self) -> None:
        if self.handle is not None:
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
        return {"factors": self.factors, "rho": self.rho, "modules": self.modules}
