"""Small helpers every layer of lightning_curv shares: whole-or-absent file writes, digests, seeds.

This package imports only the standard library and torch, so that ``curvature/`` (pure torch) can use it too;
``tests/test_layering.py`` checks that.
"""

from lightning_curv.utils.files import (
    atomic_dir,
    atomic_path,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    json_default,
)
from lightning_curv.utils.hashing import file_digest, json_digest, sha256_hex
from lightning_curv.utils.seeding import name_seed, row_seed, stream_seed

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "file_digest",
    "json_default",
    "json_digest",
    "name_seed",
    "row_seed",
    "sha256_hex",
    "stream_seed",
]
