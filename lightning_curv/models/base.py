"""What every lightning_curv LightningModule shares: the curvature hook-in and the evaluation-set dispatch.

A module owns its backbone as ``self.model`` (built in ``configure_model``). During a curvature collection a
collector (any :class:`CurvatureCollector`; the package's is ``lightning_curv.callbacks.KFACCallback``) sets
``self.curvature_collector`` and the Trainer's predict loop (run with ``inference_mode=False``) calls
:meth:`CurvatureModule.predict_step`, which hands the batch to the collector; the module only says how one batch
becomes a K-FAC step (:meth:`CurvatureModule.kfac_step`). Models know collectors only through that protocol,
so nothing here imports the callbacks.

Evaluation batches come from the loaders the data module lists in ``eval_sets`` (see
:mod:`lightning_curv.data.base`); each set gets its own torchmetrics objects and logs under
``<stage>/<group>/<name>``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_curv.curvature import KFACAccumulator
from lightning_curv.data.base import EvalSet

KFACMode = Literal["tokens", "cls"]


class CurvatureCollector(Protocol):
    """What :meth:`CurvatureModule.predict_step` hands batches to while a curvature pass runs."""

    def step(self, pl_module: CurvatureModule, batch: Mapping[str, Tensor], batch_idx: int) -> int:
        """Count one batch (typically through ``pl_module.kfac_step``); return the samples counted."""
        ...


class CurvatureModule(pl.LightningModule):
    """Base class of the lightning_curv LightningModules (see the module docstring)."""

    #: Patterns of the layers a curvature pass tracks when the config names none.
    default_curvature_modules: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None
        self.curvature_collector: CurvatureCollector | None = None
        self.eval_metrics = nn.ModuleDict()
        self._eval_sets: list[EvalSet] = []
        # An evaluation set of fewer batches than processes leaves some ranks without a batch of it (evaluation
        # shards whole batches, unpadded); their metric states stay empty and the sum over ranks is exact.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    @override
    def _apply(self, fn: Any, recurse: bool = True) -> CurvatureModule:
        """Move the module as asked, but keep every metric state in its own dtype.

        ``bf16-true`` precision converts the whole module with ``module.to(torch.bfloat16)``, which torchmetrics
        applies to metric states too: a float64 perplexity or nDCG sum would be summed in bfloat16. Devices still
        follow the module.
        """
        metrics = [m for m in self.modules() if isinstance(m, Metric)]
        dtypes = [{k: v.dtype for k, v in m._defaults.items() if isinstance(v, Tensor)} for m in metrics]
        super()._apply(fn, recurse)
        for metric, kept in zip(metrics, dtypes, strict=True):
            for name, dtype in kept.items():
                state = getattr(metric, name)
                if state.dtype != dtype:
                    setattr(metric, name, state.to(dtype))
                    metric._defaults[name] = metric._defaults[name].to(dtype)
        return self

    # ------------------------------------------------------------------ curvature
    @abstractmethod
    def kfac_step(
        self,
        batch: Mapping[str, Tensor],
        accumulator: KFACAccumulator,
        *,
        fisher: str,
        seed: int,
        max_samples: int | None,
        mode: KFACMode | None,
    ) -> int:
        """Run one forward/backward of the curvature pass on ``batch``; return the number of samples counted."""

    def curvature_modules(self) -> list[str]:
        """Default layer patterns for this backbone."""
        return list(self.default_curvature_modules)

    @override
    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        """A curvature step while a collector is set; otherwise the backbone's forward."""
        if self.curvature_collector is not None:
            return self.curvature_collector.step(self, batch, batch_idx)
        return self(batch)

    # ------------------------------------------------------------------ evaluation
    @property
    def eval_sets(self) -> list[EvalSet]:
        """The evaluation sets of the attached data module (empty without one)."""
        return self._eval_sets

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        sets = list(getattr(datamodule, "eval_sets", []) or [])
        if [s.name for s in sets] != [s.name for s in self._eval_sets]:
            self._eval_sets = sets
            self.eval_metrics = nn.ModuleDict({s.name: self.make_metrics(s) for s in sets})
        self.check_data(datamodule)

    def check_data(self, datamodule: pl.LightningDataModule | None) -> None:  # noqa: B027 - optional hook
        """Raise a clear error if the data does not fit the model (e.g. vocabulary sizes)."""

    @abstractmethod
    def make_metrics(self, eval_set: EvalSet) -> nn.ModuleDict:
        """Metrics that one evaluation set feeds."""

    @abstractmethod
    def evaluate_batch(
        self, eval_set: EvalSet, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int
    ) -> None:
        """Update ``self.eval_metrics[eval_set.name]`` with one batch."""

    @abstractmethod
    def compute_metrics(self, eval_set: EvalSet) -> dict[str, Tensor]:
        """Stage-less metric keys (``group/name``) and values of one evaluation set."""

    def _eval_set(self, dataloader_idx: int) -> EvalSet:
        if not self._eval_sets:
            raise RuntimeError(
                "Evaluation needs a data module with `eval_sets` (see lightning_curv.data.base); pass datamodule= "
                "to trainer.validate()."
            )
        return self._eval_sets[dataloader_idx]

    @override
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate_batch(self._eval_set(dataloader_idx), batch, batch_idx, dataloader_idx)

    @override
    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate_batch(self._eval_set(dataloader_idx), batch, batch_idx, dataloader_idx)

    def _log_eval(self, stage: str) -> None:
        logged: dict[str, Tensor] = {}
        for eval_set in self._eval_sets:
            for key, value in self.compute_metrics(eval_set).items():
                if key in logged:
                    raise ValueError(f"Two evaluation sets both log {key!r}; give them different kinds or splits.")
                logged[key] = value
            for metric in self.eval_metrics[eval_set.name].values():
                metric.reset()
        for key, value in logged.items():
            # float64 where the metric computes in float64 (Lightning keeps it), so metrics.json gets every digit
            value = value.double() if value.device.type != "mps" else value.float()
            self.log(f"{stage}/{key}", value, add_dataloader_idx=False, sync_dist=False)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ------------------------------------------------------------------ export
    @abstractmethod
    def export(self, path: str) -> None:
        """Save the backbone in its library's own format (``save_pretrained`` for transformers)."""


def stage_metrics(callback_metrics: Mapping[str, Tensor], stage: str = "val") -> dict[str, float]:
    """``{group/name: value}`` from a Trainer's ``callback_metrics`` for one stage prefix."""
    prefix = f"{stage}/"
    return {
        k[len(prefix) :]: float(v.item() if isinstance(v, Tensor) else v)
        for k, v in sorted(callback_metrics.items())
        if k.startswith(prefix)
    }
