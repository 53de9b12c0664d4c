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
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 14.0], [0, -3.0, 5.0, 9.0, 30.0], [0, 4.0, 4.0, 4.5, 4.2],
                         [1, 10.0, 0.0, 26.0, 25.0], [1, 2.0, 3.0, 7.0, 5.0]], dtype=torch.float64, device=CUDA)
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
        "roi_align": (lambda a: stn_triton.roi_align(a, [rois[:3, 1:], rois[3:, 1:]], (3, 2), 0.5, -1), (x,)),
        "ps_roi_align": (lambda a: stn_triton.ps_roi_align(a, rois, (2, 2), 0.5, 2),
                         (randn((2, 8, 12, 13), gen, torch.float64, CUDA),)),
        "deform_roi_pool": (lambda a, o, m: stn_triton.deform_roi_pool(a, rois, o, (2, 3), 0.5, 2, 0.1, m),
                            (x, randn((5, 2, 2, 3), gen, torch.float64, CUDA), rand((5, 1, 2, 3), gen, 0, 1,
                                                                                   torch.float64, CUDA))),
        "multi_scale_roi_align": (lambda a, b: stn_triton.multi_scale_roi_align(
            [a, b], [rois[:3, 1:] * 8, rois[3:, 1:] * 8], (2, 2), 2, [0.25, 0.125]), (x, x[:, :, ::2, ::2])),
        "dcnv3": (lambda a, o, m: stn_triton.dcnv3(a, o, m, 3, 3, 2, 1, 1, 1, 1, 2, 2, 4, 0.5, True),
                  (randn((2, 7, 9, 8), gen, torch.float64, CUDA), rand((2, 4, 5, 32), gen, -2, 2, torch.float64, CUDA),
                   rand((2, 4, 5, 16), gen, 0, 1, torch.float64, CUDA))),
        "dcnv4": (lambda a, om: stn_triton.dcnv4(a, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, softmax=True),
                  (randn((2, 7, 9, 8), gen, torch.float64, CUDA), rand((2, 7, 9, 56), gen, -2, 2, torch.float64, CUDA))),
        "blur_pool2d": (lambda a: stn_triton.blur_pool2d(a, 4, 2, "reflect"), (x,)),
        "max_blur_pool2d": (lambda a: stn_triton.max_blur_pool2d(a, 3, (2, 1), 2, padding_mode="replicate"),
                            (x.contiguous(memory_format=torch.channels_last),)),
    }


# The names of _cases(), whose tensors are built per test, on the GPU.
IDS = ["grid_sample", "grid_sample-3d", "affine_grid", "affine_grid_sample", "affine_grid_sample-3d",
       "perspective_grid_sample", "tps_grid_sample", "warp_affine", "warp_perspective", "deform_conv2d",
       "ms_deform_attn", "roi_align", "ps_roi_align", "deform_roi_pool", "multi_scale_roi_align", "dcnv3", "dcnv4", "blur_pool2d",
       "max_blur_pool2d"]


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


def test_opcheck_dcn_ops():
    from stn_triton.ops import dcnv3 as ops

    gen = generator(26)
    x = randn((2, 7, 9, 8), gen, torch.float32, CUDA).requires_grad_()
    for packed in (False, True):
        spec = ops.DcnSpec(3, 3, 2, 1, 1, 1, 1, 2, 2, 0.5, True, packed, packed, torch.float32)
        width = 56 if packed else 32
        offset = rand((2, 4, 5, width), gen, -2.0, 2.0, torch.float32, CUDA).requires_grad_()
        mask = None if packed else rand((2, 4, 5, 16), gen, 0.0, 1.0, torch.float32, CUDA).requires_grad_()
        tables = ops.tables(x, offset, mask, spec)
        torch.library.opcheck(ops.dcn_op, (x, offset, mask, *tables, *spec.op_args()))
        grad = randn((2, 4, 5, 8), gen, torch.float32, CUDA).requires_grad_()
        for deterministic in (False, True):
            torch.library.opcheck(ops.dcn_backward_op, (grad, x.detach(), offset.detach(),
                                                        None if mask is None else mask.detach(), *tables,
                                                        *spec.op_args(), True, True, not packed, deterministic))


def test_opcheck_roi_pool_ops():
    from stn_triton.kernels import codes
    from stn_triton.ops import roi as ops

    gen = generator(25)
    x = randn((2, 8, 9, 10), gen, torch.float32, CUDA).requires_grad_()
    coarse = randn((2, 8, 5, 5), gen, torch.float32, CUDA).requires_grad_()
    rois = torch.tensor([[0, 1.0, 2.0, 8.0, 7.0], [1, -2.0, 0.5, 4.0, 9.0], [1, 3.0, 3.0, 3.5, 3.2]], device=CUDA)
    levels = torch.tensor([0, 1, 0], device=CUDA)
    offset = randn((3, 2, 2, 2), gen, torch.float32, CUDA).requires_grad_()
    mask = rand((3, 1, 2, 2), gen, 0.0, 1.0, torch.float32, CUDA).requires_grad_()
    cases = [(codes.ROI_ALIGN, None, None, None, [x], [1.0], -1, False),
             (codes.PS_ROI_ALIGN, None, None, None, [x], [0.5], 2, True),
             (codes.DEFORM_ROI_POOL, None, offset, mask, [x], [1.0], 0, True),
             (codes.ROI_ALIGN, levels, None, None, [x, coarse], [1.0, 0.5], 2, True)]
    for kind, lv, off, m, features, scales, sr, aligned in cases:
        slots = [*features, *[None] * (ops.MAX_LEVELS - len(features))]
        spec = (kind, 2, 2, scales, sr, aligned, 0.1, torch.float32)
        torch.library.opcheck(ops.roi_op, (rois, lv, off, m, *slots, *spec))
        out = ops.roi_op(rois, lv, off, m, *slots, *spec)
        grad = torch.randn_like(out).requires_grad_()
        detached = [f if f is None else f.detach() for f in slots]
        for deterministic in (False, True):
            torch.library.opcheck(ops.roi_backward_op, (grad, rois, lv, off if off is None else off.detach(),
                                                        m if m is None else m.detach(), *detached, *spec, True,
                                                        off is not None, m is not None, deterministic))


def test_opcheck_blur_pool_ops():
    from stn_triton.kernels import codes
    from stn_triton.ops import blur_pool as ops

    gen = generator(26)
    x = randn((2, 3, 7, 9), gen, torch.float32, CUDA).requires_grad_()
    routed = randn((2, 3, 7, 9), gen, torch.float32, CUDA).requires_grad_()
    # (routed, window, padding): the plain blur, the max-blur, and the routed blur its autograd runs.
    cases = [(None, [1, 1], codes.REFLECTION), (None, [2, 2], codes.ZEROS), (routed, [2, 2], codes.BORDER)]
    for d, window, padding in cases:
        spec = ([3, 3], [2, 2], window, padding, torch.float32)
        torch.library.opcheck(ops.blur_pool_op, (x, d, *spec))
        out = ops.blur_pool_op(x, d, *spec)
        grad = torch.randn_like(out).requires_grad_()
        kept = x.detach() if window != [1, 1] else None
        torch.library.opcheck(ops.blur_pool_backward_op, (grad, kept, *spec, [7, 9], torch.float32, False))
