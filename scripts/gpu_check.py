r"""GPU checks of the multi-GPU path, in one run (called by ``scripts/gpu_check.sh``; prints a report).

1. ``collect`` and ``edit`` of the tiny TinyMem test config on 1 GPU and as a 2-GPU DDP job: factors agree to
   float32 tolerance with equal sample counts, and every metric of the edit agrees.
2. ``bf16-mixed`` and ``bf16-true`` collection against float32: relative Frobenius error of A and G.
3. Eigendecomposition of one 11008 x 11008 float64 factor on the device (OLMo-2 7B MLP width): seconds.
4. Collection throughput (tokens/s/GPU) and peak memory on an OLMo-2-1B-shaped model built from the shipped
   architecture (random weights, bf16), tracking gate/up of three middle layers.

``--smoke`` runs the same code on CPU at toy sizes (gloo instead of NCCL), to check the script itself::

    python scripts/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "configs" / "tiny_tinymem.yaml")
FP32_RTOL = 1e-5


def cli(args: list[str], env: dict[str, str]) -> None:
    """Run one ``python -m lightning_curv`` command; fail loudly with its output."""
    done = subprocess.run([sys.executable, "-m", "lightning_curv", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖_F / ‖b‖_F`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def compare_factor_files(a: Path, b: Path) -> float:
    """Largest relative Frobenius error over the tensors of two factor files (same keys)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb), (sorted(ta), sorted(tb))
    return max(rel_err(ta[k], tb[k]) for k in ta)


def check_ddp(out: Path, accel: str, env: dict[str, str]) -> dict:
    """Checks 1 and 2: one device against a 2-process DDP job, and bf16 collection against float32."""
    common = ["--config", TINY, "--data.init_args.cache_dir", str(out / "cache"), "--trainer.accelerator", accel]
    common += ["--trainer.limit_val_batches", "null"]
    cli(["fit", *common, "--run_dir", str(out / "fit")], env)
    ckpt = ["--ckpt_path", str(out / "fit" / "checkpoints" / "final.ckpt")]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    report = {}
    for name, extra in (("one", []), ("two", ddp)):
        cli(
            [
                "collect",
                *common,
                *ckpt,
                "--collect.max_tokens",
                "null",
                "--run_dir",
                str(out / f"collect-{name}"),
                *extra,
            ],
            env,
        )
    report["ddp_factor_rel_err"] = compare_factor_files(
        out / "collect-two" / "factors.safetensors", out / "collect-one" / "factors.safetensors"
    )
    meta = [json.loads((out / f"collect-{n}" / "metrics.json").read_text())["num_samples"] for n in ("one", "two")]
    report["ddp_num_samples"] = meta
    factors = ["--factors", str(out / "collect-one" / "factors.safetensors"), "--edit.rho", "[1.0, 0.3]"]
    for name, extra in (("one", []), ("two", ddp)):
        cli(["edit", *common, *ckpt, *factors, "--run_dir", str(out / f"edit-{name}"), *extra], env)
    one, two = (json.loads((out / f"edit-{n}" / "metrics.json").read_text()) for n in ("one", "two"))
    diffs = {k: abs(one["before"][k] - two["before"][k]) for k in one["before"]}
    report["ddp_edit_max_metric_diff"] = max(diffs.values())
    report["ddp_edit_selected"] = [(one["selected"] or {}).get("rho"), (two["selected"] or {}).get("rho")]
    for precision in ("bf16-mixed", "bf16-true"):
        run = out / f"collect-{precision}"
        cli(
            [
                "collect",
                *common,
                *ckpt,
                "--collect.max_tokens",
                "null",
                "--trainer.precision",
                precision,
                "--run_dir",
                str(run),
            ],
            env,
        )
        report[f"{precision}_factor_rel_err_vs_fp32"] = compare_factor_files(
            run / "factors.safetensors", out / "collect-one" / "factors.safetensors"
        )
    return report


def time_eigh(d: int, device: torch.device) -> float:
    """Check 3: seconds of one float64 ``eigh`` of a ``d x d`` PSD matrix on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(d, d, generator=g, dtype=torch.float64).to(device)
    c = x @ x.T / d
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    torch.linalg.eigh(c)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(device: torch.device, smoke: bool) -> dict:
    """Check 4: collection tokens/s and peak memory on an OLMo-2-1B-shaped model (random weights)."""
    from lightning_curv.curvature import collect_factors
    from lightning_curv.workflow.plan import architecture_config

    config = architecture_config({"pretrained": "allenai/OLMo-2-0425-1B"})
    if smoke:
        config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size = 64, 128, 4, 512
        config.num_attention_heads = config.num_key_value_heads = 4
        config.pad_token_id, config.eos_token_id = 0, 1
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(config).to(device, dtype)
    batch, seq = (8, 512) if not smoke else (2, 32)
    layers = config.num_hidden_layers // 2
    modules = [f"re:model\\.layers\\.({layers - 1}|{layers}|{layers + 1})\\.mlp\\.(gate|up)_proj"]
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.arange(batch)}] * (
        4 if not smoke else 2
    )
    collect_factors(model, data[:1], modules, fisher="true")  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    factors = collect_factors(model, data, modules, fisher="true")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = next(iter(factors.values())).num_samples
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {
        "model": "OLMo-2-1B shapes" if not smoke else "toy",
        "tokens": tokens,
        "tokens_per_s_per_gpu": tokens / seconds,
        "peak_memory_bytes": peak,
    }


def main() -> None:
    """Run the checks and print the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: check the script itself")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and torch.cuda.device_count() < 1:
        raise SystemExit("No CUDA device: run with --smoke on CPU, or on a GPU machine.")
    device = torch.device("cuda" if not args.smoke else "cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1" if args.smoke else os.environ.get("OMP_NUM_THREADS", "4")}
    report: dict = {
        "device": torch.cuda.get_device_name(0) if not args.smoke else "cpu (smoke)",
        "torch": torch.__version__,
    }
    if args.smoke or torch.cuda.device_count() >= 2:
        report |= check_ddp(out, "cpu" if args.smoke else "gpu", env)
    else:
        report["ddp"] = "skipped: needs 2 GPUs"
    d = 11008 if not args.smoke else 256
    report[f"eigh_{d}_float64_seconds"] = time_eigh(d, device)
    report["collection"] = throughput(device, args.smoke)
    print(json.dumps(report, indent=2))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
