"""The comparison the paper makes: the curvature edit against the alternatives, on one trained checkpoint.

Every post-hoc method (curvature edit, weight-SVD truncation, random eigen-pair removal matched on removed
energy or on pair count, BalancedSubnet) is applied to the same weights over a sweep of its strength, evaluated,
and undone. Example-tied dropout is a training-time method: it trains its own model from the same configuration
and is evaluated with its memorization channels dropped. Each method's operating point is chosen on the
selection half of the memorized set within the utility limits and reported on the test half.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger

from lightning_curv.baselines import (
    add_example_tied_dropout,
    apply_random_pair_edit,
    apply_svd_edit,
    balanced_subnet,
    resolve_hidden_layers,
    untrained_copy,
)
from lightning_curv.curvature import EditHandle, KFACEigen, apply_edit, summarize_stats
from lightning_curv.models.base import stage_metrics
from lightning_curv.workflow.options import EditOptions
from lightning_curv.workflow.reporting import plot_tradeoff, report_comparison, write_csv
from lightning_curv.workflow.selection import report_key, select_edit, selection_key, utility_key

Method = Literal["curvature", "svd", "random_energy", "random_count", "balanced_subnet", "example_tied_dropout"]
METHODS: tuple[str, ...] = Method.__args__


@dataclass
class CompareOptions:
    """The ``compare:`` section. The curvature strengths are ``edit.rho``; the limits are ``edit``'s too.

    Attributes:
        methods: Methods to run; those that do not apply to the model (BalancedSubnet needs a causal LM,
            example-tied dropout a ViT) are skipped with a note.
        svd_rho: Energy fractions kept by weight-SVD truncation.
        seed: Seed of the random controls and of BalancedSubnet.
        bsn_ratio: Fractions of weights BalancedSubnet zeroes.
        bsn_alpha: BalancedSubnet's retain weight α in ``-(1-α) CE(memorized) + α CE(retain)``.
        bsn_lr: BalancedSubnet's SGD learning rate.
        bsn_epochs: BalancedSubnet's epochs over the selection half of the memorized set.
        etd_p_fixed: Example-tied dropout: share of always-on (generalization) channels.
        etd_p_mem: Example-tied dropout: share of the other channels each example ties to itself.
    """

    methods: list[Method] = field(default_factory=lambda: list(METHODS))
    svd_rho: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95, 0.99])
    seed: int = 0
    bsn_ratio: list[float] = field(default_factory=lambda: [0.0015, 0.01, 0.05])
    bsn_alpha: float = 0.7
    bsn_lr: float = 0.3
    bsn_epochs: int = 5
    etd_p_fixed: float = 0.2
    etd_p_mem: float = 0.1

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown compare methods {unknown}; choose from {METHODS}.")


def run_post_hoc(
    model: torch.nn.Module,
    eigens: Mapping[str, KFACEigen],
    rhos: Sequence[Any],
    options: CompareOptions,
    evaluate: Callable[[], dict[str, float]],
    datamodule: Any = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Apply, evaluate and undo every post-hoc method over its strengths.

    Args:
        model: The backbone (unedited); its weights are restored after every row.
        eigens: Eigenbases of the edited modules (their names are the modules every method edits).
        rhos: Curvature-edit strengths (also the references of the random controls).
        options: The comparison options.
        evaluate: Scores the current weights (stage-less metric keys).
        datamodule: Source of the memorized and retain batches for BalancedSubnet.

    Returns:
        ``(rows, notes)``: one row per (method, strength) and notes about skipped methods.
    """
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    modules = list(eigens)
    methods = set(options.methods)

    def measure(method: str, strength: Any, handle: EditHandle) -> None:
        try:
            rows.append({"method": method, "strength": strength, **summarize_stats(handle.stats), **evaluate()})
        finally:
            handle.undo()

    masks: dict = {}
    orders: dict = {}
    for rho in rhos:
        reference = apply_edit(model, eigens, rho, masks=masks, orders=orders)
        if "curvature" in methods:
            measure("curvature", rho, reference)
        reference.undo()
        if isinstance(rho, (int, float)) and rho >= 1.0:
            continue  # nothing removed: the random controls would be the identity too
        for match in ("energy", "count"):
            if f"random_{match}" in methods:
                handle = apply_random_pair_edit(model, eigens, reference, match=match, seed=options.seed)
                measure(f"random_{match}", rho, handle)
    if "svd" in methods:
        cache: dict = {}
        for rho in options.svd_rho:
            measure("svd", rho, apply_svd_edit(model, modules, rho, cache=cache))
    if "balanced_subnet" in methods:
        if not hasattr(datamodule, "memorized_dataloader") or not _is_causal_lm(model):
            notes.append("balanced_subnet skipped: it needs a causal LM and a data module with memorized_dataloader()")
        else:
            memorized = list(datamodule.memorized_dataloader("selection"))
            retain = datamodule.retain_dataloader()
            for ratio in options.bsn_ratio:
                handle = balanced_subnet(
                    model,
                    modules,
                    memorized,
                    retain,
                    ratio=ratio,
                    alpha=options.bsn_alpha,
                    lr=options.bsn_lr,
                    epochs=options.bsn_epochs,
                    seed=options.seed,
                )
                measure("balanced_subnet", ratio, handle)
    return rows, notes


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "vocab_size") and hasattr(model, "get_output_embeddings")


def summarize(
    before: Mapping[str, float],
    rows: Sequence[Mapping[str, Any]],
    max_drop: Mapping[str, float],
    max_increase: Mapping[str, float],
) -> list[dict[str, Any]]:
    """Per method: the row chosen on the selection half within the utility limits, with its test-half numbers.

    Args:
        before: Metrics of the unedited model.
        rows: All comparison rows.
        max_drop: Allowed absolute accuracy drops.
        max_increase: Allowed relative perplexity increases.

    Returns:
        One summary per method, sorted by the test-half memorization of the chosen row (ascending), methods with
        no admissible row last.
    """
    sel = selection_key(before)
    mem = report_key(sel)
    util = utility_key(before)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        method_rows = [r for r in rows if r["method"] == method]
        index, why = select_edit(before, method_rows, max_drop, max_increase, key=sel)
        entry: dict[str, Any] = {"method": method, "criterion": why}
        if index is not None:
            chosen = method_rows[index]
            entry.update(
                {
                    "strength": chosen["strength"],
                    mem: chosen[mem],
                    sel: chosen[sel],
                    "removed_energy": chosen.get("removed_energy"),
                }
            )
            if util is not None:
                entry[util[0]] = chosen[util[0]]
        out.append(entry)
    return sorted(out, key=lambda e: (mem not in e, e.get(mem, 0.0)))


def plot_comparison(before: Mapping[str, float], rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Pareto plot of test-half memorization against the main utility metric, one line per method."""
    util = utility_key(before)
    if util is None:
        return None
    mem = report_key(selection_key(before))
    series: dict[str, list] = {}
    for row in rows:
        series.setdefault(row["method"], []).append({**row, "label": row["strength"]})
    for name in series:
        series[name].sort(key=lambda r: r[util[0]])
    return plot_tradeoff(
        series, mem, util[0], path, before=before, label_key="label", title="Memorization vs utility by method"
    )


def train_example_tied_dropout(
    model: pl.LightningModule,
    datamodule: Any,
    make_trainer: Callable[[], pl.Trainer],
    options: CompareOptions,
    evaluate_with: Callable[[pl.Trainer, pl.LightningModule], dict[str, float]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train a fresh copy of ``model`` with example-tied dropout and evaluate it with memorization channels dropped.

    Args:
        model: The compared LightningModule, built; it needs ViT MLP blocks (``model.model.blocks.*.mlp``).
        datamodule: The same data module.
        make_trainer: Builds a fresh Trainer with the experiment's trainer settings.
        options: The comparison options.
        evaluate_with: Scores a model with a trainer (stage-less keys).

    Returns:
        ``(rows, notes)``.
    """
    try:
        resolve_hidden_layers(model.model, "blocks.*.mlp")
    except (AttributeError, TypeError, ValueError):
        return [], [f"example_tied_dropout skipped: {type(model).__name__} does not support it (ViT only)"]
    etd_model = untrained_copy(model)
    add_example_tied_dropout(etd_model, p_fixed=options.etd_p_fixed, p_mem=options.etd_p_mem, seed=options.seed)
    trainer = make_trainer()
    trainer.fit(etd_model, datamodule=datamodule)
    metrics = evaluate_with(trainer, etd_model)
    row = {
        "method": "example_tied_dropout",
        "strength": options.etd_p_mem,
        "kept_pairs_fraction": None,
        "removed_energy": None,
        **metrics,
    }
    return [row], []


def compare_methods(
    model: pl.LightningModule,
    datamodule: Any,
    eigens: Mapping[str, KFACEigen],
    before: Mapping[str, float],
    edit_options: EditOptions,
    options: CompareOptions,
    *,
    evaluate: Callable[[], dict[str, float]],
    make_trainer: Callable[[], pl.Trainer] | None,
    run_dir: Path | None,
    loggers: Sequence[Logger] = (),
) -> dict[str, Any]:
    """Run every method of the comparison, choose each one's operating point, and report.

    Args:
        model: The compared LightningModule (unedited weights loaded).
        datamodule: Its data module.
        eigens: Eigenbases of the edited modules.
        before: Metrics of the unedited model.
        edit_options: The ``edit:`` section (curvature strengths and utility limits).
        options: The ``compare:`` section.
        evaluate: Scores the current weights of ``model``.
        make_trainer: Builds a fresh Trainer for training-time methods (None skips them with a note).
        run_dir: Where ``comparison.csv`` and ``comparison.png`` go; None writes no files (ranks other than 0).
        loggers: Loggers that get the Pareto plot.

    Returns:
        ``before``, ``rows``, ``summary`` and ``notes``.
    """
    rows, notes = run_post_hoc(model.model, eigens, edit_options.rho, options, evaluate, datamodule)
    if "example_tied_dropout" in options.methods:
        if make_trainer is None:
            notes.append("example_tied_dropout skipped: no trainer factory to train its model")
        else:

            def evaluate_with(trainer: pl.Trainer, m: pl.LightningModule) -> dict[str, float]:
                trainer.validate(m, datamodule=datamodule, verbose=False)
                return stage_metrics(trainer.callback_metrics, "val")

            extra, extra_notes = train_example_tied_dropout(model, datamodule, make_trainer, options, evaluate_with)
            rows, notes = rows + extra, notes + extra_notes
    summary = summarize(before, rows, edit_options.max_drop, edit_options.max_increase)
    payload = {"before": dict(before), "rows": rows, "summary": summary, "notes": notes}
    if run_dir is not None:
        write_csv(rows, run_dir / "comparison.csv")
        png = plot_comparison(before, rows, run_dir / "comparison.png")
        report_comparison(payload, png, loggers)
    return payload
