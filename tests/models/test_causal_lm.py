"""LitCausalLM: construction, loading, errors, stress-test perturbations, and the K-FAC path through Lightning."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.testing import assert_close

from lightning_curv.callbacks import KFACCallback
from lightning_curv.curvature import collect_factors, load_factors
from lightning_curv.models import LitCausalLM
from tests.cases import TINYMEM_LLAMA, tinymem_datamodule

TINY = TINYMEM_LLAMA
FP32 = {"rtol": 1e-5, "atol": 1e-7}  # same float32 computation, different batching of the same rows


def test_init_is_cheap_and_configure_model_builds_the_backbone():
    lit = LitCausalLM(config=TINY)
    assert lit.model is None
    lit.configure_model()
    assert type(lit.model).__name__ == "LlamaForCausalLM"
    assert lit.curvature_modules() == [f"model.layers.*.mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_pretrained_directory_round_trip(tmp_path):
    lit = LitCausalLM(config=TINY)
    lit.configure_model()
    lit.export(str(tmp_path / "model"))
    again = LitCausalLM(pretrained=str(tmp_path / "model"))
    again.configure_model()
    for (name, a), (_, b) in zip(lit.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="exactly one of `pretrained`"):
        LitCausalLM()
    with pytest.raises(ValueError, match="needs a `model_type`"):
        LitCausalLM(config={"hidden_size": 8})
    lit = LitCausalLM(config={**TINY, "model_type": "not_a_model"})
    with pytest.raises(ValueError, match="Unknown model_type 'not_a_model'"):
        lit.configure_model()
    with pytest.raises(ValueError, match="positive token counts"):
        LitCausalLM(config=TINY, stress_shifts=[0])


def test_vocabulary_smaller_than_the_data_is_rejected(tmp_path):
    lit = LitCausalLM(config={**TINY, "vocab_size": 8})
    lit.configure_model()
    with pytest.raises(ValueError, match="vocab_size is 8"):
        lit.check_data(tinymem_datamodule(tmp_path))


def test_stress_perturbations_move_the_split_and_prepend_context():
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    target = torch.tensor([[1, 2, 3], [4, 5, -100]])
    p, m, t = LitCausalLM._perturb("shift", 1, prompt, mask, target)
    assert p.tolist() == [[0, 5, 6, 1], [7, 8, 9, 4]] and m.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert t.tolist() == [[2, 3], [5, -100]]
    with pytest.raises(ValueError, match="leaves no target token"):
        LitCausalLM._perturb("shift", 2, prompt, mask, target)
    p, m, t = LitCausalLM._perturb("context", 2, prompt, mask, target)
    assert torch.equal(t, target)
    assert p[1, -3:].tolist() == [7, 8, 9] and p[1, -5:-3].tolist() == [5, 6]  # row 0's last 2 tokens first
    assert m[0].tolist()[-4:] == [1, 1, 1, 1]


def test_kfac_callback_equals_direct_curvature_call(tmp_path):
    dm = tinymem_datamodule(tmp_path)
    lit = LitCausalLM(config=TINY)
    lit.configure_model()
    patterns = ["model.layers.1.mlp.*"]
    callback = KFACCallback(modules=patterns, fisher="true", seed=3, output=str(tmp_path / "f.safetensors"))
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        inference_mode=False,
        callbacks=[callback],
        default_root_dir=str(tmp_path),
    )
    trainer.predict(lit, datamodule=dm, return_predictions=False)
    direct = collect_factors(lit.model, dm.collect_dataloader(), patterns, fisher="true", seed=3)
    from_file = load_factors(tmp_path / "f.safetensors", model=lit.model)
    for name, f in direct.items():
        assert from_file[name].num_samples == f.num_samples
        assert_close(from_file[name].A, f.A, **FP32)
        assert_close(from_file[name].G, f.G, **FP32)
    assert lit.curvature_collector is None and all(not m._forward_hooks for m in lit.model.modules())
