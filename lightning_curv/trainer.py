"""CurvTrainer: a Lightning ``Trainer`` with one short method per subcommand of the curvature workflow.

Each method attaches what it needs (a :class:`~lightning_curv.callbacks.KFACCallback`, an edit context) and calls
``validate``/``predict``; the sweep, the selection, the comparison and the reporting live in
:mod:`lightning_curv.workflow`, the maths in :mod:`lightning_curv.curvature`. The run directory is the Trainer's
``default_root_dir``; every method writes its ``metrics.json`` there (rank 0).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_curv.analysis import memorization_labels
from lightning_curv.analysis.report import analyze_model
from lightning_curv.callbacks.kfac import KFACCallback
from lightning_curv.curvature import read_metadata
from lightning_curv.curvature.cache import prepare_eigens
from lightning_curv.models.base import stage_metrics
from lightning_curv.utils import atomic_path
from lightning_curv.workflow.compare import CompareOptions, compare_methods
from lightning_curv.workflow.options import AnalyzeOptions, CollectOptions, EditOptions
from lightning_curv.workflow.plan import PlanOptions, format_plan, plan_collection
from lightning_curv.workflow.reporting import report_analysis, report_sweep, write_metrics
from lightning_curv.workflow.sweep import RhoSweep, choose

_CKPT_HINT = "Pass a checkpoint written by `fit` (runs/.../checkpoints/*.ckpt)."


def require_file(path: str | None, what: str, hint: str) -> None:
    """Raise ``FileNotFoundError`` naming ``what`` and a hint when ``path`` is given but missing."""
    if path is not None and path not in ("last", "best", "hpc", "registry") and not Path(path).exists():
        raise FileNotFoundError(f"No {what} at {path}. {hint}")


def _require_factors(factors: str | None, command: str) -> str:
    if factors is None:
        raise ValueError(f"`{command}` needs --factors: the factor file written by `collect` for this checkpoint.")
    read_metadata(factors)  # fails early on a missing or foreign file
    return factors


def _describe(obj: Any) -> dict[str, Any]:
    hparams = getattr(obj, "hparams", None)
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "hparams": dict(hparams) if hparams else {}}


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose checkpoints are whole or absent (``final.ckpt``, ``edited.ckpt``, callbacks').

    Lightning's writer serializes to memory and writes the bytes straight to the final name, so a full disk or a
    kill half-way leaves a truncated ``.ckpt``. This one writes through :func:`~lightning_curv.utils.atomic_path`
    (temporary file beside the target, fsync, rename) and names the file in the error.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):  # remote file systems (s3://...) keep Lightning's writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            with atomic_path(path) as tmp:
                super().save_checkpoint(checkpoint, tmp, storage_options)
        except OSError as err:
            raise OSError(
                err.errno, f"Could not write the checkpoint {os.fspath(path)}: {err.strerror or err}"
            ) from err


def install_atomic_checkpoint_io(trainer: Trainer) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` unless a custom ``CheckpointIO`` was configured."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class CurvTrainer(Trainer):
    """A Lightning ``Trainer`` with the curvature workflow as methods (each one a CLI subcommand)."""

    #: Summary of the last :meth:`collect` (factor path, modules, sample count, time).
    collect_summary: dict[str, Any] | None = None

    @override
    def save_checkpoint(
        self, filepath: Any, weights_only: bool | None = None, storage_options: Any | None = None
    ) -> None:
        """Save a checkpoint whole or not at all (:class:`AtomicCheckpointIO` unless a custom one is configured)."""
        install_atomic_checkpoint_io(self)
        super().save_checkpoint(filepath, weights_only=weights_only, storage_options=storage_options)

    @property
    def run_dir(self) -> Path:
        """The run directory (the Trainer's ``default_root_dir``)."""
        return Path(self.default_root_dir)

    def write_metrics(self, payload: dict[str, Any]) -> None:
        """Write ``metrics.json`` into the run directory (global rank 0 only)."""
        if self.is_global_zero:
            write_metrics(self.run_dir, payload)

    def evaluate_metrics(
        self, model: pl.LightningModule, datamodule: Any, ckpt_path: str | None = None, *, reference: bool = False
    ) -> dict[str, float]:
        """Validate once and return the stage-less metrics.

        Args:
            model: The LightningModule.
            datamodule: Data module with ``eval_sets``.
            ckpt_path: Checkpoint to load first.
            reference: Record this (unedited) model as the reference of later nDCG@10 scores (LMs).
        """
        recorder = getattr(model, "start_reference_recording", None) if reference else None
        if callable(recorder):
            recorder()
        try:
            self.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        finally:
            if callable(recorder):
                model.stop_reference_recording()
        return stage_metrics(self.callback_metrics, "val")

    def prepare_eigens(
        self, model: pl.LightningModule, factors: str, modules: list[str] | None = None, cache: str | None = None
    ) -> dict[str, Any]:
        """Eigenbases of ``factors`` for ``model``: decomposed once per job on the accelerators, cached by rank 0.

        Args:
            model: The LightningModule (unedited weights loaded).
            factors: Factor file.
            modules: Patterns of the modules to edit (None: all in the file).
            cache: Eigen file to reuse or write; None: ``eigens.safetensors`` in the run directory.
        """
        cache = cache or str(self.run_dir / "eigens.safetensors")
        return prepare_eigens(model.model, factors, modules=modules, cache=cache, device=self.strategy.root_device)

    # ------------------------------------------------------------------ subcommands
    def finish_fit(self, model: pl.LightningModule, datamodule: Any) -> dict[str, float]:
        """After ``fit``: evaluate the final model, export the backbone, save ``final.ckpt``, write metrics."""
        final = self.evaluate_metrics(model, datamodule)
        if self.is_global_zero:
            model.export(str(self.run_dir / "model"))
        self.save_checkpoint(self.run_dir / "checkpoints" / "final.ckpt")  # collective: every rank calls it
        self.write_metrics({"command": "fit", "final": final})
        return final

    def evaluate(
        self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None, ckpt_path: str | None = None
    ) -> dict[str, float]:
        """Score a model (a checkpoint, a pretrained directory or a fresh config) on every evaluation set.

        Args:
            model: The LightningModule.
            datamodule: Data module with ``eval_sets``.
            ckpt_path: Lightning checkpoint to load first.

        Returns:
            Metrics without the stage prefix (also written to ``metrics.json``).
        """
        require_file(ckpt_path, "checkpoint", _CKPT_HINT)
        metrics = self.evaluate_metrics(model, datamodule, ckpt_path)
        self.write_metrics({"command": "evaluate", "metrics": metrics})
        return metrics

    def collect(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        options: CollectOptions | None = None,
    ) -> Path:
        """Collect K-FAC factors of the model's MLP layers in one pass over the training data.

        Progress (samples, samples per second, peak memory) goes to the Trainer's loggers during the pass;
        ``metrics.json`` gets the final ``tokens_per_second`` (samples of this run over all devices per second of the
        pass) and ``peak_memory_bytes`` (the largest over devices: CUDA memory allocated, or the process's maximum
        resident set size on CPU).

        Args:
            model: The LightningModule (any ``from_pretrained`` model or a checkpoint).
            datamodule: Data module whose ``predict_dataloader()`` yields the training data, unshuffled.
            ckpt_path: Lightning checkpoint to load first.
            options: The ``collect:`` section.

        Returns:
            Path of the factor file.
        """
        options = options or CollectOptions()
        require_file(ckpt_path, "checkpoint", _CKPT_HINT)
        callback = KFACCallback(
            modules=options.modules,
            fisher=options.fisher,
            seed=options.seed,
            max_tokens=options.max_tokens,
            mode=options.mode,
            dtype=options.dtype,
            output=options.output,
            save_every_minutes=options.save_every_minutes,
            save_every_n_batches=options.save_every_n_batches,
            metadata={"data": _describe(datamodule), "model_source": _describe(model)},
        )
        start = time.perf_counter()
        self.callbacks.append(callback)
        inference_mode = self.predict_loop.inference_mode
        self.predict_loop.inference_mode = False  # the pass needs autograd
        try:
            self.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=False)
        finally:
            self.predict_loop.inference_mode = inference_mode
            self.callbacks.remove(callback)
        self.collect_summary = {
            "command": "collect",
            "factors": str(callback.output_path),
            "modules": list(callback.factors),
            "num_samples": next(iter(callback.factors.values())).num_samples,
            "fisher": options.fisher,
            "seconds": round(time.perf_counter() - start, 2),
            "tokens_per_second": callback.summary["tokens_per_second"],
            "peak_memory_bytes": callback.summary["peak_memory_bytes"],
        }
        self.write_metrics(self.collect_summary)
        return callback.output_path

    def edit(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        factors: str | None = None,
        options: EditOptions | None = None,
    ) -> dict[str, Any]:
        """Edit the model with its K-FAC factors over a ρ sweep; report before/after and the selected edit.

        Args:
            model: The LightningModule (unedited weights: a checkpoint or a pretrained directory).
            datamodule: Data module with ``eval_sets`` (memorized set split into selection and test halves).
            ckpt_path: Lightning checkpoint to load first.
            factors: Factor file written by ``collect`` for this checkpoint.
            options: The ``edit:`` section.

        Returns:
            The ``metrics.json`` payload: ``before``, ``edits`` (one row per ρ) and ``selected``.
        """
        factors = _require_factors(factors, "edit")
        require_file(ckpt_path, "checkpoint", _CKPT_HINT)
        payload = self._sweep(model, datamodule, factors, options or EditOptions(), ckpt_path, command="edit")
        self.write_metrics(payload)
        return payload

    def pipeline(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        collect_options: CollectOptions | None = None,
        edit_options: EditOptions | None = None,
    ) -> dict[str, Any]:
        """Fit -> collect -> edit (ρ sweep, selection) -> evaluate the selected edit, in one run directory.

        Args:
            model: The LightningModule.
            datamodule: The data module.
            ckpt_path: Checkpoint to resume training from.
            collect_options: The ``collect:`` section.
            edit_options: The ``edit:`` section.

        Returns:
            The ``metrics.json`` payload (``fit``, ``collect``, ``before``, ``edits``, ``selected``, ``evaluate``).
        """
        self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_metrics = self.finish_fit(model, datamodule)
        factors = self.collect(model, datamodule, options=collect_options)
        sweep = self._sweep(model, datamodule, str(factors), edit_options or EditOptions(), None, "pipeline")
        payload = {"command": "pipeline", "fit": fit_metrics, "factors": str(factors), **sweep}
        payload["collect"] = {k: v for k, v in self.collect_summary.items() if k != "command"}
        if payload["selected"] is not None:
            payload["evaluate"] = self.evaluate_metrics(model, datamodule)
        self.write_metrics(payload)
        return payload

    def compare(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        factors: str | None = None,
        edit_options: EditOptions | None = None,
        compare_options: CompareOptions | None = None,
        make_trainer: Any = None,
    ) -> dict[str, Any]:
        """Compare the curvature edit with weight-SVD, random-pair controls, BalancedSubnet, example-tied dropout.

        Args:
            model: The LightningModule (trained weights: a checkpoint or a pretrained directory).
            datamodule: Data module with a memorized set split into selection and test halves.
            ckpt_path: Lightning checkpoint to load first.
            factors: Factor file for this checkpoint; None collects one first (``collect:`` defaults).
            edit_options: The ``edit:`` section (curvature strengths, modules, utility limits).
            compare_options: The ``compare:`` section.
            make_trainer: Builds a fresh Trainer for methods that train their own model (the CLI passes one).

        Returns:
            The ``metrics.json`` payload: ``before``, ``rows``, ``summary`` and ``notes``.
        """
        edit_options = edit_options or EditOptions()
        require_file(ckpt_path, "checkpoint", _CKPT_HINT)
        if factors is not None:
            read_metadata(factors)
        before = self.evaluate_metrics(model, datamodule, ckpt_path, reference=True)
        if factors is None:
            factors = str(self.collect(model, datamodule))
        eigens = self.prepare_eigens(model, factors, edit_options.modules, edit_options.eigen_cache)
        payload = compare_methods(
            model,
            datamodule,
            eigens,
            before,
            edit_options,
            compare_options or CompareOptions(),
            evaluate=lambda: self.evaluate_metrics(model, datamodule),
            make_trainer=make_trainer,
            run_dir=self.run_dir if self.is_global_zero else None,
            loggers=self.loggers,
        )
        payload = {"command": "compare", "factors": factors, **payload}
        self.write_metrics(payload)
        return payload

    def analyze(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        factors: str | None = None,
        options: AnalyzeOptions | None = None,
    ) -> dict[str, Any]:
        """Curvature spectra, activation energy by band (memorized vs not) and per-example memorization scores.

        Args:
            model: The LightningModule (the unedited weights the factors were collected on).
            datamodule: Data module whose training rows carry memorization labels (TinyMem noise, flipped labels).
            ckpt_path: Lightning checkpoint to load first.
            factors: Factor file for this checkpoint.
            options: The ``analyze:`` section.

        Returns:
            The ``analysis.json`` payload (also written, with PNG plots, to the run directory).
        """
        options = options or AnalyzeOptions()
        factors = _require_factors(factors, "analyze")
        require_file(ckpt_path, "checkpoint", _CKPT_HINT)
        metrics = self.evaluate_metrics(model, datamodule, ckpt_path)  # loads the weights, sets up the data
        eigens = self.prepare_eigens(model, factors)
        payload: dict[str, Any] = {"command": "analyze", "metrics": metrics}
        if self.is_global_zero:  # a forward-only pass over the training rows: one process does it, no collectives
            head = getattr(model, "head_position", None)
            payload |= analyze_model(
                model.model,
                eigens,
                datamodule.collect_dataloader(),
                memorization_labels(datamodule),
                self.run_dir,
                task="classifier" if callable(head) else "causal_lm",
                position=head() if callable(head) else None,
                rhos=options.rhos,
                max_batches=options.max_batches,
                with_gradients=options.gradient_scores,
            )
            report_analysis(payload, self.run_dir, self.loggers)
        self.write_metrics(payload)
        return payload

    def plan(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        collect_options: CollectOptions | None = None,
        options: PlanOptions | None = None,
    ) -> dict[str, Any]:
        """Bytes of the accumulators, factor and eigen files, and peak memory of a collection, without weights.

        Args:
            model: A ``LitCausalLM`` (only its architecture options are read; nothing is loaded).
            datamodule: Its data module (batch size and block size).
            collect_options: The ``collect:`` section (tracked modules, accumulation dtype).
            options: The ``plan:`` section.

        Returns:
            The plan (also printed and written to ``metrics.json``).
        """
        collect_options = collect_options or CollectOptions()
        hparams = dict(model.hparams)
        plan = plan_collection(
            hparams,
            collect_options.modules,
            accumulation_dtype=collect_options.dtype,
            batch_size=int(getattr(datamodule, "batch_size", 1) or 1),
            block_size=int(getattr(datamodule, "block_size", None) or getattr(datamodule, "max_length", 512)),
            options=options or PlanOptions(),
        )
        if self.is_global_zero:
            rank_zero_info(format_plan(plan))
        self.write_metrics({"command": "plan", **plan})
        return plan

    # ------------------------------------------------------------------ the ρ sweep
    def _sweep(
        self,
        model: pl.LightningModule,
        datamodule: Any,
        factors: str,
        options: EditOptions,
        ckpt_path: str | None,
        command: str,
    ) -> dict[str, Any]:
        """Evaluate before and at every ρ, select on the selection half, keep the selected edit applied."""
        before = self.evaluate_metrics(model, datamodule, ckpt_path, reference=True)
        sweep = RhoSweep(model.model, self.prepare_eigens(model, factors, options.modules, options.eigen_cache))
        edits = sweep.run(options.rho, lambda: self.evaluate_metrics(model, datamodule))
        selected, why = choose(before, edits, options.max_drop, options.max_increase)
        payload = {"command": command, "before": before, "edits": edits, "selected": selected}
        if selected is not None:
            sweep.edit(selected["rho"])  # keep the selected edit in place
            selected["applied"] = True
            if options.save_model:
                if self.is_global_zero:
                    model.export(str(self.run_dir / "edited_model"))
                self.save_checkpoint(self.run_dir / "checkpoints" / "edited.ckpt")  # collective
        if self.is_global_zero:
            report_sweep({**payload, "criterion": why}, self.run_dir, self.loggers)
        return payload
