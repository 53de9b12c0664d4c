"""The fused warps' bad arguments fail before any launch, naming the argument; non-finite transforms
sample nothing and never read or write out of bounds.

The bad-argument cases run with every way out of ``functional`` (the op layer and the plain-PyTorch
fallback) replaced by a stub that fails the test if reached, so an error raised from inside a
launch cannot pass for validation.
"""

import math
import re
import zlib
from types import SimpleNamespace

import pytest
import torch
from test_warps import AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS, Shape, make_case, run_warp

import stn_triton
import stn_triton.functional as functional
from conftest import DEVICE, assert_close_scaled, reference_grid_sample

SAMPLING_FUNCTIONS = (
    "affine_grid_sample",
    "perspective_grid_sample",
    "tps_grid_sample",
    "warp_affine",
    "warp_perspective",
)


class Launched(Exception):
    """Raised by the stubs: validation let the call through."""


def _launched(*args, **kwargs):
    raise Launched


@pytest.fixture
def no_launch(monkeypatch):
    """Replace the warp launchers and the fallback's sampling functions by a stub."""
    monkeypatch.setattr(functional, "_warp_op", SimpleNamespace(**{name: _launched for name in SAMPLING_FUNCTIONS}))
    for name in SAMPLING_FUNCTIONS:
        monkeypatch.setattr(functional.fallback, name, _launched)


def t(*shape, dtype=torch.float32, requires_grad=False):
    return torch.zeros(shape, dtype=dtype, device=DEVICE, requires_grad=requires_grad)


@pytest.mark.usefixtures("no_launch")
def test_valid_arguments_reach_the_launch():
    """The stub is what a valid call reaches: the cases below really fail in validation."""
    valid = [
        lambda: stn_triton.affine_grid_sample(t(2, 3, 5, 7), t(2, 2, 3)),
        lambda: stn_triton.affine_grid_sample(t(2, 3, 5, 7, 3), t(2, 3, 4), (2, 3, 1, 3, 5), mode="nearest"),
        lambda: stn_triton.perspective_grid_sample(t(2, 3, 5, 7), t(2, 3, 3), (2, 3, 4, 4)),
        lambda: stn_triton.tps_grid_sample(t(2, 3, 5, 7), t(2, 9, 2)),
        lambda: stn_triton.tps_grid_sample(t(2, 3, 5, 7), t(2, 5, 2), t(5, 2)),
        lambda: stn_triton.warp_affine(t(2, 3, 5, 7), t(2, 2, 3), (4, 6), padding_mode="fill", fill_value=t(3)),
        lambda: stn_triton.warp_perspective(t(2, 3, 5, 7), t(2, 3, 3), (4, 6)),
    ]
    for call in valid:
        with pytest.raises(Launched):
            call()


IMAGE = (2, 3, 5, 7)
VOLUME = (2, 3, 5, 7, 3)

# (call, argument the message must name, what it got that the message must show)
AFFINE_CASES = [
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*VOLUME), t(2, 2, 3)),
        "theta",
        "(2, 2, 3)",
        id="affine-theta-2x3-for-5d",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 3, 4)), "theta", "(2, 3, 4)", id="affine-theta-3x4-for-4d"
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 2)), "theta", "(2, 2, 2)", id="affine-theta-2x2"
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 3)), "theta", "(2, 3)", id="affine-theta-unbatched"
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(3, 2, 3)), "theta", "(3, 2, 3)", id="affine-batch-mismatch"
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), [[1.0, 0.0, 0.0]]),
        "theta",
        "list",
        id="affine-theta-not-a-tensor",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3, dtype=torch.float64)),
        "theta",
        "torch.float64",
        id="affine-dtype-mismatch",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3, dtype=torch.int64)),
        "theta",
        "torch.int64",
        id="affine-integer-theta",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE, dtype=torch.int32), t(2, 2, 3)),
        "input",
        "torch.int32",
        id="affine-integer-input",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(2, 3, 5), t(2, 2, 3)), "input", "(2, 3, 5)", id="affine-input-3d"
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), (3, 3, 4, 4)),
        "size",
        "(3, 3, 4, 4)",
        id="affine-size-batch",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), (2, 1, 4, 4)),
        "size",
        "(2, 1, 4, 4)",
        id="affine-size-channels",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), (4, 4)),
        "size",
        "(4, 4)",
        id="affine-size-spatial-only",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), (2, 3, 1, 4, 4)),
        "size",
        "(2, 3, 1, 4, 4)",
        id="affine-size-5-for-4d",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*VOLUME), t(2, 3, 4), (2, 3, 4, 4)),
        "size",
        "(2, 3, 4, 4)",
        id="affine-size-4-for-5d",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), (2, 3, 0, 4)),
        "size",
        "(2, 3, 0, 4)",
        id="affine-size-zero",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), (2, 3, 4.0, 4)),
        "size",
        "4.0",
        id="affine-size-not-ints",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), mode="area"),
        "mode",
        "area",
        id="affine-unknown-mode",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*VOLUME), t(2, 3, 4), mode="bicubic"),
        "mode",
        "bicubic",
        id="affine-bicubic-5d",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), padding_mode="fill"),
        "padding_mode",
        "fill",
        id="affine-fill-padding",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), padding_mode="circular"),
        "padding_mode",
        "circular",
        id="affine-unknown-padding",
    ),
    pytest.param(
        lambda: stn_triton.affine_grid_sample(t(*IMAGE), t(2, 2, 3), align_corners="yes"),
        "align_corners",
        "yes",
        id="affine-align-corners-not-bool",
    ),
]

PERSPECTIVE_CASES = [
    pytest.param(
        lambda: stn_triton.perspective_grid_sample(t(*IMAGE), t(2, 2, 3)),
        "homography",
        "(2, 2, 3)",
        id="perspective-2x3",
    ),
    pytest.param(
        lambda: stn_triton.perspective_grid_sample(t(*IMAGE), t(3, 3, 3)),
        "homography",
        "(3, 3, 3)",
        id="perspective-batch-mismatch",
    ),
    pytest.param(
        lambda: stn_triton.perspective_grid_sample(t(*IMAGE), t(2, 3, 3, dtype=torch.float16)),
        "homography",
        "torch.float16",
        id="perspective-dtype-mismatch",
    ),
    pytest.param(
        lambda: stn_triton.perspective_grid_sample(t(*IMAGE), t(2, 3, 3, dtype=torch.int64)),
        "homography",
        "torch.int64",
        id="perspective-integer-homography",
    ),
    pytest.param(
        lambda: stn_triton.perspective_grid_sample(t(*VOLUME), t(2, 3, 3)),
        "input",
        "(2, 3, 5, 7, 3)",
        id="perspective-5d-input",
    ),
    pytest.param(
        lambda: stn_triton.perspective_grid_sample(t(*IMAGE), t(2, 3, 3), (2, 4, 4, 4)),
        "size",
        "(2, 4, 4, 4)",
        id="perspective-size-channels",
    ),
    pytest.param(
        lambda: stn_triton.perspective_grid_sample(t(*IMAGE), t(2, 3, 3), padding_mode="fill"),
        "padding_mode",
        "fill",
        id="perspective-fill-padding",
    ),
    pytest.param(
        lambda: stn_triton.perspective_grid_sample(t(*IMAGE), t(2, 3, 3), mode="linear"),
        "mode",
        "linear",
        id="perspective-unknown-mode",
    ),
]

TPS_CASES = [
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 9, 3)), "source_points", "(2, 9, 3)", id="tps-points-of-3"
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(9, 2)), "source_points", "(9, 2)", id="tps-points-unbatched"
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(3, 9, 2)), "source_points", "(3, 9, 2)", id="tps-batch-mismatch"
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 9, 2), t(8, 2)),
        "control_points",
        "(8, 2)",
        id="tps-K-mismatch",
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 9, 2), t(2, 9, 2)),
        "control_points",
        "(2, 9, 2)",
        id="tps-control-batched",
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 5, 2)), "control_points", "5", id="tps-K-not-square"
    ),
    # Fewer than 3 points cannot fix the spline's affine part, whatever the control points.
    pytest.param(lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 1, 2)), "source_points", "1", id="tps-K-1"),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 2, 2), t(2, 2)),
        "source_points",
        "2",
        id="tps-K-2-with-control",
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 9, 2, dtype=torch.float64)),
        "source_points",
        "torch.float64",
        id="tps-dtype-mismatch",
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 9, 2, dtype=torch.int64)),
        "source_points",
        "torch.int64",
        id="tps-integer-points",
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*VOLUME), t(2, 9, 2)), "input", "(2, 3, 5, 7, 3)", id="tps-5d-input"
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 9, 2), size=(2, 3, 4)),
        "size",
        "(2, 3, 4)",
        id="tps-size-length",
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 9, 2), size=(1, 3, 4, 4)),
        "size",
        "(1, 3, 4, 4)",
        id="tps-size-batch",
    ),
    pytest.param(
        lambda: stn_triton.tps_grid_sample(t(*IMAGE), t(2, 9, 2), padding_mode="fill"),
        "padding_mode",
        "fill",
        id="tps-fill-padding",
    ),
]

PIXEL_WARP_CASES = [
    case
    for name, matrix in (("warp_affine", (2, 3)), ("warp_perspective", (3, 3)))
    for case in [
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(t(*VOLUME), t(2, *matrix), (4, 6)),
            "src",
            "(2, 3, 5, 7, 3)",
            id=f"{name}-5d-src",
        ),
        pytest.param(
            lambda name=name: getattr(stn_triton, name)(t(*IMAGE), t(2, 4, 4), (4, 6)),
            "M",
            "(2, 4, 4)",
            id=f"{name}-M-4x4",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(t(*IMAGE), t(3, *matrix), (4, 6)),
            "M",
            f"(3, {matrix[0]}, {matrix[1]})",
            id=f"{name}-batch-mismatch",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(
                t(*IMAGE), t(2, *matrix, dtype=torch.float64), (4, 6)
            ),
            "M",
            "torch.float64",
            id=f"{name}-dtype-mismatch",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(t(*IMAGE), t(2, *matrix), (4, 6, 1)),
            "dsize",
            "(4, 6, 1)",
            id=f"{name}-dsize-of-3",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(t(*IMAGE), t(2, *matrix), (0, 6)),
            "dsize",
            "(0, 6)",
            id=f"{name}-dsize-zero",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(t(*IMAGE), t(2, *matrix), (4.0, 6)),
            "dsize",
            "4.0",
            id=f"{name}-dsize-not-ints",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(t(*IMAGE), t(2, *matrix), (4, 6), mode="area"),
            "mode",
            "area",
            id=f"{name}-unknown-mode",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(
                t(*IMAGE), t(2, *matrix), (4, 6), padding_mode="constant"
            ),
            "padding_mode",
            "constant",
            id=f"{name}-unknown-padding",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(
                t(*IMAGE), t(2, *matrix), (4, 6), padding_mode="fill", fill_value=t(2)
            ),
            "fill_value",
            "(2,)",
            id=f"{name}-fill-value-length",
        ),
        pytest.param(
            lambda name=name, matrix=matrix: getattr(stn_triton, name)(
                t(*IMAGE), t(2, *matrix), (4, 6), padding_mode="fill", fill_value=t(1, 3)
            ),
            "fill_value",
            "(1, 3)",
            id=f"{name}-fill-value-2d",
        ),
    ]
]


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("call, argument, got", AFFINE_CASES + PERSPECTIVE_CASES + TPS_CASES + PIXEL_WARP_CASES)
def test_bad_argument_fails_before_launch(call, argument, got):
    with pytest.raises((ValueError, TypeError), match=re.escape(argument)) as error:
        call()
    assert got in str(error.value), f"the message should show what it got ({got!r}): {error.value}"


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize("name, matrix", [("warp_affine", (2, 3)), ("warp_perspective", (3, 3))])
def test_fill_value_requiring_grad_is_rejected(name, matrix):
    """fill_value is a constant of the warp: no gradient is returned for it, so asking for one fails."""
    with pytest.raises(ValueError, match="fill_value"):
        getattr(stn_triton, name)(
            t(*IMAGE), t(2, *matrix), (4, 6), padding_mode="fill", fill_value=t(3, requires_grad=True)
        )


# --- non-finite and huge transforms -----------------------------------------------------------------


SPECIALS = {"nan": float("nan"), "-inf": float("-inf"), "1e30": 1e30}
NON_FINITE_SHAPE = Shape(2, 2, (5, 7), (4, 5))


def _poison(warp, param: torch.Tensor, value: float) -> torch.Tensor:
    """Batch element 0 of ``param`` with ``value`` where it moves every sample point; element 1 untouched.

    A translation entry for theta (so a huge value moves every point, even one at x = y = 0), the
    whole third row for a homography (every denominator non-finite or 0 * huge), and one source
    point for the spline (a non-finite value spreads into every coefficient).
    """
    param = param.clone()
    if warp is AFFINE_2D or warp is AFFINE_3D:
        param[0, 0, -1] = value
        if not math.isfinite(value):
            param[0, 1, 0] = value
    elif warp is PERSPECTIVE:
        param[0, 2] = value
    else:
        param[0, 4] = value
    return param


def _sane_reference(warp, x, param, size, grad_output, kw):
    """The reference with every non-finite or far-off sample point moved far outside (reads zeros).

    Built in float64 from the poisoned parameter; the gradient of the parameter is not taken
    through the poisoned element, where it is meaningless.
    """
    grid = warp.grid(param.double(), size, kw["align_corners"]).detach()
    grid = torch.where(torch.isfinite(grid) & (grid.abs() <= 2), grid, torch.full_like(grid, 7.0))
    x = x.detach().double().requires_grad_()
    out = reference_grid_sample(x, grid, **kw)
    out.backward(grad_output.double())
    return out.detach(), x.grad


# The interpreter runs kernels in numpy, which warns on arithmetic with NaN and inf.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("special", list(SPECIALS))
@pytest.mark.parametrize("warp", [pytest.param(w, id=w.name) for w in (AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS)])
def test_non_finite_and_huge_parameters_stay_in_bounds(warp, special, padding_mode):
    """nan, -inf and 1e30 in batch element 0 never read garbage; element 1 equals the reference.

    With zeros padding every non-finite or far-off point reads 0, so element 0 equals the reference
    with those points moved far outside, and grad input is the same too.
    """
    shape = NON_FINITE_SHAPE if warp.nd == 2 else Shape(2, 2, (3, 5, 4), (2, 3, 5))
    x, param, grad_output = make_case(
        warp, shape, zlib.crc32(f"special-{warp.name}-{special}-{padding_mode}".encode()), torch.float32
    )
    param = _poison(warp, param, SPECIALS[special])
    # Half-pixel centres: no output pixel sits on a control point, where a spline moved by 1e30
    # would be finite in exact arithmetic and rounding noise times 1e30 in practice.
    kw = dict(mode="bilinear", padding_mode=padding_mode, align_corners=False)
    out, grad_x, grad_param = run_warp(warp.ours, x, param, shape.output_shape, grad_output, **kw)
    assert torch.isfinite(out).all(), "output not finite: an out-of-bounds or garbage read"
    assert torch.isfinite(grad_x).all(), "grad input not finite: an out-of-bounds or garbage write"
    assert torch.isfinite(grad_param[1]).all()

    expected = run_warp(
        warp.reference, x[1:].double(), param[1:].double(), (1, *shape.output_shape[1:]), grad_output[1:].double(), **kw
    )
    assert_close_scaled(out[1:].double(), expected[0], 1e-5, "output of the healthy element")
    assert_close_scaled(grad_param[1:].double(), expected[2], 1e-4, "grad param of the healthy element")
    assert_close_scaled(grad_x[1:].double(), expected[1], 1e-5, "grad input of the healthy element")
    if padding_mode == "zeros":
        sane_out, sane_grad_x = _sane_reference(warp, x, param, shape.output_shape, grad_output, kw)
        assert_close_scaled(out.double(), sane_out, 1e-5, "output")
        assert_close_scaled(grad_x.double(), sane_grad_x, 1e-5, "grad input")
