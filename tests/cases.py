"""Tiny models and batches used across tests, built lazily from configs (no network)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VOCAB = 64
LLAMA_MLP = "model.layers.*.mlp.*_proj"
#: `LitCausalLM(config=...)` fields of a tiny Llama for TinyMem (vocabulary 24).
TINYMEM_LLAMA = {
    "model_type": "llama",
    "vocab_size": 24,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
GPT2_MLP = "transformer.h.*.mlp.c_*"


def tiny_llama(num_layers: int = 2, vocab: int = VOCAB) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab: int = VOCAB) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=vocab, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_vit(num_classes: int = 5) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=16, patch_size=8, in_chans=1, num_classes=num_classes, embed_dim=16, depth=2, num_heads=2
    ).eval()


#: name -> (builder, module patterns)
LM_CASES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "llama": (tiny_llama, LLAMA_MLP),
    "gpt2": (tiny_gpt2, GPT2_MLP),
}


def lm_batch(batch_size: int = 4, seq_len: int = 10, vocab: int = VOCAB, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch with varied lengths and some labels masked with -100."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    lengths = torch.randint(2, seq_len + 1, (batch_size,), generator=g)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 1] = -100  # a masked target inside the real tokens
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": torch.arange(batch_size) + 100 * seed,
    }


def split_batch(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Cut a batch into batches of ``size`` rows."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def tinymem_datamodule(tmp_path, eval_batch_size: int = 8):
    """A small TinyMem data module, prepared and set up, with its cache under ``tmp_path``."""
    from lightning_curv.data import TinyMemDataModule

    dm = TinyMemDataModule(
        num_train_per_rule=10,
        num_heldout_per_rule=4,
        num_noise=4,
        noise_duplicates=2,
        batch_size=8,
        eval_batch_size=eval_batch_size,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup()
    return dm
