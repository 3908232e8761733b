"""The workflow around the maths: stage options, the ρ sweep, the selection rule, the comparison, reporting.

:class:`~lightning_curv.trainer.CurvTrainer` calls these; notebooks and scripts can call them directly.
"""

from lightning_curv.workflow.compare import CompareOptions, compare_methods, run_post_hoc, summarize
from lightning_curv.workflow.options import AnalyzeOptions, CollectOptions, EditOptions
from lightning_curv.workflow.reporting import format_table, plot_tradeoff, write_csv, write_metrics
from lightning_curv.workflow.selection import (
    DEFAULT_MAX_DROP,
    DEFAULT_MAX_INCREASE,
    report_key,
    select_edit,
    selection_key,
    utility_key,
    within_limits,
)
from lightning_curv.workflow.sweep import RhoSweep, choose

__all__ = [
    "DEFAULT_MAX_DROP",
    "DEFAULT_MAX_INCREASE",
    "AnalyzeOptions",
    "CollectOptions",
    "CompareOptions",
    "EditOptions",
    "RhoSweep",
    "choose",
    "compare_methods",
    "format_table",
    "plot_tradeoff",
    "report_key",
    "run_post_hoc",
    "select_edit",
    "selection_key",
    "summarize",
    "utility_key",
    "within_limits",
    "write_csv",
    "write_metrics",
]
