"""``stn_triton.deform_conv2d`` against a float64 reference written here, and against torchvision on a GPU.

The reference samples every tap by explicit floor / weights / gathers with torchvision's rule (a
corner outside the image reads 0; a point at or beyond -1 or the size reads nothing), multiplies by
the mask and contracts with the weight by an einsum per convolution group. It shares no code with
the library (neither its kernels nor ``stn_triton.fallback``, which goes through grid_sample), and
is itself checked against a pure-Python loop. Gradients are autograd of the reference: with floor
held constant, that is torchvision's one-sided derivative at integer positions.

Half-precision results are held to "within 2x the error of the float64 reference rounded to that
dtype" (plus conftest's floor): torchvision is not installable on the CPU machines and has no
bfloat16, so the rounded reference stands in for "PyTorch's own error". On a GPU the float16
results are also held to 2x torchvision's own float16 error.
"""

import math
import zlib
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import (
    DEVICE,
    INTERPRETING,
    LOW_PRECISION,
    ON_GPU,
    assert_close_scaled,
    assert_within_low_precision_rule,
    deterministic_algorithms,
    generator,
    rand,
    randn,
    sizes,
)
from stn_triton import conv_shape, tuning
from stn_triton.ops import deform_conv_policy as dcn_policy

# float32 against float64, relative to the largest magnitude: sums of C * K products rounded to float32.
FLOAT32_TOL = 1e-5


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# --- references ---------------------------------------------------------------------------------


def reference_columns(input, offset, kernel, stride, padding, dilation):
    """Every tap of every output pixel, sampled bilinearly: ``[N, G, C / G, K, HO, WO]``.

    A corner (yc, xc) contributes weight * input only when 0 <= yc < H and 0 <= xc < W; that alone
    makes a point with y <= -1 or y >= H (same for x) read 0, as torchvision's forward says.
    Non-finite coordinates are sent to -2 (nothing there); huge ones fall outside by themselves.
    """
    n, c, h, w = input.shape
    kh, kw = kernel
    k = kh * kw
    ho, wo = offset.shape[2:]
    g = offset.shape[1] // (2 * k)
    i = torch.arange(kh, device=input.device).repeat_interleave(kw)  # tap k = i * kw + j
    j = torch.arange(kw, device=input.device).repeat(kh)
    oy = torch.arange(ho, device=input.device)[None, :, None]
    ox = torch.arange(wo, device=input.device)[None, None, :]
    base_y = oy * stride[0] - padding[0] + i[:, None, None] * dilation[0]  # [K, HO, 1]
    base_x = ox * stride[1] - padding[1] + j[:, None, None] * dilation[1]  # [K, 1, WO]
    pairs = offset.reshape(n, g, k, 2, ho, wo)
    y = base_y + pairs[:, :, :, 0]  # [N, G, K, HO, WO]
    x = base_x + pairs[:, :, :, 1]
    y = torch.where(torch.isfinite(y), y, torch.full_like(y, -2.0))
    x = torch.where(torch.isfinite(x), x, torch.full_like(x, -2.0))
    y0, x0 = torch.floor(y).detach(), torch.floor(x).detach()
    fy, fx = y - y0, x - x0
    pixels = input.reshape(n, g, c // g, h * w)
    columns = 0
    for cy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for cx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            valid = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
            index = torch.where(valid, cy * w + cx, torch.zeros_like(cy)).long()
            index = index.reshape(n, g, 1, k * ho * wo).expand(n, g, c // g, k * ho * wo)
            read = torch.gather(pixels, 3, index).reshape(n, g, c // g, k, ho, wo)
            weight = torch.where(valid, wy * wx, torch.zeros_like(wy))
            columns = columns + weight[:, :, None] * read
    return columns


def reference_deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """torchvision.ops.deform_conv2d in the arguments' dtype (call it with float64 tensors)."""
    n, c = input.shape[:2]
    c_out, cg, kh, kw = weight.shape
    groups = c // cg
    k = kh * kw
    ho, wo = offset.shape[2:]
    g = offset.shape[1] // (2 * k)
    columns = reference_columns(input, offset, (kh, kw), _pair(stride), _pair(padding), _pair(dilation))
    if mask is not None:
        columns = columns * mask.reshape(n, g, 1, k, ho, wo)
    columns = columns.reshape(n, groups, cg, k, ho, wo)  # channel c = group * cg + cl = og * C/G + cc
    out = torch.einsum("gock,ngckyx->ngoyx", weight.reshape(groups, c_out // groups, cg, k), columns)
    out = out.reshape(n, c_out, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def loop_deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """The same, one multiply-add at a time in Python floats, as torchvision's CPU kernel reads."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, w = input.shape
    c_out, cg, kh, kw = weight.shape
    k = kh * kw
    ho, wo = offset.shape[2:]
    g = offset.shape[1] // (2 * k)
    x_, off, wt = input.tolist(), offset.tolist(), weight.tolist()
    m_ = mask.tolist() if mask is not None else None

    def bilinear(plane, y, x):
        if y <= -1 or y >= h or x <= -1 or x >= w:
            return 0.0
        yl, xl = math.floor(y), math.floor(x)
        total = 0.0
        for yy, wy in ((yl, 1 - (y - yl)), (yl + 1, y - yl)):
            for xx, wx in ((xl, 1 - (x - xl)), (xl + 1, x - xl)):
                if 0 <= yy < h and 0 <= xx < w:
                    total += wy * wx * plane[yy][xx]
        return total

    out = torch.zeros(n, c_out, ho, wo, dtype=torch.float64)
    for b in range(n):
        for co in range(c_out):
            group = co // (c_out // (c // cg))
            for oy in range(ho):
                for ox in range(wo):
                    acc = 0.0 if bias is None else float(bias[co])
                    for cl in range(cg):
                        ci = group * cg + cl
                        og = ci // (c // g)
                        for i in range(kh):
                            for j in range(kw):
                                tap = i * kw + j
                                y = oy * sh - ph + i * dh + off[b][2 * (og * k + tap)][oy][ox]
                                x = ox * sw - pw + j * dw + off[b][2 * (og * k + tap) + 1][oy][ox]
                                modulation = 1.0 if m_ is None else m_[b][og * k + tap][oy][ox]
                                acc += wt[co][cl][i][j] * modulation * bilinear(x_[b][ci], y, x)
                    out[b, co, oy, ox] = acc
    return out


# --- cases --------------------------------------------------------------------------------------


def _size_id(value) -> str:
    return "x".join(map(str, _pair(value)))


class Case(NamedTuple):
    """A deform_conv2d problem: input [n, cin, h, w], weight [cout, cin / groups, *kernel]."""

    n: int
    cin: int
    h: int
    w: int
    cout: int
    kernel: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    offset_groups: int = 1
    mask: bool = True
    bias: bool = True

    @property
    def id(self) -> str:
        return (
            f"N{self.n}-C{self.cin}-{self.h}x{self.w}-O{self.cout}-k{_size_id(self.kernel)}-s{_size_id(self.stride)}"
            f"-p{_size_id(self.padding)}-d{_size_id(self.dilation)}-g{self.groups}-og{self.offset_groups}"
            f"{'-mask' if self.mask else ''}{'-bias' if self.bias else ''}"
        )

    @property
    def conv(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out_size(self) -> tuple[int, int]:
        (sh, sw), (ph, pw), (dh, dw) = _pair(self.stride), _pair(self.padding), _pair(self.dilation)
        kh, kw = self.kernel
        return (self.h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (self.w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def on_device(self) -> "Case":
        """Itself under the interpreter; on a GPU, 8x the channels and about 3x the sides."""
        grown = self._replace(cin=8 * self.cin, cout=8 * self.cout, h=3 * self.h + 1, w=3 * self.w + 2)
        return sizes(cpu=self, gpu=grown)


# Together these take every value of the spec: kernel 1x1, 3x3, 2x3, 5x5 (and 1x3 on a one-row
# image); stride 1/2; padding 0/1/2; dilation 1/2; groups 1/2; offset groups 1/2; mask and bias on
# and off; asymmetric stride/padding/dilation pairs; odd sides throughout.
GRID = [
    Case(2, 3, 5, 7, 2, (1, 1), mask=False, bias=False),
    Case(2, 4, 5, 6, 4, (1, 1), stride=2, padding=1, groups=2, offset_groups=2),
    Case(2, 3, 5, 6, 4, (3, 3), padding=1),
    Case(1, 2, 6, 5, 3, (3, 3), mask=False),
    Case(2, 4, 6, 7, 3, (3, 3), stride=2, padding=1, offset_groups=2, bias=False),
    Case(1, 2, 5, 5, 2, (3, 3), padding=2, dilation=2),
    Case(2, 4, 5, 7, 2, (3, 3), stride=2, padding=2, dilation=2, groups=2, offset_groups=2, mask=False),
    Case(1, 4, 5, 5, 4, (3, 3), padding=1, groups=2),
    Case(2, 2, 4, 5, 2, (3, 3), padding=1, groups=2, offset_groups=2, bias=False),
    Case(1, 3, 5, 6, 2, (2, 3)),
    Case(2, 2, 6, 5, 3, (2, 3), stride=2, padding=1, dilation=2, offset_groups=2, mask=False, bias=False),
    Case(1, 4, 5, 6, 2, (2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2),
    Case(1, 2, 5, 5, 2, (5, 5), padding=2),
    Case(1, 2, 6, 6, 1, (5, 5), stride=2, padding=2, offset_groups=2, mask=False),
    Case(1, 2, 6, 6, 2, (5, 5), padding=2, dilation=2, bias=False),
    Case(2, 2, 1, 7, 3, (1, 3), padding=(0, 1)),
    Case(1, 1, 3, 3, 1, (3, 3), padding=1),
]
GRID_PARAMS = [pytest.param(case, id=case.id) for case in GRID]


def seed_of(*parts) -> int:
    """A fixed seed per case, so every case draws its own values and reruns draw the same."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def make_inputs(case: Case, seed: int, dtype=torch.float64, offset_scale=2.0) -> dict:
    """input, offset (normal * offset_scale: taps land inside, on edges and outside), weight, bias, mask."""
    gen = generator(seed)
    ho, wo = case.out_size()
    g, k = case.offset_groups, case.taps
    return {
        "input": randn((case.n, case.cin, case.h, case.w), gen, dtype),
        "offset": randn((case.n, 2 * g * k, ho, wo), gen, dtype) * offset_scale,
        "weight": randn((case.cout, case.cin // case.groups, *case.kernel), gen, dtype),
        "bias": randn((case.cout,), gen, dtype) if case.bias else None,
        "mask": rand((case.n, g * k, ho, wo), gen, 0.0, 1.5, dtype) if case.mask else None,
    }


def grad_output_for(case: Case, seed: int, dtype=torch.float64) -> torch.Tensor:
    return randn((case.n, case.cout, *case.out_size()), generator(seed + 1), dtype)


def as_float64(tensors: dict) -> dict:
    return {name: t.double() if t is not None else None for name, t in tensors.items()}


def run_deform_conv(fn, tensors: dict, conv: dict, grad_output=None):
    """Forward and backward through ``fn``; returns (output, {argument: grad}) for the tensors given.

    ``grad_output=None`` backpropagates ``out.sum()`` (an expanded, stride-0 gradient).
    """
    # detach() keeps each tensor's own storage and strides; clone() would make a non-dense one (a strided bias
    # or mask) contiguous, so the kernels would never see it.
    leaves = {name: t.detach().requires_grad_() for name, t in tensors.items() if t is not None}
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves.get("bias"), mask=leaves.get("mask"), **conv)
    if grad_output is None:
        out.sum().backward()
    else:
        out.backward(grad_output)
    return out.detach(), {name: t.grad for name, t in leaves.items()}


def assert_matches(ours, expected, tol, what=""):
    """Output and every gradient close within ``tol`` of their magnitude (assert_close_scaled)."""
    out, grads = ours
    ref_out, ref_grads = expected
    assert_close_scaled(out, ref_out.to(out.dtype), tol, f"{what}output")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close_scaled(grads[name], ref_grads[name].to(grads[name].dtype), tol, f"{what}grad {name}")


def assert_low_precision(ours, expected, dtype):
    """Output and gradients within 2x the error of the float64 reference rounded to ``dtype``."""
    out, grads = ours
    ref_out, ref_grads = expected
    assert_within_low_precision_rule(out, ref_out.to(dtype), ref_out, dtype, "output")
    for name in ref_grads:
        assert_within_low_precision_rule(grads[name], ref_grads[name].to(dtype), ref_grads[name], dtype, f"grad {name}")


def assert_matches_reference_float64(case: Case, seed: int) -> None:
    """Output and every gradient of ``case`` in float64 against the reference, on fresh inputs."""
    tensors = make_inputs(case, seed)
    grad_output = grad_output_for(case, seed)
    ours = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
    expected = run_deform_conv(reference_deform_conv2d, tensors, case.conv, grad_output)
    assert ours[0].dtype == torch.float64
    assert_matches(ours, expected, 1e-9)


# --- the reference itself -----------------------------------------------------------------------

LOOP_CASES = [
    Case(1, 4, 4, 5, 2, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=2),
    Case(2, 2, 3, 4, 3, (3, 3), padding=2, mask=False, bias=False),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LOOP_CASES])
def test_reference_and_ours_match_a_python_loop(case):
    tensors = make_inputs(case, seed_of("loop", case.id))
    tensors = {name: t.cpu() if t is not None else None for name, t in tensors.items()}
    expected = loop_deform_conv2d(**tensors, **case.conv)
    torch.testing.assert_close(reference_deform_conv2d(**tensors, **case.conv), expected, atol=1e-12, rtol=1e-12)
    on_device = {name: t.to(DEVICE) if t is not None else None for name, t in tensors.items()}
    ours = stn_triton.deform_conv2d(**on_device, **case.conv)
    torch.testing.assert_close(ours.cpu(), expected, atol=1e-10, rtol=1e-10)


def test_reads_zero_at_and_beyond_the_border():
    """torchvision's rule by hand: y = -1 and y = H read 0; y = -0.5 reads half of row 0."""
    rows = torch.tensor([[1.0, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], dtype=torch.float64)
    dy = torch.tensor([-1.0, 2.0, -0.5, 1.5, 0.25, -1e30], dtype=torch.float64)
    # A 1x1 kernel with stride 2 down the two rows: one output row at y = 0, output column x at x.
    offset = torch.stack([dy, torch.zeros_like(dy)]).view(1, 2, 1, 6)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    expected = torch.tensor([0.0, 0.0, 0.5 * 3, 0.5 * 10, 0.75 * 5 + 0.25 * 11, 0.0], dtype=torch.float64)
    out = reference_deform_conv2d(rows.view(1, 1, 2, 6), offset, weight, stride=(2, 1))
    torch.testing.assert_close(out.view(6), expected)
    ours = stn_triton.deform_conv2d(
        rows.view(1, 1, 2, 6).to(DEVICE), offset.to(DEVICE), weight.to(DEVICE), stride=(2, 1)
    )
    torch.testing.assert_close(ours.view(6).cpu(), expected)


# --- float64 against the reference --------------------------------------------------------------


@pytest.mark.parametrize("case", GRID_PARAMS)
def test_forward_and_backward_match_reference_float64(case):
    case = case.on_device()
    assert_matches_reference_float64(case, seed_of("grid", case.id))


@pytest.mark.parametrize("rows, tiles, sms", [(1, 1, 132), (255, 1, 132), (675, 9, 132), (25088, 576, 132),
                                              (200704, 9, 132), (200704, 9, 1), (10**6, 10**5, 132)])
def test_weight_grad_splits_cover_the_rows_in_whole_blocks(rows, tiles, sms):
    from stn_triton.ops.deform_conv_configs import MIN_SPLIT_ROWS, PROGRAMS_PER_SM, ROW_ALIGN, weight_grad_splits

    splits, rows_per_split = weight_grad_splits(rows, tiles, sms)
    assert rows_per_split % ROW_ALIGN == 0
    assert (splits - 1) * rows_per_split < rows <= splits * rows_per_split, "every split has rows, all rows are covered"
    assert splits == 1 or rows_per_split >= MIN_SPLIT_ROWS
    assert splits == 1 or (splits - 1) * tiles < PROGRAMS_PER_SM * sms, "no more splits than the GPU needs"


# 3 images of 15 x 15 pixels, each padded to a multiple of ROW_ALIGN rows of grad_weight's row space
# (256 at 64 or 128): splits of its pixel sum with 31 padding rows per image that must add nothing.
SPLIT_CASE = Case(3, 2, 15, 15, 3, (3, 3), padding=1)


def test_weight_gradient_split_over_pixels_matches_reference():
    from stn_triton.ops._launch import multiprocessors
    from stn_triton.ops.deform_conv_configs import padded_pixels, weight_grad_splits

    ho, wo = SPLIT_CASE.out_size()
    rows = SPLIT_CASE.n * padded_pixels(ho * wo)
    splits, _ = weight_grad_splits(rows, SPLIT_CASE.taps, multiprocessors(torch.device(DEVICE)))
    assert splits >= 2, "the case must exercise the split reduction"
    assert_matches_reference_float64(SPLIT_CASE, seed_of("split", SPLIT_CASE.id))


# --- dtypes -------------------------------------------------------------------------------------

DTYPE_CASES = [
    Case(2, 4, 5, 6, 4, (3, 3), padding=1, groups=2, offset_groups=2),
    Case(1, 3, 6, 5, 2, (5, 5), stride=2, padding=2, mask=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DTYPE_CASES])
def test_dtypes_match_reference(case, dtype):
    """float32 within float32 rounding; float16 / bfloat16 within 2x the rounded reference's error."""
    case = case.on_device()
    seed = seed_of("dtype", case.id)
    tensors = make_inputs(case, seed, dtype)
    grad_output = grad_output_for(case, seed, dtype)
    ours = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
    # The reference runs in float64 on the same (already rounded) values.
    expected = run_deform_conv(reference_deform_conv2d, as_float64(tensors), case.conv, grad_output.double())
    assert ours[0].dtype == dtype
    assert all(grad.dtype == dtype for grad in ours[1].values())
    if dtype == torch.float32:
        assert_matches(ours, expected, FLOAT32_TOL)
    else:
        assert_low_precision(ours, expected, dtype)


# --- layouts and batch sizes --------------------------------------------------------------------

LAYOUT_CASE = Case(2, 4, 5, 6, 4, (3, 3), padding=1, groups=2, offset_groups=2)


def test_channels_last_input_gives_channels_last_output():
    case = LAYOUT_CASE.on_device()
    seed = seed_of("channels_last", case.id)
    tensors = make_inputs(case, seed)
    grad_output = grad_output_for(case, seed)
    expected = run_deform_conv(reference_deform_conv2d, tensors, case.conv, grad_output)
    tensors["input"] = tensors["input"].to(memory_format=torch.channels_last)
    assert not tensors["input"].is_contiguous()
    ours = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
    assert ours[0].is_contiguous(memory_format=torch.channels_last), f"output strides {ours[0].stride()}"
    assert_matches(ours, expected, 1e-9)


def test_non_contiguous_arguments_and_expanded_grad_output():
    """offset, weight, mask, bias and grad_output (out.sum()'s, stride 0) in layouts no kernel may assume."""
    case = LAYOUT_CASE.on_device()
    seed = seed_of("strided", case.id)
    tensors = make_inputs(case, seed)
    expected = run_deform_conv(reference_deform_conv2d, tensors, case.conv, None)
    strided = {
        "input": tensors["input"].transpose(2, 3).contiguous().transpose(2, 3),  # H and W strides swapped
        "offset": tensors["offset"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "weight": tensors["weight"].permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1),
        "bias": torch.stack([tensors["bias"], torch.zeros_like(tensors["bias"])], dim=1)[:, 0],
        "mask": torch.cat([tensors["mask"], torch.zeros_like(tensors["mask"])], dim=1)[:, : tensors["mask"].shape[1]],
    }
    for name, t in strided.items():
        assert torch.equal(t, tensors[name]) and (name == "input" or not t.is_contiguous()), name
    ours = run_deform_conv(stn_triton.deform_conv2d, strided, case.conv, None)
    assert_matches(ours, expected, 1e-9)


# On a GPU, 33 and 64 images pass torchvision's chunking of the batch into 32-image column buffers.
@pytest.mark.parametrize("n", sizes(cpu=(1, 3), gpu=(1, 3, 33, 64)))
def test_batch_sizes(n):
    case = Case(n, 2, 5, 4, 3, (3, 3), padding=1, offset_groups=2).on_device()._replace(n=n)
    assert_matches_reference_float64(case, seed_of("batch", case.id))


# --- host decisions: shape arithmetic, GEMM precision, gather layout ----------------------------


def call_shape(case: Case) -> "conv_shape.DeformConvShape":
    ho, wo = case.out_size()
    return conv_shape.DeformConvShape.of(
        (case.n, case.cin, case.h, case.w), (case.n, 2 * case.offset_groups * case.taps, ho, wo),
        (case.cout, case.cin // case.groups, *case.kernel), _pair(case.stride), _pair(case.padding), _pair(case.dilation),
    )


@pytest.mark.parametrize("case", GRID_PARAMS)
def test_shape_arithmetic_of_every_case(case):
    shape = call_shape(case)
    ho, wo = case.out_size()
    assert (shape.out_h, shape.out_w, shape.pixels, shape.rows) == (ho, wo, ho * wo, case.n * ho * wo)
    assert (shape.groups, shape.offset_groups, shape.taps) == (case.groups, case.offset_groups, case.taps)
    assert shape.group_channels == case.cin // case.groups
    assert shape.group_out_channels == case.cout // case.groups
    assert shape.offset_group_channels == case.cin // case.offset_groups
    assert shape.mask_shape() == (case.n, case.offset_groups * case.taps, ho, wo)


@pytest.mark.parametrize("offset_channels, argument", [(16, "offset"), (54, "offset groups"), (36, None)])
def test_shape_arithmetic_rejects_sizes_that_do_not_fit(offset_channels, argument):
    """input [2, 4, 5, 6], weight [6, 4, 3, 3]: 18 offset channels fit (one group), 36 (two) too,
    16 is no multiple of 2 x 9, 54 would be three offset groups of 4 / 3 channels."""
    of = conv_shape.DeformConvShape.of
    if argument is None:
        assert of((2, 4, 5, 6), (2, offset_channels, 3, 4), (6, 4, 3, 3), (1, 1), (0, 0), (1, 1)).offset_groups == 2
        return
    with pytest.raises(ValueError, match=argument):
        of((2, 4, 5, 6), (2, offset_channels, 3, 4), (6, 4, 3, 3), (1, 1), (0, 0), (1, 1))


@pytest.fixture
def launches(monkeypatch) -> list[tuple[str, dict]]:
    """(kernel name, arguments) of every deform_conv kernel launch in the test, the launches still run."""
    seen = []
    launch = tuning.Launch.__call__

    def recorded(self, grid, **arguments):
        seen.append((self.tuned.name, arguments))
        return launch(self, grid, **arguments)

    monkeypatch.setattr(tuning.Launch, "__call__", recorded)
    return seen


@pytest.fixture
def float32_matmul_precision():
    """Restores PyTorch's float32 matmul precision after the test (which sets it with set_float32_matmul_precision
    or the legacy allow_tf32, the two ways torchvision users set it)."""
    previous = torch.get_float32_matmul_precision()
    legacy = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = legacy
    torch.set_float32_matmul_precision(previous)


def _set_tf32(setting: str) -> None:
    if setting == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif setting != "default":
        torch.set_float32_matmul_precision(setting)


GEMM_KERNELS = {"deform_conv_fwd", "deform_conv_bwd_data", "deform_conv_bwd_weight"}


@pytest.mark.parametrize("setting, dtype, expected", [
    ("default", torch.float32, dcn_policy.float32_precision()),
    ("highest", torch.float32, dcn_policy.float32_precision()),
    ("high", torch.float32, "tf32"),
    ("medium", torch.float32, "tf32"),
    ("allow_tf32", torch.float32, "tf32"),
    ("high", torch.float64, "ieee"),
])
def test_float32_gemms_follow_pytorchs_tf32_switch(setting, dtype, expected, launches, float32_matmul_precision):
    """Every GEMM kernel (forward, data and weight gradients) gets the tl.dot precision that PyTorch's
    switches ask for, as torchvision's float32 matmuls follow them (the interpreter ignores the precision,
    so this checks the host's decision)."""
    _set_tf32(setting)
    assert dcn_policy.dot_precision(dtype) == expected
    case = Case(1, 2, 4, 4, 2, (3, 3), padding=1)
    run_deform_conv(stn_triton.deform_conv2d, make_inputs(case, seed_of("precision"), dtype), case.conv)
    precisions = {name: arguments["INPUT_PRECISION"] for name, arguments in launches if name in GEMM_KERNELS}
    assert precisions == dict.fromkeys(GEMM_KERNELS, expected)


@pytest.mark.parametrize("channels, groups, offset_groups, dtype, expected", [
    (256, 1, 1, torch.float32, True),  # dcn_r50
    (3, 1, 1, torch.float32, False),  # an RGB first layer: 12-byte runs
    (8, 1, 1, torch.float32, True),  # 32 bytes: one full sector
    (8, 1, 1, torch.float16, False),
    (16, 1, 1, torch.bfloat16, True),
    (64, 1, 16, torch.float32, False),  # 4 channels per offset group
    (64, 8, 1, torch.float16, False),  # 8 channels per conv group
    (4, 1, 1, torch.float64, True),
])
def test_channels_last_gather_when_a_sample_points_channels_fill_a_sector(channels, groups, offset_groups, dtype, expected):
    shape = conv_shape.DeformConvShape(2, channels, 9, 9, 8 * groups, 3, 3, groups, offset_groups, 9, 9)
    input = torch.empty((2, channels, 9, 9), dtype=dtype, device="meta")
    assert dcn_policy.gather_channels_last(input, shape) == expected


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_channels_last_gather_equals_nchw_gather(deterministic, launches, monkeypatch):
    """An NCHW input gathered from a channels-last copy (channels fastest) and as it is (pixels fastest):
    the same output and gradients, both the reference's, every gradient in the input's layout."""
    case = Case(2, 8, 5, 6, 4, (3, 3), padding=1, groups=2, offset_groups=2).on_device()
    seed = seed_of("gather-layout", case.id, deterministic)
    tensors = make_inputs(case, seed)
    grad_output = grad_output_for(case, seed)
    expected = run_deform_conv(reference_deform_conv2d, tensors, case.conv, grad_output)
    results = {}
    for layout in ("channels_last", "input"):
        monkeypatch.setattr(dcn_policy, "_gather_layout", layout)
        launches.clear()
        if deterministic:
            with deterministic_algorithms():
                results[layout] = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
        else:
            results[layout] = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
        fastest = {arguments["CHANNELS_FASTEST"] for name, arguments in launches if name in GEMM_KERNELS}
        assert fastest == {layout == "channels_last"}
        assert results[layout][1]["input"].is_contiguous(), "grad_input in the input's (NCHW) layout"
        assert_matches(results[layout], expected, 1e-9, f"{layout}: ")
    assert_matches(results["channels_last"], results["input"], 1e-12, "channels_last vs input: ")


# --- gradcheck ----------------------------------------------------------------------------------


def test_gradcheck():
    """Finite differences agree with the backward for every argument (offsets kept off the kinks)."""
    case = Case(1, 2, 3, 4, 2, (2, 2), padding=1, offset_groups=2)
    gen = generator(seed_of("gradcheck"))
    ho, wo = case.out_size()
    # Whole pixels plus a fraction in [0.2, 0.8]: every coordinate stays >= 0.2 away from an integer,
    # where bilinear sampling (and the image border) has its kinks; taps still land inside and outside.
    whole = torch.randint(-2, 3, (1, 2 * case.offset_groups * case.taps, ho, wo), generator=gen).double()
    offset = (whole + rand(whole.shape, gen, 0.2, 0.8, device="cpu")).to(DEVICE)
    tensors = make_inputs(case, seed_of("gradcheck"))
    tensors["offset"] = offset
    args = [tensors[name].detach().clone().requires_grad_() for name in ("input", "offset", "weight", "bias", "mask")]

    def fn(input, offset, weight, bias, mask):
        return stn_triton.deform_conv2d(input, offset, weight, bias, mask=mask, **case.conv)

    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


# (arguments that require a gradient, with a mask?): each alone, and DCN v1 on an image (no mask,
# the input needs no gradient), the usual first layer.
REQUIRES_GRAD = [
    pytest.param(("input",), True, id="input"),
    pytest.param(("offset",), True, id="offset"),
    pytest.param(("weight",), True, id="weight"),
    pytest.param(("bias",), True, id="bias"),
    pytest.param(("mask",), True, id="mask"),
    pytest.param(("offset", "weight", "bias"), False, id="all-but-input-v1"),
]


@pytest.mark.parametrize("wanted, with_mask", REQUIRES_GRAD)
def test_gradient_only_for_arguments_that_require_it(wanted, with_mask):
    """The backward runs with some gradients switched off and gets the others right."""
    case = Case(1, 4, 5, 6, 2, (3, 3), padding=1, groups=2, offset_groups=2, mask=with_mask).on_device()
    seed = seed_of("requires-grad", case.id)
    tensors = make_inputs(case, seed)
    grad_output = grad_output_for(case, seed)
    leaves = {name: t.detach().clone().requires_grad_(name in wanted) if t is not None else None
              for name, t in tensors.items()}
    out = stn_triton.deform_conv2d(
        leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], mask=leaves["mask"], **case.conv
    )
    grads = torch.autograd.grad(out, [leaves[name] for name in wanted], grad_output)
    expected = run_deform_conv(reference_deform_conv2d, tensors, case.conv, grad_output)
    for name, grad in zip(wanted, grads):
        assert_close_scaled(grad, expected[1][name], 1e-9, f"grad {name}")


# --- zero offsets are a plain convolution -------------------------------------------------------

CONV_CASES = [
    Case(2, 3, 5, 6, 4, (3, 3), padding=1, mask=False),
    Case(1, 4, 7, 6, 2, (3, 3), stride=2, padding=2, dilation=2, groups=2),
    Case(1, 4, 5, 7, 4, (2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=2, offset_groups=2, bias=False),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONV_CASES])
def test_zero_offsets_and_unit_mask_equal_conv2d(case):
    """The forward and the input / weight / bias gradients equal F.conv2d's; offset and mask
    gradients (taken at integer positions, where torchvision differentiates one-sidedly) equal
    the reference's."""
    case = case.on_device()
    seed = seed_of("conv", case.id)
    tensors = make_inputs(case, seed)
    tensors["offset"] = torch.zeros_like(tensors["offset"])
    if tensors["mask"] is not None:
        tensors["mask"] = torch.ones_like(tensors["mask"])
    grad_output = grad_output_for(case, seed)
    ours = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)

    def conv2d(input, offset, weight, bias, mask, stride, padding, dilation):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups=case.groups) + 0 * offset.sum()

    conv = run_deform_conv(conv2d, tensors, case.conv, grad_output)
    for name in ("input", "weight", "bias"):
        if name in ours[1]:
            assert_close_scaled(ours[1][name], conv[1][name], 1e-9, f"grad {name}")
    assert_close_scaled(ours[0], conv[0], 1e-9, "output")
    expected = run_deform_conv(reference_deform_conv2d, tensors, case.conv, grad_output)
    assert_matches(ours, expected, 1e-9)


# --- determinism --------------------------------------------------------------------------------


def crowded_offsets(case: Case, gen, target=(2.3, 3.6), spread=0.4, dtype=torch.float64) -> torch.Tensor:
    """Offsets that pull every tap of every output pixel to within ``spread`` of one input point,
    so that thousands of reads (and their gradient scatters) hit the same few pixels."""
    ho, wo = case.out_size()
    (sh, sw), (ph, pw), (dh, dw) = _pair(case.stride), _pair(case.padding), _pair(case.dilation)
    kh, kw = case.kernel
    i = torch.arange(kh, dtype=torch.float64).repeat_interleave(kw)
    j = torch.arange(kw, dtype=torch.float64).repeat(kh)
    base_y = torch.arange(ho)[None, :, None] * sh - ph + i[:, None, None] * dh  # [K, HO, 1]
    base_x = torch.arange(wo)[None, None, :] * sw - pw + j[:, None, None] * dw  # [K, 1, WO]
    shape = (case.n, case.offset_groups, case.taps, ho, wo)
    dy = target[0] - base_y + rand(shape, gen, -spread, spread, device="cpu")
    dx = target[1] - base_x + rand(shape, gen, -spread, spread, device="cpu")
    offset = torch.stack([dy, dx], dim=3).reshape(case.n, 2 * case.offset_groups * case.taps, ho, wo)
    return offset.to(dtype=dtype, device=DEVICE)


DETERMINISM_CASES = {
    "crowded": Case(1, 4, 5, 5, 3, (3, 3), padding=1, offset_groups=2),
    "grouped": Case(2, 4, 5, 6, 4, (2, 3), stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=2, offset_groups=2),
}


# Crowded taps in float32 and float16 (where atomics would reorder sums); groups in float64, where
# the comparison with the reference is tight.
DETERMINISM_PARAMS = [
    pytest.param(offsets, dtype, id=f"{offsets}-{str(dtype).replace('torch.', '')}")
    for offsets, dtype in [("crowded", torch.float32), ("crowded", torch.float16), ("grouped", torch.float64)]
]


@pytest.mark.parametrize("offsets, dtype", DETERMINISM_PARAMS)
def test_deterministic_backward_is_bitwise_reproducible(offsets, dtype):
    case = DETERMINISM_CASES[offsets].on_device()
    seed = seed_of("deterministic", case.id)
    tensors = make_inputs(case, seed, dtype)
    if offsets == "crowded":
        tensors["offset"] = crowded_offsets(case, generator(seed), dtype=dtype)
    grad_output = grad_output_for(case, seed, dtype)
    expected = run_deform_conv(reference_deform_conv2d, as_float64(tensors), case.conv, grad_output.double())
    with deterministic_algorithms():
        first = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
        second = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
    assert torch.equal(first[0], second[0]), "output differs between runs"
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"grad {name} differs between runs"
    if dtype == torch.float64:
        assert_matches(first, expected, 1e-9)
    elif dtype == torch.float32:
        assert_matches(first, expected, FLOAT32_TOL)
    else:
        assert_low_precision(first, expected, dtype)


# --- the fused promise --------------------------------------------------------------------------


def largest_allocation_during(fn) -> int:
    """Bytes of the largest tensor allocation ``fn`` makes.

    On a GPU: the peak of memory allocated beyond what was live before (an upper bound of the
    largest single allocation). On a CPU: the largest allocation the profiler records; under the
    interpreter the kernels' own tiles live in numpy and are not seen, but every torch tensor the
    op layer allocates (outputs, workspaces, column buffers) is.
    """
    if ON_GPU:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0), default=0)


@pytest.mark.skipif(not ON_GPU and not INTERPRETING, reason="the CPU fallback builds the column buffer by design")
def test_forward_allocates_no_column_buffer():
    """Cin * K is large against Cout, so the column buffer [N, Cin * K, HO * WO] dwarfs every tensor
    the forward needs (the output); the PyTorch reference, which builds it, must fail the check."""
    case = sizes(
        cpu=Case(1, 16, 6, 6, 1, (5, 5), padding=2, bias=False),
        gpu=Case(4, 64, 32, 32, 8, (5, 5), padding=2, bias=False),
    )
    tensors = make_inputs(case, seed_of("memory", case.id), torch.float32)
    ho, wo = case.out_size()
    column_bytes = case.n * case.cin * case.taps * ho * wo * 4
    output_bytes = case.n * case.cout * ho * wo * 4
    assert column_bytes >= 16 * output_bytes

    def ours():
        stn_triton.deform_conv2d(**tensors, **case.conv)

    def columns_in_memory():
        stn_triton.fallback.deform_conv2d(
            tensors["input"], tensors["offset"], tensors["weight"], None, (1, 1), (2, 2), (1, 1), tensors["mask"]
        )

    with torch.no_grad():
        ours()  # warm-up: compilation and autotuning are not the forward
        ours_bytes = largest_allocation_during(ours)
        reference_bytes = largest_allocation_during(columns_in_memory)
    assert ours_bytes < column_bytes // 4, (
        f"the forward allocated {ours_bytes} bytes at once; the column buffer is {column_bytes}"
    )
    assert reference_bytes >= column_bytes, (
        f"the check cannot fail: a column-buffer implementation allocated only {reference_bytes} bytes at once"
    )


# --- non-finite and huge offsets ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_finite_and_huge_offsets_read_nothing(dtype):
    """nan, inf and coordinates past int32 make their tap read 0 (no wrap-around into the image, no
    out-of-bounds access); every other tap, the output and every gradient stay finite and right."""
    case = Case(2, 2, 5, 6, 2, (3, 3), padding=1).on_device()
    seed = seed_of("non-finite", case.id)
    tensors = make_inputs(case, seed, dtype)
    specials = torch.tensor(
        [math.nan, math.inf, -math.inf, 1e30, -1e30, 3e9, -3e9, 2.0e9, -2.0e9, 2.0**31, -(2.0**31) - 5.5, 1e6],
        dtype=dtype,
    )
    flat = tensors["offset"].view(-1)
    picks = torch.randperm(flat.numel(), generator=generator(seed))[: 4 * specials.numel()]
    flat[picks.to(DEVICE)] = specials.repeat(4).to(DEVICE)
    grad_output = grad_output_for(case, seed, dtype)
    ours = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
    expected = run_deform_conv(reference_deform_conv2d, as_float64(tensors), case.conv, grad_output.double())
    assert torch.isfinite(ours[0]).all(), "non-finite output"
    for name, grad in ours[1].items():
        assert torch.isfinite(grad).all(), f"non-finite grad {name}"
    assert_matches(ours, expected, 1e-9 if dtype == torch.float64 else FLOAT32_TOL)


# --- on a GPU: torchvision and torch.compile ----------------------------------------------------

# Realistic layers: a DCNv2 block of a small backbone, the same past torchvision's 32-image
# chunks, and a ResNet-50 stage-4 style 256 -> 256 3x3 layer.
TORCHVISION_CASES = [
    pytest.param(Case(8, 64, 28, 28, 64, (3, 3), padding=1), id="N8-64to64-28x28-k3-p1-mask-bias"),
    pytest.param(
        Case(33, 64, 28, 28, 64, (3, 3), padding=1, offset_groups=2, bias=False), id="N33-64to64-28x28-og2-mask"
    ),
    pytest.param(Case(8, 256, 14, 14, 256, (3, 3), padding=1, bias=False), id="N8-256to256-14x14-r50-mask"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", TORCHVISION_CASES)
def test_matches_torchvision(case, dtype):
    """float32 close to torchvision's float32; float16 within 2x torchvision's own float16 error
    against torchvision in float64 on the same rounded values. Forward and every gradient."""
    torchvision = pytest.importorskip("torchvision")
    seed = seed_of("torchvision", case.id)
    tensors = make_inputs(case, seed, dtype)
    grad_output = grad_output_for(case, seed, dtype)
    ours = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # torchvision's addmm in full float32, as ours
    try:
        theirs = run_deform_conv(torchvision.ops.deform_conv2d, tensors, case.conv, grad_output)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    if dtype == torch.float32:
        assert_matches(ours, theirs, 1e-4, "vs torchvision float32: ")
        return
    exact = run_deform_conv(torchvision.ops.deform_conv2d, as_float64(tensors), case.conv, grad_output.double())
    assert_within_low_precision_rule(ours[0], theirs[0], exact[0], dtype, "output")
    for name in exact[1]:
        assert_within_low_precision_rule(ours[1][name], theirs[1][name], exact[1][name], dtype, f"grad {name}")


@pytest.mark.gpu
def test_torchvision_agrees_with_the_reference():
    """The reference's conventions (channel order, tap order, border rule) are torchvision's."""
    torchvision = pytest.importorskip("torchvision")
    case = Case(3, 4, 7, 9, 4, (2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2, offset_groups=2)
    seed = seed_of("torchvision-reference", case.id)
    tensors = make_inputs(case, seed)
    grad_output = grad_output_for(case, seed)
    theirs = run_deform_conv(torchvision.ops.deform_conv2d, tensors, case.conv, grad_output)
    expected = run_deform_conv(reference_deform_conv2d, tensors, case.conv, grad_output)
    assert_matches(theirs, expected, 1e-9, "torchvision vs reference: ")


@pytest.mark.gpu
def test_torch_compile_fullgraph_matches_eager():
    case = Case(4, 16, 17, 19, 32, (3, 3), padding=1, offset_groups=2)
    seed = seed_of("compile", case.id)
    tensors = make_inputs(case, seed, torch.float32)
    grad_output = grad_output_for(case, seed, torch.float32)
    compiled = torch.compile(stn_triton.deform_conv2d, fullgraph=True)
    eager = run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv, grad_output)
    ours = run_deform_conv(compiled, tensors, case.conv, grad_output)
    assert_matches(ours, eager, 1e-6, "compiled vs eager: ")


def test_a_channel_slice_of_a_channels_last_tensor_stays_channels_last():
    """A view whose channels are innermost but not dense (a channel slice of an NHWC tensor) is made
    dense in its own layout, not copied to NCHW; the result is the reference's."""
    case = Case(2, 4, 5, 6, 4, (3, 3), padding=1).on_device()
    tensors = make_inputs(case, seed_of("channel-slice"))
    wide = torch.cat([tensors["input"], tensors["input"]], dim=1).contiguous(memory_format=torch.channels_last)
    tensors["input"] = wide[:, :4]
    assert not tensors["input"].is_contiguous(memory_format=torch.channels_last)
    with tuning.captured_launches() as launches:
        run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv)
    strides = {arguments["sx_c"] for launch, arguments in launches if launch.tuned.name == "deform_conv_fwd"}
    assert strides == {1}, "gathered from channels-last memory"
    assert_matches(run_deform_conv(stn_triton.deform_conv2d, tensors, case.conv),
                   run_deform_conv(reference_deform_conv2d, as_float64(tensors), case.conv), 1e-9)
