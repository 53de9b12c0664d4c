"""Values derived from a tensor, computed once per tensor (and per in-place version of it).

A thin-plate spline's inverse system depends on its control points alone, and a fill value given
on the CPU needs one copy on the device: both are the same for every call that passes the same,
unmodified tensor, so they are kept beside it (by identity, with a weak reference) instead of being
recomputed, inverted or copied on each call. Under torch.compile the tensors are traced values
without an identity, and the derivation is part of the graph.
"""

import weakref
from collections.abc import Callable, Hashable

import torch

# id(tensor) -> (a weak reference to it, its version, {key: derived value}).
_cache: dict[int, tuple[weakref.ref, int, dict]] = {}


def derived(tensor: torch.Tensor, key: Hashable, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(tensor)``, computed once per tensor, in-place version and ``key``."""
    if torch.compiler.is_compiling():
        return make(tensor)
    slot = id(tensor)
    entry = _cache.get(slot)
    if entry is None or entry[0]() is not tensor or entry[1] != tensor._version:
        entry = (weakref.ref(tensor, lambda _, slot=slot: _cache.pop(slot, None)), tensor._version, {})
        _cache[slot] = entry
    values = entry[2]
    if key not in values:
        values[key] = make(tensor)
    return values[key]
