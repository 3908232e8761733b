import pytest
from lightning.pytorch.loggers import Logger

from lightning_curv.workflow.reporting import format_table, log_sweep, sweep_axis


class RecordingLogger(Logger):
    """A stub logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.rows, self.hparams = [], []

    @property
    def name(self):
        return "stub"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams.append(params)


EDITS = [
    {
        "rho": 0.9,
        "modules": ["a", "b"],
        "kept_pairs_fraction": 0.5,
        "removed_energy": 0.1,
        "mem/strict": 0.8,
        "per_module": {"a": {"kept_pairs_fraction": 0.4, "removed_energy": 0.2}},
    },
    {"rho": 0.5, "kept_pairs_fraction": 0.1, "removed_energy": 0.4, "mem/strict": 0.1, "per_module": {}},
    {"rho": {"a": 0.3}, "kept_pairs_fraction": 0.05, "removed_energy": 0.5, "mem/strict": 0.0},
]


def test_sweep_logs_one_row_per_rho_on_a_numeric_axis():
    logger = RecordingLogger()
    log_sweep([logger], {"mem/strict": 1.0}, EDITS, {**EDITS[1], "index": 1})
    assert [step for step, _ in logger.rows] == [0, 1, 2, None]
    summary = logger.rows[-1][1]  # the summary: before/* and selected/*, the numbers of metrics.json
    assert summary["before/mem/strict"] == 1.0 and summary["selected/mem/strict"] == 0.1
    assert summary["selected/index"] == 1
    first = logger.rows[0][1]
    assert first["edit/rho"] == 0.9 and first["edit/mem/strict"] == 0.8
    assert first["edit/module/a/removed_energy"] == 0.2
    assert logger.rows[1][1]["edit/rho"] == 0.5
    assert logger.rows[2][1]["edit/rho"] == 2.0  # a per-module mapping is plotted at its row index
    assert all("edit/modules" not in row for _, row in logger.rows[:3])  # lists are not metrics


@pytest.mark.parametrize(("rho", "index", "expected"), [(0.7, 3, 0.7), (1, 0, 1.0), ({"x": 0.5}, 4, 4.0)])
def test_sweep_axis(rho, index, expected):
    assert sweep_axis(rho, index) == expected


def test_format_table_marks_missing_values():
    text = format_table([{"a": 0.5, "b": "x"}, {"a": float("nan")}], ["a", "b"])
    lines = text.splitlines()
    assert lines[0].split() == ["a", "b"]
    assert lines[2].split() == ["0.5000", "x"] and lines[3].split() == ["nan", "-"]
