"""The notebooks under notebooks/ run top to bottom, and are committed without outputs.

Every ``notebooks/*.ipynb`` is executed with nbclient at ``LIGHTNING_CURV_NOTEBOOK_SIZE=tiny`` (seconds per
notebook) in a kernel that runs this interpreter (``sys.executable``, from a kernelspec the test writes, so a
``python3`` kernelspec elsewhere on the machine cannot point the run at another environment). Artifacts go to a
temporary directory through ``LIGHTNING_CURV_NOTEBOOK_DIR``.
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"01_tinymem_quickstart.ipynb", "02_vit_label_noise.ipynb", "03_spectrum_analysis.ipynb"}
KERNEL_NAME = "lightning-curv-notebook-test"
#: Seconds one cell may take at the tiny size (they take a few; this only stops a hung kernel).
CELL_TIMEOUT_S = 300
#: Inline figures each notebook must show at the tiny size (its matplotlib plots and package PNGs).
MIN_IMAGES = {
    "01_tinymem_quickstart.ipynb": 3,
    "02_vit_label_noise.ipynb": 2,
    "03_spectrum_analysis.ipynb": 5,
}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernelspec for this interpreter, found first through ``JUPYTER_PATH``; returns the artifact folder."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lightning_curv notebook test",
        "language": "python",
        "env": {
            "LIGHTNING_CURV_NOTEBOOK_SIZE": "tiny",
            "LIGHTNING_CURV_NOTEBOOK_DIR": str(root / "artifacts"),
            # One thread: tiny models gain nothing from two, and two OpenMP threads per process on a 2-core
            # machine shared with other jobs make each step tens of times slower (spin-waiting).
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root), *([old] if old else [])])
    try:
        yield root / "artifacts"
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def _code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_the_notebooks_are_there() -> None:
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(path)
    assert cells, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(cells) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs or execution counts; clear them before committing"
    assert nb.cells[0].cell_type == "markdown", f"{path.name} must open with a markdown cell explaining it"
    assert 'os.environ.get("LIGHTNING_CURV_NOTEBOOK_SIZE", "small")' in cells[0].source, (
        f"{path.name}: the first code cell must read SIZE from LIGHTNING_CURV_NOTEBOOK_SIZE"
    )


@pytest.mark.slow  # a Jupyter kernel per notebook, each training and editing tiny models end to end
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_tiny_size(path: Path, kernel_env: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel starts where Jupyter would
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    sizes = [o.text for o in outputs if o.output_type == "stream" and o.text.startswith("size:")]
    assert sizes == ["size: tiny\n"], f"the kernel did not run at the tiny size: {sizes}"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= MIN_IMAGES.get(path.name, 1), (
        f"{path.name} showed {len(images)} inline figures; a plot that is not displayed inline is lost"
    )
    assert (kernel_env / f"{path.stem}-tiny").is_dir(), "artifacts must go to LIGHTNING_CURV_NOTEBOOK_DIR"
