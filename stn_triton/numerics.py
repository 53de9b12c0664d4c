"""The bottom of the package: dtype rules and integer arithmetic that every other module uses.

Nothing here imports from stn_triton, so that host geometry, tuning, validation and the op
launchers can all depend on it without an arrow running up. Everything runs on every call, so it
is plain integer arithmetic (``triton.cdiv`` and ``triton.next_power_of_2`` are Triton function
objects, several times slower to call).
"""

import torch

# The dtypes every op takes; arithmetic and accumulation run in ``compute_dtype`` of them.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INT32_LIMIT = 2**31 - 1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of a tensor dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two at or above ``n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()
