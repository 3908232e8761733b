"""lightning_curv: find and remove memorization with the spectrum of loss curvature."""

__version__ = "0.1.0"
