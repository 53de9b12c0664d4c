"""The fused warps (``affine_grid_sample``, ``perspective_grid_sample``, ``tps_grid_sample``) against
unfused references: the sampling grid built in memory, then ``F.grid_sample``.

The affine reference is PyTorch's ``F.affine_grid``; the projective and thin-plate-spline grids are
built here, independently of ``stn_triton.fallback`` (the spline is solved through an explicit
inverse of its (K + 3)-square system in float64). Every reference is differentiable, so gradients
of the input and of the transform parameters are compared with autograd through it.
"""

import math
import os
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import (
    DEVICE,
    INTERPRETING,
    LOW_PRECISION,
    MODES_2D,
    MODES_3D,
    ON_GPU,
    PADDING_MODES,
    assert_close_scaled,
    assert_within_low_precision_rule,
    deterministic_algorithms,
    generator,
    rand,
    randn,
    reference_grid_sample,
    sizes,
)

# F.affine_grid warns on every grid with a side of 1 under align_corners=True.
pytestmark = pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior")


def seed_of(*parts) -> int:
    """A fixed seed per case, so every case draws its own values and reruns draw the same."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def align_id(align_corners: bool) -> str:
    return "align" if align_corners else "noalign"


# --- independent references ---------------------------------------------------------------------


def normalized_positions(size: int, align_corners: bool, dtype=torch.float64) -> torch.Tensor:
    """``[size]`` normalized centres of an output side's pixels, where ``F.affine_grid`` puts them.

    Computed in float64 from the index (corner-aligned: ``2i / (size - 1) - 1``; half-pixel:
    ``(2i + 1) / size - 1``; a side of 1 sits at 0 either way), then cast to ``dtype``.
    """
    i = torch.arange(size, dtype=torch.float64)
    if size == 1:
        positions = torch.zeros(1, dtype=torch.float64)
    elif align_corners:
        positions = 2 * i / (size - 1) - 1
    else:
        positions = (2 * i + 1) / size - 1
    return positions.to(dtype=dtype, device=DEVICE)


def base_xy(spatial, align_corners, dtype):
    """(x [1, 1, W], y [1, H, 1]): normalized coordinates of the output pixels, broadcastable."""
    h, w = spatial
    x = normalized_positions(w, align_corners, dtype).view(1, 1, w)
    y = normalized_positions(h, align_corners, dtype).view(1, h, 1)
    return x, y


def perspective_grid(homography: torch.Tensor, spatial, align_corners: bool) -> torch.Tensor:
    """``[N, H, W, 2]``: ``homography @ [x, y, 1]`` divided by its third coordinate, per output pixel."""
    x, y = base_xy(spatial, align_corners, homography.dtype)

    def row(i):
        return (
            homography[:, i, 0, None, None] * x + homography[:, i, 1, None, None] * y + homography[:, i, 2, None, None]
        )

    z = row(2)
    return torch.stack([row(0) / z, row(1) / z], dim=-1)


def default_control_points(k: int) -> torch.Tensor:
    """``[K, 2]`` float64: a sqrt(K) x sqrt(K) grid over [-1, 1]^2, x fastest."""
    side = math.isqrt(k)
    assert side * side == k
    line = torch.linspace(-1.0, 1.0, side, dtype=torch.float64)
    ys, xs = torch.meshgrid(line, line, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def tps_kernel(squared_distance: torch.Tensor) -> torch.Tensor:
    """U(d) = d log d of a squared distance, 0 at d = 0 (its limit)."""
    positive = squared_distance > 0
    safe = torch.where(positive, squared_distance, torch.ones_like(squared_distance))
    return torch.where(positive, safe * torch.log(safe), torch.zeros_like(safe))


def tps_interpolation_matrix(control_points: torch.Tensor) -> torch.Tensor:
    """``[K + 3, K]`` float64: spline coefficients (w_1..w_K, a0, a_x, a_y) = matrix @ values.

    The columns of the inverse of [[U(|c_i - c_j|^2), P], [P^T, 0]], P = [1, x, y], that multiply
    the K interpolated values (the other right-hand sides are 0).
    """
    c = control_points.to(torch.float64).cpu()
    k = c.shape[0]
    system = torch.zeros(k + 3, k + 3, dtype=torch.float64)
    system[:k, :k] = tps_kernel(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    p = torch.cat([torch.ones(k, 1, dtype=torch.float64), c], dim=1)
    system[:k, k:] = p
    system[k:, :k] = p.T
    return torch.linalg.inv(system)[:, :k]


def tps_grid(source_points: torch.Tensor, control_points: torch.Tensor, spatial, align_corners: bool) -> torch.Tensor:
    """``[N, H, W, 2]``: the spline through control_points -> source_points, at every output pixel.

    Runs in source_points' dtype (the constant interpolation matrix is solved in float64).
    """
    dtype = source_points.dtype
    k = control_points.shape[0]
    coefficients = torch.einsum(
        "ik,nkc->nic", tps_interpolation_matrix(control_points).to(dtype=dtype, device=DEVICE), source_points
    )
    weights, affine = coefficients[:, :k], coefficients[:, k:]
    x, y = base_xy(spatial, align_corners, dtype)
    h, w = spatial
    points = torch.stack([x.expand(1, h, w), y.expand(1, h, w)], dim=-1).reshape(-1, 2)
    c = control_points.to(dtype=dtype, device=DEVICE)
    radial = tps_kernel(((points[:, None, :] - c[None, :, :]) ** 2).sum(-1))  # [H * W, K]
    grid = torch.einsum("pk,nkc->npc", radial, weights) + affine[:, None, 0] + points[None, :, :1] * affine[:, None, 1]
    grid = grid + points[None, :, 1:] * affine[:, None, 2]
    return grid.reshape(-1, h, w, 2)


# --- the warps under test, each with its reference and its parameters -----------------------------


class Warp(NamedTuple):
    """One fused warp: how to call it, its unfused reference, and how to draw its parameter."""

    name: str
    nd: int
    ours: Callable  # (input, param, size, **sampling) -> output
    grid: Callable  # (param, full size, align_corners) -> reference grid [N, *spatial, nd]
    draw: Callable  # (n, gen, scale) -> float64 CPU parameter near the identity

    @property
    def modes(self):
        return MODES_2D if self.nd == 2 else MODES_3D

    def reference(self, x, param, size, mode, padding_mode, align_corners):
        grid = self.grid(param, tuple(size) if size is not None else tuple(x.shape), align_corners)
        return reference_grid_sample(x, grid.to(x.dtype), mode, padding_mode, align_corners)


def _draw_theta(nd):
    def draw(n, gen, scale=0.4):
        identity = torch.eye(nd, nd + 1, dtype=torch.float64)
        return identity + rand((n, nd, nd + 1), gen, -scale, scale, device="cpu")

    return draw


def _draw_homography(n, gen, scale=0.4):
    """An affine part near the identity and a third row near (0, 0, 1): denominators in [0.5, 1.5]."""
    h = torch.eye(3, dtype=torch.float64) + rand((n, 3, 3), gen, -scale, scale, device="cpu")
    h[:, 2, :2] = rand((n, 2), gen, -scale / 2, scale / 2, device="cpu")
    h[:, 2, 2] = 1 + rand((n,), gen, -0.1, 0.1, device="cpu")
    return h


TPS_K = 9
# Non-square K: the control points must be given. Fixed points that keep the system well conditioned.
CUSTOM_CONTROL_POINTS = torch.tensor(
    [[-0.9, -0.8], [0.85, -0.9], [0.1, 0.05], [-0.7, 0.9], [0.9, 0.6]], dtype=torch.float64
)


def _draw_source_points(control_points):
    def draw(n, gen, scale=0.4):
        noise = rand((n, *control_points.shape), gen, -scale / 2, scale / 2, device="cpu")
        return control_points.expand(n, -1, -1) + noise

    return draw


def _affine(x, theta, size, **kw):
    return stn_triton.affine_grid_sample(x, theta, size, **kw)


def _perspective(x, homography, size, **kw):
    return stn_triton.perspective_grid_sample(x, homography, size, **kw)


def _tps_default(x, source_points, size, **kw):
    return stn_triton.tps_grid_sample(x, source_points, size=size, **kw)


def _tps_custom(x, source_points, size, **kw):
    control = CUSTOM_CONTROL_POINTS.to(dtype=x.dtype, device=x.device)
    return stn_triton.tps_grid_sample(x, source_points, control, size=size, **kw)


def _affine_grid(theta, size, align_corners):
    return F.affine_grid(theta, list(size), align_corners=align_corners)


def _perspective_grid(homography, size, align_corners):
    return perspective_grid(homography, size[2:], align_corners)


def _tps_default_grid(source_points, size, align_corners):
    return tps_grid(source_points, default_control_points(source_points.shape[1]), size[2:], align_corners)


def _tps_custom_grid(source_points, size, align_corners):
    return tps_grid(source_points, CUSTOM_CONTROL_POINTS, size[2:], align_corners)


AFFINE_2D = Warp("affine2d", 2, _affine, _affine_grid, _draw_theta(2))
AFFINE_3D = Warp("affine3d", 3, _affine, _affine_grid, _draw_theta(3))
PERSPECTIVE = Warp("perspective", 2, _perspective, _perspective_grid, _draw_homography)
TPS = Warp("tps", 2, _tps_default, _tps_default_grid, _draw_source_points(default_control_points(TPS_K)))
TPS_CUSTOM = Warp("tps-custom", 2, _tps_custom, _tps_custom_grid, _draw_source_points(CUSTOM_CONTROL_POINTS))
WARPS = [AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS, TPS_CUSTOM]
WARP_PARAMS = [pytest.param(w, id=w.name) for w in WARPS]


class Shape(NamedTuple):
    """A warp problem: input [n, c, *size_in], output [n, c, *size_out]."""

    n: int
    c: int
    size_in: tuple
    size_out: tuple

    @property
    def id(self) -> str:
        return f"N{self.n}-C{self.c}-{'x'.join(map(str, self.size_in))}-to-{'x'.join(map(str, self.size_out))}"

    @property
    def input_shape(self):
        return (self.n, self.c, *self.size_in)

    @property
    def output_shape(self):
        return (self.n, self.c, *self.size_out)


# The main shape per dimensionality: odd sides, output different from input.
SHAPE = {
    2: sizes(cpu=Shape(2, 3, (5, 7), (6, 3)), gpu=Shape(4, 8, (33, 47), (29, 51))),
    3: sizes(cpu=Shape(2, 2, (3, 5, 4), (4, 3, 5)), gpu=Shape(2, 4, (9, 13, 7), (11, 7, 13))),
}
# Sides of 1 (the pixel sits at 0 whatever align_corners says), 3 and 7.
ODD_SHAPES = {
    2: [Shape(1, 2, (1, 7), (3, 1)), Shape(2, 1, (7, 3), (1, 7)), Shape(1, 1, (1, 1), (3, 3))],
    3: [Shape(1, 2, (1, 3, 7), (3, 1, 1)), Shape(1, 1, (3, 1, 1), (1, 7, 3))],
}


def make_case(warp: Warp, shape: Shape, seed: int, dtype=torch.float64, scale=0.4):
    """Input, parameter and grad_output of one case, all in ``dtype`` on the device."""
    gen = generator(seed)
    x = randn(shape.input_shape, gen, dtype)
    param = warp.draw(shape.n, gen, scale).to(dtype=dtype, device=DEVICE)
    grad_output = randn(shape.output_shape, gen, dtype)
    return x, param, grad_output


def run_warp(fn, x, param, size, grad_output, **kw):
    """Forward and backward through ``fn``; returns (output, grad of x, grad of param).

    ``grad_output=None`` backpropagates ``out.sum()`` (an expanded, stride-0 gradient).
    """
    x = x.detach().clone().requires_grad_()
    param = param.detach().clone().requires_grad_()
    out = fn(x, param, size, **kw)
    if grad_output is None:
        out.sum().backward()
    else:
        out.backward(grad_output)
    return out.detach(), x.grad, param.grad


def run_both(warp, x, param, size, grad_output, mode, padding_mode, align_corners):
    """(ours, reference), each (output, grad input, grad param)."""
    kw = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    ours = run_warp(warp.ours, x, param, size, grad_output, **kw)
    expected = run_warp(warp.reference, x, param, size, grad_output, **kw)
    return ours, expected


WHAT = ("output", "grad input", "grad param")


def assert_all_close(ours, expected, tol, context=""):
    for what, a, e in zip(WHAT, ours, expected):
        assert a is not None, f"{context}{what} missing"
        assert a.dtype == e.dtype, f"{context}{what}: dtype {a.dtype}, expected {e.dtype}"
        assert a.shape == e.shape, f"{context}{what}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        assert_close_scaled(a, e, tol, f"{context}{what}")


# --- the references themselves ----------------------------------------------------------------------


def test_reference_grids_agree_with_torch_where_they_overlap():
    """The hand-built grids reduce to F.affine_grid: an affine homography, a spline of affine moves."""
    gen = generator(1)
    theta = _draw_theta(2)(2, gen).to(DEVICE)
    size = (2, 1, 5, 6)
    for align_corners in (False, True):
        expected = F.affine_grid(theta, size, align_corners=align_corners)
        homography = torch.cat(
            [theta, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64, device=DEVICE).expand(2, 1, 3)], 1
        )
        torch.testing.assert_close(perspective_grid(homography, size[2:], align_corners), expected, atol=1e-12, rtol=0)
        control = default_control_points(TPS_K).to(DEVICE)
        moved = torch.einsum("nij,kj->nki", theta[:, :, :2], control) + theta[:, None, :, 2]
        torch.testing.assert_close(tps_grid(moved, control, size[2:], align_corners), expected, atol=1e-12, rtol=0)


# --- forward and backward, float64 ------------------------------------------------------------------


def every_case():
    """Every warp x mode x padding x align_corners on the main shape of its dimensionality."""
    cases = []
    for warp in WARPS:
        shape = SHAPE[warp.nd]
        for mode in warp.modes:
            for padding in PADDING_MODES:
                for align in (False, True):
                    if warp is TPS_CUSTOM and mode != "bilinear":
                        continue  # the custom control points change the spline, not the sampling
                    cases.append(
                        pytest.param(
                            warp,
                            shape,
                            mode,
                            padding,
                            align,
                            id=f"{warp.name}-{shape.id}-{mode}-{padding}-{align_id(align)}",
                        )
                    )
    return cases


@pytest.mark.parametrize("warp, shape, mode, padding_mode, align_corners", every_case())
def test_matches_reference_float64(warp, shape, mode, padding_mode, align_corners):
    """Output, grad input and grad of the transform parameter against autograd of the reference."""
    seed = seed_of("f64", warp.name, shape.id, mode, padding_mode, align_corners)
    x, param, grad_output = make_case(warp, shape, seed)
    ours, expected = run_both(warp, x, param, shape.output_shape, grad_output, mode, padding_mode, align_corners)
    assert_all_close(ours, expected, 1e-10)


def odd_size_cases():
    return [
        pytest.param(warp, shape, align, id=f"{warp.name}-{shape.id}-{align_id(align)}")
        for warp in (AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS)
        for shape in ODD_SHAPES[warp.nd]
        for align in (False, True)
    ]


@pytest.mark.parametrize("warp, shape, align_corners", odd_size_cases())
def test_odd_sizes_match_reference(warp, shape, align_corners):
    mode = "bicubic" if warp.nd == 2 else "bilinear"
    seed = seed_of("odd", warp.name, shape.id, align_corners)
    x, param, grad_output = make_case(warp, shape, seed)
    ours, expected = run_both(warp, x, param, shape.output_shape, grad_output, mode, "border", align_corners)
    assert_all_close(ours, expected, 1e-10)


@pytest.mark.skipif(not ON_GPU and not INTERPRETING, reason="the partial-sum rows belong to the Triton backward")
@pytest.mark.parametrize("warp", [pytest.param(w, id=w.name) for w in (AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS)])
def test_parameter_gradient_with_more_partial_rows_than_blocks(warp, monkeypatch):
    """A tuned block larger than the smallest of the space leaves rows of each image's partial sums
    unused; the gradient must still sum each image's own rows (several blocks per image, N > 1)."""
    from stn_triton import tuning

    shape = Shape(3, 2, (5, 6), (13, 11)) if warp.nd == 2 else Shape(2, 2, (3, 4, 5), (5, 6, 7))
    least = tuning.Launch.least
    monkeypatch.setattr(tuning.Launch, "least", lambda launch, name: 16 if name == "BLOCK_P" else least(launch, name))
    x, param, grad_output = make_case(warp, shape, seed_of("partial-rows", warp.name))
    ours, expected = run_both(warp, x, param, shape.output_shape, grad_output, "bilinear", "zeros", False)
    assert_all_close(ours, expected, 1e-10)


@pytest.mark.parametrize("size_type", [None, tuple, list, torch.Size], ids=["default", "tuple", "list", "torch-Size"])
@pytest.mark.parametrize("warp", WARP_PARAMS)
def test_size_forms(warp, size_type):
    """size is the full output size; ``None`` means input.shape (here input and output differ otherwise)."""
    shape = SHAPE[warp.nd]
    x, param, _ = make_case(warp, shape, seed_of("size", warp.name, size_type))
    size = None if size_type is None else size_type(shape.output_shape)
    out = warp.ours(x, param, size, mode="bilinear", padding_mode="zeros", align_corners=False)
    expected = warp.reference(x, param, size, "bilinear", "zeros", False)
    wanted = shape.input_shape if size is None else shape.output_shape
    assert out.shape == wanted
    assert_close_scaled(out, expected, 1e-10, "output")


@pytest.mark.parametrize("warp", WARP_PARAMS)
def test_sum_backward_reads_expanded_grad_output(warp):
    """``out.sum().backward()`` hands the backward a stride-0 grad_output of one element."""
    shape = SHAPE[warp.nd]
    x, param, _ = make_case(warp, shape, seed_of("sum", warp.name))
    ours, expected = run_both(warp, x, param, shape.output_shape, None, "bilinear", "reflection", False)
    assert_all_close(ours, expected, 1e-10)


@pytest.mark.parametrize("wants_grad", ["input-only", "param-only", "neither"])
@pytest.mark.parametrize("warp", WARP_PARAMS)
def test_gradient_only_for_tensors_that_require_it(warp, wants_grad):
    shape = SHAPE[warp.nd]
    x, param, grad_output = make_case(warp, shape, seed_of("requires-grad", warp.name, wants_grad))
    kw = dict(mode="bilinear", padding_mode="zeros", align_corners=True)
    expected = run_warp(warp.reference, x, param, shape.output_shape, grad_output, **kw)
    x.requires_grad_(wants_grad == "input-only")
    param.requires_grad_(wants_grad == "param-only")
    out = warp.ours(x, param, shape.output_shape, **kw)
    assert_close_scaled(out.detach(), expected[0], 1e-10, "output")
    if wants_grad == "neither":
        assert not out.requires_grad
        return
    out.backward(grad_output)
    if wants_grad == "input-only":
        assert param.grad is None
        assert_close_scaled(x.grad, expected[1], 1e-10, "grad input")
    else:
        assert x.grad is None
        assert_close_scaled(param.grad, expected[2], 1e-10, "grad param")


# --- layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("warp", WARP_PARAMS)
def test_channels_last_input_gives_channels_last_output(warp):
    shape = SHAPE[warp.nd]
    memory_format = torch.channels_last if warp.nd == 2 else torch.channels_last_3d
    mode = "bicubic" if warp.nd == 2 else "nearest"
    x, param, grad_output = make_case(warp, shape, seed_of("channels-last", warp.name))
    x_cl = x.contiguous(memory_format=memory_format)
    assert not x_cl.is_contiguous()
    kw = dict(mode=mode, padding_mode="reflection", align_corners=True)
    ours = run_warp(warp.ours, x_cl, param, shape.output_shape, grad_output, **kw)
    expected = run_warp(warp.reference, x, param, shape.output_shape, grad_output, **kw)
    assert ours[0].is_contiguous(memory_format=memory_format), "channels_last input must give channels_last output"
    assert_all_close(ours, expected, 1e-10)


PARAM_LAYOUTS = ["transposed", "sliced-with-step", "expanded-batch"]


def _non_contiguous_param(base: torch.Tensor, variant: str, n: int) -> torch.Tensor:
    """A view of ``base`` with the parameter's shape [N, a, b] and no copy."""
    if variant == "transposed":  # base [N, b, a]
        return base.transpose(1, 2)
    if variant == "sliced-with-step":  # base [N, a, 2b]
        return base[..., ::2]
    return base.expand(n, *base.shape[1:])  # "expanded-batch": base [1, a, b]


def _param_base(param: torch.Tensor, variant: str) -> torch.Tensor:
    """The storage ``_non_contiguous_param`` views: param's values, laid out for ``variant``."""
    if variant == "transposed":
        return param.transpose(1, 2).contiguous()
    if variant == "sliced-with-step":
        return torch.stack([param, torch.full_like(param, 1e3)], dim=-1).flatten(-2)
    return param[:1].clone()


@pytest.mark.parametrize("variant", PARAM_LAYOUTS)
@pytest.mark.parametrize("warp", WARP_PARAMS)
def test_non_contiguous_parameter(warp, variant):
    """theta / homography / source_points as views with odd strides; gradient lands on the base."""
    shape = SHAPE[warp.nd]
    x, param, grad_output = make_case(warp, shape, seed_of("param-layout", warp.name, variant))
    base = _param_base(param, variant)
    results = []
    for fn in (warp.ours, warp.reference):
        leaf = base.detach().clone().requires_grad_()
        x_leaf = x.detach().clone().requires_grad_()
        view = _non_contiguous_param(leaf, variant, shape.n)
        assert not view.is_contiguous()
        out = fn(x_leaf, view, shape.output_shape, mode="bilinear", padding_mode="border", align_corners=False)
        out.backward(grad_output)
        results.append((out.detach(), x_leaf.grad, leaf.grad))
    assert_all_close(*results, 1e-10)


# --- gradcheck --------------------------------------------------------------------------------------


GRADCHECK_SHAPE = {2: Shape(1, 2, (3, 4), (2, 3)), 3: Shape(1, 1, (3, 2, 4), (1, 2, 2))}


def pixel_coordinates(grid: torch.Tensor, size_in, align_corners: bool) -> torch.Tensor:
    """Unnormalize a grid [..., nd] (x first) to pixel coordinates of the input sides."""
    coords = []
    for axis, size in enumerate(reversed(size_in)):
        g = grid[..., axis]
        coords.append((g + 1) / 2 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2)
    return torch.stack(coords, dim=-1)


def param_away_from_kinks(warp: Warp, shape: Shape, seed: int, align_corners: bool, margin=0.05):
    """A float64 parameter whose sample points stay ``margin`` pixels off every integer and half-integer.

    Every kink of the sampling sits at an integer (tap change, border clip, reflection with
    align_corners=True) or a half-integer (nearest rounding, reflection with align_corners=False),
    so central finite differences are valid around such points. Draws until one qualifies.
    """
    gen = generator(seed)
    for _ in range(2000):
        param = warp.draw(shape.n, gen, 0.4).to(DEVICE)
        grid = warp.grid(param, shape.output_shape, align_corners)
        pixels = pixel_coordinates(grid, shape.size_in, align_corners) * 2
        if ((pixels - pixels.round()).abs().min() / 2) >= margin:
            return param
    raise AssertionError("no parameter away from the sampling kinks was found")


def gradcheck_cases():
    """Every warp x mode; the padding and align_corners rotate so each warp meets several of them.

    (Every mode x padding x align_corners meets autograd of the reference in test_matches_reference_float64.)
    """
    cases = []
    for w, warp in enumerate((AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS)):
        for m, mode in enumerate(warp.modes):
            padding = PADDING_MODES[(w + m) % len(PADDING_MODES)]
            align = (w + m) % 2 == 1
            cases.append(pytest.param(warp, mode, padding, align, id=f"{warp.name}-{mode}-{padding}-{align_id(align)}"))
    return cases


@pytest.mark.parametrize("warp, mode, padding_mode, align_corners", gradcheck_cases())
def test_gradcheck(warp, mode, padding_mode, align_corners):
    shape = GRADCHECK_SHAPE[warp.nd]
    seed = seed_of("gradcheck", warp.name, mode, padding_mode, align_corners)
    x = randn(shape.input_shape, generator(seed)).requires_grad_()
    param = param_away_from_kinks(warp, shape, seed, align_corners)
    # nearest is piecewise constant in the sample points: only its input gradient is checked.
    param.requires_grad_(mode != "nearest")

    def warped(x, param):
        return warp.ours(
            x, param, shape.output_shape, mode=mode, padding_mode=padding_mode, align_corners=align_corners
        )

    # Fast mode (random projections of the Jacobian) keeps the interpreter's launches few.
    assert torch.autograd.gradcheck(warped, (x, param), fast_mode=not ON_GPU)


# --- other dtypes -----------------------------------------------------------------------------------


LOW_PRECISION_ALIGN = {"zeros": False, "border": True, "reflection": False}


def low_precision_cases():
    return [
        pytest.param(warp, mode, padding, dtype, id=f"{warp.name}-{mode}-{padding}-{str(dtype)[6:]}")
        for warp in (AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS)
        for mode, padding in (("bilinear", "zeros"), ("nearest", "reflection"), ("bicubic", "border"))
        if mode in warp.modes
        for dtype in LOW_PRECISION
    ]


def _torch_own_low_precision(warp, x, param, size, grad_output, kw):
    """PyTorch at ``dtype`` end to end: the grid built and sampled at dtype, where PyTorch can.

    F.affine_grid has no CPU half kernel for some sizes; the grid is then built in float32 and
    rounded to dtype, the error any implementation holding a dtype grid has.
    """

    def at_dtype(x, param, size, **kw):
        try:
            grid = warp.grid(param, size, kw["align_corners"])
        except (NotImplementedError, RuntimeError):
            grid = warp.grid(param.float(), size, kw["align_corners"]).to(param.dtype)
        return reference_grid_sample(x, grid.to(x.dtype), kw["mode"], kw["padding_mode"], kw["align_corners"])

    return run_warp(at_dtype, x, param, size, grad_output, **kw)


@pytest.mark.parametrize("warp, mode, padding_mode, dtype", low_precision_cases())
def test_low_precision_within_twice_torch_error(warp, mode, padding_mode, dtype):
    """Output and gradients in float16/bfloat16 within 2x PyTorch's own error at that dtype."""
    shape = SHAPE[warp.nd]
    kw = dict(mode=mode, padding_mode=padding_mode, align_corners=LOW_PRECISION_ALIGN[padding_mode])
    x, param, grad_output = make_case(warp, shape, seed_of("low", warp.name, mode, padding_mode, dtype), dtype)
    size = shape.output_shape
    ours = run_warp(warp.ours, x, param, size, grad_output, **kw)
    torch_own = _torch_own_low_precision(warp, x, param, size, grad_output, kw)
    reference = run_warp(warp.reference, x.double(), param.double(), size, grad_output.double(), **kw)
    for what, a, t, r in zip(WHAT, ours, torch_own, reference):
        assert_within_low_precision_rule(a, t, r, dtype, what)


@pytest.mark.parametrize(
    "warp, padding_mode",
    [pytest.param(w, PADDING_MODES[i % 3], id=f"{w.name}-{PADDING_MODES[i % 3]}") for i, w in enumerate(WARPS)],
)
def test_float32_matches_float32_reference(warp, padding_mode):
    shape = SHAPE[warp.nd]
    mode = "bicubic" if warp.nd == 2 else "bilinear"
    align_corners = LOW_PRECISION_ALIGN[padding_mode]
    x, param, grad_output = make_case(warp, shape, seed_of("f32", warp.name, padding_mode), torch.float32)
    ours, expected = run_both(warp, x, param, shape.output_shape, grad_output, mode, padding_mode, align_corners)
    assert ours[0].dtype == torch.float32
    assert_close_scaled(ours[0], expected[0], 1e-5, "output")
    assert_close_scaled(ours[1], expected[1], 1e-4, "grad input")
    assert_close_scaled(ours[2], expected[2], 1e-4, "grad param")


# --- determinism ------------------------------------------------------------------------------------


def deterministic_cases():
    return [
        pytest.param(warp, mode, dtype, id=f"{warp.name}-{mode}-{str(dtype)[6:]}")
        for warp in (AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS)
        for mode in ("bilinear", "bicubic")
        if mode in warp.modes
        for dtype in (torch.float32, torch.float64)
    ]


@pytest.mark.parametrize("warp, mode, dtype", deterministic_cases())
def test_deterministic_backward_is_bitwise_reproducible(warp, mode, dtype):
    """A small input read by many more output pixels: every input pixel gets many contributions."""
    size_in = (3, 3) if warp.nd == 2 else (3, 3, 3)
    size_out = sizes(cpu=(9, 11), gpu=(129, 257)) if warp.nd == 2 else sizes(cpu=(5, 7, 6), gpu=(33, 65, 65))
    shape = Shape(*sizes(cpu=(1, 2), gpu=(4, 16)), size_in, size_out)
    x, param, grad_output = make_case(warp, shape, seed_of("deterministic", warp.name, mode, dtype), dtype, scale=0.1)
    kw = dict(mode=mode, padding_mode="zeros", align_corners=False)
    # The reference first, outside: PyTorch's own CUDA backward raises under deterministic algorithms.
    reference = run_warp(warp.reference, x.double(), param.double(), shape.output_shape, grad_output.double(), **kw)
    with deterministic_algorithms():
        first = run_warp(warp.ours, x, param, shape.output_shape, grad_output, **kw)
        second = run_warp(warp.ours, x, param, shape.output_shape, grad_output, **kw)
    for what, a, b in zip(WHAT, first, second):
        assert torch.equal(a, b), f"{what} differs between two deterministic runs"
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for what, a, r in zip(WHAT, first, reference):
        assert_close_scaled(a.double(), r, tol, what)


# --- transform-specific properties --------------------------------------------------------------


def coordinate_image(n: int, h: int, w: int) -> torch.Tensor:
    """[n, 2, h, w] float64: channel 0 holds each pixel's normalized x, channel 1 its y (corner-aligned).

    Bilinear sampling with align_corners=True of this linear image returns the sample point itself,
    anywhere inside [-1, 1]^2.
    """
    x, y = base_xy((h, w), True, torch.float64)
    return torch.stack([x.expand(1, h, w), y.expand(1, h, w)], dim=1).expand(n, 2, h, w).contiguous()


@pytest.mark.parametrize(
    "control_points",
    [
        pytest.param(None, id="default-3x3"),
        pytest.param([[-1.0, -1.0], [1.0, -1.0], [0.0, 0.0], [-0.5, 1.0], [1.0, 0.5]], id="custom-K5"),
    ],
)
def test_tps_interpolates_source_points_at_control_points(control_points):
    """Where an output pixel centre is a control point, the spline samples exactly its source point.

    Output 5x5 with align_corners=True puts pixel centres at {-1, -0.5, 0, 0.5, 1}^2, among them
    every control point; the coordinate image turns the sample into the sample point.
    """
    n = 2
    control = (
        default_control_points(TPS_K) if control_points is None else torch.tensor(control_points, dtype=torch.float64)
    )
    control = control.to(DEVICE)
    k = control.shape[0]
    gen = generator(seed_of("tps-interpolates", k))
    source_points = (control + rand((n, k, 2), gen, -0.3, 0.3)).clamp(-1.0, 1.0)
    image = coordinate_image(n, 7, 5)
    out = stn_triton.tps_grid_sample(
        image,
        source_points,
        None if control_points is None else control,
        size=(n, 2, 5, 5),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    columns = torch.round((control[:, 0] + 1) * 2).long()
    rows = torch.round((control[:, 1] + 1) * 2).long()
    sampled = out[:, :, rows, columns].transpose(1, 2)  # [N, K, 2]
    torch.testing.assert_close(sampled, source_points, atol=1e-10, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True], ids=align_id)
def test_tps_of_affinely_moved_points_is_that_affine_warp(align_corners):
    """Source points that are an affine image of the control points need no bending: f is that affine map."""
    shape = SHAPE[2]
    gen = generator(seed_of("tps-affine", align_corners))
    x = randn(shape.input_shape, gen)
    theta = _draw_theta(2)(shape.n, gen).to(DEVICE)
    control = default_control_points(16).to(DEVICE)
    source_points = torch.einsum("nij,kj->nki", theta[:, :, :2], control) + theta[:, None, :, 2]
    kw = dict(mode="bicubic", padding_mode="zeros", align_corners=align_corners)
    out = stn_triton.tps_grid_sample(x, source_points, size=shape.output_shape, **kw)
    expected = reference_grid_sample(x, F.affine_grid(theta, shape.output_shape, align_corners=align_corners), **kw)
    assert_close_scaled(out, expected, 1e-10, "output")


@pytest.mark.parametrize("align_corners", [False, True], ids=align_id)
def test_perspective_with_affine_homography_is_affine_and_scale_free(align_corners):
    """A third row (0, 0, 1) is an affine warp; H and s * H are the same projective map."""
    shape = SHAPE[2]
    gen = generator(seed_of("perspective-affine", align_corners))
    x = randn(shape.input_shape, gen)
    theta = _draw_theta(2)(shape.n, gen).to(DEVICE)
    last_row = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=DEVICE).expand(shape.n, 1, 3)
    homography = torch.cat([theta, last_row], dim=1)
    kw = dict(mode="bilinear", padding_mode="reflection", align_corners=align_corners)
    expected = stn_triton.affine_grid_sample(x, theta, shape.output_shape, **kw)
    reference = reference_grid_sample(x, F.affine_grid(theta, shape.output_shape, align_corners=align_corners), **kw)
    assert_close_scaled(expected, reference, 1e-10, "affine_grid_sample")
    for scale in (1.0, -2.5):
        out = stn_triton.perspective_grid_sample(x, homography * scale, shape.output_shape, **kw)
        assert_close_scaled(out, reference, 1e-10, f"perspective_grid_sample of {scale} * H")


# The interpreter runs kernels in numpy, which warns on arithmetic with NaN and inf.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", MODES_2D)
def test_perspective_zero_denominator_samples_nothing(mode):
    """A third row (1, 0, 0) makes the denominator x: the middle column (x = 0) maps to non-finite points.

    Those pixels read nothing (0 with zeros padding); every other pixel and both gradients equal
    the reference, whose division is guarded so that its gradient is finite too.
    """
    n, c, size_in, size_out = 2, 2, (5, 7), (4, 5)  # odd width, align_corners=True: a column at x = 0
    gen = generator(seed_of("zero-denominator", mode))
    x = randn((n, c, *size_in), gen)
    homography = _draw_homography(n, gen).to(DEVICE)
    homography[0, 2] = torch.tensor([1.0, 0.0, 0.0])
    grad_output = randn((n, c, *size_out), gen)
    kw = dict(mode=mode, padding_mode="zeros", align_corners=True)
    out, grad_x, grad_h = run_warp(_perspective, x, homography, (n, c, *size_out), grad_output, **kw)

    def guarded_reference(x, homography, size, **kw):
        gx, gy = base_xy(size[2:], True, torch.float64)

        def row(i):
            return (
                homography[:, i, 0, None, None] * gx
                + homography[:, i, 1, None, None] * gy
                + homography[:, i, 2, None, None]
            )

        z = row(2)
        finite = z != 0
        safe_z = torch.where(finite, z, torch.ones_like(z))
        grid = torch.stack([row(0) / safe_z, row(1) / safe_z], dim=-1)
        grid = torch.where(finite[..., None], grid, torch.full_like(grid, 7.0))  # far outside: reads zeros
        return reference_grid_sample(x, grid, **kw)

    expected = run_warp(guarded_reference, x, homography, (n, c, *size_out), grad_output, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all() and torch.isfinite(grad_h).all()
    assert (out[0, :, :, size_out[1] // 2] == 0).all(), "pixels with a zero denominator must read nothing"
    assert_all_close((out, grad_x, grad_h), expected, 1e-10)


# --- the fused promise: no grid in memory -------------------------------------------------------------


def largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) the profiler sees while ``fn()`` runs.

    Every allocation happens inside some aten op (``aten::empty``, ``aten::bmm``, ...); an op's
    ``self_cpu_memory_usage`` is what it allocated less what it freed itself, which for an
    allocating op is the size of what it allocated.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    return max([e.self_cpu_memory_usage for e in prof.events()] + [0])


# C = 1 and a small input: the output (and grad input) is smaller than a grid, so any allocation of
# a grid's size is a grid (or another per-pixel buffer of at least the grid's size).
MEMORY_SHAPE = {2: Shape(2, 1, (5, 7), (16, 16)), 3: Shape(2, 1, (3, 5, 4), (6, 6, 6))}
MEMORY_WARPS = [pytest.param(w, id=w.name) for w in (AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS)]


def _grid_bytes(shape: Shape, dtype) -> int:
    return shape.n * math.prod(shape.size_out) * len(shape.size_out) * dtype.itemsize


def _memory_case(warp):
    shape = MEMORY_SHAPE[warp.nd]
    x, param, grad_output = make_case(warp, shape, seed_of("memory", warp.name))
    x.requires_grad_()
    param.requires_grad_()
    return shape, x, param, grad_output


@pytest.mark.skipif(
    ON_GPU, reason="the CPU profiler sees the interpreter's allocations; on a GPU they are device memory"
)
@pytest.mark.parametrize("warp", MEMORY_WARPS)
def test_memory_probe_sees_an_unfused_grid(warp):
    """The check below can fail: the unfused reference allocates at least a grid's size."""
    shape, x, param, _ = _memory_case(warp)
    kw = dict(mode="bilinear", padding_mode="zeros", align_corners=False)
    seen = largest_allocation(lambda: warp.reference(x, param, shape.output_shape, **kw))
    assert seen >= _grid_bytes(shape, x.dtype)


@pytest.mark.skipif(
    ON_GPU, reason="the CPU profiler sees the interpreter's allocations; on a GPU they are device memory"
)
@pytest.mark.parametrize("warp", MEMORY_WARPS)
def test_forward_allocates_no_grid(warp):
    """Nothing of a grid's size is allocated in the forward; the output is smaller than a grid."""
    shape, x, param, _ = _memory_case(warp)
    kw = dict(mode="bilinear", padding_mode="zeros", align_corners=False)
    grid_bytes = _grid_bytes(shape, x.dtype)
    output_bytes = math.prod(shape.output_shape) * x.dtype.itemsize
    assert output_bytes < grid_bytes
    results = []
    seen = largest_allocation(lambda: results.append(warp.ours(x, param, shape.output_shape, **kw)))
    assert_close_scaled(
        results[0].detach(), warp.reference(x, param, shape.output_shape, **kw).detach(), 1e-10, "output"
    )
    assert seen < grid_bytes, f"the forward allocated {seen} bytes at once; a grid is {grid_bytes} bytes"


@pytest.mark.skipif(
    ON_GPU, reason="the CPU profiler sees the interpreter's allocations; on a GPU they are device memory"
)
@pytest.mark.parametrize("warp", MEMORY_WARPS)
def test_backward_allocates_no_per_pixel_grad_grid(warp):
    """The transform's gradient is reduced in the kernel: no grad_grid of a grid's size is allocated."""
    shape, x, param, grad_output = _memory_case(warp)
    kw = dict(mode="bilinear", padding_mode="zeros", align_corners=False)
    out = warp.ours(x, param, shape.output_shape, **kw)
    grid_bytes = _grid_bytes(shape, x.dtype)
    seen = largest_allocation(lambda: out.backward(grad_output))
    expected = run_warp(warp.reference, x, param, shape.output_shape, grad_output, **kw)
    assert_close_scaled(x.grad, expected[1], 1e-10, "grad input")
    assert_close_scaled(param.grad, expected[2], 1e-10, "grad param")
    assert seen < grid_bytes, f"the backward allocated {seen} bytes at once; a grid is {grid_bytes} bytes"


# --- the plain-PyTorch fallback ---------------------------------------------------------------------


@pytest.mark.skipif(ON_GPU, reason="checks the CPU fallback of a CPU-only run")
def test_cpu_without_interpreter_falls_back_to_torch():
    """Without TRITON_INTERPRET the five warps run the 'torch' backend and still equal their references."""
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import torch
        import stn_triton
        import test_warps as t

        x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert stn_triton.backend(x) == "torch", stn_triton.backend(x)
        for warp in t.WARPS:
            shape = t.SHAPE[warp.nd]
            for mode in warp.modes:
                for padding_mode in ("zeros", "border", "reflection"):
                    for align_corners in (False, True):
                        seed = t.seed_of("fallback", warp.name, mode, padding_mode, align_corners)
                        x, param, grad_output = t.make_case(warp, shape, seed)
                        ours, expected = t.run_both(
                            warp, x, param, shape.output_shape, grad_output, mode, padding_mode, align_corners
                        )
                        case = f"{warp.name} {mode} {padding_mode} {align_corners}: "
                        t.assert_all_close(ours, expected, 1e-10, case)
        try:
            import kornia.geometry.transform as kgt
        except ImportError:
            kgt = None
        if kgt is not None:
            gen = torch.Generator().manual_seed(1)
            src = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
            m = torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
            m[:, 2] = torch.tensor([0.01, -0.02, 1.0], dtype=torch.float64)
            fill = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
            for padding_mode in ("zeros", "border", "reflection", "fill"):
                for align_corners in (False, True):
                    kw = dict(mode="bilinear", padding_mode=padding_mode, align_corners=align_corners, fill_value=fill)
                    ours = stn_triton.warp_affine(src, m[:, :2], (6, 4), **kw)
                    torch.testing.assert_close(ours, kgt.warp_affine(src, m[:, :2], (6, 4), **kw))
                    torch.testing.assert_close(
                        stn_triton.warp_perspective(src, m, (6, 4), **kw), kgt.warp_perspective(src, m, (6, 4), **kw)
                    )
        print("fallback ok")
        """
    )
    # TRITON_INTERPRET=0 (rather than unset) also keeps conftest, imported by test_warps, from setting it.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", script, tests_dir], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


# --- GPU: realistic sizes, torch.compile -------------------------------------------------------------

# (n, c, size_in, size_out): the sizes of a real spatial transformer layer.
REALISTIC = {2: Shape(8, 16, (128, 128), (96, 160)), 3: Shape(2, 4, (32, 32, 32), (24, 40, 32))}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "warp, mode",
    [
        pytest.param(warp, mode, id=f"{warp.name}-{mode}")
        for warp in (AFFINE_2D, AFFINE_3D, PERSPECTIVE, TPS, TPS_CUSTOM)
        for mode in warp.modes
    ],
)
def test_realistic_sizes_float32(warp, mode):
    shape = REALISTIC[warp.nd]
    x, param, grad_output = make_case(warp, shape, seed_of("realistic", warp.name, mode), torch.float32)
    ours, expected = run_both(warp, x, param, shape.output_shape, grad_output, mode, "zeros", False)
    assert_close_scaled(ours[0], expected[0], 1e-5, "output")
    assert_close_scaled(ours[1], expected[1], 1e-4, "grad input")
    # The transform's gradient sums over every output pixel: float32 rounding grows with their number.
    reference = run_warp(
        warp.reference,
        x.double(),
        param.double(),
        shape.output_shape,
        grad_output.double(),
        mode=mode,
        padding_mode="zeros",
        align_corners=False,
    )
    assert_close_scaled(ours[2].double(), reference[2], 1e-3, "grad param")


@pytest.mark.gpu
@pytest.mark.parametrize("nd", [2, 3])
def test_torch_compile_fullgraph_matches_eager(nd):
    shape = REALISTIC[nd]
    warp = AFFINE_2D if nd == 2 else AFFINE_3D
    x, theta, _ = make_case(warp, shape, seed_of("compile", nd), torch.float32, scale=0.3)

    def spatial_transformer(x, theta):
        return stn_triton.affine_grid_sample(x, theta, mode="bilinear", padding_mode="border", align_corners=False)

    compiled = torch.compile(spatial_transformer, fullgraph=True, dynamic=False)
    results = []
    for fn in (compiled, spatial_transformer):
        x_leaf = x.detach().clone().requires_grad_()
        theta_leaf = theta.detach().clone().requires_grad_()
        out = fn(x_leaf, theta_leaf)
        (out * out).sum().backward()
        results.append((out.detach(), x_leaf.grad, theta_leaf.grad))
    assert_all_close(*results, 1e-5)


def test_pixel_warps_neither_copy_from_the_host_nor_wait_for_the_device(monkeypatch):
    """kornia's pixel frames applied as arithmetic (no torch.tensor: a host-to-device copy per call) and
    M inverted without a singularity check (torch.linalg.inv's waits for the device); a fill value is
    made or copied once, and only for 'fill' padding."""
    from stn_triton import functional

    gen = generator(seed_of("host-path"))
    src = randn((2, 3, 6, 7), gen, torch.float32)
    M = torch.tensor([[1.0, 0.1, 0.5], [0.05, 0.9, -0.3]], device=DEVICE).repeat(2, 1, 1)
    H = torch.cat([M, torch.tensor([[[0.001, 0.002, 1.0]]], device=DEVICE).expand(2, 1, 3)], dim=1)
    expected = [stn_triton.warp_affine(src, M, (5, 6)), stn_triton.warp_perspective(src, H, (5, 6), padding_mode="fill")]

    def refused(*args, **kwargs):
        raise AssertionError("called on the hot path")

    monkeypatch.setattr(torch, "tensor", refused)
    monkeypatch.setattr(torch.linalg, "inv", refused)
    torch.testing.assert_close(stn_triton.warp_affine(src, M, (5, 6)), expected[0])
    torch.testing.assert_close(stn_triton.warp_perspective(src, H, (5, 6), padding_mode="fill"), expected[1])
    assert functional._fill(src, "zeros", None) is None
    assert functional._fill(src, "fill", None) is functional._fill(src, "fill", None)
    other_dtype = torch.full((3,), 0.25, dtype=torch.float64)
    assert functional._fill(src, "fill", other_dtype) is functional._fill(src, "fill", other_dtype)
