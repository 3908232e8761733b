"""Two gloo processes (Lightning ``ddp_spawn`` on CPU) collect the same global prefix as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightning.pytorch import Callback
from torch.testing import assert_close

from lightning_curv.callbacks import KFACCallback
from lightning_curv.curvature import load_factors, read_metadata
from tests.callbacks.test_kfac_callback import BUDGET, FP64, PATTERNS, _model, _trainer
from tests.cases import tinymem_datamodule

pytestmark = pytest.mark.slow  # spawns two Python processes that each import torch, lightning and transformers


class _RowsPerRank(Callback):
    """Writes the dataset rows each rank's batches held to ``rows-<rank>.json``."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.rows = directory, []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.rows.append(batch["index"].tolist())

    def on_predict_end(self, trainer, pl_module):
        (self.directory / f"rows-{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def _collect(tmp_path, batch_size: int, **trainer_args) -> Path:
    output = tmp_path / "factors.safetensors"
    callback = KFACCallback(modules=PATTERNS, seed=3, dtype="float64", max_tokens=BUDGET, output=str(output))
    trainer = _trainer(tmp_path, [callback, _RowsPerRank(tmp_path)], **trainer_args)
    trainer.predict(_model(), datamodule=tinymem_datamodule(tmp_path, batch_size), return_predictions=False)
    return output


def test_two_processes_collect_the_prefix_of_one(tmp_path):
    single = load_factors(_collect(tmp_path / "one", 5))
    path = _collect(tmp_path / "two", 2, strategy="ddp_spawn", devices=2)
    assert read_metadata(path)["world_size"] == 2
    rows = [json.loads((tmp_path / "two" / f"rows-{rank}.json").read_text()) for rank in range(2)]
    assert rows == [[[0, 2], [4]], [[1, 3]]], "each rank reads its rows of the prefix (rows 0-4), nothing past it"
    double = load_factors(path)
    assert set(double) == set(single)
    for name, f in single.items():
        assert f.num_samples == double[name].num_samples == BUDGET
        assert_close(double[name].A, f.A, **FP64)
        assert_close(double[name].G, f.G, **FP64)
