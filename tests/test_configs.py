"""Every YAML under configs/ (and the test configs) parses through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_curv.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "tests" / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(p.parent.name == "configs" and p.parent.parent == ROOT for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("command", ["pipeline", "fit"])
def test_config_parses(config, command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "collect:" in printed and "edit:" in printed


def test_a_bad_key_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "tests" / "configs" / "tiny_tinymem.yaml").read_text() + "\nedit:\n  rhoo: [0.5]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "--config", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "rhoo" in capsys.readouterr().err
