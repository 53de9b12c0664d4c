"""The deformable aggregation of DCNv3 / DCNv4 (stn_triton/ops/dcnv3.py, the attention kernel's GRID
mode) against a float64 reference written here from InternImage's definition: each output pixel's
kernel taps, moved by ``offset_scale * offset`` (x first) in pixels with integer centres, read
bilinearly with zeros outside, weighted by the mask and summed per group."""

import pytest
import torch

import stn_triton
import stn_triton.ops.dcnv3 as dcnv3_op
from conftest import DEVICE, deterministic_algorithms, generator, rand, randn
from stn_triton.ops.dcnv3 import DcnSpec, dcn_aggregate

pytestmark = pytest.mark.skipif(stn_triton.backend(torch.empty(0, device=DEVICE)) == "torch",
                                reason="the op layer runs the Triton kernels (interpreter or GPU)")


def reference(input, offset, mask, spec: DcnSpec):
    """[N, H, W, G * D] -> [N, Ho, Wo, G * D] in float64, from the definition."""
    x = input.double().cpu()
    n, h, w, c = x.shape
    g, k = spec.group, spec.points
    ho, wo = spec.output_size(h, w)
    if spec.packed:
        rows = offset.double().cpu()[..., :g * 3 * k].reshape(n, ho, wo, g, 3 * k)
        off, weights = rows[..., :2 * k].reshape(n, ho, wo, g, k, 2), rows[..., 2 * k:]
    else:
        off = offset.double().cpu().reshape(n, ho, wo, g, k, 2)
        weights = mask.double().cpu().reshape(n, ho, wo, g, k)
    if spec.softmax:
        weights = weights.softmax(-1)
    half_w = spec.dilation_w * (spec.kernel_w - 1) // 2
    half_h = spec.dilation_h * (spec.kernel_h - 1) // 2
    centre_x = (torch.arange(wo, dtype=torch.float64) * spec.stride_w + half_w - spec.pad_w).view(1, 1, wo, 1)
    centre_y = (torch.arange(ho, dtype=torch.float64) * spec.stride_h + half_h - spec.pad_h).view(1, ho, 1, 1)
    taps = [(i, j) for i in range(spec.kernel_w) for j in range(spec.kernel_h)
            if not (spec.remove_center and i == spec.kernel_w // 2 and j == spec.kernel_h // 2)]
    rows_of = x.view(n, h * w, g, c // g)
    out = torch.zeros(n, ho, wo, g, c // g, dtype=torch.float64)
    for t, (i, j) in enumerate(taps):
        px = centre_x + spec.offset_scale * (i * spec.dilation_w - half_w + off[..., t, 0])
        py = centre_y + spec.offset_scale * (j * spec.dilation_h - half_h + off[..., t, 1])
        x0, y0 = px.floor(), py.floor()
        fx, fy = px - x0, py - y0
        for dx, dy, corner in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                               (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            row = torch.where(inside, yi * w + xi, torch.zeros_like(xi)).long().reshape(n, -1, g, 1)
            read = torch.gather(rows_of, 1, row.expand(-1, -1, -1, c // g)).view(n, ho, wo, g, c // g)
            out += (weights[..., t] * torch.where(inside, corner, torch.zeros_like(corner)))[..., None] * read
    return out.reshape(n, ho, wo, c)


# (kernel h, w, stride h, w, pad h, w, dilation h, w, remove_center, offset_scale, group, group channels, H, W)
GEOMETRIES = [
    pytest.param((3, 3, 1, 1, 1, 1, 1, 1, False, 1.0, 2, 4, 5, 7), id="3x3-s1"),
    pytest.param((3, 3, 2, 2, 1, 1, 1, 1, True, 0.7, 3, 5, 6, 5), id="3x3-s2-remove-center"),
    pytest.param((1, 3, 1, 2, 0, 2, 1, 2, False, 2.0, 1, 3, 4, 9), id="1x3-dilated"),
    pytest.param((5, 5, 1, 1, 4, 2, 2, 2, True, 1.0, 2, 2, 7, 6), id="5x5-dilated-remove-center"),
]


def _case(geometry, packed: bool, softmax: bool, seed: int):
    kh, kw, sh, sw, ph, pw, dh, dw, remove_center, scale, g, d, h, w = geometry
    spec = DcnSpec(kh, kw, sh, sw, ph, pw, dh, dw, g, scale, remove_center, packed, softmax, torch.float64)
    ho, wo = spec.output_size(h, w)
    gen = generator(seed)
    x = randn((2, h, w, g * d), gen)
    if packed:
        offset, mask = rand((2, ho, wo, -(-g * 3 * spec.points // 8) * 8), gen, -2.0, 2.0), None
    else:
        offset = rand((2, ho, wo, g * spec.points * 2), gen, -2.0, 2.0)
        mask = rand((2, ho, wo, g * spec.points), gen, 0.0, 1.0)
    return spec, x, offset, mask


@pytest.mark.parametrize("packed, softmax", [(False, False), (True, False), (True, True)],
                         ids=["dcnv3", "dcnv4", "dcnv4-softmax"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_forward_and_gradients_equal_the_reference(geometry, packed, softmax):
    spec, x, offset, mask = _case(geometry, packed, softmax, 3)
    inputs = [t.requires_grad_() for t in (x, offset, mask) if t is not None]
    out = dcn_aggregate(x, offset, mask, spec)
    expected = reference(x, offset, mask, spec)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-12, rtol=1e-12)
    direction = randn(out.shape, generator(4))
    grads = torch.autograd.grad(out, inputs, direction)
    expected_grads = torch.autograd.grad(expected, inputs, direction.cpu())
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad.cpu(), want, atol=1e-10, rtol=1e-10)


def test_a_centre_tap_with_a_unit_offset_reads_the_next_pixel():
    """By hand: a 3x3 kernel whose mask keeps only the centre, offset (1, 0): output = input shifted one
    pixel along x (zeros past the edge); offset (0, 0.5): the mean of a pixel and the one below."""
    spec = DcnSpec(3, 3, 1, 1, 1, 1, 1, 1, 1, 1.0, False, False, False, torch.float64)
    x = torch.arange(12, dtype=torch.float64, device=DEVICE).view(1, 3, 4, 1)
    mask = torch.zeros(1, 3, 4, 9, dtype=torch.float64, device=DEVICE)
    mask[..., 4] = 1
    offset = torch.zeros(1, 3, 4, 18, dtype=torch.float64, device=DEVICE)
    offset[..., 8] = 1
    shifted = dcn_aggregate(x, offset, mask, spec)[0, :, :, 0]
    assert shifted.tolist() == [[1, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]]
    offset.zero_()
    offset[..., 9] = 0.5
    below = dcn_aggregate(x, offset, mask, spec)[0, :, :, 0]
    assert below.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [4, 4.5, 5, 5.5]]


def _one_point(point: int, points: int, size=(3, 5)):
    """An arange image [1, H, W, 1] (value 5 y + x), zero offsets and a mask keeping one point."""
    x = torch.arange(size[0] * size[1], dtype=torch.float64, device=DEVICE).view(1, *size, 1)
    offset = torch.zeros(1, *size, 2 * points, dtype=torch.float64, device=DEVICE)
    mask = torch.zeros(1, *size, points, dtype=torch.float64, device=DEVICE)
    mask[..., point] = 1
    return x, offset, mask


def test_by_hand_the_tap_order_dilation_offset_scale_and_remove_center():
    """By hand, through the public op, on a 3 x 5 image of value 5 y + x, a 3x3 kernel with
    dilation_w 2 (pad 1, 2: the output keeps the size): the points run x-major, so point 1 is
    column 0, row 1 (2 pixels left, x = col - 2) and point 3 is column 1, row 0 (one row up);
    offset_scale 0.5 scales the kernel's reach (point 5, one row down, reads half a row down); with
    remove_center the centre is dropped from that order, so point 4 is column 1, row 2."""
    geometry = dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=2, dilation_h=1, dilation_w=2,
                    group=1, group_channels=1)
    x, offset, mask = _one_point(1, 9)
    left = stn_triton.dcnv3(x, offset, mask, offset_scale=1.0, **geometry)[0, :, :, 0]
    assert left.tolist() == [[0, 0, 0, 1, 2], [0, 0, 5, 6, 7], [0, 0, 10, 11, 12]]
    x, offset, mask = _one_point(3, 9)
    up = stn_triton.dcnv3(x, offset, mask, offset_scale=1.0, **geometry)[0, :, :, 0]
    assert up.tolist() == [[0, 0, 0, 0, 0], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    x, offset, mask = _one_point(5, 9)
    half = stn_triton.dcnv3(x, offset, mask, offset_scale=0.5, **geometry)[0, :, :, 0]
    assert half.tolist() == [[2.5, 3.5, 4.5, 5.5, 6.5], [7.5, 8.5, 9.5, 10.5, 11.5], [5, 5.5, 6, 6.5, 7]]
    x, offset, mask = _one_point(4, 8)
    down = stn_triton.dcnv3(x, offset, mask, offset_scale=1.0, remove_center=True, **geometry)[0, :, :, 0]
    assert down.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [0, 0, 0, 0, 0]]


def test_by_hand_dcnv4_packs_each_group_s_offsets_then_its_mask():
    """Two groups of one channel, a 1x1 kernel (K = 1): group 0's row is (x, y, mask) at positions
    0-2 and group 1's at 3-5, then padding up to 8 that is never read. Group 0 moves one pixel
    right with weight 2, group 1 one row down with weight 1; NaN in the padding changes nothing."""
    x = torch.arange(15, dtype=torch.float64, device=DEVICE).view(1, 3, 5, 1).expand(1, 3, 5, 2).contiguous()
    offset_mask = torch.zeros(1, 3, 5, 8, dtype=torch.float64, device=DEVICE)
    offset_mask[..., 0], offset_mask[..., 2] = 1, 2
    offset_mask[..., 4], offset_mask[..., 5] = 1, 1
    offset_mask[..., 6:] = float("nan")
    out = stn_triton.dcnv4(x, offset_mask, 1, 1, 1, 1, 0, 0, 1, 1, group=2, group_channels=1, offset_scale=1.0)
    assert out[0, :, :, 0].tolist() == [[2, 4, 6, 8, 0], [12, 14, 16, 18, 0], [22, 24, 26, 28, 0]]
    assert out[0, :, :, 1].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [0, 0, 0, 0, 0]]


def test_strided_inputs_are_read_as_they_are():
    """An NCHW-strided input and a sliced offset give the contiguous result."""
    spec, x, offset, mask = _case(GEOMETRIES[0].values[0], False, False, 5)
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    wide = torch.cat([offset, offset], dim=-1)[..., :offset.shape[-1]]
    torch.testing.assert_close(dcn_aggregate(strided, wide, mask, spec), dcn_aggregate(x, offset, mask, spec),
                               atol=0, rtol=0)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_the_kernel_reads_nhwc_and_nchw_strided_inputs_in_place(packed, monkeypatch):
    """The tensors the attention kernel gets are views of the caller's: no copy of a dense NHWC
    input, of an NCHW-strided one or of the offsets (DCNv4's padded offset_mask included)."""
    seen = []
    real = dcnv3_op.attention_forward

    def recording(value, shapes, starts, points, loc, attn, *rest, **options):
        seen.append((value.data_ptr(), loc.data_ptr()))
        return real(value, shapes, starts, points, loc, attn, *rest, **options)

    monkeypatch.setattr(dcnv3_op, "attention_forward", recording)
    spec, x, offset, mask = _case(GEOMETRIES[0].values[0], packed, False, 9)
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    for tensor in (x, strided):
        dcn_aggregate(tensor, offset, mask, spec)
        assert seen.pop() == (tensor.data_ptr(), offset.data_ptr())


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_deterministic_backward_repeats_bitwise_and_matches_the_atomic_one(packed):
    spec, x, offset, mask = _case(GEOMETRIES[1].values[0], packed, False, 6)
    spec = DcnSpec(*[getattr(spec, f) for f in spec.__dataclass_fields__ if f != "out_dtype"], torch.float32)
    x = x.float().requires_grad_()
    direction = randn((2, 3, 3, x.shape[-1]), generator(7), torch.float32)
    with deterministic_algorithms():
        first = torch.autograd.grad(dcn_aggregate(x, offset, mask, spec), x, direction)[0]
        again = torch.autograd.grad(dcn_aggregate(x, offset, mask, spec), x, direction)[0]
    atomic = torch.autograd.grad(dcn_aggregate(x, offset, mask, spec), x, direction)[0]
    assert torch.equal(first, again)
    torch.testing.assert_close(first, atomic, atol=1e-5, rtol=1e-5)


def test_non_finite_offsets_read_nothing():
    spec, x, offset, mask = _case(GEOMETRIES[0].values[0], False, False, 8)
    offset[0, 1, 2, :2] = float("nan")
    offset[1, 0, 0, 2:4] = float("inf")
    offset[1, 2, 3, 4:6] = -1e30
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    out = dcn_aggregate(*leaves, spec)
    torch.testing.assert_close(out.detach().cpu(), reference(x.detach(), offset.detach().nan_to_num(nan=1e30),
                                                             mask.detach(), spec), atol=1e-12, rtol=1e-12)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), leaves))
