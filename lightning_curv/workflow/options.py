"""The stage sections of an experiment YAML: ``collect:``, ``edit:``, ``analyze:`` (``compare:`` is in compare.py).

Every subcommand accepts the whole file and reads the sections it needs, so one config serves all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lightning_curv.curvature import check_rho
from lightning_curv.workflow.selection import DEFAULT_MAX_DROP, DEFAULT_MAX_INCREASE


@dataclass
class CollectOptions:
    """The ``collect:`` section: how the curvature pass runs.

    Attributes:
        modules: Layer names, globs or ``re:`` regexes; None: the model's MLP projections.
        fisher: ``"true"`` (targets sampled from the model, the paper's choice) or ``"empirical"``.
        seed: Seed of the true-Fisher targets.
        max_tokens: Sample budget (tokens for LMs, images for ViTs): the first this many samples of the data in
            dataset order, the same whatever the number of devices or the batch size; None: the whole pass.
        mode: ``"tokens"`` or ``"cls"``; None: the model's default (tokens for LMs, cls for ViTs).
        dtype: Accumulation dtype.
        output: Factor file name inside the run directory (or an absolute path).
        save_every_minutes: Resumable partial sums this often (0: never); none once a rank's share is done.
        save_every_n_batches: Deprecated (use ``save_every_minutes``): also save every this many batches.
    """

    modules: list[str] | None = None
    fisher: Literal["true", "empirical"] = "true"
    seed: int = 0
    max_tokens: int | None = None
    mode: Literal["tokens", "cls"] | None = None
    dtype: Literal["float32", "float64"] = "float32"
    output: str = "factors.safetensors"
    save_every_minutes: float = 30.0
    save_every_n_batches: int | None = None


@dataclass
class EditOptions:
    """The ``edit:`` section: which edits to try and how to choose one.

    Attributes:
        rho: The sweep: each entry is one ρ for every edited module, or a ``{module pattern: ρ}`` mapping.
        modules: Subset (patterns) of the factor file's modules to edit; None edits all collected modules.
        max_drop: Allowed absolute drop per accuracy metric for the selected edit.
        max_increase: Allowed relative increase per metric (perplexity) for the selected edit.
        save_model: Save the selected edit (``export`` format and a Lightning checkpoint).
        eigen_cache: Eigen file to reuse or write (reused when it was computed from the same factor file);
            None: ``eigens.safetensors`` in the run directory, so nothing is written beside the inputs.
    """

    rho: list[float | dict[str, float]] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 0.99])
    modules: list[str] | None = None
    max_drop: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_DROP))
    max_increase: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_INCREASE))
    save_model: bool = True
    eigen_cache: str | None = None

    def __post_init__(self) -> None:
        if not self.rho:
            raise ValueError("edit.rho is empty: give at least one value in (0, 1].")
        for value in self.rho:
            for v in value.values() if isinstance(value, dict) else [value]:
                check_rho(v)


@dataclass
class AnalyzeOptions:
    """The ``analyze:`` section.

    Attributes:
        rhos: ρ values at which kept pairs (spectra) and dropped gradient mass (scores) are reported.
        max_batches: Analyse at most this many training batches (None: the whole training set).
        gradient_scores: Also compute the per-example gradient-mass scores (one backward per batch).
    """

    rhos: list[float] = field(default_factory=lambda: [0.6, 0.75, 0.9])
    max_batches: int | None = None
    gradient_scores: bool = True
