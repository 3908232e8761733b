"""Dependencies point one way: utils <- curvature <- {metrics, data, analysis, baselines, models} <- callbacks
<- workflow <- trainer <- cli; the maths core stays plain PyTorch."""

import ast
from pathlib import Path

import pytest

import lightning_curv

PACKAGE = Path(lightning_curv.__file__).parent
FRAMEWORKS = {"lightning", "pytorch_lightning", "wandb", "transformers", "timm", "torchmetrics", "datasets"}

_BASE = {"utils", "curvature"}
_MIDDLE = _BASE | {"metrics", "data", "analysis", "baselines", "models"}
#: Which first-level parts of the package each part may import (besides itself).
ALLOWED = {
    "utils": set(),
    "curvature": {"utils"},
    "metrics": _BASE,
    "data": _BASE,
    "analysis": _BASE,
    "models": _BASE | {"metrics", "data"},
    "baselines": _BASE | {"metrics", "data", "models"},
    "callbacks": _MIDDLE,
    "workflow": _MIDDLE | {"callbacks"},
    "trainer": _MIDDLE | {"callbacks", "workflow"},
    "cli": _MIDDLE | {"callbacks", "workflow", "trainer"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports are not used in this package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _violations(files: list[Path]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in files:
        part = _part(f)
        bad = []
        for name in _imports(f):
            top, _, rest = name.partition(".")
            if top == "lightning_curv" and rest:
                target = rest.split(".")[0]
                if target != part and target not in ALLOWED[part]:
                    bad.append(name)
            elif part in ("utils", "curvature") and top in FRAMEWORKS:
                bad.append(name)
        if bad:
            found[str(f.relative_to(PACKAGE))] = sorted(bad)
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(f) for f in PACKAGE.rglob("*.py")}
    assert parts <= set(ALLOWED), f"parts without a layer in ALLOWED: {parts - set(ALLOWED)}"


def test_imports_follow_the_layers():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30, "package not found"
    violations = _violations(files)
    assert not violations, f"imports against the layer order: {violations}"


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("curvature/bad.py", "import lightning.pytorch as pl\nfrom transformers import AutoModel\n", 2),
        ("utils/bad.py", "import torchmetrics\n", 1),
        ("models/bad.py", "from lightning_curv.callbacks.kfac import KFACCallback\n", 1),
        ("models/bad.py", "from lightning_curv.baselines import apply_svd_edit\n", 1),
        ("curvature/bad.py", "from lightning_curv.models.base import stage_metrics\n", 1),
        ("workflow/ok.py", "from lightning_curv.callbacks import EditCallback\nimport lightning\n", 0),
    ],
)
def test_detector_catches_imports_against_the_layers(tmp_path, monkeypatch, where, source, expected):
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    path = tmp_path / where
    path.parent.mkdir(parents=True)
    path.write_text(source)
    found = _violations([path])
    assert sum(len(v) for v in found.values()) == expected, found
