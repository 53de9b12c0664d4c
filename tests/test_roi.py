"""RoI align, position-sensitive RoI align, deformable RoI pooling and multi-scale RoI align against
float64 references written here from the ops' definitions (Mask R-CNN's RoI align with
torchvision's sampling and clamping rules, R-FCN's position-sensitive channel map, Deformable
ConvNets' bin offsets and v2's modulation); against torchvision itself where it imports; and a
torchvision Mask R-CNN training step under deterministic algorithms with the swap on."""

import math
import re
import zlib

import pytest
import torch

import stn_triton
from conftest import (
    DEVICE,
    LOW_PRECISION_FLOOR,
    assert_close_scaled,
    deterministic_algorithms,
    generator,
    rand,
    randn,
    sizes,
)

try:
    import torchvision
    from torchvision import ops as tv_ops
except Exception:  # not installed, or a build that does not import beside this torch
    torchvision = None
needs_torchvision = pytest.mark.skipif(torchvision is None, reason="torchvision does not import here")

ALIGN, PS, DEFORM = "align", "ps", "deform"


def _bilinear(x, n, channels, y, xx):
    """torchvision's RoI bilinear rule on one image: 0 outside [-1, H] x [-1, W], coordinates below
    0 read at 0, the last row / column clamped; ``channels`` a list of channel indices."""
    _, _, h, w = x.shape
    if not (-1.0 <= y.item() <= h and -1.0 <= xx.item() <= w):
        return x.new_zeros(len(channels))
    y = torch.clamp(y, min=0.0)
    xx = torch.clamp(xx, min=0.0)
    y0, x0 = int(math.floor(y.item())), int(math.floor(xx.item()))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = y.new_tensor(float(y0))
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        xx = xx.new_tensor(float(x0))
    else:
        x1 = x0 + 1
    ly, lx = y - y0, xx - x0
    hy, hx = 1 - ly, 1 - lx
    c = torch.tensor(channels)
    return (hy * hx * x[n, c, y0, x0] + hy * lx * x[n, c, y0, x1] + ly * hx * x[n, c, y1, x0]
            + ly * lx * x[n, c, y1, x1])


def reference(kind, x, rois, size, scale, sampling_ratio, aligned=False, offset=None, mask=None, gamma=0.1):
    """float64 loops from the definitions; differentiable in x, offset and mask. A RoI whose image
    index is not one of the batch's pools to 0."""
    x = x.double()
    n_images, channels, h, w = x.shape
    ph_, pw_ = size
    out_channels = channels // (ph_ * pw_) if kind == PS else channels
    shift = 0.5 if (kind != ALIGN or aligned) else 0.0
    rows = []
    for k in range(rois.shape[0]):
        b, x1, y1, x2, y2 = rois[k].double().tolist()
        bins = []
        valid = -1 < b < n_images
        n = int(b) if valid else 0
        start_w, start_h = x1 * scale - shift, y1 * scale - shift
        roi_w, roi_h = x2 * scale - shift - start_w, y2 * scale - shift - start_h
        if kind == ALIGN and not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / pw_, roi_h / ph_
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph_)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw_)
        count = grid_h * grid_w if kind == PS else max(grid_h * grid_w, 1)
        for ph in range(ph_):
            for pw in range(pw_):
                if not valid:
                    bins.append(x.new_zeros(out_channels))
                    continue
                hs, ws = x.new_tensor(start_h), x.new_tensor(start_w)
                if offset is not None:
                    ws = ws + gamma * roi_w * offset[k, 0, ph, pw].double()
                    hs = hs + gamma * roi_h * offset[k, 1, ph, pw].double()
                cs = ([c * ph_ * pw_ + ph * pw_ + pw for c in range(out_channels)] if kind == PS
                      else list(range(channels)))
                total = x.new_zeros(out_channels)
                for iy in range(grid_h):
                    y = hs + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        xx = ws + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total = total + _bilinear(x, n, cs, y, xx)
                value = total / count if count else total / 0.0
                if mask is not None:
                    value = value * mask[k, 0, ph, pw].double()
                bins.append(value)
        rows.append(torch.stack(bins, -1).view(out_channels, ph_, pw_) if bins else x.new_zeros(out_channels, ph_, pw_))
    return torch.stack(rows) if rows else x.new_zeros(0, out_channels, ph_, pw_)


def ours(kind, x, rois, size, scale, sampling_ratio, aligned=False, offset=None, mask=None, gamma=0.1):
    if kind == ALIGN:
        return stn_triton.roi_align(x, rois, size, scale, sampling_ratio, aligned)
    if kind == PS:
        return stn_triton.ps_roi_align(x, rois, size, scale, sampling_ratio)
    return stn_triton.deform_roi_pool(x, rois, offset, size, scale, sampling_ratio, gamma, mask)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_rois(k, n, h, w, scale, gen, dtype=torch.float64):
    """RoIs in box units (input pixels / scale): some inside, some partly or wholly outside, some
    thinner than a pixel."""
    x1 = rand((k,), gen, -0.3 * w, 1.1 * w)
    y1 = rand((k,), gen, -0.3 * h, 1.1 * h)
    width = rand((k,), gen, 0.0, 0.9 * w)
    height = rand((k,), gen, 0.0, 0.9 * h)
    if k > 2:
        width[1] = 0.2  # thinner than a pixel
        height[2] = 0.0
    batch = torch.randint(0, n, (k,), generator=gen).double().to(DEVICE)
    return (torch.stack([batch, x1, y1, x1 + width, y1 + height], 1) / torch.tensor([1, scale, scale, scale, scale],
            dtype=torch.float64, device=DEVICE)).to(dtype)


def make_case(kind, n, c, h, w, k, size, scale, seed, dtype=torch.float64):
    gen = generator(seed)
    channels = c * size[0] * size[1] if kind == PS else c
    x = randn((n, channels, h, w), gen, dtype)
    rois = make_rois(k, n, h, w, scale, gen, dtype)
    offset = randn((k, 2, *size), gen, dtype) if kind == DEFORM else None
    mask = rand((k, 1, *size), gen, 0.0, 1.0, dtype) if kind == DEFORM else None
    return x, rois, offset, mask


def with_grads(fn, tensors, grad_output=None):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grad_output = torch.randn(out.shape, generator=generator(1), dtype=torch.float64).to(out) \
        if grad_output is None else grad_output
    if not out.requires_grad:  # a reference that reads no pixel (every RoI outside) depends on nothing
        return (out.detach(), *[torch.zeros_like(t) for t in leaves])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_output, allow_unused=True, materialize_grads=True))


SHAPES = sizes(
    cpu=[(1, 1, 1, 1, 1, (1, 1)), (2, 3, 7, 9, 5, (3, 2)), (3, 2, 5, 4, 4, (2, 3))],
    gpu=[(1, 1, 1, 1, 1, (1, 1)), (2, 33, 37, 29, 65, (7, 7)), (3, 64, 25, 50, 130, (14, 14))],
)
SHAPE_IDS = ["N{}-C{}-{}x{}-K{}-{}x{}".format(*s[:5], *s[5]) for s in SHAPES]


def _kind_arguments(kind, x, rois, size, scale, sr, aligned, offset, mask):
    tensors = [x] if kind != DEFORM else [x, offset, mask]

    def call(fn):
        if kind == DEFORM:
            return lambda a, o, m: fn(kind, a, rois, size, scale, sr, True, o, m)
        return lambda a: fn(kind, a, rois, size, scale, sr, aligned)

    return tensors, call


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # PS's 0 / 0 bins in numpy
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("n, c, h, w, k, size", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind, sampling_ratio, aligned", [
    (ALIGN, 2, False), (ALIGN, -1, True), (ALIGN, 0, False), (ALIGN, 3, True), (PS, 2, True), (PS, -1, True),
    (DEFORM, 0, True), (DEFORM, 2, True)], ids=lambda v: str(v))
def test_equals_the_reference_forward_and_backward(n, c, h, w, k, size, kind, sampling_ratio, aligned):
    scale = 0.5 if kind != PS else 1.0
    x, rois, offset, mask = make_case(kind, n, c, h, w, k, size, scale, seed_of(n, c, h, w, kind, sampling_ratio))
    tensors, call = _kind_arguments(kind, x, rois, size, scale, sampling_ratio, aligned, offset, mask)
    expected = with_grads(call(reference), tensors)
    got = with_grads(call(ours), tensors)
    names = ["output", "grad input", "grad offset", "grad mask"]
    for what, a, b in zip(names, got, expected):
        if kind == PS and what == "output":  # an empty RoI's adaptive bins are 0 / 0, as torchvision's
            assert torch.equal(a.isnan(), b.isnan()), "NaN bins differ"
            a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
        assert_close_scaled(a, b, 1e-12, what)


def test_a_bin_on_pixel_centres_reads_them():
    """Hand-made: the aligned RoI x 1..3, y 0..2 (pixel i's centre at i + 0.5) of one bin with 2 x 2
    samples puts them on the centres of rows 0-1, columns 1-2: their mean."""
    x = torch.arange(20, dtype=torch.float64, device=DEVICE).view(1, 1, 4, 5)
    rois = torch.tensor([[0, 1.0, 0.0, 3.0, 2.0]], dtype=torch.float64, device=DEVICE)
    out = stn_triton.roi_align(x, rois, 1, 1.0, 2, aligned=True)
    torch.testing.assert_close(out.view(()), x[0, 0, 0:2, 1:3].mean())
    # legacy (aligned=False): a 0 x 0 RoI is widened to 1 x 1 and still reads
    point = torch.tensor([[0, 2.0, 1.0, 2.0, 1.0]], dtype=torch.float64, device=DEVICE)
    legacy = stn_triton.roi_align(x, point, 1, 1.0, 1, aligned=False)
    torch.testing.assert_close(legacy.view(()), x[0, 0, 1:3, 2:4].mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", [ALIGN, PS, DEFORM])
def test_every_dtype_accumulates_in_float32(kind, dtype):
    """The reference on the same (rounded) inputs: float32 within its rounding, half precision within
    the output's rounding (float32 arithmetic inside), gradients likewise."""
    n, c, h, w, k, size = SHAPES[1]
    x, rois, offset, mask = (t if t is None else t.to(dtype) for t in make_case(kind, n, c, h, w, k, size, 0.5,
                                                                               seed_of("dtype", kind, dtype)))
    tensors, call = _kind_arguments(kind, x, rois, size, 0.5, 2, True, offset, mask)
    out_channels = c
    grad_output = torch.randn((k, out_channels, *size), generator=generator(1), dtype=torch.float64).to(DEVICE)
    got = with_grads(call(ours), tensors, grad_output.to(dtype))
    expected = with_grads(call(reference), [t.double() for t in tensors], grad_output)
    tol = 1e-5 if dtype == torch.float32 else 2 * LOW_PRECISION_FLOOR[dtype]
    for what, a, b in zip(["output", "grad input", "grad offset", "grad mask"], got, expected):
        assert a.dtype == dtype, f"{what} dtype"
        # The offsets' gradient sums over channels and samples products of gradients and pixel
        # differences, each rounded to the dtype: allow the rounding of the terms it sums.
        assert_close_scaled(a.double().nan_to_num(0.0), b.nan_to_num(0.0), tol * (8 if what == "grad offset" else 1),
                            what)


def test_channels_last_and_strided_views_are_read_as_they_are():
    """A channels_last input keeps its layout in the output and the gradient; an input sliced out of a
    wider tensor, RoIs and offsets that are views, and the stride-0 gradient of .sum()."""
    n, c, h, w, k, size = SHAPES[1]
    x, rois, offset, mask = make_case(DEFORM, n, c, h, w, k, size, 0.5, seed_of("strides"))
    expected = with_grads(lambda a, o, m: reference(DEFORM, a, rois, size, 0.5, 2, True, o, m).sum()[None],
                          (x, offset, mask), torch.ones(1, dtype=torch.float64, device=DEVICE))
    for variant in ("channels_last", "sliced"):
        if variant == "channels_last":
            xv = x.contiguous(memory_format=torch.channels_last)
        else:
            xv = torch.cat([x, x], 1)[:, ::2] if c == 1 else torch.cat([x, torch.zeros_like(x)], 1)[:, :c]
        rois_view = torch.cat([rois, rois], 1)[:, :5]
        offset_view = offset.transpose(2, 3).contiguous().transpose(2, 3)
        leaves = [xv.detach().requires_grad_(), offset_view.detach().requires_grad_(), mask.detach().requires_grad_()]
        out = stn_triton.deform_roi_pool(leaves[0], rois_view, leaves[1], size, 0.5, 2, 0.1, leaves[2])
        grads = torch.autograd.grad(out.sum(), leaves)
        if variant == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last) and grads[0].is_contiguous(
                memory_format=torch.channels_last)
        assert_close_scaled(out.sum(), expected[0][0], 1e-12, f"{variant} output")
        for what, a, b in zip(("input", "offset", "mask"), grads, expected[1:]):
            assert_close_scaled(a, b, 1e-12, f"{variant} grad {what}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0 in numpy
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_out_of_image_and_non_finite_rois_never_read_or_write_out_of_bounds(deterministic):
    """RoIs far outside, huge, non-finite or naming an image the batch does not have: finite results
    (0 for an image index outside the batch or a box whose samples all lie outside), the other
    RoIs as the reference pools them, gradients finite."""
    n, c, h, w = 2, 3, 5, 6
    gen = generator(seed_of("oob"))
    x = randn((n, c, h, w), gen)
    good = make_rois(4, n, h, w, 1.0, gen)
    specials = [[0, 1e30, 1.0, 2e30, 3.0], [1, -1e30, -1e30, 1e30, 1e30], [0, 100.0, 100.0, 120.0, 130.0],
                [2, 1.0, 1.0, 3.0, 3.0], [-1, 1.0, 1.0, 3.0, 3.0], [1e12, 1.0, 1.0, 3.0, 3.0],
                [float("nan"), 1.0, 1.0, 3.0, 3.0], [0, float("nan"), 1.0, 3.0, 3.0], [1, 1.0, float("inf"), 3.0, 4.0],
                [0, -float("inf"), 1.0, float("inf"), 3.0]]
    rois = torch.cat([good, torch.tensor(specials, dtype=torch.float64, device=DEVICE)])
    offset = randn((rois.shape[0], 2, 2, 2), gen)
    offset[-1, 0, 0, 0] = float("nan")
    for kind in (ALIGN, DEFORM):
        leaves = [x.clone().requires_grad_(), offset.clone().requires_grad_()]
        with deterministic_algorithms() if deterministic else torch.enable_grad():
            out = ours(kind, leaves[0], rois, (2, 2), 1.0, 2, True, leaves[1] if kind == DEFORM else None)
            grads = torch.autograd.grad(out.sum(), leaves[:1 if kind == ALIGN else 2])
        assert torch.isfinite(out[:4 + 6]).all() and (out[4 + 3:4 + 7] == 0).all(), kind
        assert_close_scaled(out[:4], reference(kind, x, good, (2, 2), 1.0, 2, True, offset[:4] if kind == DEFORM
                                               else None), 1e-12, f"{kind} good RoIs")
        assert (out[4:4 + 3].abs() < 1e3).all()
        assert torch.isfinite(grads[0]).all(), f"{kind} grad input"


@pytest.mark.parametrize("boxes_as", ["tensor", "list", "list with an empty image"])
def test_boxes_as_tensor_or_list_and_empty(boxes_as):
    n, c, h, w, k, size = SHAPES[1]
    x, rois, _, _ = make_case(ALIGN, n, c, h, w, k, size, 1.0, seed_of("boxes"))
    if boxes_as == "tensor":
        boxes = rois
    else:
        images = [rois[rois[:, 0] == i, 1:] for i in range(n)]
        if boxes_as == "list with an empty image":
            images[0] = images[0][:0]
        boxes = images
        rois = stn_triton.functional.boxes_to_rois(images)
    torch.testing.assert_close(stn_triton.roi_align(x, boxes, size, 1.0, 2), reference(ALIGN, x, rois, size, 1.0, 2))
    empty = x.new_zeros(0, 5)
    leaf = x.clone().requires_grad_()
    out = stn_triton.roi_align(leaf, empty, size)
    assert out.shape == (0, c, *size)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("kind", [ALIGN, PS, DEFORM])
def test_gradcheck(kind):
    size = (2, 1)
    x, rois, offset, mask = make_case(kind, 2, 2, 4, 5, 3, size, 1.0, seed_of("gradcheck", kind))
    rois = torch.tensor([[0, 0.7, 0.3, 3.1, 2.6], [1, 1.2, -0.4, 4.4, 3.3], [1, 0.1, 0.9, 2.2, 3.8]],
                        dtype=torch.float64, device=DEVICE)
    tensors, call = _kind_arguments(kind, x, rois, size, 1.0, 2, True, offset, mask)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(call(ours), leaves)


def test_double_backward_through_the_input_gradient():
    """A penalty on grad_input differentiated by grad_output, the offsets and the mask."""
    size = (2, 2)
    x, rois, offset, mask = make_case(DEFORM, 2, 2, 5, 4, 3, size, 1.0, seed_of("double"))
    go = randn((3, 2, *size), generator(5))
    v = randn(x.shape, generator(6))
    results = []
    for fn in (ours, reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask, go)]
        out = fn(DEFORM, leaves[0], rois, size, 1.0, 2, True, leaves[1], leaves[2])
        (g_x,) = torch.autograd.grad((out * leaves[3]).sum(), leaves[0], create_graph=True)
        results.append(torch.autograd.grad((g_x * v).sum(), leaves[1:]))
    for what, a, b in zip(("offset", "mask", "grad_output"), *results):
        assert_close_scaled(a, b, 1e-11, what)


def test_second_derivatives_of_the_offset_gradient_raise():
    x, rois, offset, mask = make_case(DEFORM, 1, 2, 4, 4, 2, (2, 2), 1.0, seed_of("no-double"))
    leaves = [t.detach().clone().requires_grad_() for t in (x, offset)]
    out = stn_triton.deform_roi_pool(leaves[0], rois, leaves[1], (2, 2))
    (g_offset,) = torch.autograd.grad(out.sum(), leaves[1], create_graph=True)
    with pytest.raises(NotImplementedError, match="cannot be differentiated again"):
        torch.autograd.grad(g_offset.sum(), leaves[0])


@pytest.mark.parametrize("kind", [ALIGN, PS, DEFORM])
def test_deterministic_backward_is_bitwise_reproducible_and_equals_the_atomic_one(kind):
    """Many RoIs over the same pixels (every RoI of one image, overlapping): the atomic backward adds
    in any order; the deterministic one gathers in RoI order, the same bits every run."""
    n, c, h, w, _, size = SHAPES[1]
    x, rois, offset, mask = (t if t is None else t.float() for t in make_case(kind, n, c, h, w, 12, size, 1.0,
                                                                            seed_of("det", kind)))
    rois[:, 0] = 0
    tensors, call = _kind_arguments(kind, x, rois, size, 1.0, 2, True, offset, mask)
    grad_output = torch.randn((12, c, *size), generator=generator(4)).to(DEVICE)
    atomic = with_grads(call(ours), tensors, grad_output)
    with deterministic_algorithms():
        runs = [with_grads(call(ours), tensors, grad_output) for _ in range(2)]
    for what, a, b, e in zip(("output", "grad input", "grad offset", "grad mask"), *runs, atomic):
        assert torch.equal(a, b), f"{what} differs between two deterministic runs"
        assert_close_scaled(a.nan_to_num(0.0), e.nan_to_num(0.0), 1e-5, what)


def test_autocast_computes_in_float32_and_returns_the_inputs_dtype():
    """torchvision's rule: inside autocast the op runs in float32 on the inputs as they are and returns
    the input's dtype; boxes may then be of another floating dtype."""
    n, c, h, w, k, size = SHAPES[1]
    x, rois, _, _ = make_case(ALIGN, n, c, h, w, k, size, 1.0, seed_of("autocast"))
    xb = x.bfloat16()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out = stn_triton.roi_align(xb, rois.float(), size, 1.0, 2, True)
        out32 = stn_triton.roi_align(x.float(), rois.bfloat16(), size, 1.0, 2, True)
    assert out.dtype == torch.bfloat16 and out32.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(ALIGN, xb, rois.float(), size, 1.0, 2, True), atol=1e-2,
                               rtol=1e-2)
    torch.testing.assert_close(out32.double(), reference(ALIGN, x.float(), rois.bfloat16(), size, 1.0, 2, True),
                               atol=1e-5, rtol=1e-5)


def test_per_sample_and_batched_gradients():
    size = (2, 2)
    x, rois, offset, mask = make_case(DEFORM, 2, 2, 4, 5, 3, size, 1.0, seed_of("vmap"))
    leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask)]
    out = stn_triton.deform_roi_pool(leaves[0], rois, leaves[1], size, 1.0, 2, 0.1, leaves[2])
    directions = randn((2, *out.shape), generator(8))
    batched = torch.autograd.grad(out, leaves, directions, is_grads_batched=True, retain_graph=True)
    for b in range(2):
        for many, one in zip(batched, torch.autograd.grad(out, leaves, directions[b], retain_graph=True)):
            assert_close_scaled(many[b], one, 1e-12, "batched grad")

    def loss(fn):
        return lambda a, o, m: fn(DEFORM, a, rois, size, 1.0, 2, True, o, m).pow(2).sum()

    got = torch.func.vmap(torch.func.grad(loss(ours), argnums=(0, 1, 2)), in_dims=(None, 0, 0))(
        x, torch.stack([offset, -offset]), torch.stack([mask, 1 - mask]))
    for i, (o, m) in enumerate(((offset, mask), (-offset, 1 - mask))):
        one = with_grads(lambda a, oo, mm: loss(reference)(a, oo, mm)[None], (x, o, m),
                         torch.ones(1, dtype=torch.float64, device=DEVICE))[1:]
        for what, a, b in zip(("input", "offset", "mask"), got, one):
            assert_close_scaled(a[i], b, 1e-11, f"vmap grad {what}")


def fpn_level_reference(box, k_min, k_max, canonical_scale=224, canonical_level=4):
    """The FPN paper's equation 1 with torchvision's epsilon and clamp, on one box."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    level = math.floor(canonical_level + math.log2(math.sqrt(area) / canonical_scale) + 1e-6)
    return min(max(level, k_min), k_max) - k_min


@pytest.mark.parametrize("levels", [1, 4, 6])
def test_multi_scale_roi_align_pools_each_box_from_its_level(levels):
    """Feature maps at scales 1/4 ... (FPN P2 ...); six levels take two launches of five maps."""
    gen = generator(seed_of("multi", levels))
    c, size, image = 3, (2, 2), 256
    scales = [2.0 ** -(2 + i) for i in range(levels)]
    features = [randn((2, c, max(1, int(image * s)), max(1, int(image * s) - 1)), gen) for s in scales]
    sides = [4.0, 30.0, 60.0, 120.0, 230.0, 250.0, 500.0, 1000.0]
    boxes = []
    for i in range(2):
        x1 = rand((len(sides),), gen, 0.0, image / 2)
        y1 = rand((len(sides),), gen, 0.0, image / 2)
        side = torch.tensor(sides, dtype=torch.float64, device=DEVICE)
        boxes.append(torch.stack([x1, y1, x1 + side, y1 + side * 0.8], 1))
    got = stn_triton.multi_scale_roi_align(features, boxes, size, 2, scales)
    rois = stn_triton.functional.boxes_to_rois(boxes)
    k_min, k_max = 2, 1 + levels
    expected = []
    for roi in rois:
        level = fpn_level_reference(roi[1:].tolist(), k_min, k_max) if levels > 1 else 0
        expected.append(reference(ALIGN, features[level], roi[None], size, scales[level], 2)[0])
    assert_close_scaled(got, torch.stack(expected), 1e-12, "pooled")
    if levels > 1:
        used = {fpn_level_reference(roi[1:].tolist(), k_min, k_max) for roi in rois}
        assert len(used) >= min(levels, 4), f"the boxes should span the levels, got {used}"
    module = stn_triton.MultiScaleRoIAlign([str(i) for i in range(levels)], size, 2)
    out = module({str(i): f for i, f in enumerate(features)}, boxes, [(image, image)] * 2)
    assert module.scales == scales
    torch.testing.assert_close(out, got)


def _bad(**changes):
    x = torch.zeros(2, 4, 5, 6, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    arguments = dict(input=x, boxes=rois, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2)
    return {**arguments, **changes}


BAD = [
    pytest.param(stn_triton.roi_align, _bad(input=torch.zeros(4, 5, 6)), "input", id="input-3d"),
    pytest.param(stn_triton.roi_align, _bad(input=torch.zeros(2, 4, 5, 6, dtype=torch.int64)), "input",
                 id="integer-input"),
    pytest.param(stn_triton.roi_align, _bad(boxes=torch.zeros(3, 4, dtype=torch.float64)), "boxes", id="boxes-k4"),
    pytest.param(stn_triton.roi_align, _bad(boxes=[torch.zeros(3, 5, dtype=torch.float64)]), "boxes",
                 id="list-of-k5"),
    pytest.param(stn_triton.roi_align, _bad(boxes=torch.zeros(1, 5)), "dtype", id="boxes-float32"),
    pytest.param(stn_triton.roi_align, _bad(boxes=[]), "boxes", id="no-images"),
    pytest.param(stn_triton.roi_align, _bad(output_size=(0, 2)), "output_size", id="size-0"),
    pytest.param(stn_triton.roi_align, _bad(output_size=(2, 2, 2)), "output_size", id="size-3"),
    pytest.param(stn_triton.roi_align, _bad(sampling_ratio=1.5), "sampling_ratio", id="float-ratio"),
    pytest.param(stn_triton.roi_align, _bad(spatial_scale="1"), "spatial_scale", id="string-scale"),
    pytest.param(stn_triton.roi_align, _bad(aligned=1), "aligned", id="int-aligned"),
    pytest.param(stn_triton.ps_roi_align, _bad(output_size=(3, 1)), "multiple of pooling", id="ps-channels"),
    pytest.param(stn_triton.deform_roi_pool, dict(input=torch.zeros(2, 4, 5, 6), rois=torch.zeros(1, 5),
                                                  offset=torch.zeros(1, 2, 3, 3), output_size=(2, 2)), "offset",
                 id="offset-bins"),
    pytest.param(stn_triton.deform_roi_pool, dict(input=torch.zeros(2, 4, 5, 6), rois=torch.zeros(1, 5), offset=None,
                                                  output_size=(2, 2), mask=torch.zeros(1, 2, 2, 2)), "mask",
                 id="mask-channels"),
    pytest.param(stn_triton.deform_roi_pool, dict(input=torch.zeros(2, 4, 5, 6), rois=[torch.zeros(1, 4)],
                                                  offset=None, output_size=(2, 2)), "rois", id="deform-list"),
]


@pytest.mark.parametrize("op, arguments, named", BAD)
def test_malformed_arguments_fail_before_any_launch_naming_the_argument(op, arguments, named, monkeypatch):
    from stn_triton import functional

    monkeypatch.setattr(functional._roi_op, "roi_pool", lambda *args: pytest.fail("launched"))
    monkeypatch.setattr(functional.fallback, "roi_pool", lambda *args: pytest.fail("launched"))
    arguments = {name: (t.to(DEVICE) if isinstance(t, torch.Tensor) else [b.to(DEVICE) for b in t]
                        if isinstance(t, list) else t) for name, t in arguments.items()}
    with pytest.raises((ValueError, TypeError), match=re.escape(named)):
        op(**arguments)


def test_a_boxes_shape_error_is_an_assertion_as_torchvisions():
    """torchvision checks the boxes' shape with torch._assert: code that catches AssertionError keeps
    working."""
    with pytest.raises(AssertionError, match="boxes"):
        stn_triton.roi_align(torch.zeros(1, 1, 2, 2, device=DEVICE), torch.zeros(2, 4, device=DEVICE), 1)


# --- the modules ----------------------------------------------------------------------------------


def test_modules_have_torchvisions_and_mmcvs_attributes_and_parameters():
    align = stn_triton.RoIAlign((7, 7), 0.25, 2, aligned=True)
    assert (align.output_size, align.spatial_scale, align.sampling_ratio, align.aligned) == ((7, 7), 0.25, 2, True)
    assert repr(align) == "RoIAlign(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=True)"
    ps = stn_triton.PSRoIAlign(3, 0.5, -1)
    assert repr(ps) == "PSRoIAlign(output_size=3, spatial_scale=0.5, sampling_ratio=-1)"
    pooler = stn_triton.MultiScaleRoIAlign(["0", "1"], 7, 2)
    assert (pooler.featmap_names, pooler.output_size, pooler.sampling_ratio, pooler.scales) == (["0", "1"], (7, 7), 2,
                                                                                                 None)
    pack = stn_triton.DeformRoIPoolPack((3, 3), 4, deform_fc_channels=8)
    assert {name: tuple(p.shape) for name, p in pack.state_dict().items()} == {
        "offset_fc.0.weight": (8, 36), "offset_fc.0.bias": (8,), "offset_fc.2.weight": (8, 8),
        "offset_fc.2.bias": (8,), "offset_fc.4.weight": (18, 8), "offset_fc.4.bias": (18,)}
    modulated = stn_triton.ModulatedDeformRoIPoolPack((3, 3), 4, deform_fc_channels=8)
    assert {name: tuple(p.shape) for name, p in modulated.state_dict().items() if name.startswith("mask_fc")} == {
        "mask_fc.0.weight": (8, 36), "mask_fc.0.bias": (8,), "mask_fc.2.weight": (9, 8), "mask_fc.2.bias": (9,)}


def test_packs_start_as_roi_align_and_learn_offsets():
    """At initialisation the offset heads are zero: DeformRoIPoolPack is RoI align (aligned), and the
    modulated pack is RoI align times sigmoid(0) = 0.5 (mmcv's initialisation); after a step the
    offsets move."""
    x, rois, _, _ = make_case(ALIGN, 2, 4, 7, 9, 5, (3, 3), 1.0, seed_of("packs"))
    plain = stn_triton.roi_align(x, rois, (3, 3), 1.0, 0, aligned=True)
    pack = stn_triton.DeformRoIPoolPack((3, 3), 4, deform_fc_channels=8).double().to(DEVICE)
    modulated = stn_triton.ModulatedDeformRoIPoolPack((3, 3), 4, deform_fc_channels=8).double().to(DEVICE)
    torch.testing.assert_close(pack(x, rois), plain)
    torch.testing.assert_close(modulated(x, rois), 0.5 * plain)
    modulated(x, rois).pow(2).sum().backward()
    assert modulated.offset_fc[4].weight.grad.abs().sum() > 0 and modulated.mask_fc[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="output_channels"):
        pack(x[:, :3], rois)


def test_deform_roi_pool_module_equals_the_function():
    x, rois, offset, _ = make_case(DEFORM, 2, 3, 6, 5, 4, (2, 3), 0.5, seed_of("module"))
    module = stn_triton.DeformRoIPool((2, 3), 0.5, 2, 0.2)
    torch.testing.assert_close(module(x, rois, offset), reference(DEFORM, x, rois, (2, 3), 0.5, 2, True, offset,
                                                                 gamma=0.2))


# --- torchvision ----------------------------------------------------------------------------------


@needs_torchvision
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_equals_torchvision(dtype, layout):
    n, c, h, w, k, size = SHAPES[1]
    for kind in (ALIGN, PS):
        x, rois, _, _ = make_case(kind, n, c, h, w, k, size, 0.5, seed_of("tv", kind, dtype), dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        for sr in (2, -1, 0):
            for aligned in ((False, True) if kind == ALIGN else (True,)):
                grad_output = torch.randn((k, c, *size), generator=generator(3), dtype=dtype).to(DEVICE)

                def theirs(a):
                    if kind == ALIGN:
                        return tv_ops.roi_align(a, rois, size, 0.5, sr, aligned)
                    return tv_ops.ps_roi_align(a, rois, size, 0.5, sr)

                got = with_grads(lambda a: ours(kind, a, rois, size, 0.5, sr, aligned), [x], grad_output)
                expected = with_grads(theirs, [x], grad_output)
                tol = 1e-12 if dtype == torch.float64 else 1e-5
                for what, a, b in zip(("output", "grad input"), got, expected):
                    assert torch.equal(a.isnan(), b.isnan()), f"{kind} {what} NaN"
                    assert_close_scaled(a.nan_to_num(0.0), b.nan_to_num(0.0), tol, f"{kind} sr={sr} {what}")


@needs_torchvision
def test_multi_scale_roi_align_equals_torchvisions():
    gen = generator(seed_of("tv-multi"))
    features = {"0": randn((2, 3, 16, 20), gen, torch.float32), "1": randn((2, 3, 8, 10), gen, torch.float32),
                "2": randn((2, 3, 4, 5), gen, torch.float32), "pool": randn((2, 3, 2, 3), gen, torch.float32)}
    side = torch.tensor([5.0, 20.0, 40.0, 64.0], device=DEVICE)
    boxes = [torch.stack([side * 0.1, side * 0.2, side * 1.1, side * 0.9 + 1], 1) for _ in range(2)]
    theirs = tv_ops.MultiScaleRoIAlign(["0", "1", "2"], (3, 3), 2)
    mine = stn_triton.MultiScaleRoIAlign(["0", "1", "2"], (3, 3), 2)
    shapes = [(64, 80), (60, 77)]
    torch.testing.assert_close(mine(features, boxes, shapes), theirs(features, boxes, shapes))
    assert mine.scales == theirs.scales


@needs_torchvision
def test_the_swap_routes_torchvisions_ops_and_modules(monkeypatch):
    from stn_triton import swap
    from stn_triton.ops import roi as roi_op

    calls = []
    real = roi_op.pool
    monkeypatch.setattr(roi_op, "pool", lambda *args: calls.append(args[-1].kind) or real(*args))
    n, c, h, w, k, size = SHAPES[1]
    x, rois, _, _ = make_case(ALIGN, n, c * 6, h, w, k, size, 0.5, seed_of("swap"), torch.float32)
    features = {"0": x, "1": x[:, :, ::2, ::2]}
    boxes = [rois[:2, 1:] * 2, rois[2:, 1:] * 2]
    expected = [tv_ops.roi_align(x, rois, size, 0.5, 2), tv_ops.RoIAlign(size, 0.5, 2, True)(x, rois),
                tv_ops.ps_roi_align(x, rois, size, 0.5, 2), tv_ops.PSRoIAlign(size, 0.5, 2)(x, rois),
                tv_ops.MultiScaleRoIAlign(["0", "1"], size, 2)(features, boxes, [(2 * h, 2 * w)] * 2)]
    with swap.swapped():
        got = [torchvision.ops.roi_align(x, rois, size, 0.5, 2), torchvision.ops.RoIAlign(size, 0.5, 2, True)(x, rois),
               torchvision.ops.ps_roi_align(x, rois, size, 0.5, 2), torchvision.ops.PSRoIAlign(size, 0.5, 2)(x, rois),
               torchvision.ops.MultiScaleRoIAlign(["0", "1"], size, 2)(features, boxes, [(2 * h, 2 * w)] * 2)]
    assert len(calls) >= 5, calls
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    calls.clear()
    tv_ops.roi_align(x, rois, size, 0.5, 2)
    assert not calls, "the swap is undone"


def _mask_rcnn(side: int):
    """torchvision's Mask R-CNN with random weights for ``side`` x ``side`` images: on a GPU with its
    ResNet-50 FPN; on a CPU (Triton's interpreter runs the poolers) with a ResNet-18 FPN of 8
    channels and few proposals, the same model classes and poolers at a size the interpreter
    gets through."""
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    options = dict(num_classes=3, min_size=side, max_size=side, box_batch_size_per_image=16,
                   rpn_batch_size_per_image=32)
    if DEVICE == "cuda":
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **options)
    backbone = BackboneWithFPN(resnet18(), {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [64, 128, 256, 512], out_channels=8)
    return MaskRCNN(backbone, rpn_pre_nms_top_n_train=16, rpn_post_nms_top_n_train=6,
                    mask_head=MaskRCNNHeads(8, [256], 1), **options)


@needs_torchvision
@pytest.mark.slow
def test_mask_rcnn_trains_a_step_deterministically_with_the_swap_on():
    """torchvision's Mask R-CNN (random weights, a small image) under deterministic algorithms with
    the swap on: its box and mask poolers and its mask targets run on the kernels; two training
    steps from the same state give the same bits, finite losses, and the losses of the model with
    the swap off (torchvision's own ops)."""
    from stn_triton import swap
    from stn_triton.ops import roi as roi_op

    side = sizes(cpu=64, gpu=320)
    torch.manual_seed(0)
    model = _mask_rcnn(side).to(DEVICE).train()
    images = [torch.rand(3, side, side, generator=generator(0)).to(DEVICE)]
    masks = torch.zeros(1, side, side, dtype=torch.uint8)
    masks[0, side // 4:side // 2, side // 5:side // 2] = 1
    targets = [{"boxes": torch.tensor([[side / 5, side / 4, side / 2, side / 2]], device=DEVICE),
                "labels": torch.tensor([1], device=DEVICE), "masks": masks.to(DEVICE)}]
    state = {name: t.clone() for name, t in model.state_dict().items()}

    def step():
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        losses = model(images, targets)
        sum(losses.values()).backward()
        return ({name: loss.detach() for name, loss in losses.items()},
                [p.grad.clone() for p in model.parameters() if p.grad is not None])

    expected = step()
    calls = []
    real = roi_op.pool
    with swap.swapped(), deterministic_algorithms(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(roi_op, "pool", lambda *args: calls.append(args[-1].kind) or real(*args))
        runs = [step() for _ in range(2)]
    assert len(calls) >= 6, "the box and mask poolers and the mask targets, forward and backward, reach the kernels"
    for name, loss in runs[0][0].items():
        assert torch.isfinite(loss) and torch.equal(loss, runs[1][0][name]), name
        torch.testing.assert_close(loss, expected[0][name], atol=1e-4, rtol=1e-4, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
