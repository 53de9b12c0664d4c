"""Bad arguments fail before any kernel launch, with an error naming the argument and what it got.

Every call here runs with the launchers replaced by a stub that fails the test if reached, so an
error raised from inside a kernel launch (or by PyTorch's fallback) cannot pass for validation.
The device-mismatch case needs a GPU and lives in test_gpu.py.
"""

import re
from types import SimpleNamespace

import pytest
import torch

import stn_triton
import stn_triton.functional as functional
from conftest import DEVICE


class Launched(Exception):
    """Raised by the stub launchers: validation let the call through."""


def _launched(*args, **kwargs):
    raise Launched


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Replace every way out of ``functional`` (op modules and the PyTorch fallback) by a stub."""
    monkeypatch.setattr(functional, "_sample_op", SimpleNamespace(grid_sample=_launched))
    monkeypatch.setattr(functional, "_affine_grid_op", SimpleNamespace(affine_grid=_launched))
    monkeypatch.setattr(functional, "F", SimpleNamespace(grid_sample=_launched, affine_grid=_launched))


def t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


def test_valid_arguments_reach_the_launch():
    """The stub is what a valid call reaches: the cases below really fail in validation."""
    with pytest.raises(Launched):
        stn_triton.grid_sample(t(1, 2, 3, 5), t(1, 3, 5, 2))
    with pytest.raises(Launched):
        stn_triton.grid_sample(t(1, 2, 3, 5, 3), t(1, 1, 3, 5, 3), mode="nearest")
    with pytest.raises(Launched):
        stn_triton.affine_grid(t(2, 2, 3), (2, 1, 3, 5))


# (call, argument the message must name, what it got that the message must show)
GRID_SAMPLE_CASES = [
    pytest.param(lambda: stn_triton.grid_sample([[1.0]], t(1, 3, 5, 2)), "input", "list", id="input-not-a-tensor"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5), t(2, 3, 5, 2)), "input", "(2, 3, 5)", id="input-3d"),
    pytest.param(
        lambda: stn_triton.grid_sample(t(1, 1, 1, 3, 5, 2), t(1, 3, 5, 2)), "input", "6-D", id="input-6d"
    ),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5)), "grid", "(2, 3, 5)", id="grid-3d"),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 1, 3, 5, 2)), "grid", "(2, 1, 3, 5, 2)", id="grid-5d-for-4d"
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 3)),
        "grid",
        "(2, 3, 5, 3)",
        id="grid-last-dim-3-for-4d",
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7, 3), t(2, 1, 3, 5, 2)),
        "grid",
        "(2, 1, 3, 5, 2)",
        id="grid-last-dim-2-for-5d",
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(3, 3, 5, 2)), "grid", "(3, 3, 5, 2)", id="grid-batch-mismatch"
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2, dtype=torch.float64)),
        "grid",
        "torch.float64",
        id="dtype-mismatch",
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7, dtype=torch.int64), t(2, 3, 5, 2)),
        "input",
        "torch.int64",
        id="integer-input",
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2, dtype=torch.int32)),
        "grid",
        "torch.int32",
        id="integer-grid",
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), mode="area"), "mode", "area", id="unknown-mode"
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), padding_mode="circular"),
        "padding_mode",
        "circular",
        id="unknown-padding",
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7, 3), t(2, 1, 3, 5, 3), mode="bicubic"),
        "mode",
        "bicubic",
        id="bicubic-5d",
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), align_corners="yes"),
        "align_corners",
        "yes",
        id="align-corners-not-bool",
    ),
    pytest.param(
        lambda: stn_triton.grid_sample(t(2, 3, 0, 7), t(2, 3, 5, 2)), "input", "(2, 3, 0, 7)", id="input-empty-side"
    ),
]

AFFINE_GRID_CASES = [
    pytest.param(lambda: stn_triton.affine_grid([[1.0]], (1, 1, 3, 5)), "theta", "list", id="theta-not-a-tensor"),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 3), (1, 1, 3, 5)), "theta", "(2, 3)", id="theta-2d"),
    pytest.param(
        lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 1, 3, 5, 7)), "theta", "(2, 2, 3)", id="theta-2x3-for-5d-size"
    ),
    pytest.param(
        lambda: stn_triton.affine_grid(t(2, 3, 4), (2, 1, 3, 5)), "theta", "(2, 3, 4)", id="theta-3x4-for-4d-size"
    ),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 2), (2, 1, 3, 5)), "theta", "(2, 2, 2)", id="theta-2x2"),
    pytest.param(
        lambda: stn_triton.affine_grid(t(2, 2, 3, dtype=torch.int64), (2, 1, 3, 5)),
        "theta",
        "torch.int64",
        id="integer-theta",
    ),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 3, 5)), "size", "(2, 3, 5)", id="size-of-3"),
    pytest.param(
        lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 1, 1, 3, 5, 7)), "size", "(2, 1, 1, 3, 5, 7)", id="size-of-6"
    ),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 1, 3.0, 5)), "size", "3.0", id="size-not-ints"),
    pytest.param(
        lambda: stn_triton.affine_grid(t(2, 2, 3), (3, 1, 3, 5)), "theta", "(3, 1, 3, 5)", id="theta-batch-mismatch"
    ),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 1, -3, 5)), "size", "-3", id="negative-size"),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 1, 0, 5)), "size", "0", id="zero-size"),
    pytest.param(
        lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 1, 3, 5), align_corners=1),
        "align_corners",
        "1",
        id="align-corners-not-bool",
    ),
]


@pytest.mark.parametrize("call, argument, got", GRID_SAMPLE_CASES + AFFINE_GRID_CASES)
def test_bad_argument_fails_before_launch(call, argument, got):
    with pytest.raises((ValueError, TypeError), match=re.escape(argument)) as error:
        call()
    assert got in str(error.value), f"the message should show what it got ({got!r}): {error.value}"


# (stn_triton's call, PyTorch's same call): PyTorch's exception type must be among ours, so that code
# catching PyTorch's errors keeps working with stn_triton, swapped in or called directly.
def _torch_grid_sample(input, grid, **kwargs):
    return lambda: torch.nn.functional.grid_sample(input, grid, **{"align_corners": False, **kwargs})


PYTORCH_TYPE_CASES = [
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2, dtype=torch.float64)),
                 _torch_grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2, dtype=torch.float64)), id="dtype-mismatch"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2, dtype=torch.int64)),
                 _torch_grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2, dtype=torch.int64)), id="integer-grid"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(3, 3, 5, 2)),
                 _torch_grid_sample(t(2, 3, 5, 7), t(3, 3, 5, 2)), id="batch-mismatch"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 3)),
                 _torch_grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 3)), id="grid-last-dim"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), mode="area"),
                 _torch_grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), mode="area"), id="unknown-mode"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), padding_mode="circular"),
                 _torch_grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), padding_mode="circular"), id="unknown-padding"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7, 3), t(2, 1, 3, 5, 3), mode="bicubic"),
                 _torch_grid_sample(t(2, 3, 5, 7, 3), t(2, 1, 3, 5, 3), mode="bicubic"), id="bicubic-5d"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), align_corners=1),
                 _torch_grid_sample(t(2, 3, 5, 7), t(2, 3, 5, 2), align_corners=1), id="align-corners-not-bool"),
    pytest.param(lambda: stn_triton.grid_sample(t(2, 3, 0, 7), t(2, 3, 5, 2)),
                 _torch_grid_sample(t(2, 3, 0, 7), t(2, 3, 5, 2)), id="empty-side"),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3, dtype=torch.int64), (2, 1, 3, 5)),
                 lambda: torch.nn.functional.affine_grid(t(2, 2, 3, dtype=torch.int64), [2, 1, 3, 5], False),
                 id="integer-theta"),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 3, 5)),
                 lambda: torch.nn.functional.affine_grid(t(2, 2, 3), [2, 3, 5], False), id="size-of-3"),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 1, 3, 5, 7)),
                 lambda: torch.nn.functional.affine_grid(t(2, 2, 3), [2, 1, 3, 5, 7], False), id="theta-for-5d"),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3), (3, 1, 3, 5)),
                 lambda: torch.nn.functional.affine_grid(t(2, 2, 3), [3, 1, 3, 5], False), id="batch-mismatch-theta"),
    pytest.param(lambda: stn_triton.affine_grid(t(2, 2, 3), (2, 1, 0, 5)),
                 lambda: torch.nn.functional.affine_grid(t(2, 2, 3), [2, 1, 0, 5], False), id="zero-size"),
]


@pytest.mark.parametrize("ours, theirs", PYTORCH_TYPE_CASES)
def test_the_exception_type_pytorch_raises_is_raised_too(ours, theirs):
    with pytest.raises(Exception) as expected:
        theirs()
    with pytest.raises(Exception) as actual:
        ours()
    assert isinstance(actual.value, type(expected.value)), (
        f"PyTorch raises {type(expected.value).__name__}, stn_triton {type(actual.value).__mro__}")


def test_unit_size_grid_with_align_corners_warns_as_pytorch_does():
    with pytest.warns(UserWarning) as expected:
        torch.nn.functional.affine_grid(t(2, 2, 3), [2, 1, 1, 5], align_corners=True)
    with pytest.warns(UserWarning) as actual, pytest.raises(Launched):
        stn_triton.affine_grid(t(2, 2, 3), (2, 1, 1, 5), align_corners=True)
    assert [str(w.message) for w in actual] == [str(w.message) for w in expected]
