"""Shared test set-up: the backend the tests exercise, sizes per backend, references and tolerances.

The same test files run on a CPU through Triton's interpreter (slow: every program instance runs
in numpy one after another, so sizes stay tiny) and on a GPU at realistic sizes. Without CUDA the
interpreter must be switched on before anything imports triton or stn_triton, so this module
imports only torch before setting ``TRITON_INTERPRET``.
"""

import contextlib
import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETING = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"


def _memoize_interpreter_scan() -> None:
    """Make Triton's interpreter scan triton.language for its builtins once, not per call.

    On every call of a @triton.jit helper the interpreter lists the members of triton.language
    (``inspect.getmembers``) to find the builtins to patch: a third of the CPU tests' time in the
    kernels that call helpers in loops. The builtins never change, so the list is kept; what is
    patched, and when, stays as Triton does it (only members that are still the original builtin,
    so an already patched one is left alone, as Triton's own scan leaves it). Applied only to the
    interpreter whose internals it was written against (triton 3.9's ``_patch_builtin(pkg,
    builder, scope)``); any other version keeps its own scan.
    """
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_builtin = getattr(interpreter, "_patch_builtin", None)
    if patch_builtin is None or not hasattr(interpreter, "_patch_attr"):
        return
    if list(inspect.signature(patch_builtin).parameters) != ["pkg", "builder", "scope"]:
        return
    builtins: dict = {}

    def _patch_builtin(pkg, builder, scope):
        members = builtins.get(pkg)
        if members is None:
            members = builtins[pkg] = [(n, m) for n, m in inspect.getmembers(pkg) if tl.core.is_builtin(m)]
        for name, member in members:
            if getattr(pkg, name, None) is member:
                interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = _patch_builtin


if INTERPRETING:
    _memoize_interpreter_scan()

MODES_2D = ("bilinear", "nearest", "bicubic")
MODES_3D = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Absolute floor of the low-precision rule, per unit of the reference's magnitude: it keeps a
# result that is exact in both (error 0) from demanding bitwise equality of rounding.
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def on_gpu() -> bool:
    """True when the tests run on a CUDA device (compiled kernels, realistic sizes)."""
    return ON_GPU


def sizes(cpu, gpu):
    """``cpu`` under the interpreter (tiny: it runs every program instance in numpy), else ``gpu``."""
    return gpu if ON_GPU else cpu


def pytest_configure(config):
    if not ON_GPU:
        from stn_triton.backend import interpreting

        if not interpreting():
            raise pytest.UsageError(
                "Without a GPU the tests run stn_triton's kernels in Triton's interpreter, but it is off "
                f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}, or Triton was imported before it was "
                "set): almost every test would compare the plain-PyTorch fallback with PyTorch. Unset "
                "TRITON_INTERPRET or set it to 1."
            )
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line(
        "markers",
        "slow: left out of the fast GPU tier (`-m 'not slow'`): large memory, many kernel variants, or training",
    )


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """``"cuda"`` when a GPU is present, else ``"cpu"`` (the interpreter runs the kernels)."""
    return DEVICE


@contextlib.contextmanager
def deterministic_algorithms():
    """Run a block under ``torch.use_deterministic_algorithms(True)``, then restore the setting.

    A context manager rather than a fixture: references must be computed outside it, because
    PyTorch's own CUDA grid_sample backward raises under deterministic algorithms.
    """
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


def generator(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed: the same case draws the same values on every device."""
    return torch.Generator().manual_seed(seed)


def rand(shape, gen, lo=-1.0, hi=1.0, dtype=torch.float64, device=DEVICE) -> torch.Tensor:
    """Uniform values in [lo, hi), drawn in float64 on the CPU, then cast and moved."""
    values = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    return values.to(dtype=dtype, device=device)


def randn(shape, gen, dtype=torch.float64, device=DEVICE) -> torch.Tensor:
    """Standard normal values, drawn in float64 on the CPU, then cast and moved."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def reference_grid_sample(input, grid, mode, padding_mode, align_corners):
    """``F.grid_sample`` with every keyword spelled out (so it never warns)."""
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def run_with_grads(sample, x, grid, grad_output, mode, padding_mode, align_corners):
    """Forward and backward through ``sample``; returns (output, grad of x, grad of grid).

    ``grad_output=None`` backpropagates ``out.sum()``, whose gradient autograd hands over as an
    expanded (stride-0) tensor.
    """
    x = x.detach().clone().requires_grad_()
    grid = grid.detach().clone().requires_grad_()
    out = sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    if grad_output is None:
        out.sum().backward()
    else:
        out.backward(grad_output)
    return out.detach(), x.grad, grid.grad


def assert_close_scaled(actual, expected, tol, what):
    """Close within ``tol`` relative to the largest magnitude of ``expected`` (elementwise rtol too)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_within_low_precision_rule(ours, torch_same_dtype, reference, dtype, what="output"):
    """Hold a float16/bfloat16 result to "within 2x PyTorch's own error at that dtype".

    ``reference`` is float64 computed from the same (already rounded) low-precision inputs;
    ``torch_same_dtype`` is PyTorch's own result at ``dtype``. The allowed max error is twice
    PyTorch's max error plus a floor of ``LOW_PRECISION_FLOOR[dtype]`` times the reference's
    magnitude.
    """
    assert ours.dtype == dtype, f"{what} dtype {ours.dtype}, expected {dtype}"
    reference = reference.double()
    ours_error = (ours.double() - reference).abs().max().item() if reference.numel() else 0.0
    torch_error = (torch_same_dtype.double() - reference).abs().max().item() if reference.numel() else 0.0
    scale = max(1.0, reference.abs().max().item() if reference.numel() else 0.0)
    allowed = 2 * torch_error + LOW_PRECISION_FLOOR[dtype] * scale
    assert ours_error <= allowed, (
        f"{what}: max error {ours_error:.3g} vs float64 reference exceeds {allowed:.3g} "
        f"(PyTorch's own {dtype} error is {torch_error:.3g})"
    )
