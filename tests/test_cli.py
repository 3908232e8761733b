"""End-to-end tests of every command through the real CLI entry point, on a seconds-long TinyMem config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_curv.cli import main
from lightning_curv.curvature import load_factors, read_metadata

pytestmark = pytest.mark.slow  # every test here runs the real CLI end to end

TINY = str(Path(__file__).parent / "configs" / "tiny_tinymem.yaml")
TINYMEM_KEYS = {
    "mem/noise_memorized",
    "mem/noise_rule_following",
    "mem_sel/noise_memorized",
    "util/ppl",
    "util/ppl_batch_mean",
    "util/task_acc",
    "util/task_token_acc",
}


def run(command: str, run_dir: Path, cache: Path, *extra: str) -> dict:
    main([command, "--config", TINY, "--run_dir", str(run_dir), "--data.init_args.cache_dir", str(cache), *extra])
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny `fit` run shared by the tests below: (run_dir, cache_dir)."""
    root = tmp_path_factory.mktemp("fit")
    run(
        "fit",
        root / "fit",
        root / "cache",
    )
    return root / "fit", root / "cache"


@pytest.fixture(scope="module")
def collected(fitted, tmp_path_factory):
    fit_dir, cache = fitted
    out = tmp_path_factory.mktemp("collect") / "run"
    run("collect", out, cache, "--ckpt_path", str(fit_dir / "checkpoints" / "final.ckpt"))
    return out


def _in_range(metrics: dict) -> None:
    for key, value in metrics.items():
        if key.startswith(("mem", "util/task")):
            assert 0.0 <= value <= 1.0, (key, value)
    assert metrics["util/ppl"] >= 1.0


def test_fit_writes_checkpoint_export_config_and_metrics(fitted):
    fit_dir, _ = fitted
    payload = json.loads((fit_dir / "metrics.json").read_text())
    assert payload["command"] == "fit"
    assert TINYMEM_KEYS <= set(payload["final"])
    _in_range(payload["final"])
    assert (fit_dir / "checkpoints" / "final.ckpt").is_file()
    assert (fit_dir / "model" / "config.json").is_file()
    assert "max_steps: 4" in (fit_dir / "config.yaml").read_text()


def test_evaluate_checkpoint_and_pretrained_dir_agree(fitted, tmp_path):
    fit_dir, cache = fitted
    from_ckpt = run("evaluate", tmp_path / "a", cache, "--ckpt_path", str(fit_dir / "checkpoints" / "final.ckpt"))
    assert from_ckpt["command"] == "evaluate"
    assert TINYMEM_KEYS <= set(from_ckpt["metrics"])
    _in_range(from_ckpt["metrics"])
    # The save_pretrained export loads through `pretrained` and scores the same.
    from_dir = run(
        "evaluate",
        tmp_path / "b",
        cache,
        "--model.init_args.config",
        "null",
        "--model.init_args.pretrained",
        str(fit_dir / "model"),
    )
    assert from_dir["metrics"]["util/ppl"] == pytest.approx(from_ckpt["metrics"]["util/ppl"], rel=1e-5)
    assert from_dir["metrics"]["util/task_token_acc"] == from_ckpt["metrics"]["util/task_token_acc"]


def test_command_line_options_win_over_the_checkpoint_hparams(fitted, tmp_path):
    # LightningCLI lets a checkpoint's hparams override the config; here an option given with --ckpt_path counts.
    fit_dir, cache = fitted
    payload = run(
        "evaluate", tmp_path / "stress", cache,
        "--ckpt_path", str(fit_dir / "checkpoints" / "final.ckpt"),
        "--model.init_args.stress_shifts", "[1]",
    )  # fmt: skip
    shifted = [key for key in payload["metrics"] if "/shift1/" in key]
    assert shifted, f"the stress option was dropped: {sorted(payload['metrics'])}"


def test_collect_writes_factor_file_with_metadata(collected):
    payload = json.loads((collected / "metrics.json").read_text())
    assert payload["command"] == "collect" and payload["num_samples"] == 2000
    meta = read_metadata(collected / "factors.safetensors")
    assert meta["fisher"] == "true" and meta["seed"] == 0 and meta["max_tokens"] == 2000
    assert sorted(meta["modules"]) == sorted(payload["modules"])
    assert all(name.startswith("model.layers.1.mlp.") for name in meta["modules"])
    assert not list(collected.glob("*partial*")), "partial sums are removed when the pass completes"


def test_edit_rho_one_reproduces_before_exactly(fitted, collected, tmp_path):
    fit_dir, cache = fitted
    payload = run(
        "edit",
        tmp_path / "edit",
        cache,
        "--ckpt_path",
        str(fit_dir / "checkpoints" / "final.ckpt"),
        "--factors",
        str(collected / "factors.safetensors"),
        "--edit.rho",
        "[1.0, 0.2]",
    )
    assert payload["command"] == "edit"
    before, (identity, small) = payload["before"], payload["edits"]
    for key, value in before.items():
        assert identity[key] == value, f"rho=1 changed {key}"
    assert identity["kept_pairs_fraction"] == 1.0 and identity["removed_energy"] == 0.0
    assert identity["util/ndcg10"] == pytest.approx(1.0)
    assert small["rho"] == 0.2 and 0 < small["kept_pairs_fraction"] < 1
    assert small["util/ppl"] != before["util/ppl"]
    assert small["util/ndcg10"] < 1.0
    # Memorization ties (this model memorized nothing), so the gentler edit is selected.
    assert payload["selected"]["rho"] == 1.0


def test_small_rho_edits_only_configured_modules_and_is_saved(fitted, collected, tmp_path):
    fit_dir, cache = fitted
    out = tmp_path / "edit"
    payload = run(
        "edit",
        out,
        cache,
        "--ckpt_path",
        str(fit_dir / "checkpoints" / "final.ckpt"),
        "--factors",
        str(collected / "factors.safetensors"),
        "--edit.rho",
        "[0.2]",
        "--edit.max_drop",
        "{}",
        "--edit.max_increase",
        "{}",  # accept any utility loss
    )
    assert payload["selected"]["rho"] == 0.2
    original = load_file(fit_dir / "model" / "model.safetensors")
    edited = load_file(out / "edited_model" / "model.safetensors")
    changed = {k for k in original if not torch.equal(original[k], edited[k])}
    assert changed == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert (out / "checkpoints" / "edited.ckpt").is_file()
    assert (out / "edit_tradeoff.png").stat().st_size > 0


def test_pipeline_writes_every_stage(tmp_path):
    payload = run("pipeline", tmp_path / "pipe", tmp_path / "cache")
    assert payload["command"] == "pipeline"
    assert {"fit", "before", "edits", "selected", "evaluate", "factors"} <= set(payload)
    assert [row["rho"] for row in payload["edits"]] == [1.0, 0.3]
    assert TINYMEM_KEYS <= set(payload["before"])
    assert payload["selected"] is not None
    for key in TINYMEM_KEYS:
        assert payload["evaluate"][key] == pytest.approx(payload["selected"][key], abs=1e-6)
    load_factors(tmp_path / "pipe" / "factors.safetensors")


# ---------------------------------------------------------------------------- bad input
def test_factor_file_from_another_checkpoint_is_rejected(fitted, collected, tmp_path):
    _, cache = fitted
    other = tmp_path / "other_fit"
    run("fit", other, cache, "--seed_everything", "1")
    with pytest.raises(ValueError, match="different checkpoint"):
        run(
            "edit",
            tmp_path / "edit",
            cache,
            "--ckpt_path",
            str(other / "checkpoints" / "final.ckpt"),
            "--factors",
            str(collected / "factors.safetensors"),
        )
    assert not (tmp_path / "edit").exists(), "a failed command leaves no run directory"


def test_factor_file_from_another_model_is_rejected(collected, tmp_path):
    with pytest.raises(ValueError, match="different model|does not have"):
        run(
            "edit",
            tmp_path / "edit",
            tmp_path / "cache",
            "--factors",
            str(collected / "factors.safetensors"),
            "--model.init_args.config.num_hidden_layers",
            "1",
        )
    assert not (tmp_path / "edit").exists()


def test_pattern_matching_nothing_is_a_clear_error(fitted, tmp_path):
    _, cache = fitted
    with pytest.raises(ValueError, match="matches no linear layer"):
        run("collect", tmp_path / "c", cache, "--collect.modules", "[model.layers.9.mlp.*]")
    assert not (tmp_path / "c").exists()


def test_rho_out_of_range_is_a_clear_error(collected, tmp_path):
    with pytest.raises(ValueError, match=r"rho must be a number in \(0, 1\]"):
        run(
            "edit",
            tmp_path / "e",
            tmp_path / "cache",
            "--factors",
            str(collected / "factors.safetensors"),
            "--edit.rho",
            "[0.5, 1.5]",
        )
    assert not (tmp_path / "e").exists()


def test_missing_checkpoint_and_factors_are_clear_errors(collected, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        run("evaluate", tmp_path / "a", tmp_path / "cache", "--ckpt_path", str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match="No factor file"):
        run("edit", tmp_path / "b", tmp_path / "cache", "--factors", str(tmp_path / "missing.safetensors"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------- resume and DDP
class CrashAt(__import__("lightning").pytorch.Callback):
    """Simulates a crash in the middle of a curvature pass."""

    def __init__(self, batch: int = 4) -> None:
        self.batch = batch

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            raise RuntimeError("simulated crash")


def _factors_equal(a: Path, b: Path, rtol: float) -> None:
    fa, fb = load_factors(a), load_factors(b)
    assert set(fa) == set(fb)
    for name in fa:
        assert fa[name].num_samples == fb[name].num_samples
        torch.testing.assert_close(fa[name].A, fb[name].A, rtol=rtol, atol=1e-7)
        torch.testing.assert_close(fa[name].G, fb[name].G, rtol=rtol, atol=1e-7)


RESUME_RTOL = 1e-5  # float32 sums added in a different grouping


def test_interrupted_collection_resumes_and_never_mixes_runs(fitted, collected, tmp_path, caplog):
    fit_dir, cache = fitted
    ckpt = ("--ckpt_path", str(fit_dir / "checkpoints" / "final.ckpt"))
    out = tmp_path / "resumed"
    crash = ("--trainer.callbacks+=tests.test_cli.CrashAt", "--collect.save_every_n_batches", "2")
    # A crash in a run with another seed leaves a partial file that must not be reused.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("collect", out, cache, *ckpt, *crash, "--collect.seed", "1")
    assert list(out.glob("*.partial-rank0.safetensors")), "partial sums survive the crash"
    with caplog.at_level("INFO"), pytest.raises(RuntimeError, match="simulated crash"):
        run("collect", out, cache, *ckpt, *crash)
    assert "Ignoring" in caplog.text and "Resuming" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        run("collect", out, cache, *ckpt, "--collect.save_every_n_batches", "2")
    assert "Ignoring" not in caplog.text and "Resuming the curvature pass after 4 batches" in caplog.text
    _factors_equal(out / "factors.safetensors", collected / "factors.safetensors", RESUME_RTOL)
    assert not list(out.glob("*partial*"))


DDP_RTOL = 1e-5  # float32 sums of two shards reduced with gloo


def test_ddp_collect_equals_single_device(fitted, tmp_path):
    import subprocess
    import sys

    fit_dir, cache = fitted
    common = [
        sys.executable,
        "-m",
        "lightning_curv",
        "collect",
        "--config",
        TINY,
        "--data.init_args.cache_dir",
        str(cache),
        "--ckpt_path",
        str(fit_dir / "checkpoints" / "final.ckpt"),
        "--collect.max_tokens",
        "null",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("single", []), ("ddp", ["--trainer.strategy", "ddp", "--trainer.devices", "2"])):
        subprocess.run([*common, "--run_dir", str(tmp_path / name), *extra], check=True, env=env, timeout=300)
    meta = read_metadata(tmp_path / "ddp" / "factors.safetensors")
    assert meta["world_size"] == 2
    _factors_equal(tmp_path / "ddp" / "factors.safetensors", tmp_path / "single" / "factors.safetensors", DDP_RTOL)


def test_compare_writes_table_with_every_post_hoc_method(fitted, collected, tmp_path):
    fit_dir, cache = fitted
    out = tmp_path / "compare"
    payload = run(
        "compare", out, cache,
        "--ckpt_path", str(fit_dir / "checkpoints" / "final.ckpt"),
        "--factors", str(collected / "factors.safetensors"),
        "--edit.rho", "[0.3]", "--compare.svd_rho", "[0.5]",
        "--compare.bsn_ratio", "[0.01]", "--compare.bsn_epochs", "1",
    )  # fmt: skip
    methods = [row["method"] for row in payload["rows"]]
    assert methods == ["curvature", "random_energy", "random_count", "svd", "balanced_subnet"]
    assert any("example_tied_dropout skipped" in note for note in payload["notes"])
    curv, rand_e, rand_c = payload["rows"][:3]
    assert rand_e["removed_energy"] == pytest.approx(curv["removed_energy"], abs=0.02)
    assert rand_c["kept_pairs_fraction"] == pytest.approx(curv["kept_pairs_fraction"])
    header = (out / "comparison.csv").read_text().splitlines()[0].split(",")
    assert {"method", "strength", *TINYMEM_KEYS} <= set(header)
    assert len((out / "comparison.csv").read_text().splitlines()) == 1 + len(methods)
    assert {s["method"] for s in payload["summary"]} == set(methods)
    assert (out / "comparison.png").stat().st_size > 0


def test_analyze_writes_json_and_plots(fitted, collected, tmp_path):
    fit_dir, cache = fitted
    out = tmp_path / "analyze"
    payload = run(
        "analyze", out, cache,
        "--ckpt_path", str(fit_dir / "checkpoints" / "final.ckpt"),
        "--factors", str(collected / "factors.safetensors"),
    )  # fmt: skip
    assert payload["command"] == "analyze"
    assert set(payload["auroc"]) >= {"loss", "low_curvature_energy"}
    assert all(0.0 <= v <= 1.0 for v in payload["auroc"].values())
    mean = payload["bands"]["mean"]
    assert sum(mean["memorized"].values()) == pytest.approx(1.0, abs=1e-5)
    analysis = json.loads((out / "analysis.json").read_text())
    assert set(analysis["spectra"]) == set(payload["spectra"])
    for name in ("spectra", "pair_curvature", "bands", "scores"):
        assert (out / f"{name}.png").stat().st_size > 0


def test_default_logger_is_offline_wandb_with_tables_and_images(fitted, collected, tmp_path):
    fit_dir, cache = fitted
    out = tmp_path / "edit"
    main([
        "edit", "--config", TINY, "--run_dir", str(out), "--data.init_args.cache_dir", str(cache),
        "--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline", "true",
        "--ckpt_path", str(fit_dir / "checkpoints" / "final.ckpt"),
        "--factors", str(collected / "factors.safetensors"), "--edit.rho", "[1.0, 0.2]",
    ])  # fmt: skip
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline W&B run in the run directory"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["command"] == "edit"
    media = runs[0] / "files" / "media"
    images = list((media / "images" / "edit").glob("tradeoff_*.png"))
    assert len(images) == 1 and images[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the trade-off plot was logged"
    (table_file,) = (media / "table" / "edit").glob("sweep_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][0] == "rho" and "mem/noise_memorized" in table["columns"]
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]}
    assert set(rows) == {"before", "1.0", "0.2"}
    for rho, edit in zip(("1.0", "0.2"), metrics["edits"], strict=True):
        assert rows[rho]["util/ppl"] == pytest.approx(edit["util/ppl"])
        assert rows[rho]["removed_energy"] == pytest.approx(edit["removed_energy"])
    assert rows["before"]["util/ppl"] == pytest.approx(metrics["before"]["util/ppl"])


def test_the_whole_config_reaches_the_logger(fitted, tmp_path):
    import yaml

    fit_dir, cache = fitted
    out = tmp_path / "eval"
    main([
        "evaluate", "--config", TINY, "--run_dir", str(out), "--data.init_args.cache_dir", str(cache),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out / "csv"),
        "--ckpt_path", str(fit_dir / "checkpoints" / "final.ckpt"), "--edit.rho", "[0.42]",
    ])  # fmt: skip
    (hparams,) = (out / "csv").rglob("hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert {"model", "data", "trainer", "collect", "edit", "compare", "analyze", "plan"} <= set(logged)
    assert logged["edit"]["rho"] == [0.42]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: logged[k] for k in config} == config  # every section as written to config.yaml
