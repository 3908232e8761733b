"""KFACCallback through Lightning: the budget is a global prefix, progress reaches the loggers, partial saves.

The budgets end inside a row, so a wrong order (positions of a row out of order, rows interleaved by rank) or a
per-rank split of the budget would count other tokens.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger
from torch.testing import assert_close

from lightning_curv.callbacks import KFACCallback
from lightning_curv.curvature import resolve_modules
from lightning_curv.data.lm import PrefixRows
from lightning_curv.models import LitCausalLM
from tests.cases import TINYMEM_LLAMA, tinymem_datamodule
from tests.reference import reference_lm_factors

TINY = TINYMEM_LLAMA
PATTERNS = ["model.layers.1.mlp.*"]
#: 21 samples per full TinyMem training row: the budget ends after 8 positions of the row at index 4.
BUDGET = 4 * 21 + 8
FP64 = {"rtol": 1e-10, "atol": 1e-13}  # float64 model and sums, different batching or reduction order


def _model() -> LitCausalLM:
    torch.manual_seed(0)
    lit = LitCausalLM(config=TINY)
    lit.configure_model()
    lit.model.double()
    return lit


def _trainer(tmp_path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        logger=kwargs.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        inference_mode=False,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


def _collect(tmp_path, eval_batch_size: int, **callback_args: Any) -> KFACCallback:
    callback = KFACCallback(
        modules=PATTERNS, fisher="true", seed=3, dtype="float64", output=str(tmp_path / "f.safetensors"),
        **callback_args,
    )  # fmt: skip
    _trainer(tmp_path, [callback]).predict(_model(), datamodule=tinymem_datamodule(tmp_path, eval_batch_size))
    return callback


def test_prefix_rows_stop_at_the_budget_and_cut_the_last_row(tmp_path):
    dm = tinymem_datamodule(tmp_path)
    prefix = PrefixRows(dm.train_dataset, BUDGET)
    assert len(prefix) == 5
    assert prefix[3] == dm.train_dataset[3]
    assert prefix[4]["input_ids"] == dm.train_dataset[4]["input_ids"][:9]  # positions 0..7 and their targets
    with pytest.raises(IndexError):
        prefix[5]
    batches = list(dm.collect_dataloader(BUDGET))
    assert [b["index"].tolist() for b in batches] == [list(range(5))]
    assert int((batches[0]["labels"][:, 1:] != -100).sum()) == BUDGET


@pytest.mark.parametrize("budget", [BUDGET, None])
def test_batch_sizes_2_and_5_give_the_same_factors(tmp_path, budget):
    runs = [_collect(tmp_path / str(size), size, max_tokens=budget).factors for size in (2, 5)]
    for name, f in runs[0].items():
        assert f.num_samples == runs[1][name].num_samples
        assert_close(runs[1][name].A, f.A, **FP64)
        assert_close(runs[1][name].G, f.G, **FP64)
    if budget is not None:
        assert {f.num_samples for f in runs[0].values()} == {budget}


def test_budget_equals_the_brute_force_prefix(tmp_path):
    """The counted samples are the first BUDGET positions in order: row by row against tests/reference.py."""
    got = _collect(tmp_path, 3, max_tokens=BUDGET).factors
    model = _model().model
    rows = [tinymem_datamodule(tmp_path).train_dataset[i] for i in range(6)]
    batch = {
        "input_ids": torch.tensor([r["input_ids"] for r in rows]),
        "attention_mask": torch.ones(6, 22, dtype=torch.long),
        "labels": torch.tensor([r["input_ids"] for r in rows]),
        "index": torch.tensor([r["index"] for r in rows]),
    }
    want = reference_lm_factors(model, batch, resolve_modules(model, PATTERNS), "true", seed=3, max_samples=BUDGET)
    for name, (A, G, n) in want.items():
        assert got[name].num_samples == n == BUDGET
        assert_close(got[name].A, A, **FP64)
        assert_close(got[name].G, G, **FP64)


class _CountBatches(Callback):
    def __init__(self) -> None:
        self.indices: list[int] = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.indices.extend(batch["index"].tolist())


def test_no_batch_past_the_budget_is_fetched(tmp_path):
    dm = tinymem_datamodule(tmp_path, eval_batch_size=2)
    fetched: list[int] = []
    original = dm.train_dataset.__class__.__getitem__

    class Recording(dm.train_dataset.__class__):
        def __getitem__(self, i):
            fetched.append(i)
            return original(self, i)

    dm.train_dataset.__class__ = Recording
    counter = _CountBatches()
    callback = KFACCallback(modules=PATTERNS, max_tokens=BUDGET, output=str(tmp_path / "f.safetensors"))
    _trainer(tmp_path, [callback, counter]).predict(_model(), datamodule=dm)
    assert counter.indices == [0, 1, 2, 3, 4]  # three batches of at most 2 rows, none past row 4
    assert max(fetched) == 4
    assert callback.batches_done == 3
    assert dm.collect_max_samples is None, "the limit is lifted after the pass"
    assert len(dm.predict_dataloader()) == -(-len(dm.train_dataset) // 2)


class _StubLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "stub"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_progress_goes_to_the_loggers_and_metrics_json(tmp_path):
    from lightning_curv import CollectOptions, CurvTrainer

    logger = _StubLogger()
    trainer = CurvTrainer(
        accelerator="cpu", logger=logger, log_every_n_steps=2, enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    options = CollectOptions(modules=PATTERNS, max_tokens=BUDGET)
    trainer.collect(_model(), datamodule=tinymem_datamodule(tmp_path, eval_batch_size=1), options=options)
    progress = [(m, step) for m, step in logger.calls if "collect/kfac/samples" in m]
    assert [step for _, step in progress] == [0, 2, 4]  # every 2 batches, and the last of the 5 batches
    samples = [m["collect/kfac/samples"] for m, _ in progress]
    assert samples == [21, 63, BUDGET]
    for metrics, _ in progress:
        assert metrics["collect/kfac/tokens_per_second"] > 0
        assert metrics["collect/kfac/peak_memory_bytes"] > 2**20  # max RSS of a Python process with torch
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["num_samples"] == BUDGET
    assert summary["tokens_per_second"] > 0
    assert summary["peak_memory_bytes"] >= progress[-1][0]["collect/kfac/peak_memory_bytes"]


def test_partial_sums_by_time_never_after_the_share_is_done(tmp_path, monkeypatch):
    saved: list[int] = []
    monkeypatch.setattr(KFACCallback, "_save_partial", lambda self: saved.append(self.batches_done))
    _collect(tmp_path / "a", 2, max_tokens=BUDGET, save_every_minutes=1e-9)  # due after every batch
    assert saved == [1, 2], "no partial file once the last of the 3 batches has counted"
    saved.clear()
    _collect(tmp_path / "b", 2, save_every_minutes=0)
    assert saved == []
    with pytest.warns(DeprecationWarning, match="save_every_minutes"):
        callback = KFACCallback(save_every_n_batches=2, save_every_minutes=0)
    assert callback.save_every_n_batches == 2
    with pytest.raises(ValueError, match="save_every_minutes"):
        KFACCallback(save_every_minutes=-1)
