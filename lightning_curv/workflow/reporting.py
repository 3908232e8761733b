"""What a command shows and keeps: console tables, the trade-off plot, ``metrics.json``, CSV, and W&B.

Everything here runs on global rank 0 only (the callers check); messages go through ``rank_zero_info`` so that
they appear once under DDP and respect Lightning's logging configuration.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_curv.analysis._plot import new_figure, save_png
from lightning_curv.utils import atomic_write_json, atomic_write_text
from lightning_curv.workflow.selection import report_key, selection_key, utility_key

METRICS_FILE = "metrics.json"


def write_metrics(run_dir: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write a command's ``metrics.json`` into its run directory (atomically); returns the path."""
    path = Path(run_dir) / METRICS_FILE
    atomic_write_json(path, payload)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``columns`` (missing values shown as ``-``)."""
    cells = [[_fmt(row.get(c, "-")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def plot_tradeoff(
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    mem_key: str,
    util_key: str,
    path: str | Path,
    *,
    before: Mapping[str, float] | None = None,
    selected: Mapping[str, Any] | None = None,
    label_key: str = "rho",
    title: str = "Memorization vs utility",
) -> Path:
    """Scatter/line plot of memorization against utility, one line per method, saved as PNG.

    Args:
        series: Rows per method name; each row has ``mem_key``, ``util_key`` and optionally ``label_key``.
        mem_key: Memorization metric (y axis).
        util_key: Utility metric (x axis).
        path: PNG destination (written atomically).
        before: Unedited model's metrics, drawn as a star.
        selected: The selected row, circled.
        label_key: Row field used to annotate points.
        title: Plot title.

    Returns:
        The path written.
    """
    fig, ax = new_figure()
    for name, rows in series.items():
        pts = [(r[util_key], r[mem_key], r.get(label_key)) for r in rows if util_key in r and mem_key in r]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, lab in pts:
            if lab is not None and not isinstance(lab, Mapping):
                text = _fmt(lab) if isinstance(lab, float) else str(lab)
                ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if before and util_key in before and mem_key in before:
        ax.scatter([before[util_key]], [before[mem_key]], marker="*", s=160, color="black", zorder=5, label="before")
    if selected and util_key in selected and mem_key in selected:
        ax.scatter(
            [selected[util_key]],
            [selected[mem_key]],
            s=220,
            facecolors="none",
            edgecolors="red",
            linewidths=2,
            zorder=6,
            label="selected",
        )
    ax.set_xlabel(util_key)
    ax.set_ylabel(mem_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """``comparison.csv``: one row per (method, strength), the pipeline's metric keys as columns (atomic)."""
    keys = ["method", "strength", "kept_pairs_fraction", "removed_energy"]
    metric_keys = sorted({k for r in rows for k in r if k not in keys})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys + metric_keys, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in keys + metric_keys})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ";".join(f"{k}={v}" for k, v in value.items())
    return "" if value is None else value


def wandb_loggers(loggers: Sequence[Logger]) -> list[WandbLogger]:
    """The W&B loggers among a Trainer's loggers."""
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def _cell(column: str, value: Any) -> Any:
    """A W&B table cell: the ρ column is text ("before", 0.9, or a per-module mapping), metrics are numbers."""
    if column == "rho":
        return ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _numeric(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def sweep_axis(rho: Any, index: int) -> float:
    """The numeric x value of a sweep row: ρ itself, or the row index for a per-module ρ mapping."""
    return float(rho) if isinstance(rho, (int, float)) else float(index)


def log_sweep(
    loggers: Sequence[Logger],
    before: Mapping[str, Any],
    edits: Sequence[Mapping[str, Any]],
    selected: Mapping[str, Any] | None,
) -> None:
    """Log a ρ sweep as a dashboard: one row per ρ on an ``edit/rho`` axis, ``before/*`` and ``selected/*`` as summary.

    Every logger gets ``edit/rho``, ``edit/<metric>`` and ``edit/module/<name>/<stat>`` once per row (the row index
    is the step, so charts over the sweep have one point per ρ instead of all at the validation step). W&B runs
    also plot ``edit/*`` against ``edit/rho`` and carry ``before/*`` and ``selected/*`` (the values written to
    ``metrics.json``) in their summary.
    """
    for logger in loggers:
        wandb_run = logger.experiment if isinstance(logger, WandbLogger) else None
        if wandb_run is not None:
            wandb_run.define_metric("edit/rho")
            wandb_run.define_metric("edit/*", step_metric="edit/rho")
        for i, row in enumerate(edits):
            metrics = {f"edit/{k}": v for k, v in _numeric(row).items()}
            for name, stats in row.get("per_module", {}).items():
                metrics.update({f"edit/module/{name}/{k}": float(v) for k, v in stats.items()})
            metrics["edit/rho"] = sweep_axis(row["rho"], i)
            logger.log_metrics(metrics, step=i)
        summary = {f"before/{k}": v for k, v in _numeric(before).items()}
        if selected is not None:
            summary.update({f"selected/{k}": v for k, v in _numeric(selected).items()})
        if wandb_run is not None:
            wandb_run.summary.update(summary)
        else:
            logger.log_metrics(summary)


def report_sweep(payload: Mapping[str, Any], run_dir: str | Path, loggers: Sequence[Logger]) -> Path | None:
    """Show an edit sweep: the table and the selection on the console, the trade-off plot as PNG and in W&B.

    Args:
        payload: ``before``, ``edits``, ``selected`` and ``command`` of an ``edit``/``pipeline`` run.
        run_dir: Where ``edit_tradeoff.png`` goes.
        loggers: The Trainer's loggers (W&B ones get the plot and the sweep table).

    Returns:
        The plot's path, or None when the data has no utility metric to plot against.
    """
    before, edits, selected = payload["before"], payload["edits"], payload["selected"]
    sel_key = selection_key(before)
    mem_key = report_key(sel_key)
    util = utility_key(before)
    columns = ["rho", mem_key, sel_key] + [k for k in sorted(before) if k.startswith("util/") and "/" not in k[5:]]
    columns += ["kept_pairs_fraction", "removed_energy"]
    rows = [{"rho": "before", **before}] + list(edits)
    rank_zero_info("\n" + format_table(rows, columns))
    why = payload.get("criterion") or (selected or {}).get("criterion", "")
    rank_zero_info(f"\nselected: {'none' if selected is None else selected['rho']} ({why})")
    log_sweep(loggers, before, edits, selected)
    if util is None:
        return None
    png = plot_tradeoff(
        {"curvature edit": edits},
        mem_key,
        util[0],
        Path(run_dir) / "edit_tradeoff.png",
        before=before,
        selected=selected,
        title=f"{payload['command']}: memorization vs utility",
    )
    for logger in wandb_loggers(loggers):
        logger.log_image("edit/tradeoff", [str(png)])
        logger.log_table(
            "edit/sweep",
            columns=[str(c) for c in columns],
            data=[[_cell(c, r.get(c)) for c in columns] for r in rows],
        )
    return png


def report_comparison(payload: Mapping[str, Any], png: Path | None, loggers: Sequence[Logger]) -> None:
    """Show a ``compare`` run: all rows, each method's chosen row, notes; the Pareto plot to W&B."""
    before, rows, summary = payload["before"], payload["rows"], payload["summary"]
    mem = report_key(selection_key(before))
    util = utility_key(before)
    util_cols = [util[0]] if util else []
    columns = ["method", "strength", mem, selection_key(before), *util_cols, "removed_energy"]
    rank_zero_info("\n" + format_table([{"method": "before", **before}, *rows], columns))
    rank_zero_info("\nChosen on the selection half within the utility limits, reported on the test half:")
    rank_zero_info(format_table(summary, ["method", "strength", mem, *util_cols, "criterion"]))
    for note in payload["notes"]:
        rank_zero_info(f"note: {note}")
    if png is not None:
        for logger in wandb_loggers(loggers):
            logger.log_image("compare/pareto", [str(png)])


def report_analysis(payload: Mapping[str, Any], run_dir: str | Path, loggers: Sequence[Logger]) -> None:
    """Show an ``analyze`` run: band energies and AUROCs on the console, plots and AUROCs to W&B."""
    mean = payload["bands"]["mean"]
    lines = ["\nactivation energy by band (mean over modules): memorized / non-memorized = ratio"]
    for band in mean["bands"]:
        lines.append(
            f"  {band:>8}: {mean['memorized'][band]:.4f} / {mean['non_memorized'][band]:.4f} = "
            f"{mean['ratio'][band]:.3f}"
        )
    lines.append(
        "AUROC of per-example memorization scores: " + ", ".join(f"{k}={v:.3f}" for k, v in payload["auroc"].items())
    )
    rank_zero_info("\n".join(lines))
    for logger in wandb_loggers(loggers):
        for name in ("spectra", "pair_curvature", "bands", "scores"):
            logger.log_image(f"analysis/{name}", [str(Path(run_dir) / f"{name}.png")])
        logger.log_metrics({f"analysis/auroc/{k}": v for k, v in payload["auroc"].items()})
