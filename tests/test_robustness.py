"""Issue 15, nothing lost when things go wrong: whole-or-absent checkpoints and exports, one-line user errors with
exit code 2, and a lock that keeps two live commands out of one run directory."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_curv.cli import main
from lightning_curv.trainer import AtomicCheckpointIO, CurvTrainer, install_atomic_checkpoint_io
from lightning_curv.utils import atomic_dir
from lightning_curv.utils.errors import CheckpointError, validate_checkpoint
from lightning_curv.utils.runlock import LOCK_NAME, RunDirInUseError, acquire_run_lock, release_run_lock

TINY = str(Path(__file__).parent / "configs" / "tiny_tinymem.yaml")


def _full_disk_after_half(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())


# ---------------------------------------------------------------------------- A: checkpoints and exports
def test_checkpoint_io_leaves_no_truncated_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    def half_save(checkpoint, filepath):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        _full_disk_after_half(filepath, buffer.getvalue())

    target = tmp_path / "checkpoints" / "final.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1000)}, target)
    before = target.read_bytes()
    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", half_save)
    with pytest.raises(OSError, match="final.ckpt") as caught:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, target)
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == before, "the old checkpoint survives a failed overwrite"
    target.unlink()
    with pytest.raises(OSError, match=str(target)):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, target)
    assert list(target.parent.iterdir()) == [], "no final file and no temporary file"


def test_curv_trainer_saves_through_the_atomic_checkpoint_io_unless_one_is_configured(tmp_path, monkeypatch):
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    kwargs = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = CurvTrainer(max_steps=1, limit_val_batches=0, enable_model_summary=False, **kwargs)
    trainer.fit(BoringModel())

    monkeypatch.setattr(
        "lightning.fabric.plugins.io.torch_io._atomic_save",
        lambda checkpoint, filepath: _full_disk_after_half(filepath, b"x" * 100),
    )
    target = tmp_path / "final.ckpt"
    with pytest.raises(OSError, match="final.ckpt"):
        trainer.save_checkpoint(target)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert list(tmp_path.iterdir()) == []

    class Custom(TorchCheckpointIO):
        pass

    custom = CurvTrainer(plugins=[Custom()], **kwargs)
    install_atomic_checkpoint_io(custom)
    assert type(custom.strategy.checkpoint_io) is Custom


def test_causal_lm_export_leaves_no_half_folder(tmp_path):
    from lightning_curv.models.causal_lm import LitCausalLM

    def save_pretrained(path):
        Path(path, "config.json").write_text("{}")
        _full_disk_after_half(Path(path, "model.safetensors"), b"y" * 100)

    target = tmp_path / "model"
    with pytest.raises(OSError, match=str(target)) as caught:
        LitCausalLM.export(SimpleNamespace(model=SimpleNamespace(save_pretrained=save_pretrained)), str(target))
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []

    # A complete export replaces an existing folder as a whole.
    target.mkdir()
    (target / "stale.bin").write_text("old")
    LitCausalLM.export(
        SimpleNamespace(model=SimpleNamespace(save_pretrained=lambda p: Path(p, "config.json").write_text("{}"))),
        str(target),
    )
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_vit_export_leaves_no_half_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    from lightning_curv.models.vit import LitViT

    fake = SimpleNamespace(model=nn.Linear(2, 2), name="tiny", create_kwargs={})
    target = tmp_path / "model"
    LitViT.export(fake, str(target))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert set(before) == {"model.safetensors", "config.json"}

    monkeypatch.setattr(
        "safetensors.torch.save_file",
        lambda tensors, filename, metadata=None: _full_disk_after_half(filename, b"z" * 64),
    )
    with pytest.raises(OSError, match=str(target)):
        LitViT.export(fake, str(target))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    _no_temp_files(tmp_path)


def test_atomic_dir_error_removes_the_temporary_folder(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- B: one-line user errors
def _truncated_checkpoint(tmp_path: Path) -> Path:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(4096)}, "hyper_parameters": {}}, good)
    bad = tmp_path / "final.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return bad


def test_validate_checkpoint_names_a_truncated_or_foreign_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, good)
    validate_checkpoint(good)
    bad = _truncated_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"final\.ckpt is not a readable checkpoint \(truncated or corrupt\?\)"):
        validate_checkpoint(bad)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.ckpt is not a readable checkpoint"):
        validate_checkpoint(text)


def test_main_turns_user_errors_into_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    bad = _truncated_checkpoint(tmp_path)
    args = ["evaluate", "--config", TINY, "--run_dir", str(tmp_path / "run"), "--ckpt_path", str(bad)]
    with pytest.raises(CheckpointError):  # in-process callers passing args get the exception
        main(args)
    with pytest.raises(SystemExit) as caught:
        main(args, exit_on_error=True)
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(bad) in err[-1] and "truncated or corrupt" in err[-1]
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("LIGHTNING_CURV_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(args, exit_on_error=True)
    monkeypatch.delenv("LIGHTNING_CURV_DEBUG")
    with pytest.raises(CheckpointError):
        main([*args, "--debug"], exit_on_error=True)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environment.pop("LIGHTNING_CURV_DEBUG", None)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "lightning_curv", *args], capture_output=True, text=True, env=environment, timeout=300
    )


@pytest.mark.slow
def test_truncated_checkpoint_is_one_line_with_exit_code_2_and_debug_shows_the_traceback(tmp_path):
    bad = _truncated_checkpoint(tmp_path)
    args = ["evaluate", "--config", TINY, "--run_dir", str(tmp_path / "run"), "--ckpt_path", str(bad)]
    done = _cli(*args)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "not a readable checkpoint" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
    debug = _cli(*args, "--debug")
    assert debug.returncode not in (0, 2) and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    env_debug = _cli(*args, LIGHTNING_CURV_DEBUG="1")
    assert "Traceback" in env_debug.stderr


# ---------------------------------------------------------------------------- C: run-directory lock
@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, live_pid):
    (tmp_path / LOCK_NAME).write_text(f"{live_pid}\n")
    with pytest.raises(RunDirInUseError, match=f"in use by another command \\(process {live_pid}"):
        acquire_run_lock(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == f"{live_pid}\n"

    dead = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(f"{dead}\n")
    with pytest.warns(UserWarning, match="stale lock"):
        lock = acquire_run_lock(tmp_path)
    assert lock.read_text() == f"{os.getpid()}\n"
    release_run_lock(lock)
    assert not lock.exists()


@pytest.mark.slow
def test_command_refuses_a_run_dir_locked_by_a_live_command(tmp_path, live_pid):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"keep": true}')
    (run_dir / LOCK_NAME).write_text(f"{live_pid}\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    common = ["--config", TINY, "--run_dir", str(run_dir), "--data.init_args.cache_dir", str(tmp_path / "cache")]
    done = _cli("evaluate", *common)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(run_dir) in errors[0] and str(live_pid) in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before, "the run directory is untouched"


@pytest.mark.slow
def test_command_takes_over_a_stale_lock_and_releases_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(f"{_dead_pid()}\n")
    common = ["--config", TINY, "--run_dir", str(run_dir), "--data.init_args.cache_dir", str(tmp_path / "cache")]
    with pytest.warns(UserWarning, match="stale lock"):
        main(["evaluate", *common])
    assert (run_dir / "metrics.json").is_file()
    assert not (run_dir / LOCK_NAME).exists(), "the lock is released at the end"


# ---------------------------------------------------------------------------- D: NaN/Inf caught in collection
def _collect_tiny(tmp_path, model, callbacks=()):
    from lightning.pytorch import Trainer

    from lightning_curv.callbacks import KFACCallback
    from lightning_curv.data import TinyMemDataModule

    dm = TinyMemDataModule(
        num_train_per_rule=10, num_heldout_per_rule=4, num_noise=4, noise_duplicates=2, batch_size=8,
        eval_batch_size=8, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    callback = KFACCallback(modules=["model.layers.1.mlp.*"], output=str(tmp_path / "f.safetensors"))
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, inference_mode=False,
        callbacks=[callback, *callbacks], default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.predict(model, datamodule=dm, return_predictions=False)
    return callback


def _tiny_lm():
    from lightning_curv.models import LitCausalLM
    from tests.cases import TINYMEM_LLAMA

    torch.manual_seed(0)
    lit = LitCausalLM(config=TINYMEM_LLAMA)
    lit.configure_model()
    return lit


def test_nan_weights_of_a_tracked_module_fail_before_the_pass(tmp_path):
    lit = _tiny_lm()
    with torch.no_grad():
        lit.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Non-finite values \(NaN/Inf\) in the weights of .*layers\.1\.mlp\.up_proj"):
        _collect_tiny(tmp_path, lit)
    assert not (tmp_path / "f.safetensors").exists()


def test_non_finite_statistics_name_the_module_and_the_first_bad_batch(tmp_path):
    from lightning.pytorch import Callback

    class PoisonSecondBatch(Callback):  # an Inf activation entering the tracked layers at batch 1 only
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            layer = pl_module.model.model.layers[1].mlp

            def hook(module, args):
                return (args[0] * float("inf"),) if batch_idx == 1 else None

            if batch_idx == 1:
                self.handle = layer.register_forward_pre_hook(hook)
            elif getattr(self, "handle", None) is not None:
                self.handle.remove()

    with pytest.raises(ValueError, match=r"K-FAC statistics of .*layers\.1\.mlp\..* at batch 1"):
        _collect_tiny(tmp_path, _tiny_lm(), [PoisonSecondBatch()])
    assert not (tmp_path / "f.safetensors").exists()
    assert not list(tmp_path.glob("*partial*"))
