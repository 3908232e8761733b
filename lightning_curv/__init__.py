"""lightning_curv: find and remove memorization with the spectrum of loss curvature.

The public entry points are importable from here (loaded on first use, so ``import lightning_curv.curvature``
stays free of Lightning): :class:`CurvTrainer` and the stage options :class:`CollectOptions`,
:class:`EditOptions`, :class:`CompareOptions` and :class:`AnalyzeOptions`.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CurvTrainer": "lightning_curv.trainer",
    "CollectOptions": "lightning_curv.workflow.options",
    "EditOptions": "lightning_curv.workflow.options",
    "AnalyzeOptions": "lightning_curv.workflow.options",
    "CompareOptions": "lightning_curv.workflow.compare",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_curv' has no attribute {name!r}")
