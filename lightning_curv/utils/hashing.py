"""Digests: of byte chunks, of a JSON-serializable configuration, of a file's bytes (one function each)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any


def sha256_hex(chunks: Iterable[bytes]) -> str:
    """SHA-256 hex digest of the concatenated ``chunks``."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def json_digest(obj: Any, length: int | None = None) -> str:
    """Stable digest of a JSON-serializable object (keys sorted, compact separators).

    Args:
        obj: Settings that determine an artifact (a cache key, a fingerprint).
        length: Keep only the first ``length`` hex digits; None keeps all 64.

    Returns:
        The hex digest.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    digest = sha256_hex([blob.encode()])
    return digest if length is None else digest[:length]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
