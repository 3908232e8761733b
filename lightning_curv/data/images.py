"""Image classification data with flipped training labels: the label-noise memorization setting.

Reference: Maini, Mozer, Sedghi, Lipton, Kolter, Zhang, *Can Neural Network Memorization Be Localized?*
(ICML 2023), as used by Merullo et al., *From Memorization to Reasoning in the Spectrum of Loss Curvature*
(arXiv 2510.24256, 2025).

A fraction of the training labels is flipped to a different class, ``y' = (y + r) mod C`` with ``r`` drawn
uniformly from ``[1, C-1]``. A model that predicts the flipped label of a flipped example can only have
memorized it; predicting the original label instead is "GT recovery". The validation set stays clean.

Sources:
    * ``digits``: scikit-learn's bundled ``load_digits`` (1797 grayscale 8x8 images, 10 classes, values
      0..16 scaled to [0, 1]). Offline, in memory; the default for the quickstart and the tests.
    * ``hf``: any Hugging Face ``datasets`` image classification dataset, by hub name or local directory
      (``imagefolder``); images are decoded lazily, item by item.
    * ``folder``: a torchvision ``ImageFolder`` root (one subdirectory per class).

Every image is converted to ``in_chans`` channels (1: grayscale, 3: RGB), resized to
``image_size x image_size`` (aspect ratio not kept; bilinear), scaled to [0, 1], optionally augmented
(training loader only) and normalized per channel, both by ``torchvision.transforms.v2`` (:func:`image_transform`).

Index conventions: the training set is the list of source examples left after the validation split and
``limit_train``; its positions ``0..n_train-1`` are the ``index`` of every batch built from it (training,
curvature collection, ``train_clean``, ``noisy_selection``, ``noisy_test``), and ``noisy_indices``,
``selection_indices`` and ``test_indices`` are positions in it. Validation batches carry positions in the
validation set.

Randomness: every random choice (validation split, ``limit_train`` subset, flipped examples, their offsets,
the selection/test halves) comes from its own ``torch.Generator`` seeded from ``seed``, never from global
state, so ``setup()`` gives the same result on every rank and in every process.

Warning:
    Under a distributed sampler, evaluation loaders are padded with repeated examples so that every rank
    gets the same number of batches; exact metrics need the metric to deduplicate by ``index`` or a
    non-padding sampler.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from typing_extensions import override

from lightning_curv.data.base import EvalSet
from lightning_curv.data.collate import eval_sampler
from lightning_curv.utils import stream_seed

__all__ = ["DIGITS_IMAGE_SIZE", "DIGITS_NUM_CLASSES", "SOURCES", "NoisyLabelImageDataModule", "flip_labels"]

Source = Literal["digits", "hf", "folder"]
SOURCES: tuple[str, ...] = Source.__args__

DIGITS_NUM_CLASSES = 10
DIGITS_IMAGE_SIZE = 8
#: Digits pixel values are integers in [0, 16].
_DIGITS_MAX_VALUE = 16.0
#: Normalization statistics are computed on at most this many training images (a seeded subset beyond it), so
#: that ``setup()`` stays cheap for large lazily decoded datasets; every split of at most this size is exact.
NORM_STATS_MAX_IMAGES = 10_000
#: Floor of a computed per-channel std (a constant channel would otherwise divide by zero).
_MIN_STD = 1e-6
#: Label columns tried, in order, when an ``hf`` dataset has no ``ClassLabel`` column and no ``label_key``.
_LABEL_KEYS = ("label", "labels", "fine_label", "target")

# Streams of the per-purpose generators derived from ``seed``.
_STREAM_VAL_SPLIT, _STREAM_LIMIT, _STREAM_FLIP, _STREAM_HALVES, _STREAM_NORM = range(5)


def flip_labels(labels: Tensor, num_classes: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Flip a fraction of labels to a different class, ``(y + r) mod C`` with ``r`` uniform in ``[1, C-1]``.

    Exactly ``round(fraction * N)`` examples are flipped (Python rounding), chosen as the first entries of a
    seeded permutation; their offsets ``r`` come from the same seeded generator. The result depends only on
    the arguments, never on global random state.

    Args:
        labels: Integer class labels of shape ``[N]``, values in ``[0, num_classes)``.
        num_classes: Number of classes ``C`` (at least 2).
        fraction: Fraction of examples to flip, in ``[0, 1]``.
        seed: Seed of the generator that chooses the examples and their offsets.

    Returns:
        ``(noisy_labels, noisy_indices)``: long labels of shape ``[N]`` that differ from ``labels`` exactly at
        ``noisy_indices``, a sorted long tensor of shape ``[round(fraction * N)]``.

    Raises:
        ValueError: If ``labels`` is not a 1-D integer tensor with values in ``[0, num_classes)``, if
            ``num_classes < 2`` or if ``fraction`` is outside ``[0, 1]``.
    """
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got dtype {labels.dtype} and shape {labels.shape}.")
    if num_classes < 2:
        raise ValueError(f"Label flipping needs at least 2 classes, got num_classes={num_classes}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]."
        )
    n = labels.numel()
    num_flipped = round(fraction * n)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:num_flipped]
    offsets = torch.randint(1, num_classes, (num_flipped,), generator=gen)
    noisy = labels.long().clone()
    noisy[chosen] = (noisy[chosen] + offsets) % num_classes
    return noisy, chosen.sort().values


def _generator(seed: int, stream: int) -> torch.Generator:
    """A generator for one purpose (``stream``) of ``seed``."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))


# ----------------------------------------------------------------------------------------------------------
# Sources: random access to decoded images of one split.
# ----------------------------------------------------------------------------------------------------------


class _ImageSource:
    """Images and labels of one split.

    After :meth:`configure`, :meth:`load` returns float images of shape ``[in_chans, size, size]`` in
    ``[0, 1]``.

    Attributes:
        labels: Long labels of shape ``[N]``.
    """

    labels: Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def native_size(self) -> tuple[int, int]:
        """``(height, width)`` of the first image, before resizing."""
        raise NotImplementedError

    def configure(self, size: int, in_chans: int) -> None:
        """Set the output size and number of channels."""
        raise NotImplementedError

    def load(self, i: int) -> Tensor:
        """Image ``i`` of shape ``[in_chans, size, size]``, float in ``[0, 1]``."""
        raise NotImplementedError

    def load_many(self, indices: Tensor) -> Tensor:
        """Images at ``indices`` (shape ``[K]``) as one tensor of shape ``[K, in_chans, size, size]``."""
        return torch.stack([self.load(int(i)) for i in indices])


class _TensorSource(_ImageSource):
    """In-memory images (digits), resized once for the whole split."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images  # [N, C, H, W] float in [0, 1]
        self.labels = labels

    def native_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def configure(self, size: int, in_chans: int) -> None:
        images = self.images
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            images = images.clamp_(0.0, 1.0)  # bilinear/antialias can overshoot slightly
        if images.shape[1] != in_chans:
            if images.shape[1] != 1:
                raise ValueError(f"Cannot convert {images.shape[1]}-channel images to {in_chans} channels.")
            images = images.expand(-1, in_chans, -1, -1)
        self.images = images.contiguous()

    def load(self, i: int) -> Tensor:
        return self.images[i]

    def load_many(self, indices: Tensor) -> Tensor:
        return self.images[indices]


class _PILSource(_ImageSource):
    """Lazily decoded PIL images, converted and resized item by item."""

    size: int | None = None
    mode: str = "RGB"

    def pil(self, i: int) -> Any:
        """The decoded PIL image ``i``."""
        raise NotImplementedError

    def native_size(self) -> tuple[int, int]:
        if len(self) == 0:
            raise ValueError("Cannot infer the image size of an empty split; set image_size.")
        width, height = self.pil(0).size
        return height, width

    def configure(self, size: int, in_chans: int) -> None:
        self.size = size
        self.mode = {1: "L", 3: "RGB"}[in_chans]

    def load(self, i: int) -> Tensor:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        img = self.pil(i).convert(self.mode)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return pil_to_tensor(img).float().div_(255.0)  # [C, size, size]


class _HFSource(_PILSource):
    """One split of a Hugging Face ``datasets`` image dataset."""

    def __init__(self, dataset: Any, image_key: str, label_key: str) -> None:
        self.dataset = dataset
        self.image_key = image_key
        self.labels = torch.as_tensor(list(dataset[label_key]), dtype=torch.long)

    def pil(self, i: int) -> Any:
        return self.dataset[i][self.image_key]


class _FolderSource(_PILSource):
    """A torchvision ``ImageFolder`` root, with labels mapped to a given class order."""

    def __init__(self, folder: Any, labels: Tensor) -> None:
        self.folder = folder
        self.labels = labels

    def pil(self, i: int) -> Any:
        path, _ = self.folder.samples[i]
        return self.folder.loader(path)


# ----------------------------------------------------------------------------------------------------------
# Datasets that produce image batches (see lightning_curv.data.base).
# ----------------------------------------------------------------------------------------------------------


def image_transform(
    mean: Tensor | None, std: Tensor | None, size: int = 0, crop_padding: int = 0, hflip: bool = False
) -> Callable[[Tensor], Tensor] | None:
    """The per-image ``torchvision.transforms.v2`` pipeline: optional augmentation, then normalization.

    Args:
        mean: Per-channel means, any shape with ``C`` elements, or None (no normalization).
        std: Per-channel stds, like ``mean``.
        size: Image side, kept by the random crop.
        crop_padding: Zero padding of a random crop back to the input size (0: no crop). The random draws use
            the global torch generator, which Lightning seeds per worker.
        hflip: Random horizontal flips (with a crop only).

    Returns:
        A transform of ``[C, H, W]`` float images, or None when it would do nothing.
    """
    from torchvision.transforms import v2

    steps: list[Callable[[Tensor], Tensor]] = []
    if crop_padding > 0:
        steps.append(v2.RandomCrop(size, padding=crop_padding))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    if mean is not None:
        steps.append(v2.Normalize(mean.flatten().tolist(), std.flatten().tolist()))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else v2.Compose(steps)


class _LabeledImages(Dataset):
    """Rows of a source with their trained-on label, original label and reported index."""

    def __init__(
        self,
        source: _ImageSource,
        source_indices: Tensor,
        labels: Tensor,
        true_labels: Tensor,
        index: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.source = source
        self.source_indices = source_indices
        self.labels = labels
        self.true_labels = true_labels
        self.index = index
        self.transform = transform

    def __len__(self) -> int:
        return self.source_indices.numel()

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        img = self.source.load(int(self.source_indices[i]))
        if self.transform is not None:
            img = self.transform(img)
        return {
            "pixel_values": img,
            "labels": self.labels[i],
            "true_labels": self.true_labels[i],
            "index": self.index[i],
        }


# ----------------------------------------------------------------------------------------------------------
# The data module.
# ----------------------------------------------------------------------------------------------------------


class NoisyLabelImageDataModule(pl.LightningDataModule):
    """Image classification with a seeded fraction of flipped training labels and a clean validation set.

    Evaluation sets (:attr:`eval_sets`, in the order of ``val_dataloader()`` and ``test_dataloader()``):
    ``val`` (clean validation set), ``train_clean`` (training examples whose label was not flipped, a
    ``classification`` set), ``noisy_selection`` and ``noisy_test`` (the flipped training examples, split
    50/50 by a seeded permutation; ``labels`` is the flipped label, ``true_labels`` the original). The
    selection half is used to choose an edit and the test half to report it.

    Loaders: ``train_dataloader()`` shuffles and augments (if ``augment``); ``collect_dataloader()`` is the
    same training set (flipped labels) in order, without augmentation, for the curvature pass; evaluation
    loaders neither shuffle nor augment.

    Args:
        source: ``"digits"`` (scikit-learn's bundled digits, offline), ``"hf"`` (a ``datasets`` image
            dataset) or ``"folder"`` (a torchvision ``ImageFolder`` root).
        path: For ``hf``: a hub name or a local directory (``imagefolder`` layout). For ``folder``: the
            ``ImageFolder`` root. Unused for ``digits``.
        train_split: ``hf``: split name (default ``"train"``). ``folder``: subdirectory of ``path`` holding
            the training classes (default: ``path`` itself). Must be None for ``digits``.
        val_split: ``hf``: split name; ``folder``: subdirectory of ``path``. None carves a seeded
            ``val_fraction`` out of the training split. Must be None for ``digits``.
        val_fraction: Fraction of the training split held out as the clean validation set when ``val_split``
            is None, in (0, 1).
        image_key: ``hf`` image column; None picks the first ``datasets.Image`` column.
        label_key: ``hf`` label column; None picks the first ``ClassLabel`` column, else one of
            ``label``/``labels``/``fine_label``/``target``.
        cache_dir: ``hf`` cache directory (None: the ``datasets`` default).
        noise_fraction: Fraction of training labels flipped, in [0, 1).
        image_size: Square resize target. None keeps the native size (digits: 8; other sources: the first
            training image's size, which must be square). Upscaling (e.g. digits to 16 or 32) is allowed.
        in_chans: Channels of the images given to the model, 1 (grayscale) or 3 (RGB). None: 1 for digits,
            3 otherwise.
        normalize: Normalize each channel with ``mean``/``std``.
        mean: Per-channel means (length 1 or ``in_chans``); None computes them on the training split (on a
            seeded subset of at most ``NORM_STATS_MAX_IMAGES`` images, before augmentation).
        std: Per-channel stds, given together with ``mean``.
        augment: Mildly augment training batches: random crop with zero padding ``max(1, image_size // 8)``
            and, if ``hflip``, random horizontal flips. Off by default: memorization studies need it off.
        hflip: Whether augmentation flips horizontally. None: off for digits (a mirrored digit can be a
            different digit or no digit), on otherwise.
        seed: Seed of every random choice of the data (not of shuffling, which follows Lightning's seed).
        batch_size: Batch size of the training and curvature-collection loaders.
        eval_batch_size: Batch size of the evaluation loaders (None: ``batch_size``).
        num_workers: DataLoader worker processes.
        limit_train: Keep only a seeded subset of this many training examples (quick runs); None keeps all.

    Raises:
        ValueError: On an unknown source, ``noise_fraction`` outside [0, 1), a missing ``path`` or any other
            out-of-range argument.
    """

    def __init__(
        self,
        source: Source = "digits",
        path: str | None = None,
        train_split: str | None = None,
        val_split: str | None = None,
        val_fraction: float = 0.2,
        image_key: str | None = None,
        label_key: str | None = None,
        cache_dir: str | None = None,
        noise_fraction: float = 0.2,
        image_size: int | None = None,
        in_chans: int | None = None,
        normalize: bool = True,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: bool = False,
        hflip: bool | None = None,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        limit_train: int | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"Unknown source {source!r}; expected one of {SOURCES}.")
        if source != "digits" and not path:
            raise ValueError(f"source={source!r} needs a path (hub name or local directory).")
        if source == "digits" and (train_split is not None or val_split is not None):
            raise ValueError("The digits source has no named splits; leave train_split/val_split unset.")
        if not 0.0 <= noise_fraction < 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        if in_chans is not None and in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}.")
        if (mean is None) != (std is None):
            raise ValueError("Give both mean and std, or neither (then they are computed on the train split).")
        resolved_chans = in_chans if in_chans is not None else (1 if source == "digits" else 3)
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, resolved_chans):
                raise ValueError(f"{name} needs 1 or {resolved_chans} values, got {len(values)}.")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}.")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"Batch sizes must be positive, got {batch_size} and {eval_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if limit_train is not None and limit_train < 1:
            raise ValueError(f"limit_train must be positive or None, got {limit_train}.")
        # `in_chans` is left out: LitViT records the channel count it resolved (from this module) in its own
        # hparams, and Lightning refuses to log a module and a data module whose shared keys differ (None vs 1).
        self.save_hyperparameters(ignore=["in_chans"])

        self.source = source
        self.path = path
        self.train_split = train_split
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.image_key = image_key
        self.label_key = label_key
        self.cache_dir = cache_dir
        self.noise_fraction = noise_fraction
        self.normalize = normalize
        self.mean = mean
        self.std = std
        self.augment = augment
        self.hflip = hflip if hflip is not None else source != "digits"
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.limit_train = limit_train
        self._in_chans = resolved_chans
        self._image_size = image_size

        # Lazily opened sources: (train, val or None, num_classes).
        self._sources: tuple[_ImageSource, _ImageSource | None, int] | None = None
        # Built by setup().
        self._train: _LabeledImages | None = None
        self._collect: _LabeledImages | None = None
        self._eval: list[_LabeledImages] = []
        self._noisy_indices: Tensor | None = None
        self._selection_indices: Tensor | None = None
        self._test_indices: Tensor | None = None
        self._clean_indices: Tensor | None = None
        self._norm: tuple[Tensor, Tensor] | None = None

    # ---- resolved settings (usable before setup(), e.g. for linking into the model config) ----

    @property
    def in_chans(self) -> int:
        """Number of image channels given to the model."""
        return self._in_chans

    @property
    def image_size(self) -> int:
        """Side of the square images given to the model (may open the source to read the native size)."""
        if self._image_size is None:
            if self.source == "digits":
                self._image_size = DIGITS_IMAGE_SIZE
            else:
                height, width = self._open()[0].native_size()
                if height != width:
                    raise ValueError(f"Images are {height}x{width}, not square; set image_size to resize them.")
                self._image_size = height
        return self._image_size

    @property
    def num_classes(self) -> int:
        """Number of classes (digits: 10; other sources: read from the dataset, which may open it)."""
        if self.source == "digits":
            return DIGITS_NUM_CLASSES
        return self._open()[2]

    @property
    def eval_sets(self) -> list[EvalSet]:
        """Evaluation sets, in the order of ``val_dataloader()`` and ``test_dataloader()``."""
        return [
            EvalSet("val", "classification", metric_name="val_acc"),
            EvalSet("train_clean", "classification", metric_name="train_clean_acc"),
            EvalSet("noisy_selection", "label_memorization", split="selection"),
            EvalSet("noisy_test", "label_memorization", split="test"),
        ]

    # ---- results of setup() ----

    def _require_setup(self) -> _LabeledImages:
        if self._train is None:
            raise RuntimeError("NoisyLabelImageDataModule.setup() has not been called yet.")
        return self._train

    @property
    def noisy_indices(self) -> Tensor:
        """Sorted training-set indices of the flipped examples, long ``[num_noisy]``."""
        self._require_setup()
        return self._noisy_indices

    @property
    def selection_indices(self) -> Tensor:
        """Sorted training-set indices of the flipped examples used to choose an edit."""
        self._require_setup()
        return self._selection_indices

    @property
    def test_indices(self) -> Tensor:
        """Sorted training-set indices of the flipped examples used to report an edit."""
        self._require_setup()
        return self._test_indices

    @property
    def clean_indices(self) -> Tensor:
        """Sorted training-set indices of the examples whose label was not flipped."""
        self._require_setup()
        return self._clean_indices

    @property
    def true_train_labels(self) -> Tensor:
        """Original labels of the training set, long ``[n_train]``."""
        return self._require_setup().true_labels

    @property
    def noisy_train_labels(self) -> Tensor:
        """Labels the model is trained on (flipped at ``noisy_indices``), long ``[n_train]``."""
        return self._require_setup().labels

    @property
    def normalization(self) -> tuple[Tensor, Tensor] | None:
        """Per-channel ``(mean, std)``, each of shape ``[in_chans]``, or None without normalization."""
        self._require_setup()
        if self._norm is None:
            return None
        return self._norm[0].flatten(), self._norm[1].flatten()

    # ---- Lightning hooks ----

    @override
    def prepare_data(self) -> None:
        """Download (``hf``) or check (``folder``) the data once per node; no state is assigned here."""
        if self.source == "hf":
            self._load_hf()
        elif self.source == "folder":
            self._folder_root(self.train_split)
            if self.val_split is not None:
                self._folder_root(self.val_split)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Split, flip and build every dataset; deterministic, so identical on every rank. Idempotent."""
        if self._train is not None:
            return
        train_src, val_src, num_classes = self._open()
        size, chans = self.image_size, self.in_chans
        train_src.configure(size, chans)
        if val_src is not None:
            val_src.configure(size, chans)

        # Clean validation set: a named split, or a seeded fraction carved out of the training split.
        if val_src is None:
            n = len(train_src)
            num_val = round(self.val_fraction * n)
            if num_val < 1 or num_val >= n:
                raise ValueError(f"val_fraction={self.val_fraction} of {n} examples leaves an empty split.")
            perm = torch.randperm(n, generator=_generator(self.seed, _STREAM_VAL_SPLIT))
            val_rows, pool = perm[:num_val].sort().values, perm[num_val:].sort().values
            val_src = train_src
        else:
            val_rows, pool = torch.arange(len(val_src)), torch.arange(len(train_src))
        if self.limit_train is not None and self.limit_train < pool.numel():
            keep = torch.randperm(pool.numel(), generator=_generator(self.seed, _STREAM_LIMIT))
            pool = pool[keep[: self.limit_train].sort().values]
        if pool.numel() == 0:
            raise ValueError("The training split is empty.")

        true_labels = train_src.labels[pool]
        val_labels = val_src.labels[val_rows]
        for name, labels in (("training", true_labels), ("validation", val_labels)):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(
                    f"{name} labels must lie in [0, {num_classes}), "
                    f"got [{int(labels.min())}, {int(labels.max())}] (an unlabeled split?)."
                )
        noisy_labels, noisy = flip_labels(
            true_labels, num_classes, self.noise_fraction, stream_seed(self.seed, _STREAM_FLIP)
        )
        halves = torch.randperm(noisy.numel(), generator=_generator(self.seed, _STREAM_HALVES))
        num_selection = noisy.numel() // 2
        self._noisy_indices = noisy
        self._selection_indices = noisy[halves[:num_selection]].sort().values
        self._test_indices = noisy[halves[num_selection:]].sort().values
        is_clean = torch.ones(pool.numel(), dtype=torch.bool)
        is_clean[noisy] = False
        self._clean_indices = is_clean.nonzero().flatten()

        self._norm = self._normalization(train_src, pool) if self.normalize else None
        mean, std = self._norm if self._norm is not None else (None, None)
        positions = torch.arange(pool.numel())
        plain = image_transform(mean, std)

        def subset(rows: Tensor) -> _LabeledImages:
            """Training rows (positions in the training set) without augmentation."""
            return _LabeledImages(train_src, pool[rows], noisy_labels[rows], true_labels[rows], rows, plain)

        padding = max(1, size // 8) if self.augment else 0
        train_transform = image_transform(mean, std, size, padding, self.hflip)
        self._train = _LabeledImages(train_src, pool, noisy_labels, true_labels, positions, train_transform)
        self._collect = subset(positions)
        val = _LabeledImages(val_src, val_rows, val_labels, val_labels, torch.arange(val_rows.numel()), plain)
        self._eval = [
            val,
            subset(self._clean_indices),
            subset(self._selection_indices),
            subset(self._test_indices),
        ]

    @override
    def train_dataloader(self) -> DataLoader:
        """Training set with flipped labels, shuffled, augmented if ``augment``."""
        return self._loader(self._require_setup(), self.batch_size, shuffle=True)

    def collect_dataloader(self, max_samples: int | None = None, samples_per_image: int = 1) -> DataLoader:
        """Training set with flipped labels, in order and without augmentation (the curvature pass).

        Args:
            max_samples: Serve only the first ``ceil(max_samples / samples_per_image)`` images (a global prefix:
                a distributed sampler splits these rows only); None: every training image.
            samples_per_image: Samples one image gives (1 in CLS mode, its token count in token mode).
        """
        self._require_setup()
        dataset: Dataset = self._collect
        if max_samples is not None:
            dataset = Subset(dataset, range(min(len(dataset), -(-max_samples // samples_per_image))))
        return self._loader(dataset, self.batch_size, shuffle=False)

    def limit_collection(self, max_samples: int | None, samples_per_row: Callable[[], int] | None = None) -> None:
        """Make :meth:`predict_dataloader` serve only the images of the first ``max_samples`` samples.

        Args:
            max_samples: The budget (None: no limit).
            samples_per_row: Samples per image, asked when the loader is built (the model exists by then); None: 1.
        """
        self._collect_limit = (max_samples, samples_per_row)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The curvature pass runs in ``trainer.predict``: :meth:`collect_dataloader` within the budget."""
        max_samples, per_image = getattr(self, "_collect_limit", (None, None))
        return self.collect_dataloader(max_samples, per_image() if per_image is not None else 1)

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One loader per entry of :attr:`eval_sets`, in order; no shuffling, no augmentation."""
        self._require_setup()
        return [self._loader(ds, self.eval_batch_size, shuffle=False, shard=True) for ds in self._eval]

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """The same loaders as :meth:`val_dataloader`."""
        return self.val_dataloader()

    # ---- helpers ----

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, shard: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=eval_sampler(dataset, batch_size) if shard else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _normalization(self, source: _ImageSource, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel ``(mean, std)`` of shape ``[C, 1, 1]``: given, or computed on training ``rows``."""
        chans = self.in_chans
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).expand(chans).clone()
            std = torch.tensor(self.std, dtype=torch.float32).expand(chans).clone()
            return mean.view(chans, 1, 1), std.view(chans, 1, 1)
        if rows.numel() > NORM_STATS_MAX_IMAGES:
            keep = torch.randperm(rows.numel(), generator=_generator(self.seed, _STREAM_NORM))
            rows = rows[keep[:NORM_STATS_MAX_IMAGES]]
        total = torch.zeros(chans, dtype=torch.float64)
        total_sq = torch.zeros(chans, dtype=torch.float64)
        for chunk in rows.split(1024):
            images = source.load_many(chunk).double()  # [K, C, S, S]
            total += images.sum(dim=(0, 2, 3))
            total_sq += images.square().sum(dim=(0, 2, 3))
        count = rows.numel() * self.image_size**2
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt().clamp_min(_MIN_STD)
        return mean.float().view(chans, 1, 1), std.float().view(chans, 1, 1)

    def _open(self) -> tuple[_ImageSource, _ImageSource | None, int]:
        """Open the configured source once: ``(train, val or None, num_classes)``."""
        if self._sources is None:
            opener = {"digits": self._open_digits, "hf": self._open_hf, "folder": self._open_folder}[self.source]
            train, val, num_classes = opener()
            if num_classes < 2:
                raise ValueError(f"The dataset has {num_classes} class(es); label flipping needs at least 2.")
            self._sources = (train, val, num_classes)
        return self._sources

    def _open_digits(self) -> tuple[_ImageSource, None, int]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / _DIGITS_MAX_VALUE  # [N,1,8,8]
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        return _TensorSource(images, labels), None, DIGITS_NUM_CLASSES

    def _load_hf(self) -> Any:
        import datasets

        local = os.path.expanduser(self.path)
        if os.path.isdir(local):
            path = os.path.abspath(local)
        elif self.path.startswith((os.sep, ".", "~")) or os.path.isabs(self.path):
            # Clearly meant as a local directory: do not let it fall through to a hub lookup.
            raise FileNotFoundError(f"Dataset directory {self.path!r} does not exist.")
        else:
            path = self.path  # a hub name
        return datasets.load_dataset(path, cache_dir=self.cache_dir)

    def _open_hf(self) -> tuple[_ImageSource, _ImageSource | None, int]:
        import datasets

        splits = self._load_hf()
        train_split = self.train_split or "train"
        for split in (train_split, self.val_split):
            if split is not None and split not in splits:
                raise ValueError(f"Split {split!r} not in dataset {self.path!r}; it has {sorted(splits)}.")
        train = splits[train_split]
        features = train.features
        image_key = self.image_key
        if image_key is None:
            image_key = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
            if image_key is None:
                raise ValueError(f"No image column in {self.path!r} (columns {list(features)}); set image_key.")
        label_key = self.label_key
        if label_key is None:
            label_key = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
            label_key = label_key or next((k for k in _LABEL_KEYS if k in features), None)
            if label_key is None:
                raise ValueError(
                    f"No label column in {self.path!r} (columns {list(features)}); set label_key. "
                    "(An imagefolder with a single class directory has no label column.)"
                )
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(f"Column {key!r} not in dataset {self.path!r}; it has {list(features)}.")
        train_src = _HFSource(train, image_key, label_key)
        val_src = _HFSource(splits[self.val_split], image_key, label_key) if self.val_split is not None else None
        label_feature = features[label_key]
        if isinstance(label_feature, datasets.ClassLabel):
            num_classes = label_feature.num_classes
        else:
            observed = [s.labels for s in (train_src, val_src) if s is not None and len(s)]
            num_classes = int(torch.cat(observed).max()) + 1 if observed else 0
        return train_src, val_src, num_classes

    def _folder_root(self, subdir: str | None) -> str:
        root = os.path.expanduser(self.path) if subdir is None else os.path.join(os.path.expanduser(self.path), subdir)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Image folder {root!r} does not exist.")
        return root

    def _open_folder(self) -> tuple[_ImageSource, _ImageSource | None, int]:
        from torchvision.datasets import ImageFolder

        train = ImageFolder(self._folder_root(self.train_split))
        train_src = _FolderSource(train, torch.as_tensor(train.targets, dtype=torch.long))
        val_src = None
        if self.val_split is not None:
            val = ImageFolder(self._folder_root(self.val_split))
            unknown = sorted(set(val.classes) - set(train.classes))
            if unknown:
                raise ValueError(f"Validation classes {unknown} do not occur in the training folder.")
            # Map by class name: a validation folder missing a class would otherwise shift the indices.
            labels = [train.class_to_idx[val.classes[t]] for t in val.targets]
            val_src = _FolderSource(val, torch.as_tensor(labels, dtype=torch.long))
        return train_src, val_src, len(train.classes)
