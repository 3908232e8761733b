"""Cost of a K-FAC collection step relative to a training forward+backward, measured in one run.

Times the real collection code path (``causal_lm_step`` with a ``KFACAccumulator``, true Fisher, every token)
against a plain forward + backward of the summed next-token loss with all parameters requiring gradients, on a
Llama config (hidden 256, intermediate 1024, 4 layers, vocab 1024, sequence 256, batch 8). Prints median
seconds per batch and the ratios; goal with all MLP projections of all layers tracked: ratio <= 1.3.

    python benchmarks/kfac_overhead.py [--threads N] [--repeats R] [--block-size B]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_curv.curvature import KFACAccumulator, causal_lm_step, eigendecompose
from lightning_curv.curvature.kfac import DEFAULT_BLOCK_SIZE


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 1024, (8, 256), generator=g),
        "attention_mask": torch.ones(8, 256, dtype=torch.long),
        "index": torch.arange(8),
    }

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, 1024), batch["input_ids"][:, 1:].reshape(-1), reduction="sum").backward()

    baseline = median_time(train_step, args.repeats)
    model.zero_grad(set_to_none=True)
    print(f"threads={args.threads} block_size={args.block_size} repeats={args.repeats}")
    print(f"forward+backward (all parameters):        {baseline * 1e3:8.1f} ms/batch")

    results = {}
    for label, patterns, dtype in (
        ("all 4 layers, float32", "model.layers.*.mlp.*_proj", torch.float32),
        ("all 4 layers, float64", "model.layers.*.mlp.*_proj", torch.float64),
        ("last layer only, float32", "model.layers.3.mlp.*_proj", torch.float32),
    ):
        with KFACAccumulator(model, patterns, dtype=dtype, block_size=args.block_size) as acc:
            seconds = median_time(lambda acc=acc: causal_lm_step(model, batch, acc, fisher="true"), args.repeats)
        results[label] = (seconds, acc)
        print(f"collection, {label:<28} {seconds * 1e3:8.1f} ms/batch   ratio {seconds / baseline:5.2f}")

    factors = results["all 4 layers, float32"][1].finalize()
    start = time.perf_counter()
    for f in factors.values():
        eigendecompose(f)
    print(f"eigendecomposition of {len(factors)} modules (float64):   {(time.perf_counter() - start) * 1e3:8.1f} ms")
    print(
        f"RATIO all_layers_fp32={results['all 4 layers, float32'][0] / baseline:.3f} "
        f"all_layers_fp64={results['all 4 layers, float64'][0] / baseline:.3f} "
        f"last_layer_fp32={results['last layer only, float32'][0] / baseline:.3f}"
    )


if __name__ == "__main__":
    main()
