r"""Which layers and projections of the TinyMem quickstart model carry the memorization.

A ρ sweep over layer sets x projection sets, run through the ``edit`` command with per-module ρ mappings (the
modules a mapping leaves out are not edited), on factors collected for every MLP projection::

    python -m lightning_curv fit --config configs/quickstart_tinymem.yaml --run_dir runs/fit-tinymem
    python -m lightning_curv collect --config configs/quickstart_tinymem.yaml --collect.modules null \
        --ckpt_path runs/fit-tinymem/checkpoints/final.ckpt --run_dir runs/collect-tinymem-all
    python scripts/tinymem_layer_sweep.py --ckpt_path runs/fit-tinymem/checkpoints/final.ckpt \
        --factors runs/collect-tinymem-all/factors.safetensors --run_dir runs/layer-sweep

The edit run directory holds the usual ``metrics.json``; this script adds ``layer_sweep.csv`` (one row per layer
set, projection set and ρ) and prints, per (layers, projections), memorized noise on the test half, task accuracy
and perplexity at each ρ. The quickstart's choice of layers 0-2, up+down, came from this table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from lightning_curv.cli import main as cli_main

LAYER_SETS = {
    "L0": [0],
    "L1": [1],
    "L2": [2],
    "L3": [3],
    "L0-1": [0, 1],
    "L0-2": [0, 1, 2],
    "L1-3": [1, 2, 3],
    "all": [0, 1, 2, 3],
}
PROJECTION_SETS = {
    "gate+up": ["gate_proj", "up_proj"],
    "up+down": ["up_proj", "down_proj"],
    "all3": ["gate_proj", "up_proj", "down_proj"],
}
RHOS = [0.6, 0.7, 0.74, 0.78, 0.82, 0.86, 0.9, 0.95]
COLUMNS = ["mem/noise_memorized", "util/task_acc", "util/ppl"]


def sweep_entries() -> tuple[list[dict[str, float]], list[tuple[str, str, float]]]:
    """The ``edit.rho`` list (one exact-name mapping per entry) and a (layers, projections, ρ) label per entry."""
    entries, labels = [], []
    for layers_name, layers in LAYER_SETS.items():
        for proj_name, projections in PROJECTION_SETS.items():
            for rho in RHOS:
                names = [f"model.layers.{i}.mlp.{p}" for i in layers for p in projections]
                entries.append(dict.fromkeys(names, rho))
                labels.append((layers_name, proj_name, rho))
    return entries, labels


def run(args: argparse.Namespace) -> None:
    """Run the sweep through `edit`, write layer_sweep.csv and print the table."""
    entries, labels = sweep_entries()
    cli_main(
        [
            "edit",
            "--config",
            args.config,
            "--ckpt_path",
            args.ckpt_path,
            "--factors",
            args.factors,
            "--run_dir",
            args.run_dir,
            "--edit.rho",
            json.dumps(entries),
        ]
    )
    metrics = json.loads((Path(args.run_dir) / "metrics.json").read_text())
    rows = [
        {"layers": layers, "projections": proj, "rho": rho, **{k: edit[k] for k in COLUMNS}}
        for (layers, proj, rho), edit in zip(labels, metrics["edits"], strict=True)
    ]
    with (Path(args.run_dir) / "layer_sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    before = metrics["before"]
    print(
        f"\nbefore: memorized {before[COLUMNS[0]]:.3f}, task acc {before[COLUMNS[1]]:.3f}, ppl {before[COLUMNS[2]]:.4f}"
    )
    print("cells: memorized (test half) / task acc / ppl")
    print("| layers | proj | " + " | ".join(f"ρ={r}" for r in RHOS) + " |")
    print("|---|---|" + "---|" * len(RHOS))
    for layers_name in LAYER_SETS:
        for proj_name in PROJECTION_SETS:
            cells = [r for r in rows if r["layers"] == layers_name and r["projections"] == proj_name]
            text = [f"{r[COLUMNS[0]]:.2f}/{r[COLUMNS[1]]:.2f}/{r[COLUMNS[2]]:.3f}" for r in cells]
            print(f"| {layers_name} | {proj_name} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart_tinymem.yaml")
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--factors", required=True, help="factors of every MLP projection (collect.modules null)")
    parser.add_argument("--run_dir", default="runs/layer-sweep")
    run(parser.parse_args())
