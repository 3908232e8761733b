"""``python -m lightning_curv``: LightningCLI with the subcommands of the curvature workflow.

Subcommands: ``fit``, ``evaluate``, ``collect``, ``edit``, ``pipeline`` (fit -> collect -> edit -> evaluate),
``compare`` (the curvature edit against the baselines) and ``analyze`` (spectra, activation bands, per-example
scores), plus Lightning's ``validate``/``test``/``predict``. They are methods of :class:`CurvTrainer`, registered in
:meth:`CurvCLI.subcommands` (the mechanism LightningCLI supports for custom subcommands).

One YAML describes an experiment: ``model:``, ``data:`` and ``trainer:`` as in any LightningCLI config, plus the
stage sections ``collect:`` (:class:`CollectOptions`), ``edit:`` (:class:`EditOptions`), ``compare:``
(:class:`~lightning_curv.compare.CompareOptions`) and ``analyze:``
(:class:`~lightning_curv.analysis.report.AnalyzeOptions`). Every subcommand accepts the whole file and reads the
sections it needs, so all of them can share one config.

Every command writes one run directory (``--run_dir``, default ``runs/<command>-<timestamp>``) holding the
resolved ``config.yaml``, its artifacts and ``metrics.json``; the directory is printed at the end.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger

from lightning_curv.analysis.report import AnalyzeOptions
from lightning_curv.callbacks.edit import EditCallback
from lightning_curv.callbacks.kfac import KFACCallback
from lightning_curv.compare import (
    CompareOptions,
    plot_comparison,
    run_post_hoc,
    summarize,
    train_example_tied_dropout,
    write_csv,
)
from lightning_curv.curvature import (
    atomic_write_json,
    atomic_write_text,
    check_rho,
    read_metadata,
    summarize_stats,
)
from lightning_curv.models.base import stage_metrics
from lightning_curv.reporting import (
    DEFAULT_MAX_DROP,
    DEFAULT_MAX_INCREASE,
    format_table,
    plot_tradeoff,
    report_key,
    select_edit,
    selection_key,
    utility_key,
)

RUN_DIR_ENV = "LIGHTNING_CURV_RUN_DIR"


@dataclass
class CollectOptions:
    """The ``collect:`` section: how the curvature pass runs.

    Attributes:
        modules: Layer names, globs or ``re:`` regexes; None: the model's MLP projections.
        fisher: ``"true"`` (targets sampled from the model, the paper's choice) or ``"empirical"``.
        seed: Seed of the true-Fisher targets.
        max_tokens: Sample budget over all devices (tokens for LMs, images for ViTs); None: whole pass.
        mode: ``"tokens"`` or ``"cls"``; None: the model's default (tokens for LMs, cls for ViTs).
        dtype: Accumulation dtype.
        output: Factor file name inside the run directory (or an absolute path).
        save_every_n_batches: Resumable partial sums every this many batches (0: never).
    """

    modules: list[str] | None = None
    fisher: Literal["true", "empirical"] = "true"
    seed: int = 0
    max_tokens: int | None = None
    mode: Literal["tokens", "cls"] | None = None
    dtype: Literal["float32", "float64"] = "float32"
    output: str = "factors.safetensors"
    save_every_n_batches: int = 100


@dataclass
class EditOptions:
    """The ``edit:`` section: which edits to try and how to choose one.

    Attributes:
        rho: The sweep: each entry is one ρ for every edited module, or a ``{module pattern: ρ}`` mapping.
        modules: Subset (patterns) of the factor file's modules to edit; None edits all collected modules.
        max_drop: Allowed absolute drop per accuracy metric for the selected edit.
        max_increase: Allowed relative increase per metric (perplexity) for the selected edit.
        save_model: Save the selected edit (``export`` format and a Lightning checkpoint).
    """

    rho: list[float | dict[str, float]] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 0.99])
    modules: list[str] | None = None
    max_drop: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_DROP))
    max_increase: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_INCREASE))
    save_model: bool = True

    def __post_init__(self) -> None:
        if not self.rho:
            raise ValueError("edit.rho is empty: give at least one value in (0, 1].")
        for value in self.rho:
            for v in value.values() if isinstance(value, dict) else [value]:
                check_rho(v)


def _require_file(path: str | None, what: str, hint: str) -> None:
    if path is not None and path not in ("last", "best", "hpc", "registry") and not Path(path).exists():
        raise FileNotFoundError(f"No {what} at {path}. {hint}")


class CurvTrainer(Trainer):
    """A Lightning ``Trainer`` with the curvature workflow as methods (each one a CLI subcommand)."""

    #: Summary of the last :meth:`collect` (factor path, modules, sample count, time).
    collect_summary: dict[str, Any] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def run_dir(self) -> Path:
        """The run directory (the Trainer's ``default_root_dir``)."""
        return Path(self.default_root_dir)

    def _write_metrics(self, payload: dict[str, Any]) -> None:
        if self.is_global_zero:
            atomic_write_json(self.run_dir / "metrics.json", payload)

    def _evaluate_metrics(self, model: pl.LightningModule, datamodule: Any, ckpt_path: str | None = None) -> dict:
        self.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        return stage_metrics(self.callback_metrics, "val")

    def _evaluate_reference(self, model: pl.LightningModule, datamodule: Any, ckpt_path: str | None) -> dict:
        """Evaluate the unedited model and record it as the reference of later nDCG@10 scores (LMs)."""
        recorder = getattr(model, "start_reference_recording", None)
        if callable(recorder):
            recorder()
        try:
            return self._evaluate_metrics(model, datamodule, ckpt_path)
        finally:
            if callable(recorder):
                model.stop_reference_recording()

    # ------------------------------------------------------------------ fit
    def finish_fit(self, model: pl.LightningModule, datamodule: Any) -> dict[str, float]:
        """After ``fit``: evaluate the final model, export the backbone, write ``metrics.json``."""
        final = self._evaluate_metrics(model, datamodule)
        if self.is_global_zero:
            model.export(str(self.run_dir / "model"))
            self.save_checkpoint(self.run_dir / "checkpoints" / "final.ckpt")
        self._write_metrics({"command": "fit", "final": final})
        return final

    # ------------------------------------------------------------------ evaluate
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
        _require_file(ckpt_path, "checkpoint", "Pass a checkpoint written by `fit` (runs/.../checkpoints/*.ckpt).")
        metrics = self._evaluate_metrics(model, datamodule, ckpt_path)
        self._write_metrics({"command": "evaluate", "metrics": metrics})
        return metrics

    # ------------------------------------------------------------------ collect
    def collect(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        options: CollectOptions | None = None,
    ) -> Path:
        """Collect K-FAC factors of the model's MLP layers in one pass over the training data.

        Args:
            model: The LightningModule (any ``from_pretrained`` model or a checkpoint).
            datamodule: Data module whose ``predict_dataloader()`` yields the training data, unshuffled.
            ckpt_path: Lightning checkpoint to load first.
            options: The ``collect:`` section.

        Returns:
            Path of the factor file.
        """
        options = options or CollectOptions()
        _require_file(ckpt_path, "checkpoint", "Pass a checkpoint written by `fit` (runs/.../checkpoints/*.ckpt).")
        callback = KFACCallback(
            modules=options.modules,
            fisher=options.fisher,
            seed=options.seed,
            max_tokens=options.max_tokens,
            mode=options.mode,
            dtype=options.dtype,
            output=options.output,
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
        factors = callback.factors
        self.collect_summary = {
            "command": "collect",
            "factors": str(callback.output_path),
            "modules": list(factors),
            "num_samples": next(iter(factors.values())).num_samples,
            "fisher": options.fisher,
            "seconds": round(time.perf_counter() - start, 2),
        }
        self._write_metrics(self.collect_summary)
        return callback.output_path

    # ------------------------------------------------------------------ edit
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
        options = options or EditOptions()
        if factors is None:
            raise ValueError("`edit` needs --factors: the factor file written by `collect` for this checkpoint.")
        read_metadata(factors)  # fails early on a missing or foreign file
        _require_file(ckpt_path, "checkpoint", "Pass a checkpoint written by `fit` (runs/.../checkpoints/*.ckpt).")
        callback = EditCallback(factors=factors, modules=options.modules)
        return self._sweep(model, datamodule, callback, options, ckpt_path, command="edit")

    def _sweep(
        self,
        model: pl.LightningModule,
        datamodule: Any,
        callback: EditCallback,
        options: EditOptions,
        ckpt_path: str | None,
        command: str,
    ) -> dict[str, Any]:
        before = self._evaluate_reference(model, datamodule, ckpt_path)
        callback.prepare(model.model)  # checks the factors against the unedited weights
        self.callbacks.append(callback)
        edits = []
        try:
            for rho in options.rho:
                callback.rho = rho
                handle_stats: dict = {}

                def _keep_stats(cb: EditCallback = callback, out: dict = handle_stats) -> None:
                    out.update(cb.handle.stats if cb.handle else {})

                metrics = self._evaluate_with(model, datamodule, callback, _keep_stats)
                edits.append({"rho": rho, "modules": list(handle_stats), **summarize_stats(handle_stats), **metrics})
        finally:
            callback.rho = None
            self.callbacks.remove(callback)
        index, why = select_edit(before, edits, options.max_drop, options.max_increase)
        selected = None if index is None else {**edits[index], "index": index, "criterion": why}
        payload = {"command": command, "before": before, "edits": edits, "selected": selected}
        if selected is not None:
            handle = callback.edit(model.model, selected["rho"])  # keep the selected edit in place
            payload["selected"]["applied"] = True
            if options.save_model and self.is_global_zero:
                model.export(str(self.run_dir / "edited_model"))
                self.save_checkpoint(self.run_dir / "checkpoints" / "edited.ckpt")
            del handle
        self._report(payload, why)
        self._write_metrics(payload)
        return payload

    def _evaluate_with(self, model: pl.LightningModule, datamodule: Any, callback: EditCallback, on_applied) -> dict:
        """Evaluate with ``callback`` applying the edit; ``on_applied`` sees the handle before it is undone."""
        undo = callback.undo
        callback.undo = False
        try:
            metrics = self._evaluate_metrics(model, datamodule)
            on_applied()
        finally:
            callback.undo = undo
            if callback.handle is not None:
                callback.handle.undo()
                callback.handle = None
        return metrics

    def _report(self, payload: dict[str, Any], why: str) -> None:
        if not self.is_global_zero:
            return
        before, edits, selected = payload["before"], payload["edits"], payload["selected"]
        sel_key = selection_key(before)
        mem_key = report_key(sel_key)
        util = utility_key(before)
        columns = ["rho", mem_key, sel_key] + [k for k in sorted(before) if k.startswith("util/") and "/" not in k[5:]]
        columns += ["kept_pairs_fraction", "removed_energy"]
        rows = [{"rho": "before", **before}] + edits
        print("\n" + format_table(rows, columns))
        print(f"\nselected: {'none' if selected is None else selected['rho']} ({why})")
        if util is None:
            return
        png = plot_tradeoff(
            {"curvature edit": edits},
            mem_key,
            util[0],
            self.run_dir / "edit_tradeoff.png",
            before=before,
            selected=selected,
            title=f"{payload['command']}: memorization vs utility",
        )
        if isinstance(self.logger, WandbLogger):
            self.logger.log_image("edit/tradeoff", [str(png)])
            self.logger.log_table(
                "edit/sweep",
                columns=[str(c) for c in columns],
                data=[[_cell(c, r.get(c)) for c in columns] for r in rows],
            )

    # ------------------------------------------------------------------ compare
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
        compare_options = compare_options or CompareOptions()
        _require_file(ckpt_path, "checkpoint", "Pass a checkpoint written by `fit` (runs/.../checkpoints/*.ckpt).")
        if factors is not None:
            read_metadata(factors)
        before = self._evaluate_reference(model, datamodule, ckpt_path)
        if factors is None:
            factors = str(self.collect(model, datamodule))
        eigens = EditCallback(factors=factors, modules=edit_options.modules).prepare(model.model)
        rows, notes = run_post_hoc(
            model.model,
            eigens,
            edit_options.rho,
            compare_options,
            lambda: self._evaluate_metrics(model, datamodule),
            datamodule,
        )
        if "example_tied_dropout" in compare_options.methods:
            if make_trainer is None:
                notes.append("example_tied_dropout skipped: no trainer factory to train its model")
            else:
                extra, extra_notes = train_example_tied_dropout(
                    model,
                    datamodule,
                    make_trainer,
                    compare_options,
                    lambda trainer, m: (
                        trainer.validate(m, datamodule=datamodule, verbose=False),
                        stage_metrics(trainer.callback_metrics, "val"),
                    )[1],
                )
                rows, notes = rows + extra, notes + extra_notes
        summary = summarize(before, rows, edit_options.max_drop, edit_options.max_increase)
        payload = {
            "command": "compare",
            "factors": factors,
            "before": before,
            "rows": rows,
            "summary": summary,
            "notes": notes,
        }
        if self.is_global_zero:
            write_csv(rows, self.run_dir / "comparison.csv")
            png = plot_comparison(before, rows, self.run_dir / "comparison.png")
            mem = report_key(selection_key(before))
            util = utility_key(before)
            columns = ["method", "strength", mem, selection_key(before)] + ([util[0]] if util else [])
            columns += ["removed_energy"]
            print("\n" + format_table([{"method": "before", **before}, *rows], columns))
            print("\nChosen on the selection half within the utility limits, reported on the test half:")
            print(format_table(summary, ["method", "strength", mem] + ([util[0]] if util else []) + ["criterion"]))
            for note in notes:
                print(f"note: {note}")
            if png is not None and isinstance(self.logger, WandbLogger):
                self.logger.log_image("compare/pareto", [str(png)])
        self._write_metrics(payload)
        return payload

    # ------------------------------------------------------------------ analyze
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
        from lightning_curv.analysis import memorization_labels
        from lightning_curv.analysis.report import analyze_model

        options = options or AnalyzeOptions()
        if factors is None:
            raise ValueError("`analyze` needs --factors: the factor file written by `collect` for this checkpoint.")
        read_metadata(factors)
        _require_file(ckpt_path, "checkpoint", "Pass a checkpoint written by `fit` (runs/.../checkpoints/*.ckpt).")
        metrics = self._evaluate_metrics(model, datamodule, ckpt_path)  # loads the weights, sets up the data
        eigens = EditCallback(factors=factors).prepare(model.model)
        head = getattr(model, "head_position", None)
        task = "classifier" if callable(head) else "causal_lm"
        payload = analyze_model(
            model.model,
            eigens,
            datamodule.collect_dataloader(),
            memorization_labels(datamodule),
            self.run_dir,
            task=task,
            position=head() if callable(head) else None,
            rhos=options.rhos,
            max_batches=options.max_batches,
            with_gradients=options.gradient_scores,
        )
        payload = {"command": "analyze", "metrics": metrics, **payload}
        if self.is_global_zero:
            mean = payload["bands"]["mean"]
            print("\nactivation energy by band (mean over modules): memorized / non-memorized = ratio")
            for band in mean["bands"]:
                print(
                    f"  {band:>8}: {mean['memorized'][band]:.4f} / {mean['non_memorized'][band]:.4f} = "
                    f"{mean['ratio'][band]:.3f}"
                )
            print(
                "AUROC of per-example memorization scores: "
                + ", ".join(f"{k}={v:.3f}" for k, v in payload["auroc"].items())
            )
            if isinstance(self.logger, WandbLogger):
                for name in ("spectra", "pair_curvature", "bands", "scores"):
                    self.logger.log_image(f"analysis/{name}", [str(self.run_dir / f"{name}.png")])
                self.logger.log_metrics({f"analysis/auroc/{k}": v for k, v in payload["auroc"].items()})
        self._write_metrics(payload)
        return payload

    # ------------------------------------------------------------------ pipeline
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
        edit_options = edit_options or EditOptions()
        self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_metrics = self.finish_fit(model, datamodule)
        factors = self.collect(model, datamodule, options=collect_options)
        payload = self._sweep(
            model,
            datamodule,
            EditCallback(factors=str(factors), modules=edit_options.modules),
            edit_options,
            None,
            command="pipeline",
        )
        payload = {"command": "pipeline", "fit": fit_metrics, "factors": str(factors), **payload}
        payload["collect"] = {k: v for k, v in self.collect_summary.items() if k != "command"}
        if payload["selected"] is not None:
            payload["evaluate"] = self._evaluate_metrics(model, datamodule)
        self._write_metrics(payload)
        return payload


def _cell(column: str, value: Any) -> Any:
    """A W&B table cell: the ρ column is text ("before", 0.9, or a per-module mapping), metrics are numbers."""
    if column == "rho":
        return ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _describe(obj: Any) -> dict[str, Any]:
    hparams = getattr(obj, "hparams", None)
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "hparams": dict(hparams) if hparams else {}}


class CurvCLI(LightningCLI):
    """LightningCLI with the curvature subcommands, stage sections and one run directory per command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        wandb_offline = os.environ.get("WANDB_MODE", "offline").lower() not in ("online", "run")
        defaults = {
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "lightning_curv", "offline": wandb_offline},
            }
        }
        kwargs.setdefault("trainer_class", CurvTrainer)
        kwargs.setdefault("trainer_defaults", defaults)
        kwargs.setdefault("save_config_callback", None)  # config.yaml is written into the run directory instead
        kwargs.setdefault("auto_configure_optimizers", False)  # modules configure AdamW + schedule themselves
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        self._created_run_dir = False
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``evaluate``, ``collect``, ``edit`` and ``pipeline``."""
        return {
            **LightningCLI.subcommands(),
            "evaluate": {"model", "datamodule"},
            "collect": {"model", "datamodule", "options"},
            "edit": {"model", "datamodule", "options"},
            "pipeline": {"model", "datamodule", "collect_options", "edit_options"},
            "compare": {"model", "datamodule", "edit_options", "compare_options", "make_trainer"},
            "analyze": {"model", "datamodule", "options"},
        }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Stage sections and the run directory, accepted by every subcommand."""
        parser.add_argument(
            "--run_dir", type=str | None, default=None, help="Run directory (default: runs/<command>-<time>)."
        )
        parser.add_class_arguments(CollectOptions, "collect")
        parser.add_class_arguments(EditOptions, "edit")
        parser.add_class_arguments(CompareOptions, "compare")
        parser.add_class_arguments(AnalyzeOptions, "analyze")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        # As LightningCLI's, but the method's arguments are added without an argument group: a group is named
        # after the method, and the `collect` and `edit` subcommands would clash with the stage sections.
        parser = self.init_parser(**kwargs)
        self._add_arguments(parser)
        skip: set[str | int] = set(self.subcommands()[subcommand])
        added = parser.add_method_arguments(klass, subcommand, skip=skip, as_group=False)
        self._subcommand_method_arguments[subcommand] = added
        return parser

    def _parse_ckpt_path(self) -> None:
        """Fill the model options the config leaves at their defaults from ``--ckpt_path``'s hyperparameters.

        LightningCLI lets the checkpoint's hyperparameters override the config, which would silently drop options
        given on the command line with a checkpoint (``--model.init_args.stress_shifts`` with ``evaluate``). Here
        the config wins; the checkpoint supplies only what the config does not set (e.g. the sizes a ViT resolved
        from its data).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        model = config.get("model")
        if not ckpt_path or not Path(ckpt_path).is_file() or model is None or model.get("init_args") is None:
            return
        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
        class_path = hparams.pop("_class_path", None)
        hparams.pop("_instantiator", None)
        if class_path not in (None, model.class_path):
            raise ValueError(
                f"--ckpt_path {ckpt_path} holds a {class_path}, but the config's model is {model.class_path}; "
                "use the config the checkpoint was trained with."
            )
        module_name, _, class_name = model.class_path.rpartition(".")
        signature = inspect.signature(getattr(importlib.import_module(module_name), class_name).__init__)
        init_args = model.init_args
        for key, value in hparams.items():
            parameter = signature.parameters.get(key)
            if parameter is not None and key in init_args and init_args[key] == parameter.default:
                init_args[key] = value

    def before_instantiate_classes(self) -> None:
        """Fix the run directory (shared with DDP child processes) and point the Trainer and logger at it."""
        config = self.config[self.subcommand]
        inherited = os.environ.get(RUN_DIR_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
        run_dir = Path(config.run_dir or inherited or f"runs/{self.subcommand}-{time.strftime('%Y%m%d-%H%M%S')}")
        if config.run_dir is None and inherited is None:
            suffix, base = 1, run_dir
            while run_dir.exists():
                suffix += 1
                run_dir = base.with_name(f"{base.name}-{suffix}")
        os.environ[RUN_DIR_ENV] = str(run_dir)
        config.run_dir = str(run_dir)
        config.trainer.default_root_dir = str(run_dir)
        logger = config.trainer.get("logger")
        if _is_wandb(logger):
            init = logger.init_args
            if init.get("save_dir") in (None, "."):
                init.save_dir = str(run_dir)
            if init.get("name") is None:
                init.name = run_dir.name
        with warnings.catch_warnings():  # jsonargparse deprecates skip_none, but keeping None values is the point
            warnings.simplefilter("ignore")
            self._config_text = self._parser(self.subcommand).dump(config, skip_none=False)

    # ------------------------------------------------------------------ subcommands that take stage sections
    def _section(self, name: str) -> Any:
        return self.config_init[self.subcommand][name]

    def collect(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.collect`` with the ``collect:`` section."""
        self._run(self.trainer.collect, options=self._section("collect"), **kwargs)

    def edit(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.edit`` with the ``edit:`` section."""
        self._run(self.trainer.edit, options=self._section("edit"), **kwargs)

    def pipeline(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.pipeline`` with both stage sections."""
        self._run(
            self.trainer.pipeline,
            collect_options=self._section("collect"),
            edit_options=self._section("edit"),
            **kwargs,
        )

    def compare(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.compare`` with the ``edit:`` and ``compare:`` sections."""
        self._run(
            self.trainer.compare,
            edit_options=self._section("edit"),
            compare_options=self._section("compare"),
            make_trainer=self.instantiate_trainer,
            **kwargs,
        )

    def analyze(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.analyze`` with the ``analyze:`` section."""
        self._run(self.trainer.analyze, options=self._section("analyze"), **kwargs)

    def evaluate(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.evaluate``."""
        self._run(self.trainer.evaluate, **kwargs)

    def fit(self, **kwargs: Any) -> None:
        """Run ``Trainer.fit``, then evaluate, export and write ``metrics.json``."""

        def fit_and_finish(**kw: Any) -> None:
            self.trainer.fit(**kw)
            self.trainer.finish_fit(kw["model"], kw.get("datamodule"))

        self._run(fit_and_finish, **kwargs)

    def _run(self, fn: Any, **kwargs: Any) -> None:
        # The run directory is made only once every class was instantiated, so bad configs leave nothing behind.
        run_dir = Path(self.config[self.subcommand].run_dir)
        self._created_run_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            atomic_write_text(run_dir / "config.yaml", self._config_text)
        try:
            fn(**kwargs)
        except BaseException:
            _finish_wandb(self.trainer, exit_code=1)
            if self._created_run_dir:
                _remove_if_no_artifacts(run_dir)
            raise
        _finish_wandb(self.trainer, exit_code=0)
        if self.trainer.is_global_zero:
            print(f"\nRun directory: {run_dir}", flush=True)


def _finish_wandb(trainer: Trainer, exit_code: int) -> None:
    """Close this command's W&B run: WandbLogger leaves it open, and the next run in the process would reuse it."""
    if any(isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None for lg in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def _is_wandb(logger: Any) -> bool:
    return getattr(logger, "class_path", None) in (
        "lightning.pytorch.loggers.WandbLogger",
        "lightning.pytorch.loggers.wandb.WandbLogger",
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


#: Files a failed command may leave that are not results; a run directory holding only these is removed.
_NOT_ARTIFACTS = {"config.yaml", "wandb", "lightning_logs"}


def _remove_if_no_artifacts(run_dir: Path) -> None:
    if run_dir.is_dir() and all(p.name in _NOT_ARTIFACTS for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m lightning_curv``."""
    CurvCLI(args=list(args) if args is not None else None)


if __name__ == "__main__":
    main(sys.argv[1:])
