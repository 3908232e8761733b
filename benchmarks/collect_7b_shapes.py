"""Collection time and peak memory for 7B-shaped MLP layers on CPU, and the eigendecomposition of one factor.

The model is a transformers ``LlamaConfig`` with Llama-2-7B widths (hidden 4096, intermediate 11008, 32 heads)
but 2 layers and a small vocabulary, float32, randomly initialised. The pass is the real one: ``KFACCallback`` in
a Lightning predict loop (true Fisher, ``gate_proj``/``up_proj``/``down_proj`` of both layers, float32 sums), over
``--sequences`` rows of ``--seq-len`` tokens. Then ``torch.linalg.eigh`` of one symmetric positive semi-definite
``d x d`` float64 matrix (``d = 11008``, the size of ``down_proj``'s A and of ``gate_proj``/``up_proj``'s G); with
``--eigh-extrapolate`` it times smaller sizes and extrapolates by ``d³`` when the full size would take too long.

Run: ``OMP_NUM_THREADS=2 python benchmarks/collect_7b_shapes.py --threads 2``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_curv.callbacks import KFACCallback
from lightning_curv.data.collate import RowDataset, pad_lm_batch
from lightning_curv.models import LitCausalLM

CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
}
MODULES = ["model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"]


def time_collection(sequences: int, seq_len: int, batch_size: int) -> dict[str, float]:
    """Seconds, samples per second and peak memory of one collection pass."""
    torch.manual_seed(0)
    lit = LitCausalLM(config=CONFIG, attn_implementation="sdpa")
    build = time.perf_counter()
    lit.configure_model()
    print(f"model built in {time.perf_counter() - build:.1f} s", flush=True)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 1024, (seq_len,), generator=g), "index": i} for i in range(sequences)]
    loader = DataLoader(RowDataset(rows), batch_size=batch_size, collate_fn=partial(pad_lm_batch, pad_token_id=0))
    with tempfile.TemporaryDirectory() as tmp:
        callback = KFACCallback(modules=MODULES, fisher="true", output=f"{tmp}/factors.safetensors")
        trainer = Trainer(
            accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            inference_mode=False, callbacks=[callback], default_root_dir=tmp,
        )  # fmt: skip
        trainer.predict(lit, dataloaders=loader, return_predictions=False)
    n = next(iter(callback.factors.values())).num_samples
    return {"samples": n, **callback.summary}


def time_eigh(d: int) -> float:
    """Seconds of ``torch.linalg.eigh`` on a ``d x d`` float64 PSD matrix (a Gram matrix, like a factor)."""
    x = torch.randn(d, d // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    c = x @ x.T / d
    start = time.perf_counter()
    torch.linalg.eigh(c)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--eigh-size", type=int, default=11008)
    parser.add_argument("--eigh-limit", type=float, default=480.0, help="seconds; above, extrapolate by d^3")
    parser.add_argument("--skip-collection", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} sequences={args.sequences} seq_len={args.seq_len} batch={args.batch_size}")
    if not args.skip_collection:
        r = time_collection(args.sequences, args.seq_len, args.batch_size)
        print(
            f"COLLECT samples={r['samples']} seconds={r['seconds']:.1f} tokens_per_second={r['tokens_per_second']:.1f} "
            f"peak_memory_bytes={r['peak_memory_bytes']} ({r['peak_memory_bytes'] / 2**30:.2f} GiB max RSS)",
            flush=True,
        )
    small = time_eigh(4096)
    predicted = small * (args.eigh_size / 4096) ** 3
    print(f"EIGH d=4096 seconds={small:.1f} (d^3 extrapolation to d={args.eigh_size}: {predicted:.0f} s)", flush=True)
    if predicted <= args.eigh_limit:
        print(f"EIGH d={args.eigh_size} seconds={time_eigh(args.eigh_size):.1f} (measured)", flush=True)
        return
    mid = time_eigh(8192)
    print(
        f"EIGH d=8192 seconds={mid:.1f}; d={args.eigh_size} EXTRAPOLATED by d^3 from 8192: "
        f"{mid * (args.eigh_size / 8192) ** 3:.0f} s (not measured: predicted over {args.eigh_limit:.0f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
