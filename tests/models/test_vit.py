"""LitViT: training and evaluation in a Trainer, CLS-token curvature through the callback, export, errors."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch.testing import assert_close

from lightning_curv.callbacks.kfac import KFACCallback
from lightning_curv.curvature import KFACAccumulator, classifier_step, load_factors
from lightning_curv.data.images import NoisyLabelImageDataModule
from lightning_curv.models.vit import EXPORT_CONFIG, EXPORT_WEIGHTS, LitViT, lr_factor, read_vit_checkpoint

#: Tiny ViT on 8x8 digits: 16 patches of 2x2 plus the class token.
TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2}
#: Factors from the callback and from a direct call run the same float32 ops in the same order.
FACTOR_TOL = {"rtol": 1e-6, "atol": 1e-7}
#: A float32 accumulated factor against a float64 recomputation from captured inputs.
FLOAT32_TOL = {"rtol": 1e-5, "atol": 1e-6}
EVAL_KEYS = {
    "val/util/val_acc",
    "val/util/train_clean_acc",
    "val/mem/memorized",
    "val/mem/gt_recovery",
    "val/mem_sel/memorized",
    "val/mem_sel/gt_recovery",
}


def tiny_vit(**overrides) -> LitViT:
    args = {"num_classes": 10, "img_size": 8, "patch_size": 2, "in_chans": 1, "model_kwargs": dict(TINY)}
    args.update(overrides)
    return LitViT(**args)


def digits(**overrides) -> NoisyLabelImageDataModule:
    args = {"batch_size": 16, "eval_batch_size": 64, "limit_train": 64}
    args.update(overrides)
    return NoisyLabelImageDataModule(**args)


def trainer(**overrides) -> Trainer:
    args = {
        "accelerator": "cpu",
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    args.update(overrides)
    return Trainer(**args)


def built(model: LitViT) -> LitViT:
    model.configure_model()
    return model.eval()


# ---------------------------------------------------------------------------- training and evaluation
def test_fit_and_validate_log_the_metric_keys() -> None:
    model, dm = LitViT(patch_size=2, model_kwargs=dict(TINY)), digits()  # sizes come from the data module
    trainer_ = trainer()
    start = model.model
    trainer_.fit(model, datamodule=dm)
    assert start is None and model.model is not None
    assert (model.hparams["num_classes"], model.hparams["img_size"], model.hparams["in_chans"]) == (10, 8, 1)
    assert {"train/loss", "train/acc_step"} <= set(trainer_.callback_metrics)
    assert math.isfinite(float(trainer_.callback_metrics["train/loss"]))

    results = trainer_.validate(model, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer_.callback_metrics.items() if k.startswith("val/")}
    assert set(metrics) == EVAL_KEYS
    assert results[0].keys() >= EVAL_KEYS
    for key, value in metrics.items():
        assert 0.0 <= value <= 1.0, key
    # The metrics equal a direct computation over the same sets.
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(b).argmax(-1) for b in dm.val_dataloader()[0]])
        labels = torch.cat([b["labels"] for b in dm.val_dataloader()[0]])
        test = [model(b).argmax(-1) == b["labels"] for b in dm.val_dataloader()[3]]
    assert metrics["val/util/val_acc"] == pytest.approx((preds == labels).float().mean().item(), abs=1e-6)
    assert metrics["val/mem/memorized"] == pytest.approx(torch.cat(test).float().mean().item(), abs=1e-6)


def test_empty_noisy_sets_do_not_crash() -> None:
    model, dm = tiny_vit(), digits(noise_fraction=0.0)
    trainer_ = trainer()
    trainer_.validate(model, datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer_.callback_metrics.items()}
    assert 0.0 <= metrics["val/util/val_acc"] <= 1.0
    assert math.isnan(metrics["val/mem/memorized"]) and math.isnan(metrics["val/mem_sel/gt_recovery"])


def test_forward_gives_logits_and_training_overfits_a_batch() -> None:
    model = built(tiny_vit())
    batch = {"pixel_values": torch.randn(8, 1, 8, 8), "labels": torch.arange(8) % 10}
    assert model(batch).shape == (8, 10)
    assert torch.equal(model(batch), model(batch["pixel_values"]))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("schedule", ["constant_with_warmup", "cosine", "linear"])
def test_lr_schedule(schedule: str) -> None:
    factor = lr_factor(schedule, warmup_steps=4, total_steps=14)
    assert factor(0) == pytest.approx(0.2) and factor(3) == pytest.approx(0.8) and factor(4) == pytest.approx(1.0)
    assert factor(14) == pytest.approx(1.0 if schedule == "constant_with_warmup" else 0.0, abs=1e-12)


# ---------------------------------------------------------------------------- curvature
def _collect(model: LitViT, dm: NoisyLabelImageDataModule, tmp_path, **callback_args) -> KFACCallback:
    callback = KFACCallback(output=str(tmp_path / "factors.safetensors"), **callback_args)
    predictor = trainer(inference_mode=False, callbacks=[callback])
    predictor.predict(model, dataloaders=dm.collect_dataloader(), return_predictions=False)
    return callback


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_callback_cls_statistics_equal_a_direct_call(tmp_path, fisher: str) -> None:
    dm = digits(limit_train=40, batch_size=16)
    dm.setup("predict")
    model = built(tiny_vit())
    callback = _collect(model, dm, tmp_path, fisher=fisher, seed=3)
    assert model.curvature_collector is None
    assert all(p.requires_grad for p in model.parameters())
    names = [f"blocks.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")]
    assert list(callback.factors) == names

    with KFACAccumulator(model.model, names) as acc:
        for batch in dm.collect_dataloader():
            classifier_step(model.model, batch, acc, position=0, fisher=fisher, seed=3)
        direct = acc.finalize()
    saved = load_factors(callback.output_path, model=model.model)
    for name in names:
        assert callback.factors[name].num_samples == direct[name].num_samples == 40
        assert_close(callback.factors[name].A, direct[name].A, **FACTOR_TOL)
        assert_close(callback.factors[name].G, direct[name].G, **FACTOR_TOL)
        assert_close(saved[name].G, direct[name].G, **FACTOR_TOL)


def test_curv_trainer_collect_equals_a_direct_call(tmp_path) -> None:
    from lightning_curv import CollectOptions, CurvTrainer

    dm = digits(limit_train=40, batch_size=16)
    model = built(tiny_vit())
    collector = CurvTrainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    path = collector.collect(model, datamodule=dm, options=CollectOptions(modules=["blocks.1.mlp.*"], seed=5))
    factors = load_factors(path, model=model.model)
    assert list(factors) == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    with KFACAccumulator(model.model, list(factors)) as acc:
        for batch in dm.predict_dataloader():
            classifier_step(model.model, batch, acc, position=0, fisher="true", seed=5)
        direct = acc.finalize()
    for name, f in factors.items():
        assert f.num_samples == direct[name].num_samples == 40
        assert_close(f.A, direct[name].A, **FACTOR_TOL)
        assert_close(f.G, direct[name].G, **FACTOR_TOL)


def test_cls_statistics_read_the_class_token(tmp_path) -> None:
    """The A factor of fc1 in block 0 is the mean outer product of its input at token 0 only."""
    dm = digits(limit_train=24, batch_size=8)
    dm.setup("predict")
    model = built(tiny_vit())
    callback = _collect(model, dm, tmp_path, modules=["blocks.0.mlp.fc1"], fisher="empirical")
    inputs = []
    handle = model.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: inputs.append(i[0][:, 0].detach()))
    with torch.no_grad():
        for batch in dm.collect_dataloader():
            model(batch)
    handle.remove()
    a = torch.cat(inputs).double()  # [N, d]
    assert_close(callback.factors["blocks.0.mlp.fc1"].A.double(), a.T @ a / a.shape[0], **FLOAT32_TOL)


def test_token_mode_counts_every_position_and_respects_the_budget(tmp_path) -> None:
    dm = digits(limit_train=24, batch_size=8)
    dm.setup("predict")
    model = built(tiny_vit())
    tokens = model.tokens_per_image()
    assert tokens == 17
    callback = _collect(model, dm, tmp_path, mode="tokens", modules=["blocks.1.mlp.fc2"])
    assert callback.factors["blocks.1.mlp.fc2"].num_samples == 24 * tokens
    budget = 5 * tokens - 3  # whole images: 5 of them
    callback = _collect(model, dm, tmp_path / "b", mode="tokens", modules=["blocks.1.mlp.fc2"], max_tokens=budget)
    assert callback.factors["blocks.1.mlp.fc2"].num_samples == 5 * tokens


def test_default_modules_and_cls_position() -> None:
    model = built(tiny_vit())
    assert model.curvature_modules() == ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
    assert model.head_position() == 0
    assert built(tiny_vit(cls_position=3)).head_position() == 3
    assert tiny_vit(curvature_modules=["blocks.0.mlp.fc1"]).curvature_modules() == ["blocks.0.mlp.fc1"]


def test_average_pooling_without_class_token_asks_for_token_mode() -> None:
    model = built(tiny_vit(model_kwargs={**TINY, "global_pool": "avg", "class_token": False}))
    batch = {
        "pixel_values": torch.randn(2, 1, 8, 8),
        "labels": torch.tensor([1, 2]),
        "index": torch.arange(2),
    }
    with KFACAccumulator(model.model, ["blocks.0.mlp.fc1"]) as acc:
        with pytest.raises(ValueError, match="mode='tokens'"):
            model.kfac_step(batch, acc, fisher="true", seed=0, max_samples=None, mode="cls")
        assert model.kfac_step(batch, acc, fisher="true", seed=0, max_samples=None, mode="tokens") == 2 * 16


# ---------------------------------------------------------------------------- export and checkpoints
def test_export_round_trip(tmp_path) -> None:
    model = built(tiny_vit(model_kwargs={**TINY, "mlp_ratio": 2.0}))
    x = torch.randn(4, 1, 8, 8)
    model.export(str(tmp_path / "export"))
    assert (tmp_path / "export" / EXPORT_WEIGHTS).is_file() and (tmp_path / "export" / EXPORT_CONFIG).is_file()

    for where in (tmp_path / "export", tmp_path / "export" / EXPORT_WEIGHTS):
        reloaded = built(LitViT(checkpoint=str(where)))  # architecture from the exported config
        assert reloaded.hparams["model_kwargs"] == {**TINY, "mlp_ratio": 2.0}
        assert (reloaded.hparams["img_size"], reloaded.hparams["patch_size"]) == (8, 2)
        assert torch.equal(reloaded(x), model(x))
        for key, value in model.model.state_dict().items():
            assert torch.equal(reloaded.model.state_dict()[key], value)

    with pytest.raises(ValueError, match="do not fit"):
        built(LitViT(checkpoint=str(tmp_path / "export"), model_kwargs={"embed_dim": 32}))
    with pytest.raises(ValueError, match="holds a"):
        built(LitViT(checkpoint=str(tmp_path / "export"), name="vit_small_patch16_224"))
    with pytest.raises(FileNotFoundError):
        built(LitViT(checkpoint=str(tmp_path / "missing")))


def test_state_dict_and_lightning_checkpoints(tmp_path) -> None:
    source = built(tiny_vit())
    x = torch.randn(3, 1, 8, 8)
    weights = {f"module.{k}": v for k, v in source.model.state_dict().items()}  # a DDP-style torch checkpoint
    torch.save({"state_dict": weights}, tmp_path / "w.pth")
    model = built(tiny_vit(checkpoint=str(tmp_path / "w.pth")))  # no record: sizes from the arguments
    assert torch.equal(model(x), source(x))

    dm = digits(limit_train=32)
    trainer_ = trainer(max_steps=1, default_root_dir=str(tmp_path))
    trainer_.fit(model.train(), datamodule=dm)
    trainer_.save_checkpoint(tmp_path / "last.ckpt")
    model.eval()
    assert not torch.equal(model(x), source(x))
    record, state = read_vit_checkpoint(str(tmp_path / "last.ckpt"))
    assert record == {
        "name": "vit_tiny_patch16_224",
        "create_kwargs": {"num_classes": 10, "img_size": 8, "patch_size": 2, "in_chans": 1, **TINY},
    }
    assert set(state) == set(model.model.state_dict())
    (tmp_path / "w.pth").unlink()  # a Lightning checkpoint is self-contained
    from_init = built(LitViT(checkpoint=str(tmp_path / "last.ckpt")))
    from_lightning = LitViT.load_from_checkpoint(tmp_path / "last.ckpt").eval()
    assert torch.equal(from_init(x), model(x)) and torch.equal(from_lightning(x), model(x))


def test_pretrained_weights_file_is_adapted_by_timm(tmp_path) -> None:
    """pretrained=True + a local file: timm drops a classifier of another size and keeps the rest."""
    source = built(tiny_vit(name="vit_tiny_patch16_224", num_classes=5))
    source.export(str(tmp_path / "src"))
    model = built(tiny_vit(name="vit_tiny_patch16_224", pretrained=True, checkpoint=str(tmp_path / "src")))
    assert model.model.head.out_features == 10
    assert torch.equal(model.model.blocks[1].mlp.fc2.weight, source.model.blocks[1].mlp.fc2.weight)


# ---------------------------------------------------------------------------- errors
def test_unknown_timm_name_suggests_close_names() -> None:
    model = LitViT(name="vit_tiny_patch16_22")  # __init__ stays cheap: nothing is built yet
    with pytest.raises(ValueError, match="Unknown timm model 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        model.configure_model()


def test_image_size_not_divisible_by_patch() -> None:
    with pytest.raises(ValueError, match="img_size=10 is not divisible by patch_size=4"):
        LitViT(img_size=10, patch_size=4)
    with pytest.raises(ValueError, match="not divisible by patch_size=16"):
        LitViT(img_size=40).configure_model()  # the patch size the name implies
    with pytest.raises(ValueError, match="not divisible by patch_size=3"):
        tiny_vit(patch_size=3)


def test_model_that_does_not_fit_the_data() -> None:
    model, dm = tiny_vit(img_size=16, patch_size=4), digits()
    with pytest.raises(ValueError, match="8px images but img_size=16"):
        trainer().validate(model, datamodule=dm, verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"scheduler": "step"}, "scheduler"),
        ({"model_kwargs": {"img_size": 8}}, "not inside model_kwargs"),
        ({"cls_position": -1}, "cls_position"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LitViT(**kwargs)


# ---------------------------------------------------------------------------- CLI
TINY_CONFIG = """
model:
  class_path: lightning_curv.models.vit.LitViT
  init_args:
    patch_size: 2
    model_kwargs: {embed_dim: 16, depth: 2, num_heads: 2}
data:
  class_path: lightning_curv.data.images.NoisyLabelImageDataModule
  init_args: {batch_size: 32, limit_train: 64}
trainer:
  {accelerator: cpu, max_steps: 2, logger: false, enable_checkpointing: false, enable_progress_bar: false}
collect: {fisher: empirical, modules: ["blocks.*.mlp.fc2"]}
edit: {rho: [1.0, 0.5]}
"""


def test_cli_pipeline_writes_the_vision_metric_keys(tmp_path) -> None:
    import json

    from lightning_curv.cli import main

    config = tmp_path / "tiny_vit.yaml"
    config.write_text(TINY_CONFIG)
    main(["pipeline", "--config", str(config), "--run_dir", str(tmp_path / "run")])
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    keys = {key.removeprefix("val/") for key in EVAL_KEYS}
    assert keys <= set(payload["before"]) and keys <= set(payload["edits"][0])
    assert [row["rho"] for row in payload["edits"]] == [1.0, 0.5]
    for key in keys:  # rho = 1 is the identity
        assert payload["edits"][0][key] == pytest.approx(payload["before"][key], abs=1e-9)
    assert payload["edits"][1]["modules"] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    reloaded = built(LitViT(checkpoint=str(tmp_path / "run" / "model")))
    assert reloaded.hparams["model_kwargs"] == TINY


# ---------------------------------------------------------------------------- example-tied dropout
def test_models_import_neither_callbacks_nor_baselines() -> None:
    import ast
    from pathlib import Path

    import lightning_curv.models as models

    for path in Path(models.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        bad = [n for n in names if n.startswith(("lightning_curv.baselines", "lightning_curv.callbacks"))]
        assert not bad, f"{path.name} imports {bad}"


def test_example_tied_dropout_is_wired_from_outside() -> None:
    from lightning_curv.baselines import add_example_tied_dropout, untrained_copy

    base = built(tiny_vit())
    etd_model = untrained_copy(base)
    assert isinstance(etd_model, LitViT) and etd_model.model is None
    wiring = add_example_tied_dropout(etd_model, p_fixed=0.5, p_mem=0.25, seed=1)
    assert wiring.etd is None  # installed once configure_model has built the backbone
    trainer(max_steps=2).fit(etd_model, datamodule=digits())
    etd = wiring.etd
    assert etd is not None and etd.layers == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    hidden = {}
    handle = etd_model.model.blocks[0].mlp.fc2.register_forward_pre_hook(lambda m, args: hidden.update(x=args[0]))
    etd_model.eval()
    with torch.no_grad():
        etd_model.model(torch.randn(3, 1, 8, 8))
    handle.remove()
    fixed = etd.num_fixed("blocks.0.mlp.fc2")
    assert torch.all(hidden["x"][..., fixed:] == 0), "evaluation drops every memorization channel"
    assert torch.any(hidden["x"][..., :fixed] != 0)
    wiring.remove()
    with torch.no_grad():
        etd_model.model(torch.randn(3, 1, 8, 8))  # no hooks left: no error, every channel on


def test_cli_compare_on_vit_includes_example_tied_dropout(tmp_path) -> None:
    import json

    from lightning_curv.cli import main

    config = tmp_path / "tiny_vit.yaml"
    config.write_text(TINY_CONFIG)
    main(["pipeline", "--config", str(config), "--run_dir", str(tmp_path / "fit")])
    main([
        "compare", "--config", str(config), "--run_dir", str(tmp_path / "cmp"),
        "--ckpt_path", str(tmp_path / "fit" / "checkpoints" / "final.ckpt"),
        "--factors", str(tmp_path / "fit" / "factors.safetensors"),
        "--edit.rho", "[0.5]", "--compare.svd_rho", "[0.5]",
        # With a logger, Lightning merges the module's and the data module's hparams and rejects shared keys
        # that differ (the ViT records the in_chans it resolved from the data; the config leaves it null).
        "--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline", "true",
    ])  # fmt: skip
    payload = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    methods = [row["method"] for row in payload["rows"]]
    assert methods == ["curvature", "random_energy", "random_count", "svd", "example_tied_dropout"]
    assert any("balanced_subnet skipped" in note for note in payload["notes"])
    etd_row = payload["rows"][-1]
    assert {"mem/memorized", "util/val_acc"} <= set(etd_row)
