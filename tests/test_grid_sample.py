"""``stn_triton.grid_sample`` against ``torch.nn.functional.grid_sample``.

References are float64 PyTorch on the same device; half-precision results are held to "within 2x
PyTorch's own error at that dtype" against a float64 reference computed from the same rounded
inputs (PyTorch runs grid_sample in float16 and bfloat16 on both CPU and CUDA, forward and
backward, so its own error is measured directly).
"""

import os
import subprocess
import sys
import textwrap
import zlib
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import (
    DEVICE,
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
    run_with_grads,
    sizes,
)


class Shape(NamedTuple):
    """A grid_sample problem: input [n, c, *size_in], grid [n, *size_out, nd]."""

    n: int
    c: int
    size_in: tuple
    size_out: tuple

    @property
    def nd(self) -> int:
        return len(self.size_in)

    @property
    def id(self) -> str:
        return f"N{self.n}-C{self.c}-{'x'.join(map(str, self.size_in))}-to-{'x'.join(map(str, self.size_out))}"


# Odd sides on purpose, a side of 1 (its coordinate is special-cased by align_corners), and an
# output size different from the input size so no index mix-up can hide.
SHAPES = {
    2: sizes(
        cpu=[Shape(2, 3, (5, 7), (3, 5)), Shape(1, 2, (1, 3), (3, 1))],
        gpu=[Shape(2, 16, (13, 7), (33, 47)), Shape(3, 5, (1, 13), (7, 1)), Shape(2, 16, (33, 47), (13, 29))],
    ),
    3: sizes(
        cpu=[Shape(2, 2, (3, 5, 3), (1, 3, 5)), Shape(1, 2, (1, 3, 1), (3, 1, 5))],
        gpu=[Shape(2, 8, (7, 13, 3), (13, 7, 17)), Shape(1, 4, (1, 7, 13), (3, 13, 1))],
    ),
}
MODES = {2: MODES_2D, 3: MODES_3D}
# (nd, mode) pairs: every mode grid_sample supports.
ND_MODES = [pytest.param(nd, mode, id=f"{nd}d-{mode}") for nd in (2, 3) for mode in MODES[nd]]


def align_id(align_corners: bool) -> str:
    return "align" if align_corners else "noalign"


def every_case(shapes=SHAPES):
    """Every shape x mode x padding x align_corners, as readable pytest params."""
    return [
        pytest.param(shape, mode, padding, align, id=f"{shape.id}-{mode}-{padding}-{align_id(align)}")
        for nd in (2, 3)
        for shape in shapes[nd]
        for mode in MODES[nd]
        for padding in PADDING_MODES
        for align in (False, True)
    ]


def seed_of(*parts) -> int:
    """A fixed seed per case, so every case draws its own values and reruns draw the same."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def make_inputs(shape: Shape, seed: int, dtype=torch.float64, lo=-1.3, hi=1.3):
    """Random input [N, C, *size_in] and grid [N, *size_out, nd] with values in [lo, hi)."""
    gen = generator(seed)
    x = randn((shape.n, shape.c, *shape.size_in), gen, dtype)
    grid = rand((shape.n, *shape.size_out, shape.nd), gen, lo, hi, dtype)
    return x, grid


def output_shape(shape: Shape):
    return (shape.n, shape.c, *shape.size_out)


# --- backend ------------------------------------------------------------------------------------


def test_tests_run_the_kernels_not_the_fallback(device):
    expected = "triton" if ON_GPU else "interpreter"
    assert stn_triton.backend(torch.zeros(1, device=device)) == expected


def test_backend_of_a_cpu_tensor_follows_triton_interpret():
    expected = "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    assert stn_triton.backend(torch.zeros(1)) == expected


@pytest.mark.skipif(ON_GPU, reason="checks the CPU fallback of a CPU-only run")
def test_cpu_without_interpreter_falls_back_to_torch():
    script = textwrap.dedent(
        """
        import torch
        import torch.nn.functional as F
        import stn_triton

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
        grid = torch.rand(2, 3, 5, 2, generator=gen, dtype=torch.float64) * 2.6 - 1.3
        assert stn_triton.backend(x) == "torch", stn_triton.backend(x)
        for mode in ("bilinear", "nearest", "bicubic"):
            for padding_mode in ("zeros", "border", "reflection"):
                for align_corners in (False, True):
                    kw = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
                    torch.testing.assert_close(stn_triton.grid_sample(x, grid, **kw), F.grid_sample(x, grid, **kw))
        theta = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(
            stn_triton.affine_grid(theta, (2, 3, 5, 7), align_corners=False),
            F.affine_grid(theta, (2, 3, 5, 7), align_corners=False),
        )
        print("fallback ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


# --- forward, float64 -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape, mode, padding_mode, align_corners", every_case())
def test_forward_matches_torch_float64(shape, mode, padding_mode, align_corners):
    x, grid = make_inputs(shape, seed_of("fwd", shape.id, mode, padding_mode, align_corners))
    out = stn_triton.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    expected = reference_grid_sample(x, grid, mode, padding_mode, align_corners)
    assert out.dtype == torch.float64
    assert out.shape == output_shape(shape)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("nd, mode", ND_MODES)
@pytest.mark.parametrize("padding_mode", ["border", "reflection"])
@pytest.mark.parametrize("align_corners", [False, True], ids=align_id)
def test_far_out_of_range_coordinates_match_torch(nd, mode, padding_mode, align_corners):
    """Coordinates up to 4.5 input widths away: reflection folds several times, border clamps."""
    shape = SHAPES[nd][0]
    x, grid = make_inputs(shape, seed_of("far", nd, mode, padding_mode, align_corners), lo=-4.5, hi=4.5)
    grad_output = randn(output_shape(shape), generator(seed_of("far-go", nd, mode)))
    ours = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    expected = run_with_grads(F.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    for what, a, e in zip(("output", "grad input", "grad grid"), ours, expected):
        assert_close_scaled(a, e, 1e-10, what)


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("nd, mode", ND_MODES)
def test_channels_last_input_gives_channels_last_output(nd, mode):
    shape = SHAPES[nd][0]
    memory_format = torch.channels_last if nd == 2 else torch.channels_last_3d
    x, grid = make_inputs(shape, seed_of("channels-last", nd, mode))
    grad_output = randn(output_shape(shape), generator(seed_of("channels-last-go", nd, mode)))
    x_cl = x.contiguous(memory_format=memory_format)
    assert not x_cl.is_contiguous()
    ours = run_with_grads(stn_triton.grid_sample, x_cl, grid, grad_output, mode, "reflection", True)
    expected = run_with_grads(F.grid_sample, x, grid, grad_output, mode, "reflection", True)
    assert ours[0].is_contiguous(memory_format=memory_format)
    for what, a, e in zip(("output", "grad input", "grad grid"), ours, expected):
        assert_close_scaled(a, e, 1e-10, what)


def _non_contiguous_grid(base: torch.Tensor, variant: str, shape: Shape) -> torch.Tensor:
    """A grid [N, *size_out, nd] viewed out of ``base`` (made by ``_grid_base``) without a copy."""
    if variant == "transposed":  # base [N, *reversed(size_out), nd]
        spatial = list(range(1, shape.nd + 1))
        return base.permute(0, *reversed(spatial), shape.nd + 1)
    if variant == "strided-last-dim":  # base [N, *size_out, 2 * nd]
        return base[..., ::2]
    if variant == "expanded-batch":  # base [1, *size_out, nd]
        return base.expand(shape.n, *base.shape[1:])
    raise AssertionError(variant)


def _grid_base(shape: Shape, variant: str, gen) -> torch.Tensor:
    if variant == "transposed":
        return rand((shape.n, *reversed(shape.size_out), shape.nd), gen, -1.3, 1.3)
    if variant == "strided-last-dim":
        return rand((shape.n, *shape.size_out, 2 * shape.nd), gen, -1.3, 1.3)
    return rand((1, *shape.size_out, shape.nd), gen, -1.3, 1.3)


GRID_LAYOUTS = ["transposed", "strided-last-dim", "expanded-batch"]
LAYOUT_MODES = [
    pytest.param(2, "bilinear", id="2d-bilinear"),
    pytest.param(2, "bicubic", id="2d-bicubic"),
    pytest.param(3, "bilinear", id="3d-bilinear"),
]


@pytest.mark.parametrize("variant", GRID_LAYOUTS)
@pytest.mark.parametrize("nd, mode", LAYOUT_MODES)
def test_non_contiguous_grid(variant, nd, mode):
    shape = SHAPES[nd][0]
    gen = generator(seed_of("grid-layout", variant, nd, mode))
    x = randn((shape.n, shape.c, *shape.size_in), gen)
    base = _grid_base(shape, variant, gen)
    grad_output = randn(output_shape(shape), gen)
    results = []
    for sample in (stn_triton.grid_sample, F.grid_sample):
        leaf = base.detach().clone().requires_grad_()
        x_leaf = x.detach().clone().requires_grad_()
        grid = _non_contiguous_grid(leaf, variant, shape)
        assert not grid.is_contiguous()
        out = sample(x_leaf, grid, mode=mode, padding_mode="zeros", align_corners=False)
        out.backward(grad_output)
        results.append((out.detach(), x_leaf.grad, leaf.grad))
    for what, a, e in zip(("output", "grad input", "grad grid"), *results):
        assert_close_scaled(a, e, 1e-10, what)


INPUT_LAYOUTS = ["sliced-with-step", "expanded-batch"]


@pytest.mark.parametrize("variant", INPUT_LAYOUTS)
@pytest.mark.parametrize("nd, mode", LAYOUT_MODES)
def test_non_contiguous_input(variant, nd, mode):
    shape = SHAPES[nd][0]
    gen = generator(seed_of("input-layout", variant, nd, mode))
    if variant == "sliced-with-step":  # every other channel and every other last-axis element
        base = randn((shape.n, 2 * shape.c, *shape.size_in[:-1], 2 * shape.size_in[-1]), gen)
    else:
        base = randn((1, shape.c, *shape.size_in), gen)
    grid = rand((shape.n, *shape.size_out, shape.nd), gen, -1.3, 1.3)
    grad_output = randn(output_shape(shape), gen)
    results = []
    for sample in (stn_triton.grid_sample, F.grid_sample):
        leaf = base.detach().clone().requires_grad_()
        grid_leaf = grid.detach().clone().requires_grad_()
        if variant == "sliced-with-step":
            x = leaf[:, ::2, ..., ::2]
        else:
            x = leaf.expand(shape.n, *leaf.shape[1:])
        assert not x.is_contiguous()
        out = sample(x, grid_leaf, mode=mode, padding_mode="border", align_corners=True)
        out.backward(grad_output)
        results.append((out.detach(), leaf.grad, grid_leaf.grad))
    for what, a, e in zip(("output", "grad input", "grad grid"), *results):
        assert_close_scaled(a, e, 1e-10, what)


# --- backward, float64 ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape, mode, padding_mode, align_corners", every_case())
def test_backward_matches_autograd_float64(shape, mode, padding_mode, align_corners):
    seed = seed_of("bwd", shape.id, mode, padding_mode, align_corners)
    x, grid = make_inputs(shape, seed)
    grad_output = randn(output_shape(shape), generator(seed + 1))
    ours = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    expected = run_with_grads(F.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    for what, a, e in zip(("output", "grad input", "grad grid"), ours, expected):
        assert a.dtype == torch.float64, what
        assert_close_scaled(a, e, 1e-10, what)


def grid_away_from_kinks(gen, n, size_out, size_in, align_corners):
    """A float64 grid whose pixel coordinates stay >= 0.15 pixel from every integer and half-integer.

    Every kink of grid_sample sits at an integer (tap changes, border clip, reflection about 0 and
    size-1 with align_corners=True) or a half-integer (nearest rounding, reflection about -0.5 and
    size-0.5 with align_corners=False), so central finite differences with gradcheck's eps are
    valid there. Integer parts run from -2 to size, so zeros padding sees taps outside the input
    and reflection folds once.
    """
    coords = []
    for size in reversed(size_in):  # grid[..., 0] is x (the last axis)
        whole = torch.randint(-2, size + 1, (n, *size_out), generator=gen).double()
        frac = 0.25 + 0.5 * torch.randint(0, 2, (n, *size_out), generator=gen).double()
        frac += (torch.rand((n, *size_out), generator=gen, dtype=torch.float64) - 0.5) * 0.2
        pixel = whole + frac
        if align_corners:
            coords.append(2 * pixel / (size - 1) - 1)
        else:
            coords.append((2 * pixel + 1) / size - 1)
    return torch.stack(coords, dim=-1).to(DEVICE)


GRADCHECK_SHAPES = {2: Shape(1, 2, (3, 4), (2, 3)), 3: Shape(1, 1, (3, 3, 4), (1, 2, 3))}


@pytest.mark.parametrize(
    "nd, mode, padding_mode, align_corners",
    [
        pytest.param(nd, mode, padding, align, id=f"{nd}d-{mode}-{padding}-{align_id(align)}")
        for nd in (2, 3)
        for mode in MODES[nd]
        for padding in PADDING_MODES
        for align in (False, True)
    ],
)
def test_gradcheck(nd, mode, padding_mode, align_corners):
    shape = GRADCHECK_SHAPES[nd]
    gen = generator(seed_of("gradcheck", nd, mode, padding_mode, align_corners))
    x = randn((shape.n, shape.c, *shape.size_in), gen).requires_grad_()
    grid = grid_away_from_kinks(gen, shape.n, shape.size_out, shape.size_in, align_corners)
    # nearest has a zero grid gradient with jumps between: only its input gradient is checked.
    grid.requires_grad_(mode != "nearest")

    def sample(x, grid):
        return stn_triton.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)

    # Fast mode (random projections of the Jacobian) keeps the interpreter's launches few.
    assert torch.autograd.gradcheck(sample, (x, grid), fast_mode=not ON_GPU)


@pytest.mark.parametrize("nd, mode", ND_MODES)
def test_sum_backward_reads_expanded_grad_output(nd, mode):
    """``out.sum().backward()`` hands the backward a stride-0 grad_output of one element."""
    shape = SHAPES[nd][0]
    x, grid = make_inputs(shape, seed_of("sum", nd, mode))
    ours = run_with_grads(stn_triton.grid_sample, x, grid, None, mode, "border", False)
    expected = run_with_grads(F.grid_sample, x, grid, None, mode, "border", False)
    for what, a, e in zip(("output", "grad input", "grad grid"), ours, expected):
        assert_close_scaled(a, e, 1e-10, what)


@pytest.mark.parametrize("wants_grad", ["input-only", "grid-only", "neither"])
@pytest.mark.parametrize("nd, mode", LAYOUT_MODES)
def test_gradient_only_for_tensors_that_require_it(wants_grad, nd, mode):
    shape = SHAPES[nd][0]
    seed = seed_of("requires-grad", wants_grad, nd, mode)
    x, grid = make_inputs(shape, seed)
    grad_output = randn(output_shape(shape), generator(seed + 1))
    expected = run_with_grads(F.grid_sample, x, grid, grad_output, mode, "zeros", False)
    x.requires_grad_(wants_grad == "input-only")
    grid.requires_grad_(wants_grad == "grid-only")
    out = stn_triton.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    assert_close_scaled(out.detach(), expected[0], 1e-10, "output")
    if wants_grad == "neither":
        assert not out.requires_grad
        return
    out.backward(grad_output)
    if wants_grad == "input-only":
        assert grid.grad is None
        assert_close_scaled(x.grad, expected[1], 1e-10, "grad input")
    else:
        assert x.grad is None
        assert_close_scaled(grid.grad, expected[2], 1e-10, "grad grid")


# --- other dtypes ---------------------------------------------------------------------------------


LOW_PRECISION_ALIGN = {"zeros": False, "border": True, "reflection": False}


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("nd, mode", ND_MODES)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_low_precision_within_twice_torch_error(dtype, nd, mode, padding_mode):
    """Output and gradients in float16/bfloat16 within 2x PyTorch's own error at that dtype."""
    shape = SHAPES[nd][0]
    align_corners = LOW_PRECISION_ALIGN[padding_mode]
    seed = seed_of("low", dtype, nd, mode, padding_mode)
    x, grid = make_inputs(shape, seed, dtype=dtype)
    grad_output = randn(output_shape(shape), generator(seed + 1), dtype=dtype)
    ours = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    torch_own = run_with_grads(F.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    reference = run_with_grads(
        F.grid_sample, x.double(), grid.double(), grad_output.double(), mode, padding_mode, align_corners
    )
    for what, a, t, r in zip(("output", "grad input", "grad grid"), ours, torch_own, reference):
        assert_within_low_precision_rule(a, t, r, dtype, what)


@pytest.mark.parametrize("nd, mode", ND_MODES)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_float32_matches_torch_float32(nd, mode, padding_mode):
    shape = SHAPES[nd][-1]
    align_corners = LOW_PRECISION_ALIGN[padding_mode]
    seed = seed_of("f32", nd, mode, padding_mode)
    x, grid = make_inputs(shape, seed, dtype=torch.float32)
    grad_output = randn(output_shape(shape), generator(seed + 1), dtype=torch.float32)
    ours = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    expected = run_with_grads(F.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)
    assert_close_scaled(ours[1], expected[1], 1e-4, "grad input")
    assert_close_scaled(ours[2], expected[2], 1e-4, "grad grid")


# --- determinism --------------------------------------------------------------------------------


def _upsampling_case(nd, dtype, seed):
    """A small input read by many more output pixels: every input pixel gets many contributions."""
    n, c = sizes(cpu=(1, 2), gpu=(4, 16))
    size_in = (3, 3) if nd == 2 else (3, 3, 3)
    size_out = sizes(cpu=(9, 11), gpu=(129, 257)) if nd == 2 else sizes(cpu=(5, 7, 9), gpu=(33, 65, 65))
    gen = generator(seed)
    identity = torch.eye(nd, nd + 1, dtype=torch.float64).expand(n, nd, nd + 1)
    grid = F.affine_grid(identity, (n, c, *size_out), align_corners=False)
    grid = grid + rand(grid.shape, gen, -0.05, 0.05, device="cpu")
    x = randn((n, c, *size_in), gen, dtype)
    grad_output = randn((n, c, *size_out), gen, dtype)
    return x, grid.to(dtype=dtype, device=DEVICE), grad_output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("nd, mode", ND_MODES)
def test_deterministic_backward_is_bitwise_reproducible(dtype, nd, mode):
    x, grid, grad_output = _upsampling_case(nd, dtype, seed_of("deterministic", dtype, nd, mode))
    # References first: PyTorch's own CUDA backward raises under deterministic algorithms.
    torch_own = run_with_grads(F.grid_sample, x, grid, grad_output, mode, "zeros", False)
    reference = run_with_grads(F.grid_sample, x.double(), grid.double(), grad_output.double(), mode, "zeros", False)
    with deterministic_algorithms():
        first = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, mode, "zeros", False)
        second = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, mode, "zeros", False)
    for what, a, b in zip(("output", "grad input", "grad grid"), first, second):
        assert torch.equal(a, b), f"{what} differs between two deterministic runs"
    for what, a, t, r in zip(("output", "grad input", "grad grid"), first, torch_own, reference):
        if dtype == torch.float32:
            assert_close_scaled(a, t, 1e-4, what)
        else:
            assert_within_low_precision_rule(a, t, r, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_deterministic_backward_sums_a_long_run_in_chunks(dtype):
    """Border padding with every point far outside: one input pixel (a corner) collects every tap of
    every output pixel, a run of thousands of entries that the sorted scatter sums in chunks and then
    adds chunk by chunk (ops/sorted_scatter.py), still in a fixed order."""
    from stn_triton.ops.sorted_scatter import CHUNK

    gen = generator(seed_of("long-run", dtype))
    x = randn((2, 3, 4, 5), gen, dtype)
    out_pixels = sizes(cpu=(12, 16), gpu=(96, 128))
    grid = rand((2, *out_pixels, 2), gen, 3.0, 9.0, dtype)  # x > 1 and y > 1: the bottom-right corner
    grad_output = randn((2, 3, *out_pixels), gen, dtype)
    assert 4 * out_pixels[0] * out_pixels[1] > 8 * CHUNK, "the run must span several chunks"
    reference = run_with_grads(F.grid_sample, x.double(), grid.double(), grad_output.double(), "bilinear", "border",
                               False)
    with deterministic_algorithms():
        first = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, "bilinear", "border", False)
        second = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, "bilinear", "border", False)
    assert torch.equal(first[1], second[1]), "grad input differs between two deterministic runs"
    assert_close_scaled(first[1], reference[1].to(dtype), 1e-12 if dtype == torch.float64 else 1e-5, "grad input")
    assert reference[1][:, :, -1, -1].abs().min() > 0 and not reference[1][:, :, :-1].any()


# --- non-finite and huge coordinates --------------------------------------------------------------


SPECIAL_VALUES = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 1e10)


def _grid_with_specials(shape: Shape, seed: int, dtype):
    """A grid with one special value per pixel in its first few pixels, and one all-NaN pixel.

    Returns the grid and a bool mask [N, *size_out] of the pixels holding a special value.
    """
    _, grid = make_inputs(shape, seed, dtype=dtype)
    flat = grid.view(-1, shape.nd)
    for i, value in enumerate(SPECIAL_VALUES):
        flat[i, i % shape.nd] = value
    flat[len(SPECIAL_VALUES)] = float("nan")
    special = torch.zeros(flat.shape[0], dtype=torch.bool, device=grid.device)
    special[: len(SPECIAL_VALUES) + 1] = True
    return grid, special.view(shape.n, *shape.size_out)


# The interpreter runs kernels in numpy, which warns on arithmetic with NaN and inf.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("nd, mode", ND_MODES)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_non_finite_and_huge_coordinates_stay_in_bounds(dtype, nd, mode, padding_mode):
    """NaN, +-inf and +-1e30 coordinates never read garbage; the other pixels equal PyTorch.

    Outputs at NaN coordinates are not compared with PyTorch (its CPU and CUDA disagree there).
    """
    shape = SHAPES[nd][0]
    align_corners = padding_mode == "border"
    seed = seed_of("special", dtype, nd, mode, padding_mode)
    x = randn((shape.n, shape.c, *shape.size_in), generator(seed + 1), dtype=dtype)
    grid, special = _grid_with_specials(shape, seed, dtype)
    grad_output = randn(output_shape(shape), generator(seed + 2), dtype=dtype)
    out, grad_input, grad_grid = run_with_grads(
        stn_triton.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners
    )
    assert torch.isfinite(out).all(), "output not finite: an out-of-bounds or garbage read"
    assert torch.isfinite(grad_input).all(), "grad input not finite: an out-of-bounds or garbage write"

    # A finite stand-in for every special value that PyTorch treats the same way.
    sane = grid.clone()
    if padding_mode == "zeros":  # any coordinate far outside reads only zeros
        sane[~torch.isfinite(sane) | (sane.abs() > 2)] = 7.0
    else:  # border clamps anything beyond the edge to the edge, as 1.5 is (reflection: normal pixels only)
        sane = torch.where(sane.abs() > 2, torch.sign(sane) * 1.5, sane)
        sane = torch.nan_to_num(sane, nan=0.0)
    expected = run_with_grads(F.grid_sample, x, sane, grad_output, mode, padding_mode, align_corners)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    per_pixel = special.unsqueeze(1).expand_as(out)
    normal_pixels = ~special

    assert_close_scaled(out[~per_pixel], expected[0][~per_pixel], tol, "output at normal coordinates")
    assert_close_scaled(grad_grid[normal_pixels], expected[2][normal_pixels], 10 * tol, "grad grid at normal pixels")
    if padding_mode == "zeros":
        assert (out[per_pixel] == 0).all(), "zeros padding: a huge or non-finite coordinate must give 0"
        assert_close_scaled(grad_input, expected[1], 10 * tol, "grad input")
    elif padding_mode == "border" and mode != "bicubic":
        not_nan = ~torch.isnan(grid).any(dim=-1).unsqueeze(1).expand_as(out)
        assert_close_scaled(out[not_nan], expected[0][not_nan], tol, "border: a huge coordinate samples the edge")


# --- empty tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_shape, grid_shape",
    [
        pytest.param((0, 3, 5, 7), (0, 3, 5, 2), id="2d-batch-0"),
        pytest.param((2, 3, 5, 7), (2, 0, 5, 2), id="2d-no-output-pixels"),
        pytest.param((2, 0, 5, 7), (2, 3, 5, 2), id="2d-no-channels"),
        pytest.param((0, 2, 3, 5, 3), (0, 1, 3, 5, 3), id="3d-batch-0"),
        pytest.param((2, 2, 3, 5, 3), (2, 1, 0, 5, 3), id="3d-no-output-pixels"),
    ],
)
def test_empty_tensors(input_shape, grid_shape):
    gen = generator(seed_of("empty", input_shape, grid_shape))
    x = randn(input_shape, gen)
    grid = rand(grid_shape, gen, -1.3, 1.3)
    ours = run_with_grads(stn_triton.grid_sample, x, grid, None, "bilinear", "zeros", False)
    expected = run_with_grads(F.grid_sample, x, grid, None, "bilinear", "zeros", False)
    for what, a, e in zip(("output", "grad input", "grad grid"), ours, expected):
        assert a is not None, f"{what} missing"
        assert a.shape == e.shape, what
        torch.testing.assert_close(a, e, msg=lambda m: f"{what}: {m}")
