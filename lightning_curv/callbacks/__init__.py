"""Lightning callbacks: thin adapters over :mod:`lightning_curv.curvature`."""

from lightning_curv.callbacks.edit import EditCallback
from lightning_curv.callbacks.kfac import KFACCallback

__all__ = ["EditCallback", "KFACCallback"]
