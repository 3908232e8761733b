"""Two gloo processes on CPU reduce to the single-process factors over the same data."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from lightning_curv.curvature import collect_factors
from tests.cases import LLAMA_MLP, lm_batch, split_batch, tiny_llama

pytestmark = pytest.mark.slow  # spawns two Python processes that each import torch and transformers

DDP = {"rtol": 1e-10, "atol": 1e-12}  # float64 sums reduced in a different order


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_llama().double()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        batch = lm_batch(batch_size=6, seed=9)
        shard = split_batch(batch, 3)[rank]  # rank r takes rows 3r..3r+2
        factors = collect_factors(_model(), [shard], LLAMA_MLP, fisher="true", dtype=torch.float64)
        torch.save({n: (f.A, f.G, f.num_samples) for n, f in factors.items()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gloo_two_processes_equal_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    single = collect_factors(_model(), [lm_batch(batch_size=6, seed=9)], LLAMA_MLP, fisher="true", dtype=torch.float64)
    for rank in range(2):
        reduced = torch.load(tmp_path / f"{rank}.pt")
        for name, f in single.items():
            A, G, n = reduced[name]
            assert n == f.num_samples
            assert_close(A, f.A, **DDP)
            assert_close(G, f.G, **DDP)
