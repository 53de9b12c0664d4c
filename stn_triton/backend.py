"""Which implementation runs a call: compiled Triton, the Triton interpreter, or plain PyTorch."""

import contextlib
import os

import torch

TRITON = "triton"
INTERPRETER = "interpreter"
TORCH = "torch"


def _interpreting() -> bool:
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4 has no knobs; it reads the environment itself
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once, at import: Triton decides at the same moment, when it decorates the kernels, whether
# they run in the interpreter. A constant also keeps backend() traceable by torch.compile.
INTERPRETING = _interpreting()


def interpreting() -> bool:
    """True when Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return INTERPRETING


# Set by ``forced``: the backend every call takes, whatever its tensors.
_forced: str | None = None


@contextlib.contextmanager
def forced(name: str):
    """Every call in the block takes backend ``name`` (CPU tensors the Triton path, say), so that the
    launches of real calls can be captured on a machine without a GPU (``tuning.captured_launches``)."""
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def backend(tensor: torch.Tensor) -> str:
    """The implementation a call on ``tensor`` takes.

    ``"triton"`` for a CUDA tensor (compiled kernels), ``"interpreter"`` for a CPU tensor
    while ``TRITON_INTERPRET=1`` (the same kernels, run by Triton's interpreter), and
    ``"torch"`` otherwise (a plain PyTorch implementation).
    """
    if _forced is not None:
        return _forced
    if tensor.is_cuda:
        return TRITON
    if tensor.device.type == "cpu" and INTERPRETING:
        return INTERPRETER
    return TORCH
