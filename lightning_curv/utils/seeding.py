"""Seeds derived from the user's seed, so that each purpose draws its own reproducible stream.

* :func:`row_seed` — one seed per data row (true-Fisher targets, example-tied dropout masks), a splitmix64 mix,
  so draws do not depend on batching, order or the number of devices.
* :func:`name_seed` — one seed per module name (random-pair controls, BalancedSubnet scores), independent of
  which other modules are edited.
* :func:`stream_seed` — one seed per purpose of a data module (validation split, label flips, halves). It is a
  plain affine map rather than :func:`row_seed` because the splits of existing configs were drawn with it;
  changing it would move every image data split and the measured results that depend on them.
"""

from __future__ import annotations

import zlib

_MASK64 = 0xFFFFFFFFFFFFFFFF


def row_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for dataset row ``index`` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def name_seed(seed: int, name: str) -> int:
    """A well-mixed 63-bit seed for the module (or any object) called ``name``."""
    return row_seed(seed, zlib.crc32(name.encode()))


def stream_seed(seed: int, stream: int) -> int:
    """The seed of one purpose (``stream``) of a data module: purposes drawn from one ``seed`` do not share draws."""
    return (seed * 1_000_003 + stream) % (2**63)
