"""K-FAC statistics against brute force, invariances, Fisher expectations, dtypes and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lightning_curv.curvature import (
    KFACAccumulator,
    ModuleHooks,
    causal_lm_step,
    classifier_step,
    collect_factors,
    load_accumulator_state,
    load_factors,
    resolve_modules,
    save_accumulator_state,
    valid_positions,
)
from lightning_curv.curvature.kfac import budget_prefix, symmetric_accumulate_, symmetrize_upper
from tests.cases import LLAMA_MLP, LM_CASES, lm_batch, split_batch, tiny_llama, tiny_vit
from tests.reference import reference_lm_factors

FP64 = {"rtol": 1e-9, "atol": 1e-12}  # float64 paths that should agree to round-off
BATCHING = {"rtol": 1e-9, "atol": 1e-12}  # float64, different batching
BF16_REL = 0.05  # bf16 autocast forward vs float32 forward, relative Frobenius error
MC_RTOL = 0.05  # Monte-Carlo estimate with 40k samples, relative Frobenius error


def _collect(model, batches, patterns, fisher="empirical", **kw):
    return collect_factors(model, batches, patterns, fisher=fisher, dtype=torch.float64, **kw)


@pytest.mark.parametrize("case", sorted(LM_CASES))
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_factors_match_brute_force(case, fisher):
    build, patterns = LM_CASES[case]
    model = build().double()
    batch = lm_batch(batch_size=4, seq_len=10)
    names = resolve_modules(model, patterns)
    got = _collect(model, [batch], patterns, fisher=fisher, seed=3)
    want = reference_lm_factors(model, batch, names, fisher, seed=3)
    assert set(got) == set(names)
    for name in names:
        A, G, n = want[name]
        assert got[name].num_samples == n
        assert_close(got[name].A, A, **FP64)
        assert_close(got[name].G, G, **FP64)


def test_valid_positions_rules():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    labels = torch.tensor([[5, 5, -100, 5], [5, 5, 5, 5], [5, 5, 5, 5]])
    expected = torch.tensor([[True, False, True, False], [True, False, False, False], [False, True, True, False]])
    assert torch.equal(valid_positions(mask, labels), expected)


def test_gate_and_up_share_one_activation_product():
    model = tiny_llama().double()
    got = _collect(model, [lm_batch()], LLAMA_MLP)
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        assert torch.equal(got[p + "gate_proj"].A, got[p + "up_proj"].A)
        assert not torch.equal(got[p + "gate_proj"].G, got[p + "up_proj"].G)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_batch_size_and_order_invariance(fisher):
    model = tiny_llama().double()
    batch = lm_batch(batch_size=6, seq_len=10, seed=1)
    full = _collect(model, [batch], LLAMA_MLP, fisher=fisher)
    singles = split_batch(batch, 1)[::-1]  # batch size 1, reversed order
    one_by_one = _collect(model, singles, LLAMA_MLP, fisher=fisher)
    for name, f in full.items():
        assert f.num_samples == one_by_one[name].num_samples
        assert_close(one_by_one[name].A, f.A, **BATCHING)
        assert_close(one_by_one[name].G, f.G, **BATCHING)


def test_two_half_passes_merge_to_one_pass():
    model = tiny_llama().double()
    batch = lm_batch(batch_size=6, seed=2)
    first, second = split_batch(batch, 3)
    full = _collect(model, [batch], LLAMA_MLP, fisher="true")
    halves = [_collect(model, [b], LLAMA_MLP, fisher="true") for b in (first, second)]
    for name, f in full.items():
        n1, n2 = halves[0][name].num_samples, halves[1][name].num_samples
        assert n1 + n2 == f.num_samples
        assert_close((n1 * halves[0][name].A + n2 * halves[1][name].A) / (n1 + n2), f.A, **FP64)
        assert_close((n1 * halves[0][name].G + n2 * halves[1][name].G) / (n1 + n2), f.G, **FP64)


def test_true_fisher_differs_from_empirical_and_depends_on_seed():
    model = tiny_llama().double()
    batch = lm_batch(batch_size=4, seed=4)
    emp = _collect(model, [batch], LLAMA_MLP, fisher="empirical")
    true0 = _collect(model, [batch], LLAMA_MLP, fisher="true", seed=0)
    true1 = _collect(model, [batch], LLAMA_MLP, fisher="true", seed=1)
    name = "model.layers.1.mlp.up_proj"
    assert_close(emp[name].A, true0[name].A, **FP64)  # A does not depend on the targets
    assert not torch.allclose(emp[name].G, true0[name].G)
    assert not torch.allclose(true0[name].G, true1[name].G)
    again = _collect(model, [batch], LLAMA_MLP, fisher="true", seed=0)
    assert torch.equal(again[name].G, true0[name].G)


def test_without_index_rows_are_numbered_in_order():
    model = tiny_llama().double()
    batches = [lm_batch(seed=5), lm_batch(seed=6)]
    numbered = [{**b, "index": torch.arange(4) + 4 * i} for i, b in enumerate(batches)]
    plain = [{k: v for k, v in b.items() if k != "index"} for b in batches]
    a = _collect(model, plain, LLAMA_MLP, fisher="true", seed=7)
    b = _collect(model, numbered, LLAMA_MLP, fisher="true", seed=7)
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(a[name].G, b[name].G)
    with KFACAccumulator(model, LLAMA_MLP) as acc, pytest.raises(ValueError, match="needs an `index`"):
        causal_lm_step(model, plain[0], acc, fisher="true")


def test_single_position_kronecker_equals_weight_gradient_outer_product():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False).double()
    head = nn.Linear(3, 5).double()
    model = nn.Sequential(layer, nn.Tanh(), head)
    x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([2])
    with KFACAccumulator(model, "0", dtype=torch.float64) as acc:
        acc.select(None)
        F.cross_entropy(model(x), y, reduction="sum").backward()
    f = acc.finalize()["0"]
    F.cross_entropy(model(x), y, reduction="sum").backward()
    vec = layer.weight.grad.flatten()  # row-major vec(dW) = g ⊗ a
    assert_close(torch.kron(f.G, f.A), torch.outer(vec, vec), **FP64)


def test_true_fisher_expectation_matches_analytic():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4, bias=False).double()
    head = nn.Linear(4, 6, bias=False).double()
    model = nn.Sequential(layer, head)
    n = 40_000
    x = torch.randn(1, 3, dtype=torch.float64).expand(n, 3)
    batch = {"pixel_values": x, "labels": torch.zeros(n, dtype=torch.long), "index": torch.arange(n)}
    with KFACAccumulator(model, "0", dtype=torch.float64) as acc:
        classifier_step(model, batch, acc, position=None, fisher="true", seed=0)
    G = acc.finalize()["0"].G
    with torch.no_grad():
        p = torch.softmax(model(x[:1]), dim=-1)[0]
    J = head.weight  # d logits / d s, [V, d_out]
    expected = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    rel = torch.linalg.norm(G - expected) / torch.linalg.norm(expected)
    assert rel < MC_RTOL, f"true-Fisher G deviates from J^T (diag p - p p^T) J by {rel:.3f}"


def test_cls_only_mode_matches_per_image_brute_force():
    model = tiny_vit().double()
    names = ["blocks.0.mlp.fc1", "blocks.1.mlp.fc2"]
    images = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])
    batch = {"pixel_values": images, "labels": labels, "index": torch.arange(3)}
    with KFACAccumulator(model, names, dtype=torch.float64) as acc:
        classifier_step(model, batch, acc, position=0, fisher="empirical")
    got = acc.finalize()
    modules = dict(model.named_modules())
    for name in names:
        A = G = 0
        for i in range(3):
            store = {}

            def hook(module, inputs, output, store=store):
                output.retain_grad()
                store.update(a=inputs[0], s=output)

            h = modules[name].register_forward_hook(hook)
            F.cross_entropy(model(images[i : i + 1]), labels[i : i + 1], reduction="sum").backward()
            h.remove()
            a, g = store["a"][0, 0], store["s"].grad[0, 0]  # class token
            A = A + torch.outer(a, a).detach()
            G = G + torch.outer(g, g)
            model.zero_grad()
        assert got[name].num_samples == 3
        assert_close(got[name].A, A / 3, **FP64)
        assert_close(got[name].G, G / 3, **FP64)


def test_bf16_autocast_keeps_float32_accumulators():
    model = tiny_llama()
    batch = lm_batch(batch_size=4)
    ref = collect_factors(model, [batch], LLAMA_MLP, fisher="empirical")
    with KFACAccumulator(model, LLAMA_MLP) as acc:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            causal_lm_step(model, batch, acc, fisher="empirical")
        assert all(t.dtype == torch.float32 for t in acc._A_sums.values())
        assert all(t.dtype == torch.float32 for t in acc._G_sums.values())
    got = acc.finalize()
    for name, f in ref.items():
        assert got[name].A.dtype == torch.float32
        for mine, ref_mat in ((got[name].A, f.A), (got[name].G, f.G)):
            rel = torch.linalg.norm(mine - ref_mat) / torch.linalg.norm(ref_mat)
            assert rel < BF16_REL, f"{name}: bf16 statistics off by {rel:.3f} (relative Frobenius)"


def test_no_parameter_gradients_and_hooks_removed():
    model = tiny_llama()
    flags = [p.requires_grad for p in model.parameters()]
    collect_factors(model, [lm_batch()], "model.layers.1.mlp.*")
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_backward_stops_at_lowest_tracked_module():
    model = tiny_llama()
    reached = []
    model.model.layers[0].register_full_backward_hook(lambda *a: reached.append(0))
    collect_factors(model, [lm_batch()], "model.layers.1.mlp.up_proj")
    assert reached == []


def test_hooks_removed_when_the_step_fails():
    model = tiny_llama()
    with pytest.raises(KeyError):
        collect_factors(model, [{"attention_mask": torch.ones(1, 3)}], LLAMA_MLP)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_every_submodule_mode_and_flag_restored():
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    model.model.layers[1].register_forward_hook(lambda m, *a: seen.append(m.training))
    collect_factors(model, [lm_batch()], LLAMA_MLP)
    assert seen == [False], "the pass runs in eval mode"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_module_hooks_restore_state_on_error_and_start_backward_at_tracked_outputs():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Dropout(0.5))
    model[3].eval()
    grads = {}

    def on_forward(name, x, output):
        return lambda grad: grads.__setitem__(name, grad)

    hooks = ModuleHooks(model, ["2"], on_forward, needs_grad=True, purpose="Test")
    with pytest.raises(RuntimeError, match="boom"), hooks:
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        out = model(torch.randn(5, 3))
        out.sum().backward()
        raise RuntimeError("boom")
    assert grads["2"].shape == (5, 2)
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model] == [True, True, True, False]
    assert all(p.requires_grad for p in model.parameters()) and not model[2]._forward_hooks
    with hooks, pytest.raises(RuntimeError, match="ran 2 times in one forward"):
        model[2](model[2].weight)  # [2, 4] -> [2, 2]: fine once
        model[2](model[2].weight)
    with pytest.raises(ValueError, match="backbone"):
        ModuleHooks(model, ["nope"])


def test_accumulator_state_file_resumes_bit_exactly(tmp_path):
    model = tiny_llama()
    batches = [lm_batch(seed=s) for s in range(2)]
    path = tmp_path / "partial.safetensors"
    with KFACAccumulator(model, LLAMA_MLP) as full:
        for b in batches:
            causal_lm_step(model, b, full, seed=1)
    with KFACAccumulator(model, LLAMA_MLP) as first:
        causal_lm_step(model, batches[0], first, seed=1)
    save_accumulator_state(path, first.state_dict(), {"fingerprint": "abc", "batches_done": 1})
    state, header = load_accumulator_state(path)
    assert header["fingerprint"] == "abc" and header["batches_done"] == 1
    with KFACAccumulator(model, LLAMA_MLP) as resumed:
        resumed.load_state_dict(state)
        causal_lm_step(model, batches[1], resumed, seed=1)
    want, got = full.finalize(), resumed.finalize()
    for name, f in want.items():
        assert got[name].num_samples == f.num_samples
        assert torch.equal(got[name].A, f.A) and torch.equal(got[name].G, f.G)
    with pytest.raises(ValueError, match="load_accumulator_state"):
        load_factors(path)


def test_max_tokens_budget_is_exact():
    model = tiny_llama()
    got = collect_factors(model, [lm_batch(seed=s) for s in range(3)], LLAMA_MLP, max_tokens=13)
    assert {f.num_samples for f in got.values()} == {13}


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_budget_is_a_prefix_that_ends_inside_a_row(fisher):
    """The budget counts rows in order and positions in order; the data ends after the last counted position."""
    model = tiny_llama().double()
    batch = lm_batch(batch_size=5, seq_len=10, seed=8)
    counts = valid_positions(batch["attention_mask"], batch["labels"]).sum(1).tolist()
    budget = counts[0] + counts[1] + 2  # two positions of row 2
    names = resolve_modules(model, LLAMA_MLP)
    want = reference_lm_factors(model, batch, names, fisher, seed=1, max_samples=budget)
    for size in (1, 2, 5):
        got = _collect(model, split_batch(batch, size), LLAMA_MLP, fisher=fisher, seed=1, max_tokens=budget)
        for name in names:
            A, G, n = want[name]
            assert got[name].num_samples == n == budget
            assert_close(got[name].A, A, **FP64)
            assert_close(got[name].G, G, **FP64)


def test_budget_prefix_rows():
    assert budget_prefix([3, 4, 5], None) == (3, None)
    assert budget_prefix([3, 4, 5], 7) == (2, 4)
    assert budget_prefix([3, 4, 5], 8) == (3, 1)
    assert budget_prefix([3, 4, 5], 100) == (3, None)
    assert budget_prefix([0, 3, 0, 4], 3) == (2, 3)
    consumed = []
    assert budget_prefix((consumed.append(i) or 2 for i in range(10**9)), 5) == (3, 1)
    assert consumed == [0, 1, 2], "only the rows of the prefix are read"


def test_symmetric_accumulation_matches_full_product():
    x = torch.randn(50, 37, dtype=torch.float64)
    for block in (4, 16, 37, 64):
        acc = torch.zeros(37, 37, dtype=torch.float64)
        symmetric_accumulate_(acc, x, block)
        symmetric_accumulate_(acc, 2 * x, block)
        assert_close(symmetrize_upper(acc), 5 * x.T @ x, **FP64)


# ---------------------------------------------------------------------------- errors
def test_pattern_matching_nothing_names_the_pattern():
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.mlp\.fc1.*matches no linear layer"):
        resolve_modules(tiny_llama(), "model.layers.*.mlp.fc1")


def test_exact_name_that_is_not_linear():
    with pytest.raises(TypeError, match="not a linear layer"):
        resolve_modules(tiny_llama(), "model.layers.0.mlp.act_fn")


def test_regex_patterns():
    names = resolve_modules(tiny_llama(), r"re:model\.layers\.1\.mlp\.(gate|up)_proj")
    assert names == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_tied_weights_are_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, tie_word_embeddings=True))
    if model.lm_head.weight is not model.transformer.wte.weight:
        pytest.skip("this transformers version does not tie GPT-2 embeddings by default")
    with pytest.raises(ValueError, match="tied weights"):
        resolve_modules(model, "lm_head")


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def test_module_called_twice_is_an_error():
    model = _Twice()
    with pytest.raises(RuntimeError, match="ran 2 times in one forward"):
        with KFACAccumulator(model, "layer") as acc:
            acc.select(None)
            model(torch.randn(2, 3)).sum().backward()


def test_forward_under_inference_mode_is_an_error():
    model = tiny_llama()
    with KFACAccumulator(model, LLAMA_MLP) as acc:
        acc.select(None)
        with torch.inference_mode(), pytest.raises(RuntimeError, match="needs autograd"):
            model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_zero_samples_is_an_error():
    model = tiny_llama()
    batch = lm_batch()
    batch["attention_mask"][:] = 0
    with pytest.raises(ValueError, match="No samples were collected"):
        collect_factors(model, [batch], LLAMA_MLP)
    with pytest.raises(ValueError, match="No samples were collected"):
        collect_factors(model, [], LLAMA_MLP)


def test_nan_statistics_are_an_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        collect_factors(model, [lm_batch()], "model.layers.0.mlp.down_proj")


def test_bad_fisher_and_dtype():
    model = tiny_llama()
    with pytest.raises(ValueError, match="fisher must be one of"):
        collect_factors(model, [lm_batch()], LLAMA_MLP, fisher="emp")
    with pytest.raises(ValueError, match="Accumulation dtype"):
        KFACAccumulator(model, LLAMA_MLP, dtype=torch.bfloat16)
