import pytest
import torch
from torch import nn

from lightning_curv.models.generation import (
    greedy_generate,
    longest_prefix_match,
    prepend_context,
    shift_split,
)
from tests.cases import VOCAB, tiny_gpt2, tiny_llama

PAD = 0
NEW_TOKENS = 12
PROMPT_LENGTHS = [9, 3, 6, 1, 9]


def _naive_greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """One unpadded prompt, full forward every step, no cache."""
    sequence = prompt[None]
    for _ in range(steps):
        token = model(input_ids=sequence).logits[:, -1].argmax(-1)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
    return sequence[0, prompt.numel() :]


def _left_pad(prompts: list[torch.Tensor], fill: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), fill, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel() :] = prompt
        mask[row, width - prompt.numel() :] = 1
    return ids, mask


@pytest.fixture(params=["gpt2", "llama"])
def model(request) -> nn.Module:
    # float64 so that batched and single-row forwards cannot flip an argmax at a near-tie.
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]().double()


@pytest.fixture
def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in PROMPT_LENGTHS]


def test_greedy_generate_matches_naive_loop_with_left_padding(model, prompts):
    ids, mask = _left_pad(prompts, fill=-100)  # placeholder in the padding must not matter
    generated = greedy_generate(model, ids, mask, NEW_TOKENS, pad_token_id=PAD)
    assert generated.shape == (len(prompts), NEW_TOKENS) and generated.dtype == torch.long
    with torch.no_grad():
        expected = torch.stack([_naive_greedy(model, p, NEW_TOKENS) for p in prompts])
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


def test_greedy_generate_ignores_eos(model, prompts):
    """Exactly max_new_tokens come back even when the model emits its EOS token."""
    ids, mask = _left_pad(prompts)
    first = greedy_generate(model, ids, mask, NEW_TOKENS, pad_token_id=PAD)
    model.generation_config.eos_token_id = int(first[0, 0])
    model.config.eos_token_id = int(first[0, 0])
    again = greedy_generate(model, ids, mask, NEW_TOKENS, pad_token_id=PAD)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_greedy_generate_restores_train_mode(prompts):
    model = tiny_gpt2().double()
    ids, mask = _left_pad(prompts)
    model.train()
    model.transformer.h[0].eval()  # mixed modes must come back as they were
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    handle = model.transformer.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        greedy_generate(model, ids, mask, 3, pad_token_id=PAD)
    finally:
        handle.remove()
    assert seen and not any(seen), "generation must run in eval mode (no dropout)"
    assert {name: m.training for name, m in model.named_modules()} == before


def test_greedy_generate_edge_cases(prompts):
    model = tiny_llama()
    ids, mask = _left_pad(prompts)
    assert greedy_generate(model, ids, mask, 0, pad_token_id=PAD).shape == (len(prompts), 0)
    with pytest.raises(ValueError, match="(?i)left-padded"):
        greedy_generate(model, ids.flip(1), mask.flip(1), 2, pad_token_id=PAD)
    holes = mask.clone()
    holes[0, -2] = 0  # a gap inside the real tokens
    with pytest.raises(ValueError, match="not left-padded"):
        greedy_generate(model, ids, holes, 2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, ids, mask, -1, pad_token_id=PAD)


def test_prepend_context_hand_made():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    new_ids, new_mask = prepend_context(ids, mask, torch.tensor([1, 2]), pad_token_id=0)
    assert new_ids.tolist() == [[0, 0, 1, 2, 5, 6], [1, 2, 7, 8, 9, 10]]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    per_row = torch.tensor([[1, 2], [3, 4]])
    new_ids, _ = prepend_context(ids, mask, per_row, pad_token_id=0)
    assert new_ids.tolist() == [[0, 0, 1, 2, 5, 6], [3, 4, 7, 8, 9, 10]]
    with pytest.raises(ValueError, match="context_ids"):
        prepend_context(ids, mask, torch.ones(3, 2, dtype=torch.long))


def test_prepend_context_then_generate_equals_prompt_with_context(prompts):
    model = tiny_gpt2().double()
    context = torch.tensor([11, 12, 13])
    ids, mask = prepend_context(*_left_pad(prompts), context, pad_token_id=PAD)
    generated = greedy_generate(model, ids, mask, 4, pad_token_id=PAD)
    with torch.no_grad():
        expected = torch.stack([_naive_greedy(model, torch.cat([context, p]), 4) for p in prompts])
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


def test_shift_split():
    sequences = torch.arange(40).reshape(2, 20)
    prompt, prompt_mask, target = shift_split(sequences, prefix_len=5, suffix_len=4, shift=2)
    assert prompt.tolist() == [list(range(7)), list(range(20, 27))]
    assert prompt_mask.tolist() == [[1] * 7] * 2
    assert target.tolist() == [[7, 8, 9, 10], [27, 28, 29, 30]]
    prompt, _, target = shift_split(sequences, prefix_len=5, suffix_len=4, shift=0)
    assert prompt.shape == (2, 5) and target[0].tolist() == [5, 6, 7, 8]
    prompt, _, target = shift_split(sequences, prefix_len=5, suffix_len=4, shift=-2)
    assert prompt.shape == (2, 3) and target[0].tolist() == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="shorter"):
        shift_split(sequences, prefix_len=10, suffix_len=8, shift=3)
    with pytest.raises(ValueError, match=">= 1"):
        shift_split(sequences, prefix_len=2, suffix_len=4, shift=-2)


def test_longest_prefix_match():
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, -100, -100], [1, 2, 3, 4]])
    generated = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 4], [1, 2, 3, 4], [9, 2, 3, 4]])
    assert longest_prefix_match(generated, target).tolist() == [4, 2, 2, 0]
    # A shorter generation bounds the match.
    assert longest_prefix_match(generated[:, :3], target).tolist() == [3, 2, 2, 0]
