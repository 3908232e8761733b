import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_curv.curvature import KFACAccumulator
from lightning_curv.workflow.plan import PlanOptions, architecture_config, plan_collection

TINY = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 40,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
}
PATTERN = ["re:model\\.layers\\.(1|2)\\.mlp\\.(gate|up|down)_proj"]


def _plan(model_args, modules, dtype="float32"):
    return plan_collection(
        model_args, modules, accumulation_dtype=dtype, batch_size=2, block_size=8, options=PlanOptions(gpu_memory_gb=1)
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_accumulator_bytes_equal_what_collection_allocates(dtype):
    torch.manual_seed(0)
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**fields))
    acc = KFACAccumulator(model, PATTERN, dtype=getattr(torch, dtype))
    ids = torch.randint(0, 64, (2, 8))
    acc.attach()
    try:
        acc.select(None)
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        acc.detach()
    state = acc.state_dict()
    allocated = sum(t.numel() * t.element_size() for key in ("A_sums", "G_sums") for t in state[key].values())
    plan = _plan({"config": TINY}, PATTERN, dtype)
    assert plan["accumulator_bytes"] == allocated
    assert len(plan["modules"]) == 6
    assert plan["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())


def test_olmo2_7b_paper_modules_offline():
    plan = _plan(
        {"pretrained": "allenai/OLMo-2-1124-7B", "torch_dtype": "bfloat16"},
        ["re:model\\.layers\\.(23|24|25)\\.mlp\\.(gate|up)_proj"],
    )
    assert set(plan["modules"]) == {f"model.layers.{i}.mlp.{p}_proj" for i in (23, 24, 25) for p in ("gate", "up")}
    assert plan["accumulator_bytes"] == 6 * (4096 * 4096 + 11008 * 11008) * 4
    assert plan["eigen_file_tensor_bytes"] == 6 * (4096 * 4096 + 4096 + 11008 * 11008 + 11008) * 4


def test_unknown_hub_name_is_a_clear_error():
    with pytest.raises(ValueError, match="No offline architecture"):
        architecture_config({"pretrained": "someone/unknown-model"})
