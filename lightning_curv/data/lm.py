"""Loaders shared by the language-model data modules (:class:`TinyMemDataModule`, :class:`TextDataModule`).

Both build their rows in ``setup`` and serve them through the same loaders; a subclass says only which rows are
which. Both also share the prepare/setup cache: :meth:`LMRowsDataModule.prepare_data` writes a JSON file keyed
by a digest of :attr:`~LMRowsDataModule.cache_config` (once, on one process), and
:meth:`~LMRowsDataModule.setup` only reads it (DDP-safe).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_curv.curvature.constants import IGNORE_INDEX
from lightning_curv.curvature.kfac import budget_prefix
from lightning_curv.data.base import EvalSet
from lightning_curv.data.collate import build_loader, generation_to_lm_rows
from lightning_curv.utils import atomic_write_json, json_digest

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

BatchKind = Literal["lm", "generation"]


def _sample_positions(row: Mapping[str, Any]) -> Tensor:
    """Positions ``t`` of an unpadded LM row that are K-FAC samples: those whose next token is a label."""
    ids = torch.as_tensor(row["input_ids"]).reshape(-1)
    labels = ids if row.get("labels") is None else torch.as_tensor(row["labels"]).reshape(-1)
    return (labels[1:] != IGNORE_INDEX).nonzero().flatten()


class PrefixRows(Dataset):
    """The rows of a token-sample budget: the first ``max_samples`` sample positions of ``dataset``, in order.

    A row's samples are its positions with a next-token label (:func:`~lightning_curv.curvature.valid_positions`
    of its collated batch). Rows are read in order only until the budget is reached. The row where it runs out is
    cut right after its last counted position (``input_ids`` and ``labels`` end at that position's target), as
    if the data ended there; later rows are not served. So the samples are a global prefix of the data whatever
    the batch size or the number of processes (a distributed sampler splits these rows only).

    Args:
        dataset: LM rows (``input_ids``, optional ``labels``, ``index``).
        max_samples: The budget in sample positions.
    """

    def __init__(self, dataset: Dataset, max_samples: int) -> None:
        self.dataset = dataset
        counts = (len(_sample_positions(dataset[i])) for i in range(len(dataset)))
        self.num_rows, last = budget_prefix(counts, max_samples)
        self._cut: int | None = None
        if last is not None:
            positions = _sample_positions(dataset[self.num_rows - 1])
            if last < len(positions):
                self._cut = int(positions[last - 1]) + 2  # keep position p and its target p + 1

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"Row {i} is past the budget ({self.num_rows} rows).")
        row = self.dataset[i]
        if self._cut is None or i != self.num_rows - 1:
            return row
        cut = dict(row)
        for key in ("input_ids", "labels"):
            if cut.get(key) is not None:
                cut[key] = cut[key][: self._cut]
        return cut


class LMRowsDataModule(pl.LightningDataModule):
    """Base of the causal-LM data modules: training, curvature, memorized-set, retain and evaluation loaders.

    Subclasses set ``batch_size``, ``eval_batch_size``, ``seed``, ``num_workers``, ``cache_dir``,
    :attr:`cache_name`, ``_data`` (None until ``setup``) and ``train_dataset``, and implement
    :attr:`cache_config`, :meth:`_create_cache`, :meth:`_build`, :attr:`pad_token_id`, :attr:`eval_sets`,
    :meth:`_eval_datasets`, :meth:`_memorized_dataset` and :meth:`_retain_dataset`.
    """

    #: File name prefix of the cache (``<cache_name>-<digest>.json``) and name used in messages.
    cache_name: ClassVar[str]
    batch_size: int
    eval_batch_size: int
    seed: int
    num_workers: int
    cache_dir: str
    train_dataset: Dataset | None
    _data: dict[str, Any] | None
    #: Sample budget of the curvature pass's loader (:meth:`limit_collection`); None: every training row.
    collect_max_samples: int | None = None

    # ------------------------------------------------------------------ the cache
    @property
    @abstractmethod
    def cache_config(self) -> dict[str, Any]:
        """JSON-able settings that determine the cached content (the cache key, stored in the file)."""

    @abstractmethod
    def _create_cache(self) -> dict[str, Any]:
        """Build the cached content (a JSON-able dict whose ``config`` is :attr:`cache_config`)."""

    @abstractmethod
    def _build(self, data: dict[str, Any]) -> None:
        """Build the datasets from the cached content."""

    @property
    def cache_path(self) -> Path:
        """The cache file for the current settings."""
        return Path(self.cache_dir) / f"{self.cache_name}-{json_digest(self.cache_config, 16)}.json"

    @override
    def prepare_data(self) -> None:
        """Build the cached content and write it, unless a cache for these settings exists."""
        path = self.cache_path
        if not path.exists():
            atomic_write_json(path, self._create_cache(), indent=None)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read the cache written by :meth:`prepare_data` and build the datasets.

        Args:
            stage: Lightning stage (unused: every split is built).

        Raises:
            FileNotFoundError: If :meth:`prepare_data` has not written the cache.
            ValueError: If the cache was written for other settings.
        """
        if self._data is not None:
            return
        path = self.cache_path
        if not path.exists():
            raise FileNotFoundError(
                f"{self.cache_name} cache {path} does not exist; call prepare_data() before setup()."
            )
        with open(path) as f:
            data = json.load(f)
        if data.get("config") != self.cache_config:
            raise ValueError(f"{self.cache_name} cache {path} was written for other settings: {data.get('config')}.")
        self._build(data)
        self._data = data

    # ------------------------------------------------------------------ what a subclass provides
    @property
    @abstractmethod
    def pad_token_id(self) -> int:
        """Token id used to pad rows."""

    @property
    @abstractmethod
    def eval_sets(self) -> list[EvalSet]:
        """Evaluation sets, in the order of the loaders that :meth:`val_dataloader` returns."""

    @abstractmethod
    def _eval_datasets(self) -> list[tuple[Dataset, BatchKind]]:
        """The rows and batch kind of each entry of :attr:`eval_sets`, in that order."""

    @abstractmethod
    def _memorized_dataset(self, split: Literal["selection", "test"]) -> Dataset | None:
        """Generation rows of one half of the memorized set, or None when there is no memorized set."""

    @abstractmethod
    def _retain_dataset(self) -> Dataset:
        """Training rows that are not in the memorized set."""

    # ------------------------------------------------------------------ loaders
    def _require_setup(self) -> None:
        if getattr(self, "_data", None) is None:
            raise RuntimeError("Call prepare_data() and setup() before asking for data.")

    def _loader(self, dataset: Dataset, kind: BatchKind, train: bool = False, shard: bool = False) -> DataLoader:
        return build_loader(
            dataset,
            kind,
            pad_token_id=self.pad_token_id,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            num_workers=self.num_workers,
            shard=shard,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled training rows (LM batches)."""
        self._require_setup()
        return self._loader(self.train_dataset, "lm", train=True)

    def collect_dataloader(self, max_samples: int | None = None) -> DataLoader:
        """Training rows in order, unshuffled, for the curvature pass (``eval_batch_size`` rows a batch).

        Args:
            max_samples: Serve only the rows of the first this many sample positions (:class:`PrefixRows`); None:
                every training row.
        """
        self._require_setup()
        dataset = self.train_dataset if max_samples is None else PrefixRows(self.train_dataset, max_samples)
        return self._loader(dataset, "lm")

    def limit_collection(self, max_samples: int | None, samples_per_row: Callable[[], int] | None = None) -> None:
        """Make :meth:`predict_dataloader` serve only the global prefix of ``max_samples`` token positions.

        Args:
            max_samples: The budget (None: no limit).
            samples_per_row: Unused: a language-model row's samples are its labelled positions.
        """
        self.collect_max_samples = max_samples

    @override
    def predict_dataloader(self) -> DataLoader:
        """The curvature pass runs in ``trainer.predict``: :meth:`collect_dataloader` within the budget."""
        return self.collect_dataloader(self.collect_max_samples)

    def memorized_dataloader(self, split: Literal["selection", "test"] = "selection") -> DataLoader:
        """LM batches of one half of the memorized set (loss on the memorized continuation only).

        Methods that learn from the memorized set (BalancedSubnet) train on the selection half; reports use the
        test half, which they never see.
        """
        self._require_setup()
        dataset = self._memorized_dataset(split)
        if dataset is None:
            raise ValueError("This data module has no memorized set (configure one to use this method).")
        return self._loader(generation_to_lm_rows(dataset), "lm")

    def retain_dataloader(self) -> DataLoader:
        """Shuffled LM batches of training data that is not in the memorized set."""
        self._require_setup()
        return self._loader(self._retain_dataset(), "lm", train=True)

    def _eval_loaders(self) -> list[DataLoader]:
        self._require_setup()
        return [self._loader(dataset, kind, shard=True) for dataset, kind in self._eval_datasets()]

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One loader per entry of :attr:`eval_sets`, in that order."""
        return self._eval_loaders()

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """Same loaders as :meth:`val_dataloader`."""
        return self._eval_loaders()
