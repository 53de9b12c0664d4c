"""Every public op under ``torch.compile(fullgraph=True)``, forward and backward, equals eager; the
``torch.library`` ops pass ``opcheck``; launches follow the tensors' device. GPU only: the
interpreter cannot run on torch.compile's fake tensors (tests/test_compile_mutations.py checks on
the CPU what torch.compile's functionalization needs of the kernels)."""

import pytest
import torch

import stn_triton
from conftest import assert_close_scaled, generator, rand, randn

pytestmark = pytest.mark.gpu

CUDA = "cuda"


def _theta(n, nd, gen):
    return (torch.eye(nd, nd + 1, dtype=torch.float64) + rand((n, nd, nd + 1), gen, -0.2, 0.2, device="cpu")).to(CUDA)


def _cases():
    gen = generator(21)
    x = randn((2, 5, 12, 13), gen, torch.float64, CUDA)
    x3 = randn((2, 3, 6, 7, 8), gen, torch.float64, CUDA)
    grid = rand((2, 9, 10, 2), gen, -1.1, 1.1, torch.float64, CUDA)
    control = stn_triton.geometry.regular_control_points(9, torch.float64, CUDA)
    source = control + rand((2, 9, 2), gen, -0.1, 0.1, torch.float64, CUDA)
    homography = torch.eye(3, dtype=torch.float64, device=CUDA) + rand((2, 3, 3), gen, -0.05, 0.05, torch.float64, CUDA)
    M = torch.tensor([[1.0, 0.05, 0.5], [0.02, 0.9, -0.3]], dtype=torch.float64, device=CUDA).repeat(2, 1, 1)
    offset = randn((2, 18, 12, 13), gen, torch.float64, CUDA)
    weight = randn((4, 5, 3, 3), gen, torch.float64, CUDA)
    mask = rand((2, 9, 12, 13), gen, 0.0, 1.0, torch.float64, CUDA)
    levels = torch.tensor([[4, 6], [2, 3]], device=CUDA)
    return {
        "grid_sample": (lambda a, g: stn_triton.grid_sample(a, g, mode="bicubic", padding_mode="border"), (x, grid)),
        "grid_sample-3d": (stn_triton.grid_sample, (x3, rand((2, 4, 5, 6, 3), gen, -1.1, 1.1, torch.float64, CUDA))),
        "affine_grid": (lambda t: stn_triton.affine_grid(t, (2, 5, 9, 10)), (_theta(2, 2, gen),)),
        "affine_grid_sample": (stn_triton.affine_grid_sample, (x, _theta(2, 2, gen))),
        "affine_grid_sample-3d": (stn_triton.affine_grid_sample, (x3, _theta(2, 3, gen))),
        "perspective_grid_sample": (stn_triton.perspective_grid_sample, (x, homography)),
        "tps_grid_sample": (lambda a, s: stn_triton.tps_grid_sample(a, s, control), (x, source)),
        "warp_affine": (lambda a, m: stn_triton.warp_affine(a, m, (9, 10), padding_mode="fill"), (x, M)),
        "warp_perspective": (lambda a, m: stn_triton.warp_perspective(a, m, (9, 10)),
                             (x, torch.eye(3, dtype=torch.float64, device=CUDA).repeat(2, 1, 1))),
        "deform_conv2d": (lambda a, o, w, m: stn_triton.deform_conv2d(a, o, w, padding=1, mask=m),
                          (x, offset, weight, mask)),
        "ms_deform_attn": (lambda v, loc, a: stn_triton.ms_deform_attn(v, levels, None, loc, a, softmax=True),
                           (randn((2, 30, 2, 8), gen, torch.float64, CUDA), rand((2, 7, 2, 2, 3, 2), gen, 0, 1, torch.float64, CUDA),
                            randn((2, 7, 2, 2, 3), gen, torch.float64, CUDA))),
    }


# The names of _cases(), whose tensors are built per test, on the GPU.
IDS = ["grid_sample", "grid_sample-3d", "affine_grid", "affine_grid_sample", "affine_grid_sample-3d",
       "perspective_grid_sample", "tps_grid_sample", "warp_affine", "warp_perspective", "deform_conv2d",
       "ms_deform_attn"]


def _run(fn, tensors):
    """Output and every input's gradient; every input is a leaf that requires grad (the case that
    failed under torch.compile when a kernel seemed to write one of its inputs)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * out).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_compiled_forward_and_backward_equal_eager(name, deterministic):
    fn, tensors = _cases()[name]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        out, grads = _run(compiled, tensors)
        expected, expected_grads = _run(fn, tensors)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_close_scaled(out, expected, 1e-10, f"{name} output")
    for index, (got, want) in enumerate(zip(grads, expected_grads)):
        assert_close_scaled(got, want, 1e-9, f"{name} gradient {index}")


def _sample_inputs():
    gen = generator(22)
    x = randn((2, 3, 7, 8), gen, torch.float32, CUDA)
    grid = rand((2, 5, 6, 2), gen, -1.1, 1.1, torch.float32, CUDA)
    theta = _theta(2, 2, gen).float()
    return x, grid, theta


def test_opcheck_sample_ops():
    from stn_triton.kernels import codes
    from stn_triton.ops import sample as ops

    x, grid, theta = _sample_inputs()
    for coords, size, transform in ((grid, [5, 6], codes.GRID), (theta, [7, 8], codes.AFFINE)):
        args = (x.requires_grad_(), coords.requires_grad_(), None, None, size, transform, 0, 1, False, torch.float32)
        torch.library.opcheck(ops.sample_op, args)
        grad = torch.randn(2, 3, *size, device=CUDA)
        torch.library.opcheck(ops.sample_backward_op, (grad, x.detach(), coords.detach(), *args[2:], True, True, False))


def test_opcheck_affine_grid_ops():
    from stn_triton.ops import affine_grid as ops

    _, _, theta = _sample_inputs()
    torch.library.opcheck(ops.affine_grid_op, (theta.requires_grad_(), [9, 10], False, torch.float32))
    grad_grid = torch.randn(2, 9, 10, 2, device=CUDA).requires_grad_()
    torch.library.opcheck(ops.affine_grid_backward_op, (grad_grid, [9, 10], False, torch.float32, torch.float32))


def test_opcheck_deform_conv2d_op():
    from stn_triton.ops import deform_conv as ops

    gen = generator(23)
    x = randn((2, 4, 7, 8), gen, torch.float32, CUDA).requires_grad_()
    offset = randn((2, 18, 7, 8), gen, torch.float32, CUDA).requires_grad_()
    weight = randn((6, 4, 3, 3), gen, torch.float32, CUDA).requires_grad_()
    mask = rand((2, 9, 7, 8), gen, 0.0, 1.0, torch.float32, CUDA).requires_grad_()
    bias = randn((6,), gen, torch.float32, CUDA).requires_grad_()
    conv = ([1, 1], [1, 1], [1, 1])
    torch.library.opcheck(ops.deform_conv2d_op, (x, offset, weight, bias, mask, *conv))
    grad = randn((2, 6, 7, 8), gen, torch.float32, CUDA).requires_grad_()
    for deterministic in (False, True):
        torch.library.opcheck(ops.deform_conv2d_backward_op,
                              (grad, x, offset, weight, mask, *conv, True, True, True, True, True, deterministic))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_go_to_the_tensors_device():
    x = torch.randn(2, 3, 9, 10, device="cuda:1")
    grid = torch.rand(2, 5, 6, 2, device="cuda:1") * 2 - 1
    with torch.cuda.device(0):
        out = stn_triton.grid_sample(x, grid)
    torch.testing.assert_close(out, torch.nn.functional.grid_sample(x, grid, align_corners=False))


def test_opcheck_ms_deform_attn_ops():
    from stn_triton.ops import ms_deform_attn as ops

    gen = generator(24)
    value = randn((2, 30, 2, 8), gen, torch.float32, CUDA).requires_grad_()
    loc = rand((2, 7, 2, 2, 3, 2), gen, 0.0, 1.0, torch.float32, CUDA).requires_grad_()
    attn = rand((2, 7, 2, 2, 3), gen, 0.0, 1.0, torch.float32, CUDA).requires_grad_()
    levels = ops.levels(value, torch.tensor([[4, 6], [2, 3]], device=CUDA), None, (3, 3), False)
    for softmax in (False, True):
        torch.library.opcheck(ops.attention_op, (value, *levels, loc, attn, softmax, torch.float32))
        grad = randn((2, 7, 16), gen, torch.float32, CUDA).requires_grad_()
        for deterministic in (False, True):
            torch.library.opcheck(ops.attention_backward_op, (grad, value.detach(), *levels, loc.detach(), attn.detach(),
                                                              softmax, torch.float32, True, True, True, deterministic))
