"""``stn_triton.affine_grid`` against ``torch.nn.functional.affine_grid``."""

import zlib

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import (
    DEVICE,
    LOW_PRECISION,
    MODES_2D,
    MODES_3D,
    assert_within_low_precision_rule,
    generator,
    rand,
    randn,
    sizes,
)

# Odd sides, and sides of 1: a single pixel sits at coordinate 0 whatever align_corners says.
SIZES = sizes(
    cpu=[(2, 3, 5, 7), (1, 2, 1, 3), (2, 1, 3, 1), (1, 1, 1, 1), (2, 2, 3, 5, 7), (1, 1, 1, 3, 1), (2, 1, 5, 1, 3)],
    gpu=[
        (4, 3, 33, 47),
        (2, 1, 1, 13),
        (3, 2, 13, 1),
        (1, 1, 1, 1),
        (2, 2, 13, 33, 47),
        (1, 1, 1, 7, 1),
        (2, 1, 13, 1, 7),
    ],
)


def size_id(size) -> str:
    return f"{len(size) - 2}d-N{size[0]}-" + "x".join(map(str, size[2:]))


# F.affine_grid warns on every grid with a side of 1 under align_corners=True.
pytestmark = pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior")

SIZE_PARAMS = [pytest.param(size, id=size_id(size)) for size in SIZES]
ALIGN = [pytest.param(False, id="noalign"), pytest.param(True, id="align")]


def seed_of(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def make_theta(size, seed, dtype=torch.float64) -> torch.Tensor:
    """theta [N, nd, nd + 1]: the identity plus noise of up to 0.5 (rotation, scale, shear, shift)."""
    nd = len(size) - 2
    identity = torch.eye(nd, nd + 1, dtype=torch.float64)
    noise = rand((size[0], nd, nd + 1), generator(seed), -0.5, 0.5, device="cpu")
    return (identity + noise).to(dtype=dtype, device=DEVICE)


def grid_with_grad(make_grid, theta, size, align_corners, grad_grid):
    """Grid and theta's gradient through ``make_grid``; ``grad_grid=None`` backpropagates a sum."""
    theta = theta.detach().clone().requires_grad_()
    grid = make_grid(theta, size, align_corners=align_corners)
    if grad_grid is None:
        grid.sum().backward()
    else:
        grid.backward(grad_grid)
    return grid.detach(), theta.grad


def grid_shape(size):
    return (size[0], *size[2:], len(size) - 2)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_matches_torch_float64(size, align_corners):
    theta = make_theta(size, seed_of("f64", size, align_corners))
    grid = stn_triton.affine_grid(theta, size, align_corners=align_corners)
    expected = F.affine_grid(theta, size, align_corners=align_corners)
    assert grid.dtype == torch.float64
    assert grid.shape == grid_shape(size)
    torch.testing.assert_close(grid, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_matches_torch_float32(size, align_corners):
    theta = make_theta(size, seed_of("f32", size, align_corners), dtype=torch.float32)
    grid = stn_triton.affine_grid(theta, size, align_corners=align_corners)
    expected = F.affine_grid(theta.double(), size, align_corners=align_corners)
    assert grid.dtype == torch.float32
    torch.testing.assert_close(grid, expected.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_low_precision_within_twice_torch_error(size, dtype):
    """Grid and theta gradient in float16/bfloat16 within 2x PyTorch's own error at that dtype."""
    seed = seed_of("low", size, dtype)
    theta = make_theta(size, seed, dtype=dtype)
    grad_grid = randn(grid_shape(size), generator(seed + 1), dtype=dtype, device=theta.device)
    ours = grid_with_grad(stn_triton.affine_grid, theta, size, False, grad_grid)
    reference = grid_with_grad(F.affine_grid, theta.double(), size, False, grad_grid.double())
    try:
        torch_own = grid_with_grad(F.affine_grid, theta, size, False, grad_grid)
    except NotImplementedError:
        # PyTorch's CPU affine_grid has no half kernel for a side of 1; stand in the float64
        # reference rounded to dtype, the least error any implementation at dtype can have.
        torch_own = tuple(r.to(dtype) for r in reference)
    for what, a, t, r in zip(("grid", "grad theta"), ours, torch_own, reference):
        assert_within_low_precision_rule(a, t, r, dtype, what)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_theta_gradient_matches_autograd_float64(size, align_corners):
    seed = seed_of("grad", size, align_corners)
    theta = make_theta(size, seed)
    grad_grid = randn(grid_shape(size), generator(seed + 1), device=theta.device)
    ours = grid_with_grad(stn_triton.affine_grid, theta, size, align_corners, grad_grid)
    expected = grid_with_grad(F.affine_grid, theta, size, align_corners, grad_grid)
    assert ours[1].dtype == torch.float64
    torch.testing.assert_close(ours[1], expected[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_sum_backward_reads_expanded_grad_grid(size, align_corners):
    """``grid.sum().backward()`` hands the backward a stride-0 grad of one element."""
    theta = make_theta(size, seed_of("sum", size, align_corners))
    ours = grid_with_grad(stn_triton.affine_grid, theta, size, align_corners, None)
    expected = grid_with_grad(F.affine_grid, theta, size, align_corners, None)
    torch.testing.assert_close(ours[1], expected[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize(
    "size", [pytest.param((2, 1, 3, 5), id="2d-N2-3x5"), pytest.param((1, 1, 3, 1, 5), id="3d-N1-3x1x5")]
)
def test_gradcheck(size, align_corners):
    theta = make_theta(size, seed_of("gradcheck", size, align_corners)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: stn_triton.affine_grid(t, size, align_corners=align_corners), (theta,))


def _non_contiguous_theta(base: torch.Tensor, variant: str, n: int) -> torch.Tensor:
    if variant == "transposed":  # base [N, nd + 1, nd]
        return base.transpose(1, 2)
    if variant == "sliced-with-step":  # base [N, nd, 2 * (nd + 1)]
        return base[..., ::2]
    return base.expand(n, *base.shape[1:])  # "expanded-batch": base [1, nd, nd + 1]


@pytest.mark.parametrize("variant", ["transposed", "sliced-with-step", "expanded-batch"])
@pytest.mark.parametrize("size", [pytest.param(SIZES[0], id="2d"), pytest.param(SIZES[4], id="3d")])
def test_non_contiguous_theta(size, variant):
    n, nd = size[0], len(size) - 2
    gen = generator(seed_of("layout", size, variant))
    base_shape = {
        "transposed": (n, nd + 1, nd),
        "sliced-with-step": (n, nd, 2 * (nd + 1)),
        "expanded-batch": (1, nd, nd + 1),
    }[variant]
    base = rand(base_shape, gen, -1.0, 1.0, device=DEVICE)
    grad_grid = randn(grid_shape(size), gen, device=base.device)
    results = []
    for make_grid in (stn_triton.affine_grid, F.affine_grid):
        leaf = base.detach().clone().requires_grad_()
        theta = _non_contiguous_theta(leaf, variant, n)
        assert not theta.is_contiguous()
        grid = make_grid(theta, size, align_corners=False)
        grid.backward(grad_grid)
        results.append((grid.detach(), leaf.grad))
    for what, a, e in zip(("grid", "grad theta"), *results):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10, msg=lambda m: f"{what}: {m}")


COMPOSITION_CASES = [
    pytest.param(2, mode, padding, id=f"2d-{mode}-{padding}")
    for mode in MODES_2D
    for padding in ("zeros", "reflection")
] + [pytest.param(3, mode, "border", id=f"3d-{mode}-border") for mode in MODES_3D]


@pytest.mark.parametrize("nd, mode, padding_mode", COMPOSITION_CASES)
def test_grid_sample_of_affine_grid_matches_torch(nd, mode, padding_mode):
    """The spatial transformer: sample an input at an affine grid; output and both gradients."""
    n, c = sizes(cpu=(2, 2), gpu=(4, 8))
    size_in = sizes(cpu=(5, 7), gpu=(33, 47)) if nd == 2 else sizes(cpu=(3, 5, 3), gpu=(13, 17, 9))
    seed = seed_of("compose", nd, mode, padding_mode)
    gen = generator(seed)
    x = randn((n, c, *size_in), gen, device=DEVICE)
    theta = make_theta((n, c, *size_in), seed + 1)
    results = []
    for make_grid, sample in ((stn_triton.affine_grid, stn_triton.grid_sample), (F.affine_grid, F.grid_sample)):
        x_leaf = x.detach().clone().requires_grad_()
        theta_leaf = theta.detach().clone().requires_grad_()
        grid = make_grid(theta_leaf, x_leaf.shape, align_corners=False)  # a torch.Size as size
        out = sample(x_leaf, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
        out.sum().backward()
        results.append((out.detach(), x_leaf.grad, theta_leaf.grad))
    for what, a, e in zip(("output", "grad input", "grad theta"), *results):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9, msg=lambda m: f"{what}: {m}")
