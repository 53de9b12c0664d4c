"""RoI pooling by bilinear sampling: RoI align (Mask R-CNN), position-sensitive RoI align (R-FCN) and
deformable RoI pooling (Deformable ConvNets v1 / v2), forward and backward.

Bin (ph, pw) of RoI k averages a grid of samples: with the RoI's corners in input pixels
(``x1 * scale - shift``, shift 0.5, or 0 for roi_align's legacy rule, which also makes a RoI at
least 1 x 1), bins of ``height / PH`` by ``width / PW`` pixels, and ``grid_h x grid_w`` samples per
bin (``sampling_ratio``, or adaptively ``ceil(height / PH)`` by ``ceil(width / PW)``), sample
(iy, ix) of the bin lies at ``y = (start_h + ph * bin_h) + ((iy + 0.5) * bin_h) / grid_h`` (x
likewise; torchvision's and mmcv's order of operations), read by torchvision's RoI bilinear rule
(``clamped_axis``), and the bin is the sum over its samples divided by the sample count (at least
1, except in ps_roi_align, whose empty bins are 0 / 0 as torchvision's). Deformable pooling
shifts each bin's start by ``gamma * (width, height) * offset[k, :, ph, pw]`` and multiplies the
bin by ``mask[k, 0, ph, pw]``.

Two kernels.

``_roi_bins_kernel`` owns BLOCK_B (RoI, bin) lanes, the flat index ``k * PH * PW + bin`` (so
lanes stay busy whatever PH * PW is), and walks a range of channels BLOCK_C at a time; tiles are
``[BLOCK_C, BLOCK_B]``, gathered as the sampling kernel gathers (sampling.py: a warp along the
bins on NCHW memory, along the channels on channels_last memory). Every lane loops only over the
samples that can read the image: ``sample_window`` bounds the rows and columns of samples lying
in [-1, size], so a RoI far larger than the image costs what its part inside does, and the
sample loops run to the longest lane's window. FORWARD writes the bins; BACKWARD adds grad_input
atomically (INPUT_GRAD) and reduces the offset and mask gradients of its bins over every channel
itself (then one channel range per program: no atomics there).

``_roi_pixels_kernel`` is the deterministic grad_input: a program owns a tile of input pixels of
one image and BLOCK_C channels, walks every RoI in index order and, for each bin whose samples
can reach the tile, adds ``grad_output[k, c, bin] / count`` times the bin's weight at each
pixel. A bin's weights are separable (a sample's bilinear weight is a row weight times a column
weight, and its validity a row test and a column test), so the weight of a pixel is ``ay[row] *
ax[col]``, each a sum over the bin's sample rows or columns (``axis_weights``): no tap list, no
sort, no memory beyond grad_input, and each pixel summed in one fixed order.

The loads that decide grad_input's atomic addresses (RoIs, offsets) are in the kernel bodies:
torch.compile's mutation analysis counts a pointer passed to a helper as written when the
helper's result addresses a store (see transforms.py). Non-finite RoIs, batch indices outside
[0, N) and non-finite offsets read nothing: their bins are 0.
"""

import triton
import triton.language as tl

from stn_triton.kernels import codes
from stn_triton.kernels.sampling import as_index, gather, scatter_add, to_compute

FORWARD = tl.constexpr(codes.FORWARD)
BACKWARD = tl.constexpr(codes.BACKWARD)
ROI_ALIGN = tl.constexpr(codes.ROI_ALIGN)
PS_ROI_ALIGN = tl.constexpr(codes.PS_ROI_ALIGN)

# An adaptive sample grid is capped at this many samples a side (an integer float32 holds exactly);
# only a bin wider than 2^24 pixels would count its samples differently from torchvision.
GRID_LIMIT = tl.constexpr(16777216.0)
INFINITY = tl.constexpr(float("inf"))

SIZES = ["K", "N", "C", "H", "W", "LEVEL"]


@triton.jit
def finite(v):
    return (v == v) & (tl.abs(v) < INFINITY)


@triton.jit
def roi_frame(batch, x1, y1, x2, y2, scale, N, PH, PW, SR, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """A RoI (batch index, corners in box units) -> where its bins lie in input pixels:
    (n, start_w, start_h, width, height, bin_w, bin_h, grid_w, grid_h, count, ok).

    ``ok``: every number finite and the batch index in [0, N) after truncation (torchvision's int
    cast); where it is False every value is a harmless 0 (n too) and the RoI must read nothing.
    Grid sides are integral floats (``SR`` > 0: exactly SR)."""
    shift = 0.5
    if KIND == ROI_ALIGN and not ALIGNED:
        shift = 0.0
    start_w = x1 * scale - shift
    start_h = y1 * scale - shift
    width = (x2 * scale - shift) - start_w
    height = (y2 * scale - shift) - start_h
    ok = (batch > -1.0) & (batch < N * 1.0) & finite(start_w) & finite(start_h) & finite(width) & finite(height)
    start_w = tl.where(ok, start_w, 0.0)
    start_h = tl.where(ok, start_h, 0.0)
    width = tl.where(ok, width, 0.0)
    height = tl.where(ok, height, 0.0)
    if KIND == ROI_ALIGN and not ALIGNED:
        # The legacy rule forces too small RoIs to 1 x 1.
        width = tl.maximum(width, 1.0)
        height = tl.maximum(height, 1.0)
    bin_w = width / PW
    bin_h = height / PH
    if SR > 0:
        grid_w = bin_w * 0 + SR
        grid_h = bin_h * 0 + SR
    else:
        grid_w = tl.minimum(tl.ceil(bin_w), GRID_LIMIT)
        grid_h = tl.minimum(tl.ceil(bin_h), GRID_LIMIT)
    count = grid_h * grid_w
    if KIND != PS_ROI_ALIGN:
        count = tl.maximum(count, 1.0)
    count = tl.where(ok, count, 1.0)
    n = tl.where(ok, batch, 0.0).to(tl.int32)
    return n, start_w, start_h, width, height, bin_w, bin_h, grid_w, grid_h, count, ok


@triton.jit
def sample_window(start, size, grid, lo, hi):
    """Of the samples ``start + ((i + 0.5) * size) / grid``, i in [0, grid): a range [first, first +
    count) of i holding every one that lies in [lo, hi] (a superset by a rounding margin).

    Everything finite in, int32 out; a degenerate bin (size 0) keeps its whole grid."""
    g = tl.maximum(grid, 0.0)
    spacing = size / tl.maximum(g, 1.0)
    regular = spacing != 0
    safe = tl.where(regular, spacing, 1.0)
    t_lo = tl.minimum(tl.maximum((lo - start) / safe - 0.5, -1.0), g + 1)
    t_hi = tl.minimum(tl.maximum((hi - start) / safe - 0.5, -1.0), g + 1)
    a = tl.minimum(t_lo, t_hi)
    b = tl.maximum(t_lo, t_hi)
    first = tl.maximum(tl.floor(a - (0.5 + tl.abs(a) * 0.000004)), 0.0)
    end = tl.minimum(tl.floor(b + (0.5 + tl.abs(b) * 0.000004)) + 1, g)
    first = tl.where(regular, first, 0.0)
    end = tl.where(regular, end, g)
    return first.to(tl.int32), tl.maximum(end - first, 0.0).to(tl.int32)


@triton.jit
def clamped_axis(y, size):
    """torchvision's RoI bilinear rule along one axis: a sample at y in [-1, size] reads rows
    ``low`` and ``high = low + 1`` of ``max(y, 0)``, both the last row once ``low`` reaches it.
    Returns (low, high, weight of low, weight of high, d weight of high / dy, inside); outside
    [-1, size] (NaN included) inside is False and the rows are 0. ``size`` >= 1 (the launchers skip
    empty feature maps)."""
    inside = (y >= -1.0) & (y <= size * 1.0)
    moving = inside & (y > 0)
    yc = tl.where(moving, y, 0.0)
    low = tl.floor(yc)
    edge = low >= size - 1.0
    low = tl.where(edge, size - 1.0, low)
    low = tl.where(inside, low, 0.0)
    frac = tl.where(edge, 0.0, yc - low)
    high = tl.where(edge, low, low + 1)
    slope = tl.where(moving & ~edge, 1.0, 0.0)
    return low.to(tl.int32), high.to(tl.int32), 1.0 - frac, frac, slope, inside


@triton.jit
def axis_weights(p, bin_start, bin_size, grid, first, count, size):
    """The weight of a bin's samples at pixel rows (or columns) ``p``: the sum, over samples
    ``first`` to ``first + count``, of what ``clamped_axis`` gives each row."""
    weights = p * 0.0 + bin_start * 0
    divisor = tl.maximum(grid, 1.0)  # equal to grid wherever there are samples
    for s in range(first, first + count):
        y = bin_start + ((s + 0.5) * bin_size) / divisor
        low, high, w_low, w_high, _, inside = clamped_axis(y, size)
        weights += tl.where(p == low, tl.where(inside, w_low, 0.0), 0.0)
        weights += tl.where(p == high, tl.where(inside, w_high, 0.0), 0.0)
    return weights


@triton.jit(do_not_specialize=SIZES)
def _roi_bins_kernel(
    x_ptr,  # [N, C_in, H, W] input of this launch's level; BACKWARD reads it only for OFFSET_GRAD / MASK_GRAD
    rois_ptr,  # [K, 5] RoIs: batch index, x1, y1, x2, y2 in box units
    levels_ptr,  # LEVELS: [K] integer level of each RoI (a launch pools the RoIs of LEVEL); else unused
    offset_ptr,  # OFFSET: [K, 2, PH, PW] bin offsets (x, then y) in units of gamma times the RoI's size
    mask_ptr,  # MASK: [K, 1, PH, PW] bin modulation
    y_ptr,  # FORWARD: [K, C, PH, PW] out, each RoI's bins dense (flat bin stride sy_b)
    gy_ptr,  # BACKWARD: gradient of the output, any strides
    gx_ptr,  # BACKWARD, INPUT_GRAD: zero-filled gradient of the input, compute dtype, added atomically
    goffset_ptr,  # BACKWARD, OFFSET_GRAD: [K, 2, PH, PW] contiguous out, compute dtype
    gmask_ptr,  # BACKWARD, MASK_GRAD: [K, PH, PW] contiguous out, compute dtype
    K, N, C, H, W,  # RoIs, images, output channels (PS_ROI_ALIGN: input channels / (PH * PW)), input size
    PH, PW, SR,  # bins a side, samples a bin side (<= 0: adaptive)
    LEVEL,  # this launch's level (LEVELS)
    scale, gamma,  # box units -> input pixels, offset scale
    sx_n, sx_c, sx_h, sx_w,  # input strides
    sr_k, sr_c, sl_k,  # RoI and level strides
    so_k, so_c, so_h, so_w,  # offset strides
    sm_k, sm_h, sm_w,  # mask strides
    sy_k, sy_c, sy_b,  # output strides (RoI, channel, flat bin)
    sgy_k, sgy_c, sgy_h, sgy_w,  # grad_output strides
    sgx_n, sgx_c, sgx_h, sgx_w,  # grad_input strides
    PASS: tl.constexpr,  # FORWARD or BACKWARD
    KIND: tl.constexpr,  # ROI_ALIGN, PS_ROI_ALIGN or DEFORM_ROI_POOL
    ALIGNED: tl.constexpr,  # ROI_ALIGN: the half-pixel shift (always on for the other kinds)
    OFFSET: tl.constexpr, MASK: tl.constexpr, LEVELS: tl.constexpr,
    ZERO_OTHERS: tl.constexpr,  # FORWARD with LEVELS: also write 0 to the other levels' lanes (the first launch)
    INPUT_GRAD: tl.constexpr, OFFSET_GRAD: tl.constexpr, MASK_GRAD: tl.constexpr,
    F64: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_B: tl.constexpr,  # (RoI, bin) lanes per program
    BLOCK_C: tl.constexpr,  # channels per step of the channel loop
    EVEN_C: tl.constexpr,  # C is whole BLOCK_C steps
):
    bins = PH * PW
    lane = as_index(tl.program_id(0), INDEX_64) * BLOCK_B + tl.arange(0, BLOCK_B)
    lane_mask = lane < K * bins
    k = tl.where(lane_mask, lane // bins, 0)
    b = lane % bins
    ph = b // PW
    pw = b % PW

    roi = rois_ptr + k * sr_k
    n, start_w, start_h, width, height, bin_w, bin_h, grid_w, grid_h, count, ok = roi_frame(
        to_compute(tl.load(roi, mask=lane_mask, other=-1.0), F64),
        to_compute(tl.load(roi + sr_c, mask=lane_mask, other=0.0), F64),
        to_compute(tl.load(roi + 2 * sr_c, mask=lane_mask, other=0.0), F64),
        to_compute(tl.load(roi + 3 * sr_c, mask=lane_mask, other=0.0), F64),
        to_compute(tl.load(roi + 4 * sr_c, mask=lane_mask, other=0.0), F64),
        scale, N, PH, PW, SR, KIND, ALIGNED)
    # The lanes this launch writes: with levels, those of its level (the others are another launch's).
    mine = lane_mask
    if LEVELS:
        mine = mine & (tl.load(levels_ptr + k * sl_k, mask=lane_mask, other=-1) == LEVEL)
    ok = ok & mine
    written = mine
    if ZERO_OTHERS:
        written = lane_mask
    if OFFSET:
        off = offset_ptr + k * so_k + ph * so_h + pw * so_w
        start_w = start_w + gamma * width * to_compute(tl.load(off, mask=ok, other=0.0), F64)
        start_h = start_h + gamma * height * to_compute(tl.load(off + so_c, mask=ok, other=0.0), F64)
        ok = ok & finite(start_w) & finite(start_h)
        start_w = tl.where(ok, start_w, 0.0)
        start_h = tl.where(ok, start_h, 0.0)
    bin_x0 = start_w + pw * bin_w
    bin_y0 = start_h + ph * bin_h
    first_y, rows = sample_window(bin_y0, bin_h, grid_h, -1.0, H * 1.0)
    first_x, cols = sample_window(bin_x0, bin_w, grid_w, -1.0, W * 1.0)
    rows = tl.where(ok, rows, 0)
    cols = tl.where(ok, cols, 0)
    steps_y = tl.max(rows, axis=0)
    steps_x = tl.max(cols, axis=0)
    # The grid sides as divisors: equal wherever a bin has samples, 1 where it has none.
    divisor_h = tl.maximum(grid_h, 1.0)
    divisor_w = tl.maximum(grid_w, 1.0)
    modulation = count * 0 + 1.0
    if MASK:
        modulation = to_compute(tl.load(mask_ptr + k * sm_k + ph * sm_h + pw * sm_w, mask=ok, other=0.0), F64)

    n = as_index(n, INDEX_64)
    x_lane = x_ptr + n * sx_n
    gx_lane = gx_ptr + n * sgx_n
    x_channel = sx_c
    gx_channel = sgx_c
    if KIND == PS_ROI_ALIGN:
        # Output channel c of bin b reads input channel c * bins + b.
        x_lane += b * sx_c
        gx_lane += b * sgx_c
        x_channel = sx_c * bins
        gx_channel = sgx_c * bins

    # A block of channels per program_id(1), or every channel where the program reduces over them.
    c_begin = 0
    c_end = C
    if not (OFFSET_GRAD or MASK_GRAD):
        c_begin = tl.program_id(1) * BLOCK_C
        c_end = tl.minimum(c_begin + BLOCK_C, C)
    if PASS == FORWARD:
        for c0 in range(c_begin, c_end, BLOCK_C):
            c = as_index(c0 + tl.arange(0, BLOCK_C), INDEX_64)
            c_mask = (c < c_end) | EVEN_C
            acc = to_compute(tl.zeros([BLOCK_C, BLOCK_B], dtype=tl.float32), F64)
            for j in range(0, steps_y):
                y = bin_y0 + ((first_y + j + 0.5) * bin_h) / divisor_h
                yl, yh, wyl, wyh, _, y_in = clamped_axis(y, H)
                y_in = y_in & (j < rows)
                row_l = x_lane + as_index(yl, INDEX_64) * sx_h
                row_h = x_lane + as_index(yh, INDEX_64) * sx_h
                for i in range(0, steps_x):
                    x = bin_x0 + ((first_x + i + 0.5) * bin_w) / divisor_w
                    xl, xh, wxl, wxh, _, x_in = clamped_axis(x, W)
                    read = c_mask[:, None] & (y_in & x_in & (i < cols))[None, :]
                    xl = as_index(xl, INDEX_64) * sx_w
                    xh = as_index(xh, INDEX_64) * sx_w
                    channels = c * x_channel
                    acc += to_compute(gather(channels, row_l + xl, read), F64) * (wyl * wxl)[None, :]
                    acc += to_compute(gather(channels, row_l + xh, read), F64) * (wyl * wxh)[None, :]
                    acc += to_compute(gather(channels, row_h + xl, read), F64) * (wyh * wxl)[None, :]
                    acc += to_compute(gather(channels, row_h + xh, read), F64) * (wyh * wxh)[None, :]
            out = acc / count[None, :]
            if MASK:
                out = out * modulation[None, :]
            store = y_ptr + (k * sy_k + b * sy_b)[None, :] + (c * sy_c)[:, None]
            tl.store(store, tl.where(mine[None, :], out, 0.0).to(y_ptr.dtype.element_ty),
                     mask=c_mask[:, None] & written[None, :])
    else:
        gy_lane = gy_ptr + k * sgy_k + ph * sgy_h + pw * sgy_w
        # Per-element partial sums of the bins' offset and mask gradients, reduced once at the end.
        g_x_tile = to_compute(tl.zeros([BLOCK_C, BLOCK_B], dtype=tl.float32), F64)
        g_y_tile = g_x_tile
        g_mask_tile = g_x_tile
        for c0 in range(c_begin, c_end, BLOCK_C):
            c = as_index(c0 + tl.arange(0, BLOCK_C), INDEX_64)
            c_mask = (c < c_end) | EVEN_C
            grad_bin = to_compute(gather(c * sgy_c, gy_lane, c_mask[:, None] & ok[None, :]), F64) / count[None, :]
            grad_sample = grad_bin * modulation[None, :]  # d loss / d (each sample's value)
            for j in range(0, steps_y):
                y = bin_y0 + ((first_y + j + 0.5) * bin_h) / divisor_h
                yl, yh, wyl, wyh, slope_y, y_in = clamped_axis(y, H)
                y_in = y_in & (j < rows)
                for i in range(0, steps_x):
                    x = bin_x0 + ((first_x + i + 0.5) * bin_w) / divisor_w
                    xl, xh, wxl, wxh, slope_x, x_in = clamped_axis(x, W)
                    read = c_mask[:, None] & (y_in & x_in & (i < cols))[None, :]
                    yl_ = as_index(yl, INDEX_64)
                    yh_ = as_index(yh, INDEX_64)
                    xl_ = as_index(xl, INDEX_64)
                    xh_ = as_index(xh, INDEX_64)
                    if INPUT_GRAD:
                        channels = c * gx_channel
                        scatter_add(channels, gx_lane + (yl_ * sgx_h + xl_ * sgx_w),
                                    (grad_sample * (wyl * wxl)[None, :]).to(gx_ptr.dtype.element_ty), read)
                        scatter_add(channels, gx_lane + (yl_ * sgx_h + xh_ * sgx_w),
                                    (grad_sample * (wyl * wxh)[None, :]).to(gx_ptr.dtype.element_ty), read)
                        scatter_add(channels, gx_lane + (yh_ * sgx_h + xl_ * sgx_w),
                                    (grad_sample * (wyh * wxl)[None, :]).to(gx_ptr.dtype.element_ty), read)
                        scatter_add(channels, gx_lane + (yh_ * sgx_h + xh_ * sgx_w),
                                    (grad_sample * (wyh * wxh)[None, :]).to(gx_ptr.dtype.element_ty), read)
                    if OFFSET_GRAD or MASK_GRAD:
                        channels = c * x_channel
                        v00 = to_compute(gather(channels, x_lane + (yl_ * sx_h + xl_ * sx_w), read), F64)
                        v01 = to_compute(gather(channels, x_lane + (yl_ * sx_h + xh_ * sx_w), read), F64)
                        v10 = to_compute(gather(channels, x_lane + (yh_ * sx_h + xl_ * sx_w), read), F64)
                        v11 = to_compute(gather(channels, x_lane + (yh_ * sx_h + xh_ * sx_w), read), F64)
                        if MASK_GRAD:
                            value = wyl[None, :] * (wxl[None, :] * v00 + wxh[None, :] * v01) \
                                + wyh[None, :] * (wxl[None, :] * v10 + wxh[None, :] * v11)
                            g_mask_tile += grad_bin * value
                        if OFFSET_GRAD:
                            g_x_tile += grad_sample * (slope_x[None, :] * (wyl[None, :] * (v01 - v00)
                                                                            + wyh[None, :] * (v11 - v10)))
                            g_y_tile += grad_sample * (slope_y[None, :] * (wxl[None, :] * (v10 - v00)
                                                                            + wxh[None, :] * (v11 - v01)))
        if OFFSET_GRAD:
            # x = start_w + gamma * width * offset_x + ...: d x / d offset_x = gamma * width.
            point = goffset_ptr + (k * 2 * bins + b)
            tl.store(point, gamma * width * tl.sum(g_x_tile, axis=0), mask=mine)
            tl.store(point + bins, gamma * height * tl.sum(g_y_tile, axis=0), mask=mine)
        if MASK_GRAD:
            tl.store(gmask_ptr + lane, tl.sum(g_mask_tile, axis=0), mask=mine)


@triton.jit(do_not_specialize=SIZES)
def _roi_pixels_kernel(
    rois_ptr,  # [K, 5] RoIs: batch index, x1, y1, x2, y2 in box units
    levels_ptr,  # LEVELS: [K] integer level of each RoI; else unused
    offset_ptr,  # OFFSET: [K, 2, PH, PW] bin offsets (x, then y)
    mask_ptr,  # MASK: [K, 1, PH, PW] bin modulation
    gy_ptr,  # gradient of the output [K, C_out, PH, PW], any strides
    gx_ptr,  # [N, C, H, W] out: the gradient of the input, every element written once
    K, N, C, H, W,  # RoIs, images, input channels, input size
    PH, PW, SR, LEVEL,  # bins a side, samples a bin side (<= 0: adaptive), this launch's level
    scale, gamma,
    sr_k, sr_c, sl_k,  # RoI and level strides
    so_k, so_c, so_h, so_w,  # offset strides
    sm_k, sm_h, sm_w,  # mask strides
    sgy_k, sgy_c, sgy_h, sgy_w,  # grad_output strides
    sgx_n, sgx_c, sgx_h, sgx_w,  # grad_input strides
    KIND: tl.constexpr, ALIGNED: tl.constexpr, OFFSET: tl.constexpr, MASK: tl.constexpr, LEVELS: tl.constexpr,
    F64: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,  # the pixel tile
    BLOCK_C: tl.constexpr,  # channels per program (PS_ROI_ALIGN: output channels of one bin)
    EVEN_C: tl.constexpr,  # the channels are whole BLOCK_C blocks
):
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    image = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    y0 = (tile // tiles_w) * BLOCK_H
    x0 = (tile % tiles_w) * BLOCK_W
    py = y0 + tl.arange(0, BLOCK_H)
    px = x0 + tl.arange(0, BLOCK_W)
    bins = PH * PW
    if KIND == PS_ROI_ALIGN:
        # program_id(1) holds one bin b and a block of output channels: their input channels c * bins + b.
        c_out_count = C // bins
        blocks = tl.cdiv(c_out_count, BLOCK_C)
        only_bin = tl.program_id(1) // blocks
        c_out = as_index((tl.program_id(1) % blocks) * BLOCK_C + tl.arange(0, BLOCK_C), INDEX_64)
        c_mask = (c_out < c_out_count) | EVEN_C
        c = c_out * bins + only_bin
    else:
        only_bin = 0
        c = as_index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), INDEX_64)
        c_mask = (c < C) | EVEN_C
        c_out = c
    # Samples that can reach the tile lie within one pixel of it (torchvision's rule reads rows
    # floor(y) and floor(y) + 1, and [-1, 0] reads row 0, [size - 1, size] the last).
    lo_y = y0 - 1.0
    hi_y = y0 + BLOCK_H * 1.0
    lo_x = x0 - 1.0
    hi_x = x0 + BLOCK_W * 1.0
    gy_channels = gy_ptr + c_out * sgy_c
    acc = to_compute(tl.zeros([BLOCK_H, BLOCK_W, BLOCK_C], dtype=tl.float32), F64)
    for k in range(0, K):
        roi = rois_ptr + k * sr_k
        n, start_w, start_h, width, height, bin_w, bin_h, grid_w, grid_h, count, ok = roi_frame(
            to_compute(tl.load(roi), F64), to_compute(tl.load(roi + sr_c), F64),
            to_compute(tl.load(roi + 2 * sr_c), F64), to_compute(tl.load(roi + 3 * sr_c), F64),
            to_compute(tl.load(roi + 4 * sr_c), F64), scale, N, PH, PW, SR, KIND, ALIGNED)
        ok = ok & (n == image)
        if LEVELS:
            ok = ok & (tl.load(levels_ptr + k * sl_k) == LEVEL)
        if ok:
            if KIND == PS_ROI_ALIGN:
                ph_first = only_bin // PW
                ph_count = 1
                pw_first = only_bin % PW
                pw_count = 1
            elif OFFSET:
                ph_first = 0
                ph_count = PH
                pw_first = 0
                pw_count = PW
            else:
                # The bins whose centres lie within a bin of the tile's sample window.
                ph_first, ph_count = sample_window(start_h, height, PH * 1.0, lo_y - tl.abs(bin_h), hi_y + tl.abs(bin_h))
                pw_first, pw_count = sample_window(start_w, width, PW * 1.0, lo_x - tl.abs(bin_w), hi_x + tl.abs(bin_w))
            for ph in range(ph_first, ph_first + ph_count):
                bin_y0 = start_h + ph * bin_h
                first_y, rows = sample_window(bin_y0, bin_h, grid_h, lo_y, hi_y)
                if not OFFSET:
                    ay = axis_weights(py, bin_y0, bin_h, grid_h, first_y, rows, H)
                for pw in range(pw_first, pw_first + pw_count):
                    bin_x0 = start_w + pw * bin_w
                    if OFFSET:
                        off = offset_ptr + k * so_k + ph * so_h + pw * so_w
                        bin_x0 = (start_w + gamma * width * to_compute(tl.load(off), F64)) + pw * bin_w
                        bin_y0 = (start_h + gamma * height * to_compute(tl.load(off + so_c), F64)) + ph * bin_h
                        shifted = finite(bin_x0) & finite(bin_y0)
                        bin_x0 = tl.where(shifted, bin_x0, 0.0)
                        bin_y0 = tl.where(shifted, bin_y0, 0.0)
                        first_y, rows = sample_window(bin_y0, bin_h, grid_h, lo_y, hi_y)
                        rows = tl.where(shifted, rows, 0)
                    first_x, cols = sample_window(bin_x0, bin_w, grid_w, lo_x, hi_x)
                    if (rows > 0) & (cols > 0):
                        if OFFSET:
                            ay = axis_weights(py, bin_y0, bin_h, grid_h, first_y, rows, H)
                        ax = axis_weights(px, bin_x0, bin_w, grid_w, first_x, cols, W)
                        share = 1.0 / count
                        if MASK:
                            share = share * to_compute(tl.load(mask_ptr + k * sm_k + ph * sm_h + pw * sm_w), F64)
                        grad = tl.load(gy_channels + k * sgy_k + ph * sgy_h + pw * sgy_w, mask=c_mask, other=0.0)
                        weight = ay[:, None] * ax[None, :]
                        acc += weight[:, :, None] * (to_compute(grad, F64) * share)[None, None, :]
    rows_out = as_index(py, INDEX_64) * sgx_h
    cols_out = as_index(px, INDEX_64) * sgx_w
    out = gx_ptr + as_index(image, INDEX_64) * sgx_n + rows_out[:, None, None] + cols_out[None, :, None] \
        + (c * sgx_c)[None, None, :]
    keep = (py < H)[:, None, None] & (px < W)[None, :, None] & c_mask[None, None, :]
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=keep)
