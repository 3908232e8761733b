import json
import os
import stat

import pytest

from lightning_curv.utils import (
    atomic_write,
    atomic_write_json,
    file_digest,
    json_digest,
    name_seed,
    row_seed,
    sha256_hex,
)


def test_json_digest_is_stable_and_sensitive():
    assert json_digest({"a": 1, "b": [1, 2]}) == json_digest({"b": [1, 2], "a": 1})
    assert json_digest({"a": 1}) != json_digest({"a": 2})
    assert len(json_digest({}, 16)) == 16
    assert json_digest({}, 16) == json_digest({})[:16]


def test_file_digest_equals_digest_of_bytes(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)  # spans several read chunks
    path.write_bytes(data)
    assert file_digest(path) == sha256_hex([data[:5], data[5:]])


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"x": 1}, indent=None)
    assert json.loads(target.read_text()) == {"x": 1}

    def failing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert json.loads(target.read_text()) == {"x": 1}  # the old file is untouched
    assert os.listdir(target.parent) == ["out.json"]  # and no temporary file is left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.json").st_mode) == 0o666 & ~umask


def test_seeds_are_distinct_and_independent_of_other_names():
    seeds = {row_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert name_seed(0, "a.b") == name_seed(0, "a.b") != name_seed(1, "a.b")
    assert name_seed(0, "a.b") != name_seed(0, "a.c")
