"""Loaders shared by the language-model data modules (:class:`TinyMemDataModule`, :class:`TextDataModule`).

Both hold their rows as :class:`~lightning_curv.data.collate.RowDataset` objects built in ``setup`` and serve
them through the same loaders; a subclass says only which rows are which.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_curv.data.base import EvalSet
from lightning_curv.data.collate import RowDataset, build_loader, generation_to_lm_rows

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

BatchKind = Literal["lm", "generation"]


class LMRowsDataModule(pl.LightningDataModule):
    """Base of the causal-LM data modules: training, curvature, memorized-set, retain and evaluation loaders.

    Subclasses set ``batch_size``, ``eval_batch_size``, ``seed``, ``num_workers``, ``_data`` (None until
    ``setup``) and ``train_dataset``, and implement :attr:`pad_token_id`, :attr:`eval_sets`,
    :meth:`_eval_datasets`, :meth:`_memorized_dataset` and :meth:`_retain_rows`.
    """

    batch_size: int
    eval_batch_size: int
    seed: int
    num_workers: int
    train_dataset: RowDataset | None

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
    def _eval_datasets(self) -> list[tuple[RowDataset, BatchKind]]:
        """The rows and batch kind of each entry of :attr:`eval_sets`, in that order."""

    @abstractmethod
    def _memorized_dataset(self, split: Literal["selection", "test"]) -> RowDataset | None:
        """Generation rows of one half of the memorized set, or None when there is no memorized set."""

    @abstractmethod
    def _retain_rows(self) -> list[dict]:
        """Training rows that are not in the memorized set."""

    # ------------------------------------------------------------------ loaders
    def _require_setup(self) -> None:
        if getattr(self, "_data", None) is None:
            raise RuntimeError("Call prepare_data() and setup() before asking for data.")

    def _loader(self, dataset: RowDataset, kind: BatchKind, train: bool = False) -> DataLoader:
        return build_loader(
            dataset,
            kind,
            pad_token_id=self.pad_token_id,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            num_workers=self.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled training rows (LM batches)."""
        self._require_setup()
        return self._loader(self.train_dataset, "lm", train=True)

    def collect_dataloader(self) -> DataLoader:
        """Training rows in order, unshuffled, for the curvature pass (``eval_batch_size`` rows a batch)."""
        self._require_setup()
        return self._loader(self.train_dataset, "lm")

    @override
    def predict_dataloader(self) -> DataLoader:
        """The curvature pass runs in ``trainer.predict``: the same loader as :meth:`collect_dataloader`."""
        return self.collect_dataloader()

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
        return self._loader(RowDataset(self._retain_rows()), "lm", train=True)

    def _eval_loaders(self) -> list[DataLoader]:
        self._require_setup()
        return [self._loader(dataset, kind) for dataset, kind in self._eval_datasets()]

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One loader per entry of :attr:`eval_sets`, in that order."""
        return self._eval_loaders()

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """Same loaders as :meth:`val_dataloader`."""
        return self._eval_loaders()
