"""KFACCallback: collect K-FAC factors in a Trainer's predict loop (a thin adapter over ``curvature/``).

The pass needs autograd, so it runs in ``trainer.predict`` with ``inference_mode=False`` (``CurvTrainer.collect``
sets it), never in ``validation_step``. Lightning's predict loop does not wrap the model in DDP and shards data
with an unrepeated distributed sampler, so under DDP every example is counted exactly once: each rank
accumulates sums and counts over its shard, one all-reduce merges them, and rank 0 writes the factor file.

An interrupted collection resumes: every ``save_every_n_batches`` batches each rank writes its partial sums
beside the output, tagged with a fingerprint of the configuration, model weights and data; a restart with the
same run directory and configuration skips the batches already counted, and a partial file with any other
fingerprint is ignored (and replaced), so runs are never mixed. The file format is
:func:`~lightning_curv.curvature.save_accumulator_state`'s. Resuming goes through that file only: the
callback's ``state_dict`` reports the output path and counts, and there is no ``load_state_dict`` because a
predict pass writes no Lightning checkpoint to restore it from.

During the pass the callback is the module's ``curvature_collector``
(:class:`~lightning_curv.models.base.CurvatureCollector`): the module's ``predict_step`` hands each batch to
:meth:`KFACCallback.step`, which calls back the module's ``kfac_step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_curv.curvature import (
    KFACAccumulator,
    KFACFactors,
    load_accumulator_state,
    model_identity,
    save_accumulator_state,
    save_factors,
)
from lightning_curv.curvature.constants import FISHER_TYPES
from lightning_curv.utils import json_digest

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class KFACCallback(Callback):
    """Accumulate K-FAC statistics of selected linear layers over a predict pass and write a factor file.

    Args:
        modules: Layer names, globs or ``re:`` regexes; None uses the module's ``curvature_modules()``.
        fisher: ``"true"`` (targets sampled from the model, seeded per example) or ``"empirical"``.
        seed: Seed of the true-Fisher targets.
        max_tokens: Sample budget (tokens for LMs, images for ViTs) over all devices; each rank counts at most
            ``ceil(max_tokens / world_size)`` of its shard. None: the whole pass.
        mode: ``"tokens"`` (every valid position) or ``"cls"`` (the class token only); None: the module's default.
        dtype: Accumulation dtype.
        output: Factor file; a relative path is placed in ``trainer.default_root_dir``.
        save_every_n_batches: Write resumable partial sums this often (0: never).
        metadata: Extra JSON-serializable facts recorded in the file header.
    """

    def __init__(
        self,
        modules: Sequence[str] | str | None = None,
        fisher: Literal["true", "empirical"] = "true",
        seed: int = 0,
        max_tokens: int | None = None,
        mode: Literal["tokens", "cls"] | None = None,
        dtype: Literal["float32", "float64"] = "float32",
        output: str = "factors.safetensors",
        save_every_n_batches: int = 100,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}.")
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive or None, got {max_tokens}.")
        self.modules = modules
        self.fisher, self.seed, self.max_tokens, self.mode = fisher, seed, max_tokens, mode
        self.dtype = dtype
        self.output = output
        self.save_every_n_batches = save_every_n_batches
        self.metadata = dict(metadata or {})
        self.accumulator: KFACAccumulator | None = None
        self.factors: dict[str, KFACFactors] | None = None
        self.output_path: Path | None = None
        self.batches_done = 0
        self._skip = 0
        self._budget: int | None = None
        self._fingerprint = ""
        self._partial: Path | None = None

    # ------------------------------------------------------------------ hooks
    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        patterns = self.modules or pl_module.curvature_modules()
        self.accumulator = KFACAccumulator(pl_module.model, patterns, dtype=_DTYPES[self.dtype])
        world = trainer.world_size
        self._budget = None if self.max_tokens is None else -(-self.max_tokens // world)
        self.output_path = self._resolve(trainer, self.output)
        self._partial = self.output_path.with_name(
            f"{self.output_path.stem}.partial-rank{trainer.global_rank}.safetensors"
        )
        self._fingerprint = self._make_fingerprint(trainer, pl_module)
        self._skip = self.batches_done = self._resume()
        self.accumulator.attach()
        pl_module.curvature_collector = self

    def step(self, pl_module: pl.LightningModule, batch: Mapping[str, Tensor], batch_idx: int) -> int:
        """Count one batch (called from the module's ``predict_step``); returns the samples counted."""
        acc = self.accumulator
        if batch_idx < self._skip:
            return 0  # already in the resumed partial sums
        remaining = None if self._budget is None else self._budget - acc.num_samples
        n = 0
        if remaining is None or remaining > 0:
            n = pl_module.kfac_step(
                batch, acc, fisher=self.fisher, seed=self.seed, max_samples=remaining, mode=self.mode
            )
        self.batches_done = batch_idx + 1
        if self.save_every_n_batches and self.batches_done % self.save_every_n_batches == 0:
            self._save_partial()
        return n

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(pl_module)
        self.accumulator.all_reduce()
        self.factors = self.accumulator.finalize()
        if trainer.is_global_zero:
            save_factors(self.factors, self.output_path, self._file_metadata(trainer), model=pl_module.model)
            n = next(iter(self.factors.values())).num_samples
            rank_zero_info(f"K-FAC factors of {len(self.factors)} modules over {n} samples -> {self.output_path}")
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
        trainer.strategy.barrier("kfac_written")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output_path) if self.output_path else None,
            "num_samples": self.accumulator.num_samples if self.accumulator else 0,
            "batches_done": self.batches_done,
        }

    # ------------------------------------------------------------------ helpers
    def _release(self, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "curvature_collector", None) is self:
            pl_module.curvature_collector = None
        if self.accumulator is not None:
            self.accumulator.detach()

    @staticmethod
    def _resolve(trainer: pl.Trainer, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(trainer.default_root_dir) / p

    def _file_metadata(self, trainer: pl.Trainer) -> dict[str, Any]:
        return {
            "fisher": self.fisher,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "mode": self.mode or "default",
            "accumulation_dtype": self.dtype,
            "world_size": trainer.world_size,
            **self.metadata,
        }

    def _make_fingerprint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        facts = {
            "modules": self.accumulator.names,
            "fisher": self.fisher,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "mode": self.mode,
            "dtype": self.dtype,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "num_batches": len(loader) if loader is not None and hasattr(loader, "__len__") else None,
            "batch_size": getattr(loader, "batch_size", None),
            "model": model_identity(pl_module.model, self.accumulator.names),
        }
        return json_digest(facts)

    def _save_partial(self) -> None:
        header = {"fingerprint": self._fingerprint, "batches_done": self.batches_done}
        save_accumulator_state(self._partial, self.accumulator.state_dict(), header)

    def _resume(self) -> int:
        if self._partial is None or not self._partial.exists():
            return 0
        try:
            state, header = load_accumulator_state(self._partial)
        except ValueError as err:
            rank_zero_info(f"Ignoring {self._partial}: not a partial collection of this package ({err}).")
            return 0
        if header.get("fingerprint") != self._fingerprint:
            rank_zero_info(f"Ignoring {self._partial}: it belongs to a different configuration, model or data.")
            return 0
        self.accumulator.load_state_dict(state)
        done = int(header["batches_done"])
        rank_zero_info(f"Resuming the curvature pass after {done} batches from {self._partial}.")
        return done
