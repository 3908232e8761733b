"""KFACCallback: collect K-FAC factors in a Trainer's predict loop (a thin adapter over ``curvature/``).

The pass needs autograd, so it runs in ``trainer.predict`` with ``inference_mode=False`` (``CurvTrainer.collect``
sets it), never in ``validation_step``. Lightning's predict loop does not wrap the model in DDP and shards data
with an unrepeated distributed sampler, so under DDP every example is counted exactly once: each rank
accumulates sums and counts over its shard, one all-reduce merges them, and rank 0 writes the factor file.

The sample budget ``max_tokens`` is a global prefix of the data in dataset order (rows in order, positions in
order within a row), the same samples whatever the number of devices or the batch size: in ``setup`` the callback
asks the data module (its ``limit_collection(max_samples, samples_per_row)``, see
:class:`~lightning_curv.data.lm.LMRowsDataModule`) to serve only the rows of that prefix, the last row cut to the
exact count, so every rank stops after its share and no batch past the budget is read. Without such a data
module the budget is applied to the batches in order, which is a global prefix on one process only (several
processes then raise).

An interrupted collection resumes: every ``save_every_minutes`` each rank writes its partial sums beside the
output (never once its share is done), tagged with a fingerprint of the configuration, model weights and data; a
restart with the same run directory and configuration skips the batches already counted, and a partial file with
any other fingerprint is ignored (and replaced), so runs are never mixed. The file format is
:func:`~lightning_curv.curvature.save_accumulator_state`'s. Resuming goes through that file only: the
callback's ``state_dict`` reports the output path and counts, and there is no ``load_state_dict`` because a
predict pass writes no Lightning checkpoint to restore it from.

Progress goes to ``trainer.loggers`` (``log_metrics``; a predict loop cannot ``self.log``) every
``log_every_n_batches`` batches or ``log_every_seconds``: ``collect/kfac/samples`` (this rank's count),
``collect/kfac/tokens_per_second`` (samples per second of this rank) and ``collect/kfac/peak_memory_bytes``
(:func:`peak_memory_bytes`). After the pass :attr:`KFACCallback.summary` holds the global throughput and the
peak memory over ranks.

During the pass the callback is the module's ``curvature_collector``
(:class:`~lightning_curv.models.base.CurvatureCollector`): the module's ``predict_step`` hands each batch to
:meth:`KFACCallback.step`, which calls back the module's ``kfac_step``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation
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


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA memory allocated on ``device``, else the maximum resident set size.

    Args:
        device: The device the pass runs on.

    Returns:
        Bytes (0 where the platform reports nothing).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


def _all_reduce(value: float, op: dist.ReduceOp) -> float:
    """``value`` reduced over the processes of ``torch.distributed`` (itself when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op)
    return float(t.item())


class KFACCallback(Callback):
    """Accumulate K-FAC statistics of selected linear layers over a predict pass and write a factor file.

    Args:
        modules: Layer names, globs or ``re:`` regexes; None uses the module's ``curvature_modules()``.
        fisher: ``"true"`` (targets sampled from the model, seeded per example) or ``"empirical"``.
        seed: Seed of the true-Fisher targets.
        max_tokens: Sample budget (tokens for LMs, images for ViTs): the first ``max_tokens`` samples of the data
            in dataset order, over all devices (see the module docstring). None: the whole pass.
        mode: ``"tokens"`` (every valid position) or ``"cls"`` (the class token only); None: the module's default.
        dtype: Accumulation dtype.
        output: Factor file; a relative path is placed in ``trainer.default_root_dir``.
        save_every_minutes: Write resumable partial sums this often (0: never).
        save_every_n_batches: Deprecated (use ``save_every_minutes``): also write them every this many batches.
        log_every_n_batches: Log progress every this many batches; None: the Trainer's ``log_every_n_steps``.
        log_every_seconds: Also log progress when this long has passed since the last log.
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
        save_every_minutes: float = 30.0,
        save_every_n_batches: int | None = None,
        log_every_n_batches: int | None = None,
        log_every_seconds: float = 60.0,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}.")
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive or None, got {max_tokens}.")
        if save_every_minutes < 0:
            raise ValueError(f"save_every_minutes must be >= 0 (0: never), got {save_every_minutes}.")
        if save_every_n_batches is not None:
            rank_zero_deprecation(
                "collect.save_every_n_batches is deprecated: partial sums are saved by time, "
                "collect.save_every_minutes (it still saves every n batches too)."
            )
        self.modules = modules
        self.fisher, self.seed, self.max_tokens, self.mode = fisher, seed, max_tokens, mode
        self.dtype = dtype
        self.output = output
        self.save_every_minutes = save_every_minutes
        self.save_every_n_batches = save_every_n_batches or 0
        self.log_every_n_batches, self.log_every_seconds = log_every_n_batches, log_every_seconds
        self.metadata = dict(metadata or {})
        self.accumulator: KFACAccumulator | None = None
        self.factors: dict[str, KFACFactors] | None = None
        self.output_path: Path | None = None
        #: After the pass: ``seconds``, ``tokens_per_second`` (samples counted in this run over all ranks, per
        #: second) and ``peak_memory_bytes`` (the largest over ranks).
        self.summary: dict[str, float] = {}
        self.batches_done = 0
        self._skip = 0
        self._budget: int | None = None
        self._data_limited = False
        self._num_batches: float = float("inf")
        self._fingerprint = ""
        self._partial: Path | None = None
        self._start = self._last_save = self._last_log = 0.0
        self._last_log_batch = -1
        self._resumed_samples = 0

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        limit = getattr(trainer.datamodule, "limit_collection", None)
        self._data_limited = callable(limit)
        if self._data_limited:
            limit(self.max_tokens, lambda: self._samples_per_row(pl_module))

    def _samples_per_row(self, pl_module: pl.LightningModule) -> int:
        """Samples of one image in this pass: its token count in a ViT's token mode, else 1."""
        tokens = getattr(pl_module, "tokens_per_image", None)
        return int(tokens()) if self.mode == "tokens" and callable(tokens) else 1

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.max_tokens is not None and trainer.world_size > 1 and not self._data_limited:
            raise ValueError(
                f"collect.max_tokens over {trainer.world_size} processes needs a data module with "
                "`limit_collection` (the lightning_curv data modules have it) so that every process reads only its "
                "rows of the global prefix; pass datamodule= to predict, or collect without a budget."
            )
        patterns = self.modules or pl_module.curvature_modules()
        self.accumulator = KFACAccumulator(pl_module.model, patterns, dtype=_DTYPES[self.dtype])
        # One process: the budget also trims the batches (a no-op when the data module already cut the prefix).
        # Several: the data module served each rank its rows of the prefix, cut to the exact count.
        self._budget = self.max_tokens if trainer.world_size == 1 else None
        self._num_batches = sum(trainer.num_predict_batches)
        self.output_path = self._resolve(trainer, self.output)
        self._partial = self.output_path.with_name(
            f"{self.output_path.stem}.partial-rank{trainer.global_rank}.safetensors"
        )
        self._check_weights_finite()
        self._fingerprint = self._make_fingerprint(trainer, pl_module)
        self._skip = self.batches_done = self._resume()
        self._resumed_samples = self.accumulator.num_samples
        self._start = self._last_save = self._last_log = time.monotonic()
        self._last_log_batch = self._skip - 1
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
        if n:
            self._check_sums_finite(batch_idx)
        self.batches_done = batch_idx + 1
        if self._should_save():
            self._save_partial()
        return n

    def _check_weights_finite(self) -> None:
        """Fail before the pass when a tracked module's weights hold NaN/Inf (a diverged or damaged checkpoint)."""
        params = [(f"{name}.{p_name}", p) for name, m in self.accumulator.modules.items()
                  for p_name, p in m.named_parameters(recurse=False)]  # fmt: skip
        if not params:
            return
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params])
        if not bool(finite.all()):  # one device sync
            bad = [name for (name, _), ok in zip(params, finite.tolist(), strict=True) if not ok]
            raise ValueError(
                f"Non-finite values (NaN/Inf) in the weights of {', '.join(bad)}: the checkpoint is diverged or "
                "damaged; collect the curvature of a finite model."
            )

    def _check_sums_finite(self, batch_idx: int) -> None:
        """Fail at the first batch whose statistics (activations or loss gradients) bring NaN/Inf into the sums."""
        acc = self.accumulator
        sums = [(f"{name} ({kind})", t) for kind, store in (("A", acc._A_sums), ("G", acc._G_sums))
                for name, t in store.items()]  # fmt: skip
        if not sums:
            return
        finite = torch.stack([torch.isfinite(t).all() for _, t in sums])
        if not bool(finite.all()):  # one device sync per batch
            bad = [name for (name, _), ok in zip(sums, finite.tolist(), strict=True) if not ok]
            raise ValueError(
                f"Non-finite values (NaN/Inf) in the K-FAC statistics of {', '.join(bad)} at batch {batch_idx}: "
                "the batch's activations or loss are not finite (A: layer inputs, G: output gradients)."
            )

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        every = self.log_every_n_batches or trainer.log_every_n_steps
        now = time.monotonic()
        first, last = self._last_log_batch < self._skip, batch_idx + 1 >= self._num_batches
        due = batch_idx - self._last_log_batch >= every or now - self._last_log >= self.log_every_seconds
        if batch_idx < self._skip or not (first or due or last) or not trainer.loggers:
            return
        self._last_log, self._last_log_batch = now, batch_idx
        samples = self.accumulator.num_samples
        metrics = {
            "collect/kfac/samples": float(samples),
            "collect/kfac/tokens_per_second": (samples - self._resumed_samples) / max(now - self._start, 1e-9),
            "collect/kfac/peak_memory_bytes": float(peak_memory_bytes(pl_module.device)),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=batch_idx)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(pl_module)
        self.summary = self._summarize(pl_module.device)  # collective, before the factors' all-reduce
        self.accumulator.all_reduce()
        self.factors = self.accumulator.finalize()
        if trainer.is_global_zero:
            save_factors(self.factors, self.output_path, self._file_metadata(trainer), model=pl_module.model)
            n = next(iter(self.factors.values())).num_samples
            rank_zero_info(
                f"K-FAC factors of {len(self.factors)} modules over {n} samples -> {self.output_path} "
                f"({self.summary['tokens_per_second']:.1f} samples/s, peak memory "
                f"{self.summary['peak_memory_bytes'] / 2**30:.2f} GiB)"
            )
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
        trainer.strategy.barrier("kfac_written")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(pl_module)
        if self._data_limited:
            trainer.datamodule.limit_collection(None)  # later predict passes read the whole data again
            self._data_limited = False

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

    def _summarize(self, device: torch.device) -> dict[str, float]:
        """Seconds, global samples per second of this run and peak memory over ranks (every rank calls it)."""
        counted = _all_reduce(float(self.accumulator.num_samples - self._resumed_samples), dist.ReduceOp.SUM)
        peak = _all_reduce(float(peak_memory_bytes(device)), dist.ReduceOp.MAX)
        seconds = time.monotonic() - self._start
        return {
            "seconds": round(seconds, 3),
            "tokens_per_second": round(counted / max(seconds, 1e-9), 3),
            "peak_memory_bytes": int(peak),
        }

    def _should_save(self) -> bool:
        """Partial sums are due (by time or, deprecated, batch count) and this rank's share is not done yet."""
        done = self.batches_done >= self._num_batches or (
            self._budget is not None and self.accumulator.num_samples >= self._budget
        )
        if done:
            return False
        by_batches = self.save_every_n_batches and self.batches_done % self.save_every_n_batches == 0
        by_time = self.save_every_minutes and time.monotonic() - self._last_save >= 60 * self.save_every_minutes
        return bool(by_batches or by_time)

    def _save_partial(self) -> None:
        header = {"fingerprint": self._fingerprint, "batches_done": self.batches_done}
        save_accumulator_state(self._partial, self.accumulator.state_dict(), header)
        self._last_save = time.monotonic()

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
