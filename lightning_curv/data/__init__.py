"""LightningDataModules and the batch contract they share (see :mod:`lightning_curv.data.base`)."""

from lightning_curv.data.base import EvalSet
from lightning_curv.data.images import NoisyLabelImageDataModule, flip_labels
from lightning_curv.data.text import TextDataModule
from lightning_curv.data.tinymem import NoiseExample, TinyMemDataModule, TinyMemTokenizer

__all__ = [
    "EvalSet",
    "NoisyLabelImageDataModule",
    "flip_labels",
    "NoiseExample",
    "TextDataModule",
    "TinyMemDataModule",
    "TinyMemTokenizer",
]
