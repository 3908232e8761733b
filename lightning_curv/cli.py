"""``python -m lightning_curv``: LightningCLI with the subcommands of the curvature workflow.

Subcommands: ``fit``, ``evaluate``, ``collect``, ``edit``, ``pipeline`` (fit -> collect -> edit -> evaluate),
``compare`` (the curvature edit against the baselines) and ``analyze`` (spectra, activation bands, per-example
scores), plus Lightning's ``validate``/``test``/``predict``. They are methods of
:class:`~lightning_curv.trainer.CurvTrainer`, registered in :meth:`CurvCLI.subcommands` (the mechanism LightningCLI
supports for custom subcommands).

One YAML describes an experiment: ``model:``, ``data:`` and ``trainer:`` as in any LightningCLI config, plus the
stage sections ``collect:``, ``edit:``, ``compare:`` and ``analyze:`` (:mod:`lightning_curv.workflow.options`).
Every subcommand accepts the whole file and reads the sections it needs, so all of them can share one config.

Every command writes one run directory (``--run_dir``, default ``runs/<command>-<timestamp>``) holding the
resolved ``config.yaml``, its artifacts and ``metrics.json``; the directory is printed at the end.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.imports import module_available
from typing_extensions import override

from lightning_curv.trainer import CurvTrainer
from lightning_curv.utils import atomic_write_text
from lightning_curv.utils.errors import is_user_error, one_line, validate_checkpoint
from lightning_curv.utils.runlock import LOCK_NAME, acquire_run_lock, release_run_lock
from lightning_curv.workflow.compare import CompareOptions
from lightning_curv.workflow.options import AnalyzeOptions, CollectOptions, EditOptions
from lightning_curv.workflow.plan import PlanOptions

#: Lightning's DDP launcher re-runs the command in child processes; they read rank 0's run directory from here
#: (a timestamped default would differ between processes started a second apart).
RUN_DIR_ENV = "LIGHTNING_CURV_RUN_DIR"

#: The stage sections and their option classes.
SECTIONS = {
    "collect": CollectOptions,
    "edit": EditOptions,
    "compare": CompareOptions,
    "analyze": AnalyzeOptions,
    "plan": PlanOptions,
}

#: Files a failed command may leave that are not results; a run directory holding only these is removed.
_NOT_ARTIFACTS = {"config.yaml", "wandb", "lightning_logs", LOCK_NAME}

#: Set to 1 to get the full traceback of user errors (same as ``--debug`` on the command line).
DEBUG_ENV = "LIGHTNING_CURV_DEBUG"


class SaveRunConfig(SaveConfigCallback):
    """Write the resolved config as ``config.yaml`` into the run directory (atomically, rank 0); log it too.

    Every logger gets the whole config (all sections, not only the model's hyperparameters) as its run config.
    """

    @override
    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():  # jsonargparse deprecates skip_none, but keeping None values is the point
            warnings.simplefilter("ignore")
            text = self.parser.dump(self.config, skip_none=False)
        atomic_write_text(Path(trainer.default_root_dir) / self.config_filename, text)
        config = yaml.safe_load(text)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class CurvCLI(LightningCLI):
    """LightningCLI with the curvature subcommands, stage sections and one run directory per command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        wandb_offline = os.environ.get("WANDB_MODE", "offline").lower() not in ("online", "run")
        logger = {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "lightning_curv", "offline": wandb_offline},
        }
        kwargs.setdefault("trainer_class", CurvTrainer)
        kwargs.setdefault("trainer_defaults", {"logger": logger})
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("save_config_kwargs", {"save_to_log_dir": False, "overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # modules configure AdamW + schedule themselves
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if module_available("omegaconf") else {})
        super().__init__(*args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus the curvature workflow's (values: method arguments the CLI fills in)."""
        return {
            **LightningCLI.subcommands(),
            "evaluate": {"model", "datamodule"},
            "collect": {"model", "datamodule", "options"},
            "edit": {"model", "datamodule", "options"},
            "pipeline": {"model", "datamodule", "collect_options", "edit_options"},
            "compare": {"model", "datamodule", "edit_options", "compare_options", "make_trainer"},
            "analyze": {"model", "datamodule", "options"},
            "plan": {"model", "datamodule", "collect_options", "options"},
        }

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Stage sections and the run directory, accepted by every subcommand."""
        parser.add_argument(
            "--run_dir", type=str | None, default=None, help="Run directory (default: runs/<command>-<time>)."
        )
        for name, options in SECTIONS.items():
            # Not an argument group: LightningCLI names each subcommand's group after its method, and the
            # `collect` and `edit` methods would clash with the sections of the same name.
            parser.add_class_arguments(options, name, as_group=False)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, and keep the model options as given, before LightningCLI merges a checkpoint's hyperparameters."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():  # before LightningCLI torch.loads it for the hyperparameters
            validate_checkpoint(ckpt_path)
        self._given_model = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None

    @override
    def before_instantiate_classes(self) -> None:
        """Let the config win over ``--ckpt_path``'s hyperparameters; fix the run directory; point logger at it."""
        config = self.config[self.subcommand]
        self._apply_checkpoint_hparams(config)
        if self.subcommand == "plan":  # arithmetic on the meta device: no accelerator, no logger needed
            for key, value in {"accelerator": "cpu", "devices": 1, "strategy": "auto", "logger": False}.items():
                config.trainer[key] = value
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
        if getattr(logger, "class_path", "").endswith("WandbLogger"):
            if logger.init_args.get("save_dir") in (None, "."):
                logger.init_args.save_dir = str(run_dir)
            if logger.init_args.get("name") is None:
                logger.init_args.name = run_dir.name

    def _apply_checkpoint_hparams(self, config: Any) -> None:
        """Options the config sets keep their values; the checkpoint fills only those left at their defaults.

        LightningCLI lets a checkpoint's hyperparameters override the config, which would silently drop options
        given on the command line with a checkpoint (``--model.init_args.stress_shifts`` with ``evaluate``).
        """
        given, merged = self._given_model, config.get("model")
        if given is None or merged is None or given.get("init_args") is None or merged is given:
            return
        if merged.class_path != given.class_path:
            raise ValueError(
                f"--ckpt_path {config.get('ckpt_path')} holds a {merged.class_path}, but the config's model is "
                f"{given.class_path}; use the config the checkpoint was trained with."
            )
        from_ckpt = {**dict(merged.get("init_args") or {}), **dict(merged.get("dict_kwargs") or {})}
        module_name, _, class_name = given.class_path.rpartition(".")
        signature = inspect.signature(getattr(__import__(module_name, fromlist=[class_name]), class_name).__init__)
        for key, value in from_ckpt.items():
            parameter = signature.parameters.get(key)
            if parameter is not None and key in given.init_args and given.init_args[key] == parameter.default:
                given.init_args[key] = value
        config.model = given

    # ------------------------------------------------------------------ subcommands
    def _section(self, name: str) -> Any:
        section = self.config_init[self.subcommand][name]
        return SECTIONS[name](**section.as_dict()) if hasattr(section, "as_dict") else section

    def before_fit(self) -> None:
        """Make the run directory before training."""
        self._make_run_dir()

    def after_fit(self) -> None:
        """Evaluate the final model, export it, save ``final.ckpt`` and write ``metrics.json``."""
        try:
            self.trainer.finish_fit(self.model, self.datamodule)
        finally:
            self._release_run_dir()
        self._close(exit_code=0)

    def evaluate(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.evaluate``."""
        self._run(self.trainer.evaluate, **kwargs)

    def collect(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.collect`` with the ``collect:`` section."""
        self._run(self.trainer.collect, options=self._section("collect"), **kwargs)

    def edit(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.edit`` with the ``edit:`` section."""
        self._run(self.trainer.edit, options=self._section("edit"), **kwargs)

    def pipeline(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.pipeline`` with both stage sections."""
        sections = {"collect_options": self._section("collect"), "edit_options": self._section("edit")}
        self._run(self.trainer.pipeline, **sections, **kwargs)

    def compare(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.compare`` with the ``edit:`` and ``compare:`` sections."""
        sections = {"edit_options": self._section("edit"), "compare_options": self._section("compare")}
        self._run(self.trainer.compare, **sections, make_trainer=self.instantiate_trainer, **kwargs)

    def analyze(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.analyze`` with the ``analyze:`` section."""
        self._run(self.trainer.analyze, options=self._section("analyze"), **kwargs)

    def plan(self, **kwargs: Any) -> None:
        """Run ``CurvTrainer.plan`` with the ``collect:`` and ``plan:`` sections."""
        sections = {"collect_options": self._section("collect"), "options": self._section("plan")}
        self._run(self.trainer.plan, **sections, **kwargs)

    def _make_run_dir(self) -> Path:
        run_dir = Path(self.config[self.subcommand].run_dir)
        self._created_run_dir = not run_dir.exists()
        if self.trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self._run_lock = acquire_run_lock(run_dir)
            except BaseException:
                if self._created_run_dir:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
        return run_dir

    def _release_run_dir(self) -> None:
        """Free the run directory for the next command (a lock a failed ``fit`` leaves is taken over as stale)."""
        release_run_lock(getattr(self, "_run_lock", None))
        self._run_lock = None

    def _run(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        # The run directory is made only once every class was instantiated, so bad configs leave nothing behind.
        run_dir = self._make_run_dir()
        try:
            fn(**kwargs)
        except BaseException:
            self._close(exit_code=1)
            self._release_run_dir()
            if self._created_run_dir and self.trainer.is_global_zero:
                _remove_if_no_artifacts(run_dir)
            raise
        self._release_run_dir()
        self._close(exit_code=0)

    def _close(self, exit_code: int) -> None:
        """Close this command's W&B run (WandbLogger leaves it open for the next run in the process to reuse)."""
        loggers = self.trainer.loggers
        if any(isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None for lg in loggers):
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=exit_code)
        if exit_code == 0:
            rank_zero_info(f"\nRun directory: {self.config[self.subcommand].run_dir}")


def _remove_if_no_artifacts(run_dir: Path) -> None:
    if run_dir.is_dir() and all(p.name in _NOT_ARTIFACTS for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def main(args: Sequence[str] | None = None, *, exit_on_error: bool | None = None) -> None:
    """Entry point of ``python -m lightning_curv``.

    User errors (:func:`~lightning_curv.utils.errors.is_user_error`) print one line ``error: <message>`` to
    stderr and exit with code 2; ``--debug`` (anywhere on the command line) or ``LIGHTNING_CURV_DEBUG=1`` shows
    their traceback instead. Other errors keep their traceback.

    Args:
        args: Command line without the program name; None: ``sys.argv[1:]``.
        exit_on_error: Turn user errors into the one-line message and exit code 2. Default: only when reading the
            real command line (``args`` is None); in-process callers passing ``args`` get the exception.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        if args is None:  # the real command line: processes re-launched from sys.argv (DDP) inherit the setting
            os.environ[DEBUG_ENV] = "1"
            sys.argv = [sys.argv[0], *argv]
    if exit_on_error is None:
        exit_on_error = args is None
    try:
        CurvCLI(args=None if args is None else argv)
    except Exception as err:
        if debug or not exit_on_error or not is_user_error(err):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
