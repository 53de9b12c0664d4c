"""Property-based tests: random shapes, modes and options, drawn by hypothesis, against PyTorch.

The parametrized tests pin chosen cases; these search the space between them (sizes of 1,
outputs larger or smaller than inputs, every option combination) for a disagreement, in
float64, forward and backward. Example counts stay small under the interpreter.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import stn_triton
from conftest import ON_GPU
from stn_triton import fallback

EXAMPLES = 60 if ON_GPU else 15
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
# A deformable convolution's forward and backward take seconds each in the interpreter.
DCN_SETTINGS = settings(max_examples=EXAMPLES if ON_GPU else 6, deadline=None, derandomize=True)
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = 1e-9
# Many random shapes and options: many kernel variants to compile on a GPU, outside the fast tier.
pytestmark = pytest.mark.slow


def _grads(fn, tensors, grad_output_seed: int):
    """Output and gradients of fn(*tensors) for a random grad_output."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(grad_output_seed)
    grad_output = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad_output)
    return [out.detach(), *grads]


def _assert_all_close(ours, theirs):
    """Equal within TOL relative to each tensor's magnitude (output first, then the gradients)."""
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"tensor {index}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if b.numel():
            error = (a - b).abs().max().item()
            assert error <= TOL * max(1.0, b.abs().max().item()), f"tensor {index} differs by {error:.3g}"


def _rand(shape, seed, lo=-1.0, hi=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(DEVICE)


@st.composite
def grid_sample_cases(draw):
    nd = draw(st.sampled_from([2, 3]))
    mode = draw(st.sampled_from(["bilinear", "nearest", "bicubic"] if nd == 2 else ["bilinear", "nearest"]))
    side = st.integers(1, 6 if nd == 2 else 4)
    size_in = tuple(draw(side) for _ in range(nd))
    size_out = tuple(draw(side) for _ in range(nd))
    return dict(
        n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), size_in=size_in, size_out=size_out, mode=mode,
        padding=draw(st.sampled_from(["zeros", "border", "reflection"])), align=draw(st.booleans()),
        reach=draw(st.sampled_from([1.0, 1.5, 3.0])), seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(grid_sample_cases())
def test_grid_sample_equals_pytorch(case):
    x = _rand((case["n"], case["c"], *case["size_in"]), case["seed"])
    grid = _rand((case["n"], *case["size_out"], len(case["size_in"])), case["seed"] + 1, -case["reach"], case["reach"])
    options = dict(mode=case["mode"], padding_mode=case["padding"], align_corners=case["align"])
    ours = _grads(lambda a, g: stn_triton.grid_sample(a, g, **options), (x, grid), case["seed"] + 2)
    theirs = _grads(lambda a, g: F.grid_sample(a, g, **options), (x, grid), case["seed"] + 2)
    _assert_all_close(ours, theirs)


@SETTINGS
@given(grid_sample_cases())
def test_affine_grid_sample_equals_the_composition(case):
    nd = len(case["size_in"])
    x = _rand((case["n"], case["c"], *case["size_in"]), case["seed"])
    theta = torch.eye(nd, nd + 1, dtype=torch.float64, device=DEVICE) + case["reach"] * 0.3 * _rand(
        (case["n"], nd, nd + 1), case["seed"] + 1
    )
    size = (case["n"], case["c"], *case["size_out"])
    options = dict(mode=case["mode"], padding_mode=case["padding"], align_corners=case["align"])

    def composition(a, t):
        return F.grid_sample(a, F.affine_grid(t, size, align_corners=case["align"]), **options)

    ours = _grads(lambda a, t: stn_triton.affine_grid_sample(a, t, size, **options), (x, theta), case["seed"] + 2)
    _assert_all_close(ours, _grads(composition, (x, theta), case["seed"] + 2))


@st.composite
def deform_conv_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    offset_groups = draw(st.sampled_from([1, 2]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 6))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 6))
    return dict(
        n=draw(st.integers(1, 2)), c=2 * math.lcm(groups, offset_groups),
        c_out=2 * groups, kernel=(kh, kw), stride=stride, padding=padding, dilation=dilation, size=(h, w),
        groups=groups, offset_groups=offset_groups, mask=draw(st.booleans()), bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@DCN_SETTINGS
@given(deform_conv_cases())
def test_deform_conv2d_equals_the_column_buffer_reference(case):
    n, c, (kh, kw) = case["n"], case["c"], case["kernel"]
    ho = (case["size"][0] + 2 * case["padding"][0] - case["dilation"][0] * (kh - 1) - 1) // case["stride"][0] + 1
    wo = (case["size"][1] + 2 * case["padding"][1] - case["dilation"][1] * (kw - 1) - 1) // case["stride"][1] + 1
    seed = case["seed"]
    tensors = [
        _rand((n, c, *case["size"]), seed),
        _rand((n, 2 * case["offset_groups"] * kh * kw, ho, wo), seed + 1, -2.5, 2.5),
        _rand((case["c_out"], c // case["groups"], kh, kw), seed + 2),
    ]
    if case["bias"]:
        tensors.append(_rand((case["c_out"],), seed + 3))
    if case["mask"]:
        tensors.append(_rand((n, case["offset_groups"] * kh * kw, ho, wo), seed + 4, 0.0, 1.0))
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])

    def split(rest):
        bias = rest[0] if case["bias"] else None
        mask = rest[-1] if case["mask"] else None
        return bias, mask

    def ours(x, offset, weight, *rest):
        bias, mask = split(rest)
        return stn_triton.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)

    def theirs(x, offset, weight, *rest):
        bias, mask = split(rest)
        return fallback.deform_conv2d(x, offset, weight, bias, case["stride"], case["padding"], case["dilation"], mask)

    _assert_all_close(_grads(ours, tensors, seed + 5), _grads(theirs, tensors, seed + 5))
