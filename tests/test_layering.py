"""The maths core stays plain PyTorch: no Lightning, wandb, transformers or timm imports."""

import ast
from pathlib import Path

import lightning_curv.curvature as curvature

FORBIDDEN = {"lightning", "pytorch_lightning", "wandb", "transformers", "timm", "torchmetrics", "datasets"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_curvature_imports_no_framework():
    files = sorted(Path(curvature.__file__).parent.glob("*.py"))
    assert files, "curvature package not found"
    offenders = {f.name: sorted(_imports(f) & FORBIDDEN) for f in files if _imports(f) & FORBIDDEN}
    assert not offenders, f"curvature/ must stay pure torch, found {offenders}"


def test_detector_catches_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import lightning.pytorch as pl\nfrom transformers import AutoModel\n")
    assert _imports(bad) & FORBIDDEN == {"lightning", "transformers"}
