"""Shared pytest setup: deterministic seeds, a quiet offline environment, and the ``gpu`` tier."""

import os

import pytest
import torch

# Tests never talk to a hub or to W&B.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``gpu`` tests unless the ``-m`` expression names the marker (``-m gpu``, ``-m "gpu or slow"``).

    So plain ``python -m pytest`` runs every test but the GPU ones, and ``-m "not slow"`` is the quick tier,
    without each command having to repeat ``and not gpu``.
    """
    if "gpu" in (config.getoption("markexpr") or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
