"""splitmix64's output function, the one Python definition of the hash the
package keys its per-request randomness with (the C++ scheduler has its own)."""
from __future__ import annotations

from typing import overload

import numpy as np

GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's state increment
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB


@overload
def splitmix64(state: int) -> int: ...
@overload
def splitmix64(state: np.ndarray) -> np.ndarray: ...
def splitmix64(state):
    """splitmix64's mix of a 64-bit state: a Python int (taken mod 2**64) to
    an int in [0, 2**64), or a uint64 array to a uint64 array (wrapping)."""
    scalar = isinstance(state, int)
    z = np.uint64(state % 2**64) if scalar else np.asarray(state, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX_1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX_2)
        z = z ^ (z >> np.uint64(31))
    return int(z) if scalar else z
