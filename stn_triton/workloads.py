"""The benchmark cases' inputs and stn_triton's call for each: one source for perf/ and ``stn_triton.tune``.

``perf/cases.py`` times these calls on these inputs against its baselines, and ``python -m
stn_triton.tune`` autotunes the kernels by running the same calls on the same inputs, so the
tables are tuned at exactly the launches the suite measures. The shapes are ``stn_triton.shapes``'.
"""

import functools

import torch
import torch.nn.functional as F

import stn_triton
from stn_triton.shapes import BenchShape

Inputs = dict[str, torch.Tensor]
Shape = BenchShape
NCHW, NHWC = "nchw", "nhwc"
# Ops whose inputs come in one layout (their make_inputs ignores ``layout``).
SINGLE_LAYOUT = frozenset({"ms_deform_attn", "dcnv3", "dcnv4"})


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` [N, C, *spatial] in channels-last memory for ``nhwc`` (channels_last_3d on 5-D)."""
    if layout == NCHW:
        return t.contiguous()
    memory_format = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=memory_format)


def randn(shape, dtype, device, gen) -> torch.Tensor:
    """Standard normal values drawn in float32 on ``device``, then cast to ``dtype``."""
    return torch.randn(shape, device=device, generator=gen).to(dtype)


def image(shape: Shape, dtype, device, layout, gen) -> torch.Tensor:
    """A random image [N, C, *shape.size] in ``layout``."""
    return to_layout(randn((shape.N, shape.C, *shape.size), dtype, device, gen), layout)


def _near_identity_theta(batch: int, nd: int, device, gen) -> torch.Tensor:
    """Affine maps [batch, nd, nd+1] (float32) within about 10% of the identity."""
    identity = torch.eye(nd, nd + 1, device=device).expand(batch, nd, nd + 1)
    return identity + 0.1 * torch.randn((batch, nd, nd + 1), device=device, generator=gen)


def _near_identity_grid(shape: Shape, dtype, device, gen) -> torch.Tensor:
    """A grid [N, *shape.out_size, nd] = the identity jittered by up to 2 input pixels per axis."""
    batch, out_size, nd = shape.N, shape.out_size, len(shape.out_size)
    identity = torch.eye(nd, nd + 1, device=device).expand(batch, nd, nd + 1)
    grid = F.affine_grid(identity, [batch, 1, *out_size], align_corners=False)
    pixel = torch.tensor([2.0 / s for s in reversed(shape.size)], device=device)  # grid is (x, y[, z])
    jitter = (2 * torch.rand(grid.shape, device=device, generator=gen) - 1) * 2 * pixel
    return (grid + jitter).to(dtype)


def grid_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, *in], grid [N, *out, nd]."""
    return {"input": image(shape, dtype, device, layout, gen), "grid": _near_identity_grid(shape, dtype, device, gen)}


def affine_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, *in], theta [N, nd, nd+1]."""
    nd = len(shape.size)
    theta = _near_identity_theta(shape.N, nd, device, gen).to(dtype)
    return {"input": image(shape, dtype, device, layout, gen), "theta": theta}


def homography_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, H, W], homography [N, 3, 3] near the identity with a mild perspective row."""
    batch = shape.N
    homography = torch.eye(3, device=device).expand(batch, 3, 3).clone()
    homography[:, :2] += 0.1 * torch.randn((batch, 2, 3), device=device, generator=gen)
    homography[:, 2, :2] += 0.05 * torch.randn((batch, 2), device=device, generator=gen)
    return {"input": image(shape, dtype, device, layout, gen), "homography": homography.to(dtype)}


def text_control_points(count: int, device) -> torch.Tensor:
    """[count, 2] control points in two rows along the top and bottom edges (ASTER's layout)."""
    xs = torch.linspace(-1, 1, count // 2, device=device)
    top = torch.stack([xs, torch.full_like(xs, -1)], dim=1)
    bottom = torch.stack([xs, torch.full_like(xs, 1)], dim=1)
    return torch.cat([top, bottom])


def tps_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, H, W], source_points [N, K, 2] = control_points [K, 2] moved by up to 10%."""
    control = text_control_points(shape.K, device)
    moved = control + 0.1 * (2 * torch.rand((shape.N, *control.shape), device=device, generator=gen) - 1)
    return {
        "input": image(shape, dtype, device, layout, gen),
        "source_points": moved.to(dtype),
        "control_points": control.to(dtype),
    }


def dcn_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C_in, H, W], offset [N, 2*k*k, H, W] (about a pixel), mask [N, k*k, H, W] in (0, 1),
    weight [C_out, C_in, k, k], bias [C_out]; stride 1 and "same" padding keep H x W."""
    batch, c_in, c_out, k = shape.N, shape.C, shape.out_channels, shape.kernel
    height, width = shape.size
    x = image(shape, dtype, device, layout, gen)
    offset = randn((batch, 2 * k * k, height, width), dtype, device, gen)
    mask = torch.sigmoid(randn((batch, k * k, height, width), torch.float32, device, gen)).to(dtype)
    weight = randn((c_out, c_in, k, k), torch.float32, device, gen) / (c_in * k * k) ** 0.5
    return {
        "input": x,
        "offset": to_layout(offset, layout),
        "mask": to_layout(mask, layout),
        "weight": weight.to(dtype),
        "bias": randn((c_out,), dtype, device, gen),
    }


def msda_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """value [N, S, M, D] in ``dtype``; the levels as device tensors (as the models pass them); locations
    [N, Lq, M, L, P, 2] about a pixel around each query's reference point (the encoder's queries: its
    own rows' centres; the decoder's: random points) and weights [N, Lq, M, L, P] (a softmax) in
    float32, as autocast leaves them beside a half-precision value. ``layout`` names value's only one."""
    batch, heads, channels, points, queries = shape.N, shape.heads, shape.C, shape.points, shape.queries
    levels = torch.tensor(shape.levels, dtype=torch.int64, device=device)
    areas = levels[:, 0] * levels[:, 1]
    rows = int(sum(h * w for h, w in shape.levels))
    if queries == rows:
        centres = [torch.stack(torch.meshgrid((torch.arange(w, device=device) + 0.5) / w,
                                              (torch.arange(h, device=device) + 0.5) / h, indexing="xy"), -1).view(-1, 2)
                   for h, w in shape.levels]
        reference = torch.cat(centres).expand(batch, rows, 2)
    else:
        reference = 0.05 + 0.9 * torch.rand((batch, queries, 2), device=device, generator=gen)
    pixel = 1.0 / torch.tensor([[w, h] for h, w in shape.levels], dtype=torch.float32, device=device)  # [L, 2]
    offsets = torch.randn((batch, queries, heads, len(shape.levels), points, 2), device=device, generator=gen)
    locations = reference[:, :, None, None, None, :] + offsets * pixel[None, None, None, :, None, :]
    logits = torch.randn((batch, queries, heads, len(shape.levels) * points), device=device, generator=gen)
    return {
        "value": randn((batch, rows, heads, channels), dtype, device, gen),
        "spatial_shapes": levels,
        "level_start_index": torch.cumsum(areas, 0) - areas,
        "sampling_locations": locations,
        "attention_weights": logits.softmax(-1).view(batch, queries, heads, len(shape.levels), points),
    }


def roi_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """The FPN maps ``p0`` ... [N, C, H_l, W_l] in ``layout`` and boxes [N, R, 4] in image pixels:
    centres uniform over the image, sides log-uniform in [16, 800] pixels with an aspect ratio
    log-uniform in [1/2, 2] (so they spread over the levels as proposals do), clipped to the image;
    everything in ``dtype``, as torchvision needs it."""
    height, width = shape.size
    features = {f"p{level}": to_layout(randn((shape.N, shape.C, h, w), dtype, device, gen), layout)
                for level, (h, w) in enumerate(shape.levels)}
    count = (shape.N, shape.rois)
    centre = torch.rand((*count, 2), device=device, generator=gen) * torch.tensor([width, height], device=device)
    side = 16.0 * 50.0 ** torch.rand(count, device=device, generator=gen)
    aspect = 2.0 ** (2 * torch.rand(count, device=device, generator=gen) - 1)
    half = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], -1) / 2
    low = torch.minimum(centre - half, centre - 1).clamp(min=0)
    high = torch.maximum(centre + half, centre + 1)
    high = torch.minimum(high, torch.tensor([width, height], device=device, dtype=high.dtype))
    return {**features, "boxes": torch.cat([low, high], -1).to(dtype)}


def mask_target_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """Instance masks [N, 1, H, W] (an elliptical blob each, 0 or 1 as the ground truth's uint8 cast)
    and RoIs [rois, 5]: each names a random mask and a box around its blob, jittered as proposals
    are, in ``dtype``."""
    height, width = shape.size
    centre = torch.rand((shape.N, 2), device=device, generator=gen) * torch.tensor([width, height], device=device)
    radius = 16.0 * 25.0 ** torch.rand((shape.N, 2), device=device, generator=gen)
    ys = torch.arange(height, device=device, dtype=torch.float32)[None, :, None]
    xs = torch.arange(width, device=device, dtype=torch.float32)[None, None, :]
    inside = ((xs - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 + \
        ((ys - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2 <= 1
    masks = to_layout(inside[:, None].to(dtype), layout)
    index = torch.randint(shape.N, (shape.rois,), device=device, generator=gen)
    jitter = 1 + 0.2 * (2 * torch.rand((shape.rois, 4), device=device, generator=gen) - 1)
    box = torch.cat([centre[index] - radius[index], centre[index] + radius[index]], 1) * jitter
    return {"masks": masks, "rois": torch.cat([index[:, None].float(), box], 1).to(dtype)}


# ---- stn_triton's calls ---------------------------------------------------------------------------


def ours_grid_sample(input, grid, *, mode):
    return stn_triton.grid_sample(input, grid, mode=mode, padding_mode="zeros", align_corners=False)


def ours_affine_grid_then_sample(input, theta, *, out_size):
    grid = stn_triton.affine_grid(theta, (*input.shape[:2], *out_size), align_corners=False)
    return stn_triton.grid_sample(input, grid, align_corners=False)


def ours_affine_grid_sample(input, theta, *, out_size):
    return stn_triton.affine_grid_sample(input, theta, size=(*input.shape[:2], *out_size), align_corners=False)


def ours_perspective_grid_sample(input, homography, *, out_size):
    size = (*input.shape[:2], *out_size)
    return stn_triton.perspective_grid_sample(input, homography, size=size, align_corners=False)


def ours_tps_grid_sample(input, source_points, control_points, *, out_size):
    size = (*input.shape[:2], *out_size)
    return stn_triton.tps_grid_sample(input, source_points, control_points, size=size, align_corners=False)


def ours_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *, levels):
    """The levels as device tensors, as Deformable DETR passes them (read on the device, no sync); ``levels``,
    the Python list the compositions take, goes unused here."""
    return stn_triton.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def ours_deform_conv2d(input, offset, mask, weight, bias, *, padding):
    return stn_triton.deform_conv2d(input, offset, weight, bias, padding=padding, mask=mask)


def roi_scales(levels) -> list[float]:
    """The FPN maps' spatial scales, 1/4 for the first (P2) and halving: what MultiScaleRoIAlign infers."""
    return [0.25 / 2 ** level for level in range(len(levels))]


def ours_multi_scale_roi_align(boxes, *, out_size, levels, **features):
    """Mask R-CNN's pooler at sampling_ratio 2: every box from the level its size maps to."""
    return stn_triton.multi_scale_roi_align(list(features.values()), list(boxes.unbind(0)), out_size, 2,
                                            roi_scales(levels))


def ours_roi_align(masks, rois, *, out_size):
    """Mask R-CNN's mask targets: ``roi_align(gt_masks, rois, (M, M), 1.0)``, adaptive sampling."""
    return stn_triton.roi_align(masks, rois, out_size, 1.0, -1, False)


def blur_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, H, W]."""
    return {"input": image(shape, dtype, device, layout, gen)}


def ours_blur_pool2d(input, *, kernel):
    """Anti-aliased downsampling at stride 2, zero padding (kornia's blur_pool2d)."""
    return stn_triton.blur_pool2d(input, kernel, 2)


def ours_max_blur_pool2d(input, *, kernel):
    """A 2 x 2 max at stride 1, then the blur at stride 2 (kornia's max_blur_pool2d)."""
    return stn_triton.max_blur_pool2d(input, kernel, 2, 2)


def dcnv3_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, H, W, C] (dense channels-last, as InternImage's blocks pass it), offset [N, H, W,
    G * K * 2] (about a pixel), mask [N, H, W, G * K] (softmaxed over each group's K points, as the
    module does), and a depthwise weight [C, 1, k, k] for the depthwise-convolution baseline."""
    batch, c, g, k = shape.N, shape.C, shape.groups, shape.kernel
    height, width = shape.size
    logits = torch.randn((batch, height, width, g, k * k), device=device, generator=gen)
    return {
        "input": randn((batch, height, width, c), dtype, device, gen),
        "offset": randn((batch, height, width, g * k * k * 2), dtype, device, gen),
        "mask": logits.softmax(-1).view(batch, height, width, g * k * k).to(dtype),
        "weight": (randn((c, 1, k, k), torch.float32, device, gen) / k).to(dtype),
    }


def dcnv4_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """``dcnv3_inputs`` with offset and mask packed as DCNv4's offset_mask [N, H, W, L]: per group
    its K * 2 offsets then its K mask values, L = G * 3 * K padded with zeros to a multiple of 8."""
    inputs = dcnv3_inputs(shape, dtype, device, layout, gen)
    batch, height, width, _ = inputs["input"].shape
    g, k = shape.groups, shape.kernel * shape.kernel
    packed = torch.cat((inputs.pop("offset").view(batch, height, width, g, 2 * k),
                        inputs.pop("mask").view(batch, height, width, g, k)), -1).view(batch, height, width, 3 * g * k)
    inputs["offset_mask"] = F.pad(packed, (0, -(3 * g * k) % 8))
    return inputs


def dcn_geometry(kernel: int) -> tuple[int, ...]:
    """A k x k window at stride 1, "same" padding, dilation 1: (kernel_h, kernel_w, stride_h, stride_w,
    pad_h, pad_w, dilation_h, dilation_w)."""
    return kernel, kernel, 1, 1, kernel // 2, kernel // 2, 1, 1


def ours_dcnv3(input, offset, mask, weight, *, groups, kernel):
    """InternImage's DCNv3 core: offset_scale 1 (``weight`` is the depthwise baseline's)."""
    return stn_triton.dcnv3(input, offset, mask, *dcn_geometry(kernel), groups, input.shape[-1] // groups, 1.0)


def ours_dcnv4(input, offset_mask, weight, *, groups, kernel):
    """FlashInternImage's DCNv4 core: offset_scale 1, no softmax (``weight`` is the depthwise baseline's)."""
    return stn_triton.dcnv4(input, offset_mask, *dcn_geometry(kernel), groups, input.shape[-1] // groups, 1.0)


def workload(shape: BenchShape):
    """(make_inputs, call, grad_inputs) of the stn_triton op a benchmark shape times: ``call(**inputs)``
    returns its output, ``grad_inputs`` the inputs a backward takes gradients of. A training-step
    shape (op SpatialTransformer or DeformConv2d) gives the op its model runs, its image as data."""
    op = shape.op
    if op == "grid_sample":
        return grid_inputs, functools.partial(ours_grid_sample, mode=shape.mode), ("input", "grid")
    if op == "affine_grid":
        return affine_inputs, functools.partial(ours_affine_grid_then_sample, out_size=shape.out_size), ("input", "theta")
    if op in ("affine_grid_sample", "SpatialTransformer"):
        grads = ("theta",) if op == "SpatialTransformer" else ("input", "theta")
        return affine_inputs, functools.partial(ours_affine_grid_sample, out_size=shape.out_size), grads
    if op == "perspective_grid_sample":
        return (homography_inputs, functools.partial(ours_perspective_grid_sample, out_size=shape.out_size),
                ("input", "homography"))
    if op == "tps_grid_sample":
        return tps_inputs, functools.partial(ours_tps_grid_sample, out_size=shape.out_size), ("input", "source_points")
    if op in ("deform_conv2d", "DeformConv2d"):
        return (dcn_inputs, functools.partial(ours_deform_conv2d, padding=shape.kernel // 2),
                ("input", "offset", "mask", "weight", "bias"))
    if op == "ms_deform_attn":
        return (msda_inputs, functools.partial(ours_ms_deform_attn, levels=shape.levels),
                ("value", "sampling_locations", "attention_weights"))
    if op == "multi_scale_roi_align":
        return (roi_inputs, functools.partial(ours_multi_scale_roi_align, out_size=shape.out_size, levels=shape.levels),
                tuple(f"p{level}" for level in range(len(shape.levels))))
    if op == "roi_align":
        return mask_target_inputs, functools.partial(ours_roi_align, out_size=shape.out_size), ()
    if op == "blur_pool2d":
        return blur_inputs, functools.partial(ours_blur_pool2d, kernel=shape.kernel), ("input",)
    if op == "max_blur_pool2d":
        return blur_inputs, functools.partial(ours_max_blur_pool2d, kernel=shape.kernel), ("input",)
    if op == "dcnv3":
        return (dcnv3_inputs, functools.partial(ours_dcnv3, groups=shape.groups, kernel=shape.kernel),
                ("input", "offset", "mask"))
    if op == "dcnv4":
        return (dcnv4_inputs, functools.partial(ours_dcnv4, groups=shape.groups, kernel=shape.kernel),
                ("input", "offset_mask"))
    raise ValueError(f"no workload for op {op!r}")
