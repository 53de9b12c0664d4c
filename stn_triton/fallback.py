"""Plain PyTorch implementations of the fused warps, deformable convolution, deformable attention, DCNv3 / DCNv4, RoI pooling and blur pooling.

These run when a CPU tensor is used without ``TRITON_INTERPRET=1`` (see ``stn_triton.backend``):
they build the sampling grid (or the column buffer) in memory and call ``F.grid_sample`` (or a
matmul), as one would without this library. The transform math they share with the Triton path
(the thin-plate-spline solve, kornia's pixel frames) lives in ``stn_triton.geometry``.
Shapes: input ``[N, C, H, W]`` (or ``[N, C, D, H, W]`` for the affine warp).
"""

import functools
import math

import torch
import torch.nn.functional as F

from stn_triton.geometry import affine_to_homography, normalized_inverse_map, tps_coefficients, tps_radial
from stn_triton.kernels import codes
from stn_triton.numerics import compute_dtype
from stn_triton.ops._dispatch import constant
from stn_triton.ops._launch import channels_last

# Normalized coordinates beyond this are replaced by it (NaN by its negative): far outside any
# image, yet small enough that F.grid_sample's CPU index arithmetic cannot overflow on them.
COORD_LIMIT = 1.0e4
# Adaptive RoI sample grids are capped at this many samples a side, as the kernels cap them.
GRID_LIMIT = 2.0**24


def host_table(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A small tensor of host ``values`` on ``device``: cached in eager mode (a fresh ``torch.tensor``
    on a GPU is a blocking host-to-device copy every call, which would make these compositions, the
    perf suite's baselines, pay a synchronisation the library's kernels do not), plain while
    torch.compile traces (it folds the constant into the graph)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_table(values, dtype, torch.device(device))


@functools.lru_cache(maxsize=128)
def _cached_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return constant(values, dtype, device)


def finite_grid(grid: torch.Tensor) -> torch.Tensor:
    """``grid`` with non-finite and huge coordinates moved to +-COORD_LIMIT (NaN to -COORD_LIMIT).

    PyTorch's CPU grid_sample indexes out of bounds on them (its backward can crash); the Triton
    kernels send them outside the image the same way, so zeros padding reads 0 and border the edge.
    """
    return torch.nan_to_num(grid, nan=-COORD_LIMIT).clamp(-COORD_LIMIT, COORD_LIMIT)


def output_positions(size: int, align_corners: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """Normalized positions ``[size]`` of an output side's pixels, as ``F.affine_grid`` places them."""
    if size <= 1:
        return torch.zeros(size, dtype=dtype, device=device)
    positions = torch.linspace(-1.0, 1.0, size, dtype=dtype, device=device)
    return positions if align_corners else positions * (size - 1) / size


def base_points(spatial: tuple[int, int], align_corners: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """``[H, W, 2]`` normalized (x, y) of every output pixel."""
    h, w = spatial
    ys = output_positions(h, align_corners, dtype, device)
    xs = output_positions(w, align_corners, dtype, device)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)


def affine_grid_sample(input, theta, spatial, mode, padding_mode, align_corners):
    """``F.grid_sample(input, F.affine_grid(theta, size))`` with the grid in memory."""
    grid = finite_grid(F.affine_grid(theta, [*input.shape[:2], *spatial], align_corners=align_corners))
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def perspective_grid(homography: torch.Tensor, spatial, align_corners: bool) -> torch.Tensor:
    """``[N, H, W, 2]``: ``homography [N, 3, 3]`` applied to every base point, dehomogenized."""
    base = base_points(spatial, align_corners, homography.dtype, homography.device)
    points = torch.cat([base, torch.ones_like(base[..., :1])], dim=-1)
    mapped = torch.einsum("nij,hwj->nhwi", homography, points)
    return finite_grid(mapped[..., :2] / mapped[..., 2:])


def perspective_grid_sample(input, homography, spatial, mode, padding_mode, align_corners):
    grid = perspective_grid(homography, spatial, align_corners)
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def tps_grid(coefficients: torch.Tensor, control_points: torch.Tensor, spatial, align_corners: bool) -> torch.Tensor:
    """``[N, H, W, 2]``: the spline of ``tps_coefficients`` evaluated at every base point."""
    base = base_points(spatial, align_corners, coefficients.dtype, coefficients.device).reshape(-1, 2)
    k = control_points.shape[0]
    radial = tps_radial(((base[:, None, :] - control_points.to(base.dtype)[None]) ** 2).sum(-1))
    features = torch.cat([radial, torch.ones_like(base[:, :1]), base], dim=1)
    grid = torch.einsum("pk,nkc->npc", features, coefficients[:, : k + 3])
    return grid.reshape(coefficients.shape[0], *spatial, 2)


def tps_grid_sample(input, source_points, control_points, spatial, mode, padding_mode, align_corners):
    coefficients = tps_coefficients(source_points, control_points)
    grid = finite_grid(tps_grid(coefficients, control_points, spatial, align_corners)).to(input.dtype)
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def _sample_pixel_warp(src, grid, mode, padding_mode, align_corners, fill_value):
    """kornia's sampling: ``fill`` blends fill_value by the weight the taps lose off the image."""
    if padding_mode != "fill":
        return F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    sample = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=align_corners)
    coverage = F.grid_sample(torch.ones_like(src), grid, mode=mode, padding_mode="zeros", align_corners=align_corners)
    return sample + (1 - coverage) * fill_value.view(1, -1, 1, 1)


def warp_affine(src, M, dsize, mode, padding_mode, align_corners, fill_value):
    """kornia.geometry.transform.warp_affine, with the grid in memory."""
    inverse = normalized_inverse_map(affine_to_homography(M), src.shape[2:], dsize, align_corners)
    grid = finite_grid(F.affine_grid(inverse[:, :2, :], [src.shape[0], src.shape[1], *dsize], align_corners=align_corners))
    return _sample_pixel_warp(src, grid.to(src.dtype), mode, padding_mode, align_corners, fill_value)


def warp_perspective(src, M, dsize, mode, padding_mode, align_corners, fill_value):
    """kornia.geometry.transform.warp_perspective, with the grid in memory."""
    inverse = normalized_inverse_map(M, src.shape[2:], dsize, align_corners)
    grid = perspective_grid(inverse, dsize, align_corners)
    return _sample_pixel_warp(src, grid.to(src.dtype), mode, padding_mode, align_corners, fill_value)


def _bilinear_gather(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bilinear reads of ``image [B, C, H, W]`` at pixel points ``y, x [B, P]``, zero outside -> ``[B, C, P]``.

    Floor-based weights (torchvision's arithmetic): at an integer point the derivative is the
    forward difference, as in the kernels. Non-finite points read nothing.
    """
    b, c, h, w = image.shape
    y = torch.where(torch.isfinite(y), y, -4.0).clamp(-4.0, h + 4.0)
    x = torch.where(torch.isfinite(x), x, -4.0).clamp(-4.0, w + 4.0)
    y0, x0 = torch.floor(y), torch.floor(x)
    flat = image.reshape(b, c, h * w)
    out = 0
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yi, xi = y0 + dy, x0 + dx
        weight = (y - y0 if dy else y0 + 1 - y) * (x - x0 if dx else x0 + 1 - x)
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
        values = torch.gather(flat, 2, index[:, None, :].expand(b, c, index.shape[1]))
        out = out + (weight * inside)[:, None, :] * values
    return out


def deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask):
    """Deformable convolution as torchvision computes it: sample every tap bilinearly, build the
    column buffer [N, C * K, HO * WO], and multiply by the weight."""
    n, c, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    k = kh * kw
    ho, wo = offset.shape[2:]
    groups = c // c_per_group
    offset_groups = offset.shape[1] // (2 * k)
    ii, jj = torch.meshgrid(torch.arange(kh, device=input.device), torch.arange(kw, device=input.device), indexing="ij")
    oy = torch.arange(ho, device=input.device) * stride[0] - padding[0]
    ox = torch.arange(wo, device=input.device) * stride[1] - padding[1]
    base_y = oy[None, :, None] + (ii.reshape(k) * dilation[0])[:, None, None]  # [K, HO, 1]
    base_x = ox[None, None, :] + (jj.reshape(k) * dilation[1])[:, None, None]  # [K, 1, WO]
    offset = offset.view(n, offset_groups, k, 2, ho, wo)
    y = (base_y + offset[:, :, :, 0]).reshape(n * offset_groups, k * ho * wo)  # pixel units
    x = (base_x + offset[:, :, :, 1]).reshape(n * offset_groups, k * ho * wo)
    grouped = input.reshape(n * offset_groups, c // offset_groups, h, w)
    samples = _bilinear_gather(grouped, y, x).view(n, offset_groups, c // offset_groups, k, ho, wo)
    if mask is not None:
        samples = samples * mask.view(n, offset_groups, 1, k, ho, wo)
    columns = samples.reshape(n, groups, c_per_group * k, ho * wo)
    out = torch.einsum("gok,ngkp->ngop", weight.reshape(groups, c_out // groups, c_per_group * k), columns)
    out = out.reshape(n, c_out, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, points, softmax, out_dtype):
    """Multi-scale deformable attention as the models write it in PyTorch: one grid_sample per level
    (bilinear, zeros, align_corners=False on ``2 * loc - 1``) and a weighted sum. value [N, S, M, D],
    locations [N, Lq, M, L, P, 2] or [N, Lq, M, sum(points), 2] -> [N, Lq, M * D]."""
    n, _, m, d = value.shape
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    queries, total = sampling_locations.shape[1], sum(points)
    locations = sampling_locations.reshape(n, queries, m, total, 2)
    weights = attention_weights.reshape(n, queries, m, total)
    if softmax:
        weights = weights.softmax(dim=-1)
    grids = finite_grid(2 * locations - 1)
    samples, first = [], 0
    for (h, w), level, count in zip(shapes, value.split([h * w for h, w in shapes], dim=1), points):
        level = level.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid = grids[:, :, :, first:first + count].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(level, grid.to(level.dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
        first += count
    weights = weights.transpose(1, 2).reshape(n * m, 1, queries, total)
    out = (torch.cat(samples, dim=-1) * weights).sum(-1).view(n, m * d, queries).transpose(1, 2)
    return out.to(out_dtype)


def _clamped_axis(y: torch.Tensor, size: int):
    """torchvision's RoI bilinear rule along one axis (kernels/roi.py, ``clamped_axis``): rows low and
    high of max(y, 0), their weights, and whether y lies in [-1, size] (NaN does not)."""
    inside = (y >= -1) & (y <= size)
    yc = torch.where(inside & (y > 0), y, torch.zeros_like(y))
    low = yc.floor()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    yc = torch.where(edge, low, yc)
    frac = yc - low
    high = torch.where(edge, low, low + 1)
    return low.long().clamp(min=0), high.long().clamp(min=0), 1 - frac, frac, inside


def roi_pool(input, rois, offset, mask, kind: int, output_size, spatial_scale, sampling_ratio, aligned, gamma):
    """RoI align, position-sensitive RoI align and deformable RoI pooling by explicit samples: every
    RoI's grid sampled (adaptive grids padded to the largest and masked), as torchvision's and
    mmcv's kernels define them. input [N, C, H, W], rois [K, 5] -> [K, C_out, PH, PW]."""
    n_images, channels, height, width = input.shape
    ph, pw = output_size
    if height * width == 0:
        c_out = channels // (ph * pw) if kind == codes.PS_ROI_ALIGN else channels
        return input.new_zeros((rois.shape[0], c_out, ph, pw))
    dtype = compute_dtype(input.dtype)
    boxes = rois.to(dtype)
    k = boxes.shape[0]
    shift = 0.0 if kind == codes.ROI_ALIGN and not aligned else 0.5
    start_w = boxes[:, 1] * spatial_scale - shift
    start_h = boxes[:, 2] * spatial_scale - shift
    roi_w = (boxes[:, 3] * spatial_scale - shift) - start_w
    roi_h = (boxes[:, 4] * spatial_scale - shift) - start_h
    ok = (boxes[:, 0] > -1) & (boxes[:, 0] < n_images)
    for value in (start_w, start_h, roi_w, roi_h):
        ok = ok & value.isfinite()
    start_w, start_h, roi_w, roi_h = (torch.where(ok, v, torch.zeros_like(v)) for v in (start_w, start_h, roi_w, roi_h))
    if kind == codes.ROI_ALIGN and not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    if sampling_ratio > 0:
        grid_w = grid_h = torch.full_like(bin_w, sampling_ratio)
    else:
        grid_w, grid_h = bin_w.ceil().clamp(max=GRID_LIMIT), bin_h.ceil().clamp(max=GRID_LIMIT)
    count = grid_h * grid_w
    if kind != codes.PS_ROI_ALIGN:
        count = count.clamp(min=1)
    count = torch.where(ok, count, torch.ones_like(count))
    most_h = int(grid_h.max().clamp(min=0)) if k else 0
    most_w = int(grid_w.max().clamp(min=0)) if k else 0
    shape = (k, ph, pw)
    x0 = (start_w[:, None, None] + torch.zeros(shape, dtype=dtype, device=input.device))
    y0 = (start_h[:, None, None] + torch.zeros(shape, dtype=dtype, device=input.device))
    if offset is not None:
        x0 = x0 + gamma * roi_w[:, None, None] * offset[:, 0].to(dtype)
        y0 = y0 + gamma * roi_h[:, None, None] * offset[:, 1].to(dtype)
    bins_w = torch.arange(pw, device=input.device, dtype=dtype)
    bins_h = torch.arange(ph, device=input.device, dtype=dtype)
    x0 = x0 + bins_w * bin_w[:, None, None]
    y0 = y0 + bins_h[:, None] * bin_h[:, None, None]
    steps_w = torch.arange(most_w, device=input.device, dtype=dtype)
    steps_h = torch.arange(most_h, device=input.device, dtype=dtype)
    # Samples [K, PH, PW, GH, GW]: rows along GH, columns along GW.
    # Divided by the grid side where a bin has samples (by 1 where it has none, which reads nothing).
    xs = x0[..., None] + ((steps_w + 0.5) * bin_w[:, None, None, None]) / grid_w.clamp(min=1)[:, None, None, None]
    ys = y0[..., None] + ((steps_h + 0.5) * bin_h[:, None, None, None]) / grid_h.clamp(min=1)[:, None, None, None]
    x_taken = steps_w < grid_w[:, None, None, None]
    y_taken = steps_h < grid_h[:, None, None, None]
    xl, xh, wxl, wxh, x_in = _clamped_axis(xs, width)
    yl, yh, wyl, wyh, y_in = _clamped_axis(ys, height)
    x_keep = (x_in & x_taken & ok[:, None, None, None]).to(dtype)
    y_keep = (y_in & y_taken).to(dtype)
    pixels = input.to(dtype).permute(0, 2, 3, 1)  # [N, H, W, C]
    image = torch.where(ok, boxes[:, 0], torch.zeros_like(boxes[:, 0])).long()[:, None, None, None, None]
    out = 0
    for rows, w_rows in ((yl, wyl), (yh, wyh)):
        for cols, w_cols in ((xl, wxl), (xh, wxh)):
            weight = (w_rows * y_keep)[..., :, None] * (w_cols * x_keep)[..., None, :]  # [K, PH, PW, GH, GW]
            values = pixels[image, rows[..., :, None], cols[..., None, :]]  # [K, PH, PW, GH, GW, C]
            out = out + (weight[..., None] * values).sum((3, 4))
    out = out / count[:, None, None, None]  # [K, PH, PW, C]
    if kind == codes.PS_ROI_ALIGN:
        c_out = channels // (ph * pw)
        bins = torch.arange(ph * pw, device=input.device)
        index = (torch.arange(c_out, device=input.device)[None, :] * ph * pw + bins[:, None]).view(1, ph, pw, c_out)
        out = torch.gather(out, 3, index.expand(k, ph, pw, c_out))
    if mask is not None:
        out = out * mask[:, 0, :, :, None].to(dtype)
    fmt = torch.channels_last if channels_last(input) else torch.contiguous_format
    return out.permute(0, 3, 1, 2).to(input.dtype).contiguous(memory_format=fmt)


def binomial_kernel(k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The normalized binomial (Pascal) taps ``C(k - 1, i) / 2^(k - 1)`` [k]."""
    return host_table(tuple(math.comb(k - 1, i) / 2 ** (k - 1) for i in range(k)), dtype, device)


def blur_pool(input, kernel_size, stride, window, padding_mode: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The composition the blur kernels fuse: ``F.max_pool2d(window, stride=1)`` (unless 1 x 1), a
    padded copy, a depthwise ``F.conv2d`` with the binomial kernel at ``stride``; in float32 (float64
    for float64). input [N, C, H, W] -> [N, C, OH, OW], input's layout."""
    dtype = compute_dtype(input.dtype)
    x = input.to(dtype)
    if tuple(window) != (1, 1):
        x = F.max_pool2d(x, window, stride=1)
    (kh, kw), c = kernel_size, input.shape[1]
    x = F.pad(x, ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2),
              mode="constant" if padding_mode == "zeros" else padding_mode)
    weight = binomial_kernel(kh, dtype, input.device)[:, None] * binomial_kernel(kw, dtype, input.device)[None, :]
    if c == 0:  # conv2d takes no zero groups
        out = x.new_empty((x.shape[0], 0, (x.shape[2] - kh) // stride[0] + 1, (x.shape[3] - kw) // stride[1] + 1))
    else:
        out = F.conv2d(x, weight.expand(c, 1, kh, kw), stride=stride, groups=c)
    fmt = torch.channels_last if channels_last(input) else torch.contiguous_format
    return out.to(out_dtype).contiguous(memory_format=fmt)


def dcn_aggregate(input, offset, mask, spec) -> torch.Tensor:
    """DCNv3's / DCNv4's aggregation as InternImage's pure-PyTorch core writes it: each group's
    channels as an image, one ``F.grid_sample`` (bilinear, zeros, align_corners=False) of every
    output pixel's K points (its kernel taps moved by ``offset_scale`` times the offsets, x first),
    weighted by the mask (``spec.softmax``: softmaxed over the group's points) and summed. The
    padding is a shift of the points (grid_sample's zeros outside are the zero padding), not a
    padded copy. input [N, H, W, G * D], ``spec`` a DcnSpec -> [N, Ho, Wo, G * D]; in float32
    (float64 when a tensor is float64)."""
    n, h, w, c = input.shape
    g, k = spec.group, spec.points
    ho, wo = spec.output_size(h, w)
    tensors = (input, offset) if mask is None else (input, offset, mask)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if spec.packed:
        rows = offset[..., :g * 3 * k].reshape(n, ho, wo, g, 3 * k)
        offsets, weights = rows[..., :2 * k].reshape(n, ho, wo, g, k, 2), rows[..., 2 * k:]
    else:
        offsets, weights = offset.reshape(n, ho, wo, g, k, 2), mask.reshape(n, ho, wo, g, k)
    weights = weights.to(dtype)
    if spec.softmax:
        weights = weights.softmax(-1)
    taps = host_table(tuple(spec.taps()), dtype, input.device)
    xs = torch.arange(wo, dtype=dtype, device=input.device) * spec.stride_w + (
        spec.dilation_w * (spec.kernel_w - 1) // 2 - spec.pad_w)
    ys = torch.arange(ho, dtype=dtype, device=input.device) * spec.stride_h + (
        spec.dilation_h * (spec.kernel_h - 1) // 2 - spec.pad_h)
    centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[:, :, None, None]
    points = centres + spec.offset_scale * (taps + offsets.to(dtype))
    px, py = points.unbind(-1)
    grid = finite_grid(torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), -1)).permute(0, 3, 1, 2, 4, 5).reshape(n * g, ho * wo, k, 2)
    image = input.to(dtype).permute(0, 3, 1, 2).reshape(n * g, c // g, h, w)
    samples = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = weights.permute(0, 3, 1, 2, 4).reshape(n * g, 1, ho * wo, k)
    out = (samples * weights).sum(-1).view(n, c, ho, wo).permute(0, 2, 3, 1)
    return out.to(spec.out_dtype).contiguous()
