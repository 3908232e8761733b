"""Every command completes under DDP with 2 CPU processes (gloo) and measures exactly what one process measures.

Evaluation shards whole batches over the ranks without padding, so the rates are equal bit for bit (the memorized
halves here have odd sizes, and some sets do not split evenly over the ranks); float sums are reduced in another
order, so they agree to float64 rounding. Each command writes its outputs once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_curv.cli import main

pytestmark = pytest.mark.slow  # spawns DDP jobs of two processes

TINY = str(Path(__file__).parent / "configs" / "tiny_tinymem.yaml")
#: Odd memorized halves (7 noise rows: 3 + 4) and batches that do not split evenly over two ranks.
DATA = [
    "--data.init_args.num_noise",
    "7",
    "--data.init_args.eval_batch_size",
    "3",
    "--trainer.limit_val_batches",
    "null",
]
FLOAT_RTOL = 1e-9  # float64 sums reduced over two ranks in another order
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]


def _args(command: str, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        command,
        "--config",
        TINY,
        "--run_dir",
        str(run_dir),
        "--data.init_args.cache_dir",
        str(cache),
        *DATA,
        *extra,
    ]


def _single(command: str, run_dir: Path, cache: Path, *extra: str) -> dict:
    main(_args(command, run_dir, cache, *extra))
    return json.loads((run_dir / "metrics.json").read_text())


def _ddp(command: str, run_dir: Path, cache: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_curv", *_args(command, run_dir, cache, *extra), *DDP]
    done = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def _assert_same_metrics(single: dict, ddp: dict) -> None:
    assert set(single) == set(ddp)
    for key, value in single.items():
        if key.startswith(("mem", "util/task")):
            assert ddp[key] == value, key  # rates over whole sets: exactly equal
        else:
            assert ddp[key] == pytest.approx(value, rel=FLOAT_RTOL), key


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cache = root / "cache"
    _single("fit", root / "fit", cache)
    ckpt = root / "fit" / "checkpoints" / "final.ckpt"
    _single("collect", root / "collect", cache, "--ckpt_path", str(ckpt))
    return root, cache, ckpt, root / "collect" / "factors.safetensors"


def test_evaluate_edit_and_analyze_under_ddp_equal_one_process(trained, tmp_path):
    root, cache, ckpt, factors = trained
    common = ("--ckpt_path", str(ckpt))
    single = _single("evaluate", tmp_path / "eval1", cache, *common)
    ddp = _ddp("evaluate", tmp_path / "eval2", cache, *common)
    _assert_same_metrics(single["metrics"], ddp["metrics"])

    edit = ("--factors", str(factors), "--edit.rho", "[1.0, 0.3]", *common)
    single = _single("edit", tmp_path / "edit1", cache, *edit)
    ddp = _ddp("edit", tmp_path / "edit2", cache, *edit)
    _assert_same_metrics(single["before"], ddp["before"])
    for a, b in zip(single["edits"], ddp["edits"], strict=True):
        _assert_same_metrics(
            {k: v for k, v in a.items() if isinstance(v, float)}, {k: v for k, v in b.items() if isinstance(v, float)}
        )
    assert (single["selected"] or {}).get("rho") == (ddp["selected"] or {}).get("rho")
    out = tmp_path / "edit2"
    if ddp["selected"] is not None:
        assert (out / "checkpoints" / "edited.ckpt").is_file() and (out / "edited_model" / "config.json").is_file()
    assert (out / "eigens.safetensors").is_file()
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"

    single = _single("analyze", tmp_path / "an1", cache, "--factors", str(factors), *common)
    ddp = _ddp("analyze", tmp_path / "an2", cache, "--factors", str(factors), *common)
    _assert_same_metrics(single["metrics"], ddp["metrics"])
    assert ddp["auroc"] == pytest.approx(single["auroc"])
    assert (tmp_path / "an2" / "analysis.json").is_file()


def test_compare_under_ddp_equals_one_process(trained, tmp_path):
    root, cache, ckpt, factors = trained
    args = (
        "--ckpt_path", str(ckpt), "--factors", str(factors), "--edit.rho", "[0.3]",
        "--compare.methods", "[curvature, random_energy, svd]", "--compare.svd_rho", "[0.5]",
    )  # fmt: skip
    single = _single("compare", tmp_path / "c1", cache, *args)
    ddp = _ddp("compare", tmp_path / "c2", cache, *args)
    assert [r["method"] for r in single["rows"]] == [r["method"] for r in ddp["rows"]]
    for a, b in zip(single["rows"], ddp["rows"], strict=True):
        _assert_same_metrics(
            {k: v for k, v in a.items() if k.startswith(("mem", "util"))},
            {k: v for k, v in b.items() if k.startswith(("mem", "util"))},
        )
    assert (tmp_path / "c2" / "comparison.csv").is_file()


def test_fit_and_pipeline_complete_under_ddp(tmp_path):
    cache = tmp_path / "cache"
    fit = _ddp("fit", tmp_path / "fit", cache)
    assert fit["command"] == "fit" and (tmp_path / "fit" / "checkpoints" / "final.ckpt").is_file()
    assert (tmp_path / "fit" / "model" / "config.json").is_file()
    pipeline = _ddp("pipeline", tmp_path / "pipe", cache)
    assert pipeline["command"] == "pipeline" and pipeline["collect"]["num_samples"] > 0
    assert {"fit", "before", "edits", "selected"} <= set(pipeline)
