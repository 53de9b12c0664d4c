"""``stn_triton.warp_affine`` / ``warp_perspective`` against kornia's, which they replace.

kornia (a test extra) is the reference: M in pixels, source -> destination; ``padding_mode='fill'``
blends a per-channel ``fill_value`` by the weight the sampling taps lose off the image. Gradients
of src and M are compared with autograd through kornia's own warps.
"""

import zlib

import pytest
import torch

import stn_triton
from conftest import (
    DEVICE,
    LOW_PRECISION,
    MODES_2D,
    ON_GPU,
    assert_close_scaled,
    assert_within_low_precision_rule,
    deterministic_algorithms,
    generator,
    rand,
    randn,
    sizes,
)

kornia_transform = pytest.importorskip("kornia.geometry.transform")

PADDING_MODES = ("zeros", "border", "reflection", "fill")


def seed_of(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def align_id(align_corners: bool) -> str:
    return "align" if align_corners else "noalign"


def pixel_affine(n, src_size, gen, strength=1.0) -> torch.Tensor:
    """[n, 2, 3] float64 CPU: rotation (up to 25 degrees) and scale (0.8..1.25) about the image
    centre, then a shift of up to a pixel: the kind of matrix kornia's users pass."""
    h, w = src_size
    angle = rand((n,), gen, -0.44, 0.44, device="cpu") * strength
    scale = torch.exp(rand((n,), gen, -0.22, 0.22, device="cpu") * strength)
    shift = rand((n, 2), gen, -1.0, 1.0, device="cpu") * strength
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    translation = centre - linear @ centre + shift
    return torch.cat([linear, translation[..., None]], dim=-1)


def pixel_homography(n, src_size, gen, strength=1.0) -> torch.Tensor:
    """[n, 3, 3]: ``pixel_affine`` with a third row (p, q, 1), |p x + q y| <= 0.2 over the image."""
    h, w = src_size
    m = torch.cat([pixel_affine(n, src_size, gen, strength), torch.zeros(n, 1, 3, dtype=torch.float64)], dim=1)
    m[:, 2, 0] = rand((n,), gen, -0.1, 0.1, device="cpu") * strength / max(w, 2)
    m[:, 2, 1] = rand((n,), gen, -0.1, 0.1, device="cpu") * strength / max(h, 2)
    m[:, 2, 2] = 1.0
    return m


WARPS = {
    "warp_affine": (stn_triton.warp_affine, kornia_transform.warp_affine, pixel_affine),
    "warp_perspective": (stn_triton.warp_perspective, kornia_transform.warp_perspective, pixel_homography),
}
WARP_NAMES = list(WARPS)

# (n, c, src (h, w), dsize): odd sides, output size different from the source.
SHAPE = sizes(cpu=(2, 3, (5, 7), (6, 4)), gpu=(4, 8, (33, 47), (29, 51)))
ODD_SHAPES = [(1, 2, (1, 7), (3, 1)), (2, 1, (7, 3), (1, 7)), (1, 1, (3, 3), (7, 5))]


def make_case(name, shape, seed, dtype=torch.float64, strength=1.0):
    """src, M, fill_value and grad_output of one case, in ``dtype`` on the device."""
    n, c, src_size, dsize = shape
    gen = generator(seed)
    src = randn((n, c, *src_size), gen, dtype)
    m = WARPS[name][2](n, src_size, gen, strength).to(dtype=dtype, device=DEVICE)
    fill_value = rand((c,), gen, -2.0, 2.0, dtype)
    grad_output = randn((n, c, *dsize), gen, dtype)
    return src, m, fill_value, grad_output


def run_warp(fn, src, m, dsize, grad_output, **kw):
    """Forward and backward through ``fn``; returns (output, grad src, grad M)."""
    src = src.detach().clone().requires_grad_()
    m = m.detach().clone().requires_grad_()
    out = fn(src, m, dsize, **kw)
    out.backward(grad_output)
    return out.detach(), src.grad, m.grad


WHAT = ("output", "grad src", "grad M")


def assert_all_close(ours, expected, tol):
    for what, a, e in zip(WHAT, ours, expected):
        assert a is not None, f"{what} missing"
        assert a.dtype == e.dtype and a.shape == e.shape, (
            f"{what}: {a.dtype} {tuple(a.shape)} vs {e.dtype} {tuple(e.shape)}"
        )
        assert_close_scaled(a, e, tol, what)


def every_case():
    return [
        pytest.param(name, mode, padding, align, id=f"{name}-{mode}-{padding}-{align_id(align)}")
        for name in WARP_NAMES
        for mode in MODES_2D
        for padding in PADDING_MODES
        for align in (False, True)
    ]


@pytest.mark.parametrize("name, mode, padding_mode, align_corners", every_case())
def test_matches_kornia_float64(name, mode, padding_mode, align_corners):
    ours_fn, kornia_fn, _ = WARPS[name]
    src, m, fill_value, grad_output = make_case(name, SHAPE, seed_of("f64", name, mode, padding_mode, align_corners))
    kw = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners, fill_value=fill_value)
    ours = run_warp(ours_fn, src, m, SHAPE[3], grad_output, **kw)
    expected = run_warp(kornia_fn, src, m, SHAPE[3], grad_output, **kw)
    assert_all_close(ours, expected, 1e-10)


@pytest.mark.parametrize("align_corners", [False, True], ids=align_id)
@pytest.mark.parametrize(
    "shape", [pytest.param(s, id=f"N{s[0]}-C{s[1]}-{s[2][0]}x{s[2][1]}-to-{s[3][0]}x{s[3][1]}") for s in ODD_SHAPES]
)
@pytest.mark.parametrize("name", WARP_NAMES)
def test_odd_sizes_match_kornia(name, shape, align_corners):
    ours_fn, kornia_fn, _ = WARPS[name]
    src, m, fill_value, grad_output = make_case(name, shape, seed_of("odd", name, shape, align_corners))
    kw = dict(mode="bilinear", padding_mode="fill", align_corners=align_corners, fill_value=fill_value)
    ours = run_warp(ours_fn, src, m, shape[3], grad_output, **kw)
    expected = run_warp(kornia_fn, src, m, shape[3], grad_output, **kw)
    assert_all_close(ours, expected, 1e-10)


@pytest.mark.parametrize("name", WARP_NAMES)
def test_defaults_match_kornia(name):
    """Default keywords (bilinear, zeros, align_corners=True), and fill with the default fill_value."""
    ours_fn, kornia_fn, _ = WARPS[name]
    src, m, _, _ = make_case(name, SHAPE, seed_of("defaults", name))
    dsize = SHAPE[3]
    assert_close_scaled(ours_fn(src, m, dsize), kornia_fn(src, m, dsize), 1e-10, "defaults")
    assert_close_scaled(
        ours_fn(src, m, dsize, padding_mode="fill"), kornia_fn(src, m, dsize, padding_mode="fill"), 1e-10, "fill"
    )


@pytest.mark.parametrize("name", WARP_NAMES)
def test_channels_last_src_gives_channels_last_output(name):
    ours_fn, kornia_fn, _ = WARPS[name]
    src, m, fill_value, grad_output = make_case(name, SHAPE, seed_of("channels-last", name))
    kw = dict(mode="bicubic", padding_mode="fill", align_corners=True, fill_value=fill_value)
    src_cl = src.contiguous(memory_format=torch.channels_last)
    ours = run_warp(ours_fn, src_cl, m, SHAPE[3], grad_output, **kw)
    expected = run_warp(kornia_fn, src, m, SHAPE[3], grad_output, **kw)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert_all_close(ours, expected, 1e-10)


@pytest.mark.parametrize("name", WARP_NAMES)
def test_non_contiguous_matrix(name):
    """M as a transposed view: its gradient lands on the base."""
    ours_fn, kornia_fn, _ = WARPS[name]
    src, m, _, grad_output = make_case(name, SHAPE, seed_of("m-layout", name))
    base = m.transpose(1, 2).contiguous()
    results = []
    for fn in (ours_fn, kornia_fn):
        leaf = base.detach().clone().requires_grad_()
        src_leaf = src.detach().clone().requires_grad_()
        out = fn(
            src_leaf, leaf.transpose(1, 2), SHAPE[3], mode="bilinear", padding_mode="reflection", align_corners=False
        )
        out.backward(grad_output)
        results.append((out.detach(), src_leaf.grad, leaf.grad))
    assert_all_close(*results, 1e-10)


def matrix_away_from_kinks(name, shape, seed, margin=0.05):
    """src and M whose source points keep ``margin`` pixels off every integer and half-integer.

    The source point of destination pixel (u, v) is M^-1 [u, v, 1] dehomogenized, in pixels,
    whatever align_corners says; every kink of the sampling (tap change, nearest rounding, the
    image edge) sits at an integer or a half-integer. Draws until a matrix qualifies.
    """
    h, w = shape[3]
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    points = torch.stack([u.flatten(), v.flatten(), torch.ones(h * w, dtype=torch.float64)])  # [3, h * w]
    for attempt in range(2000):
        src, m, fill_value, _ = make_case(name, shape, seed + attempt, strength=0.5)
        m3 = (
            m.cpu()
            if m.shape[1] == 3
            else torch.cat([m.cpu(), torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)], 1)
        )
        source = torch.linalg.inv(m3) @ points
        doubled = source[:, :2] / source[:, 2:] * 2
        if (doubled - doubled.round()).abs().min() / 2 >= margin:
            return src, m, fill_value
    raise AssertionError("no matrix away from the sampling kinks was found")


@pytest.mark.parametrize("padding_mode", ["zeros", "fill"])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("name", WARP_NAMES)
def test_gradcheck(name, mode, padding_mode):
    ours_fn = WARPS[name][0]
    shape = (1, 2, (3, 4), (2, 3))
    src, m, fill_value = matrix_away_from_kinks(name, shape, seed_of("gradcheck", name, mode, padding_mode))
    src.requires_grad_()
    # nearest is piecewise constant in the sample points: only its src gradient is checked.
    m.requires_grad_(mode != "nearest")

    def warped(src, m):
        return ours_fn(
            src, m, shape[3], mode=mode, padding_mode=padding_mode, align_corners=False, fill_value=fill_value
        )

    # Fast mode (random projections of the Jacobian) keeps the interpreter's launches few.
    assert torch.autograd.gradcheck(warped, (src, m), fast_mode=not ON_GPU)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("mode, padding_mode", [("bilinear", "fill"), ("bicubic", "border")])
@pytest.mark.parametrize("name", WARP_NAMES)
def test_low_precision_within_twice_kornia_error(name, mode, padding_mode, dtype):
    """float16/bfloat16 within 2x kornia's own error at that dtype, against kornia in float64."""
    ours_fn, kornia_fn, _ = WARPS[name]
    src, m, fill_value, grad_output = make_case(name, SHAPE, seed_of("low", name, mode, padding_mode, dtype), dtype)
    kw = dict(mode=mode, padding_mode=padding_mode, align_corners=True)
    ours = run_warp(ours_fn, src, m, SHAPE[3], grad_output, fill_value=fill_value, **kw)
    kornia_own = run_warp(kornia_fn, src, m, SHAPE[3], grad_output, fill_value=fill_value, **kw)
    reference = run_warp(
        kornia_fn, src.double(), m.double(), SHAPE[3], grad_output.double(), fill_value=fill_value.double(), **kw
    )
    for what, a, k, r in zip(WHAT, ours, kornia_own, reference):
        assert_within_low_precision_rule(a, k, r, dtype, what)


@pytest.mark.parametrize("name", WARP_NAMES)
def test_float32_matches_kornia_float32(name):
    ours_fn, kornia_fn, _ = WARPS[name]
    src, m, fill_value, grad_output = make_case(name, SHAPE, seed_of("f32", name), torch.float32)
    kw = dict(mode="bilinear", padding_mode="fill", align_corners=False, fill_value=fill_value)
    ours = run_warp(ours_fn, src, m, SHAPE[3], grad_output, **kw)
    expected = run_warp(kornia_fn, src, m, SHAPE[3], grad_output, **kw)
    assert ours[0].dtype == torch.float32
    assert_close_scaled(ours[0], expected[0], 1e-5, "output")
    assert_close_scaled(ours[1], expected[1], 1e-4, "grad src")
    assert_close_scaled(ours[2], expected[2], 1e-4, "grad M")


@pytest.mark.parametrize("name", WARP_NAMES)
def test_deterministic_backward_is_bitwise_reproducible(name):
    """An upsampling warp (every source pixel read by many output pixels) under deterministic algorithms."""
    ours_fn, kornia_fn, _ = WARPS[name]
    shape = (*sizes(cpu=(1, 2), gpu=(4, 16)), (3, 3), sizes(cpu=(9, 11), gpu=(129, 257)))
    src, m, fill_value, grad_output = make_case(name, shape, seed_of("deterministic", name), torch.float32, 0.3)
    m = m.clone()
    # Scale rows x and y by dsize / source size: an upsampling warp.
    m[:, :2, :] *= (torch.tensor(shape[3], dtype=m.dtype, device=DEVICE).flip(0) / 3)[:, None]
    kw = dict(mode="bilinear", padding_mode="fill", align_corners=False, fill_value=fill_value)
    reference = run_warp(
        kornia_fn, src.double(), m.double(), shape[3], grad_output.double(), **{**kw, "fill_value": fill_value.double()}
    )
    with deterministic_algorithms():
        first = run_warp(ours_fn, src, m, shape[3], grad_output, **kw)
        second = run_warp(ours_fn, src, m, shape[3], grad_output, **kw)
    for what, a, b in zip(WHAT, first, second):
        assert torch.equal(a, b), f"{what} differs between two deterministic runs"
    for what, a, r in zip(WHAT, first, reference):
        assert_close_scaled(a.double(), r, 1e-4, what)
