"""Deformable convolution (DCN v1/v2) as an implicit GEMM: sampling and GEMM in one kernel.

Rows of the GEMM are output pixels, columns output channels, and the reduction runs over taps
k = (i, j) of the kernel window and input channels. Each A tile is sampled bilinearly at the
tap's offset position, scaled by the modulation mask, and fed to ``tl.dot``: no im2col column
buffer ever reaches memory. The bilinear read is the sampling arithmetic of sampling.py in pixel
units with zero padding, which is torchvision's rule (a point at or beyond -1 / the size reads
nothing).

Rows run per image: a block of rows is BLOCK_M consecutive pixels p = oy * WO + ox of one
image n, so a tensor whose pixels are dense (NCHW: stride 1) is read and written along provably
contiguous addresses (the offsets, the mask, the output, grad_output). ``*_p`` strides are the
stride of that flat pixel index.

The gather's orientation follows the memory. One (pixel, tap, corner) read touches BLOCK_K
channels. In channels-last memory (CHANNELS_FASTEST) they are one contiguous run: the tile is
loaded as [BLOCK_M, BLOCK_K] and the compiler puts a warp's threads along the channels, with
vector loads. In NCHW memory the channels lie H * W apart while neighbouring output pixels read
neighbouring input pixels, and no dimension is provably contiguous: the tile is addressed with the
pixels in the dimension Triton's tie-break gives the threads (sampling.py, ``TIES_GO_FIRST``), as
[BLOCK_K, BLOCK_M] transposed in registers from Triton 3.7, as [BLOCK_M, BLOCK_K] before.

torch.compile's mutation analysis counts a pointer passed to a helper as written when the
helper's result addresses a store, so every load whose value addresses a store or atomic (the
offsets) is in a kernel body; helpers take no pointers but the ones they load from or add into.
"""

import triton
import triton.language as tl

from stn_triton.kernels.sampling import (
    BILINEAR,
    TIES_GO_FIRST,
    ZEROS,
    as_index,
    keep_indexable,
    tap,
    to_compute,
)

# Sizes that change from layer to layer and never matter to the compiled code. P, CG, COG and CPG
# are left to Triton's specialization: their divisibility by 16 is what lets it prove that channel
# chunks and pixel blocks are aligned (and their masks uniform) for vector loads and stores.
SIZES = ["C", "COUT", "H", "W", "WO", "KW", "K"]


@triton.jit
def image_pixels(program, P, BLOCK_M: tl.constexpr, INDEX_64: tl.constexpr):
    """Program -> (its image n, its output pixels p [BLOCK_M] of that image, which p < P)."""
    blocks = tl.cdiv(P, BLOCK_M)
    p = (program % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    return as_index(program // blocks, INDEX_64), as_index(p, INDEX_64), p < P


@triton.jit
def output_channels(program, COG, BLOCK_N: tl.constexpr):
    """Program -> (its convolution group, its output channels co [BLOCK_N], which co are in the group)."""
    blocks = tl.cdiv(COG, BLOCK_N)
    group = program // blocks
    co = group * COG + (program % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return group, co, co < (group + 1) * COG


@triton.jit
def tap_position(oy, ox, k, KW, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    """Where tap k = i * KW + j of output pixel (oy, ox) reads the input, offset by (dy, dx).

    Returns (y, x) in input pixels; a non-finite or huge position is sent where every corner misses.
    """
    y = keep_indexable(oy * stride_h - pad_h + (k // KW) * dil_h + dy)
    x = keep_indexable(ox * stride_w - pad_w + (k % KW) * dil_w + dx)
    return y, x


@triton.jit
def gather(rows, columns, row_mask, column_mask, CHANNELS_FASTEST: tl.constexpr):
    """``[BLOCK_M, BLOCK_K]`` values at ``rows[m] + columns[c]`` (pointers [BLOCK_M], offsets [BLOCK_K]), 0 where masked.

    sampling.py's ``gather`` in the A tile's orientation. Routed through it (a transpose of its
    ``[C, P]`` tile) the channels-last tile is loaded transposed and the kernels compile to more
    scalar loads and different registers (perf/resources.py), so the A tile keeps this helper.
    """
    if CHANNELS_FASTEST or TIES_GO_FIRST:
        return tl.load(rows[:, None] + columns[None, :], mask=row_mask[:, None] & column_mask[None, :], other=0.0)
    else:
        tile = tl.load(rows[None, :] + columns[:, None], mask=row_mask[None, :] & column_mask[:, None], other=0.0)
        return tl.trans(tile)


@triton.jit
def scatter_add(rows, columns, values, row_mask, column_mask, CHANNELS_FASTEST: tl.constexpr):
    """Atomically add ``values`` [BLOCK_M, BLOCK_K] at ``rows[m] + columns[c]``, oriented as ``gather``."""
    if CHANNELS_FASTEST or TIES_GO_FIRST:
        tl.atomic_add(rows[:, None] + columns[None, :], values, mask=row_mask[:, None] & column_mask[None, :],
                      sem="relaxed")
    else:
        tl.atomic_add(rows[None, :] + columns[:, None], tl.trans(values),
                      mask=row_mask[None, :] & column_mask[:, None], sem="relaxed")


@triton.jit
def modulated_samples(x_image, y, x, modulation, W, H, sx_h, sx_w, channels, row_mask, c_mask,
                      INDEX_64: tl.constexpr, CHANNELS_FASTEST: tl.constexpr, F64: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_M, BLOCK_K]``: each row's bilinear read at its sample point (y, x) of the channels at
    offsets ``channels``, times its modulation; corner by corner, one loaded corner live at a time.
    The rows of the forward's A tile and of the weight gradient's B tile."""
    samples = to_compute(tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), F64)
    for t in tl.static_range(4):
        xi, yi, _, inside, weight, _, _, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
        rows = x_image + as_index(yi, INDEX_64) * sx_h + as_index(xi, INDEX_64) * sx_w
        value = gather(rows, channels, row_mask & inside, c_mask, CHANNELS_FASTEST)
        samples += (weight * modulation)[:, None] * to_compute(value, F64)
    return samples


@triton.jit
def gemm_operand(x, LOW_PRECISION: tl.constexpr, dtype: tl.constexpr):
    """A tile as tl.dot takes it: in the tensors' half dtype for tensor cores, else as computed."""
    if LOW_PRECISION:
        return x.to(dtype)
    else:
        return x


@triton.jit(do_not_specialize=SIZES)
def _deform_conv_fwd_kernel(
    x_ptr,  # [N, C, H, W] input (channels-last for CHANNELS_FASTEST)
    off_ptr,  # [N, 2 * G * K, HO, WO] offsets: channel 2 (g K + k) is dy, + 1 is dx
    mask_ptr,  # [N, G * K, HO, WO] modulation (HAS_MASK)
    w_ptr,  # [COUT, CG, KH, KW] weight
    b_ptr,  # [COUT] bias (HAS_BIAS)
    y_ptr,  # [N, COUT, HO, WO] output
    P,  # HO * WO output pixels per image
    H, W, WO, KW, K,  # K = KH * KW taps
    CG, COG, CPG,  # input channels per conv group, output channels per conv group, input channels per offset group
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    soff_n, soff_c, soff_p,
    sm_n, sm_c, sm_p,
    sw_o, sw_i, sw_h, sw_w,
    sy_n, sy_c, sy_p,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, F64: tl.constexpr,
    LOW_PRECISION: tl.constexpr,  # feed tl.dot half operands (float16 / bfloat16 tensors)
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for float32 operands ("ieee", "tf32x3", "tf32")
    INDEX_64: tl.constexpr,
    CHANNELS_FASTEST: tl.constexpr,  # gather with a warp's threads along channels (channels-last input)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_M pixels of one image x BLOCK_N output channels of one conv group.

    For each tap and each offset group overlapping the conv group, the sample point of every row
    (offsets, modulation) is computed before the channel loop; the corners and bilinear weights
    (``tap()`` in ``modulated_samples``) are written inside it and depend on no channel, so the
    compiler hoists them (compiled for sm_90 at dcn_r50: every floor before the channel loop). The A
    tile of each channel chunk is summed corner by corner (one loaded corner live at a time) and
    multiplied.
    """
    n, p, row_mask = image_pixels(tl.program_id(0), P, BLOCK_M, INDEX_64)
    oy = p // WO
    ox = p % WO
    group, co, co_mask = output_channels(tl.program_id(1), COG, BLOCK_N)
    x_image = x_ptr + n * sx_n
    off_rows = off_ptr + n * soff_n + p * soff_p
    mask_rows = mask_ptr + n * sm_n + p * sm_p
    first_og = (group * CG) // CPG
    last_og = ((group + 1) * CG - 1) // CPG
    acc = to_compute(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), F64)
    for k in range(0, K):
        for og in range(first_og, last_og + 1):
            channel = as_index(og * K + k, INDEX_64)
            dy = to_compute(tl.load(off_rows + 2 * channel * soff_c, mask=row_mask, other=0.0), F64)
            dx = to_compute(tl.load(off_rows + (2 * channel + 1) * soff_c, mask=row_mask, other=0.0), F64)
            y, x = tap_position(oy, ox, k, KW, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
            if HAS_MASK:
                modulation = to_compute(tl.load(mask_rows + channel * sm_c, mask=row_mask, other=0.0), F64)
            else:
                modulation = tl.full([BLOCK_M], 1.0, dy.dtype)
            lo = tl.maximum(og * CPG, group * CG)
            hi = tl.minimum((og + 1) * CPG, (group + 1) * CG)
            for c0 in range(lo, hi, BLOCK_K):
                ci = c0 + tl.arange(0, BLOCK_K)
                c_mask = ci < hi
                a = modulated_samples(x_image, y, x, modulation, W, H, sx_h, sx_w, as_index(ci, INDEX_64) * sx_c,
                                      row_mask, c_mask, INDEX_64, CHANNELS_FASTEST, F64, BLOCK_M, BLOCK_K)
                cl = ci - group * CG
                w_tile = w_ptr + (co * sw_o)[None, :] + (cl * sw_i)[:, None] + (k // KW) * sw_h + (k % KW) * sw_w
                w = tl.load(w_tile, mask=c_mask[:, None] & co_mask[None, :], other=0.0)
                a = gemm_operand(a, LOW_PRECISION, w_ptr.dtype.element_ty)
                b = gemm_operand(to_compute(w, F64), LOW_PRECISION, w_ptr.dtype.element_ty)
                acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += to_compute(tl.load(b_ptr + co, mask=co_mask, other=0.0), F64)[None, :]
    out = (y_ptr + n * sy_n + p * sy_p)[:, None] + (as_index(co, INDEX_64) * sy_c)[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & co_mask[None, :])


@triton.jit(do_not_specialize=SIZES)
def _deform_conv_bwd_data_kernel(
    gy_ptr,  # [N, COUT, HO, WO] gradient of the output
    x_ptr, off_ptr, mask_ptr, w_ptr,  # as in the forward
    gx_ptr,  # [N, C, H, W] zero-filled gradient of the input with x's strides, compute dtype, added atomically (INPUT_GRAD)
    col_ptr,  # [N * HO * WO, K, C] contiguous out: the modulated column gradient (COLUMNS)
    goff_ptr,  # [N, 2 * G * K, HO, WO] contiguous gradient of the offsets (OFFSET_GRAD)
    gmask_ptr,  # [N, G * K, HO, WO] contiguous gradient of the mask (MASK_GRAD)
    P, C, H, W, WO, KW, K, CG, COG, CPG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    soff_n, soff_c, soff_p,
    sm_n, sm_c, sm_p,
    sw_o, sw_i, sw_h, sw_w,
    sgy_n, sgy_c, sgy_p,
    HAS_MASK: tl.constexpr, F64: tl.constexpr, LOW_PRECISION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr, CHANNELS_FASTEST: tl.constexpr,
    INPUT_GRAD: tl.constexpr,  # scatter into gx_ptr with atomics
    COLUMNS: tl.constexpr,  # write the column gradient instead, for the sorted (deterministic) backward
    OFFSET_GRAD: tl.constexpr, MASK_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_M pixels of one image and one offset group g, every tap and channel of g.

    The column gradient grad_y @ W^T of each (tap, channel chunk) is formed in registers. Corner by
    corner it is scattered into grad_input through the bilinear weights, and contracted with the
    corner's values over the chunk's channels into one number per row, from which grad_offset and
    grad_mask follow (d value / d y = sum over corners of d weight / d y * corner value): only one
    loaded corner is live at a time. This program alone writes g's grad_offset and grad_mask.

    The column gradient is formed transposed, W^T @ grad_y^T, and transposed back: the product's
    layout is then not a tensor-core accumulator layout, and the corner arithmetic runs in the
    gathered tiles' layout with one conversion of the column gradient per chunk instead of three
    conversions per corner (Triton resolves a clash of an MMA result with a loaded tile in favour of
    the MMA layout).
    """
    n, p, row_mask = image_pixels(tl.program_id(0), P, BLOCK_M, INDEX_64)
    oy = p // WO
    ox = p % WO
    g = tl.program_id(1)
    G = C // CPG
    x_image = x_ptr + n * sx_n
    gx_image = gx_ptr + n * sx_n
    off_rows = off_ptr + n * soff_n + p * soff_p
    mask_rows = mask_ptr + n * sm_n + p * sm_p
    gy_rows = gy_ptr + n * sgy_n + p * sgy_p
    first_group = (g * CPG) // CG
    last_group = ((g + 1) * CPG - 1) // CG
    for k in range(0, K):
        channel = as_index(g * K + k, INDEX_64)
        dy = to_compute(tl.load(off_rows + 2 * channel * soff_c, mask=row_mask, other=0.0), F64)
        dx = to_compute(tl.load(off_rows + (2 * channel + 1) * soff_c, mask=row_mask, other=0.0), F64)
        y, x = tap_position(oy, ox, k, KW, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        if HAS_MASK:
            modulation = to_compute(tl.load(mask_rows + channel * sm_c, mask=row_mask, other=0.0), F64)
        else:
            modulation = tl.full([BLOCK_M], 1.0, dy.dtype)
        grad_dy = tl.zeros_like(dy)
        grad_dx = tl.zeros_like(dy)
        grad_mod = tl.zeros_like(dy)
        for group in range(first_group, last_group + 1):
            lo = tl.maximum(g * CPG, group * CG)
            hi = tl.minimum((g + 1) * CPG, (group + 1) * CG)
            for c0 in range(lo, hi, BLOCK_K):
                ci = c0 + tl.arange(0, BLOCK_K)
                c_mask = ci < hi
                cl = ci - group * CG
                gcol_t = to_compute(tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32), F64)
                for co0 in range(group * COG, (group + 1) * COG, BLOCK_N):
                    co = co0 + tl.arange(0, BLOCK_N)
                    co_mask = co < (group + 1) * COG
                    w_tile = w_ptr + (co * sw_o)[None, :] + (cl * sw_i)[:, None] + (k // KW) * sw_h + (k % KW) * sw_w
                    w = tl.load(w_tile, mask=c_mask[:, None] & co_mask[None, :], other=0.0)
                    gy_tile = gy_rows[None, :] + (as_index(co, INDEX_64) * sgy_c)[:, None]
                    gy = tl.load(gy_tile, mask=co_mask[:, None] & row_mask[None, :], other=0.0)
                    a = gemm_operand(to_compute(w, F64), LOW_PRECISION, w_ptr.dtype.element_ty)
                    b = gemm_operand(to_compute(gy, F64), LOW_PRECISION, w_ptr.dtype.element_ty)
                    gcol_t += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=gcol_t.dtype)
                gcol = tl.trans(gcol_t)
                for t in tl.static_range(4):
                    xi, yi, _, inside, weight, dwx, dwy, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
                    if OFFSET_GRAD or MASK_GRAD:
                        rows = x_image + as_index(yi, INDEX_64) * sx_h + as_index(xi, INDEX_64) * sx_w
                        value = gather(rows, as_index(ci, INDEX_64) * sx_c, row_mask & inside, c_mask, CHANNELS_FASTEST)
                        dot_value = tl.sum(gcol * to_compute(value, F64), axis=1)
                        grad_mod += weight * dot_value
                        grad_dy += dwy * dot_value
                        grad_dx += dwx * dot_value
                    if INPUT_GRAD:
                        rows = gx_image + as_index(yi, INDEX_64) * sx_h + as_index(xi, INDEX_64) * sx_w
                        grad = ((weight * modulation)[:, None] * gcol).to(gx_ptr.dtype.element_ty)
                        scatter_add(rows, as_index(ci, INDEX_64) * sx_c, grad, row_mask & inside, c_mask,
                                    CHANNELS_FASTEST)
                if COLUMNS:
                    cols = col_ptr + ((n * P + p) * K + k)[:, None] * C + ci[None, :]
                    tl.store(cols, modulation[:, None] * gcol, mask=row_mask[:, None] & c_mask[None, :])
        if OFFSET_GRAD:
            goff = goff_ptr + (n * (2 * G * K) + 2 * channel) * P + p
            tl.store(goff, (modulation * grad_dy).to(goff_ptr.dtype.element_ty), mask=row_mask)
            tl.store(goff + P, (modulation * grad_dx).to(goff_ptr.dtype.element_ty), mask=row_mask)
        if MASK_GRAD:
            gmask = gmask_ptr + (n * (G * K) + channel) * P + p
            tl.store(gmask, grad_mod.to(gmask_ptr.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=SIZES + ["ROWS", "ROWS_PER_SPLIT"])
def _deform_conv_bwd_weight_kernel(
    gy_ptr,  # [N, COUT, HO, WO] gradient of the output
    x_ptr, off_ptr, mask_ptr,  # as in the forward
    gw_ptr,  # [SPLITS, COUT, CG, KH, KW] contiguous out: each split's sum, in the compute dtype
    gb_ptr,  # [SPLITS, COUT] contiguous out: each split's sum of grad_y over its pixels (BIAS_GRAD)
    P,  # HO * WO output pixels per image
    P_PAD,  # P rounded up to a multiple of the host's ROW_ALIGN: the rows of an image in the padded row space
    ROWS,  # N * P_PAD
    ROWS_PER_SPLIT,  # padded rows each split sums, a multiple of ROW_ALIGN
    H, W, WO, KW, K, COUT, CG, COG, CPG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    soff_n, soff_c, soff_p,
    sm_n, sm_c, sm_p,
    sgy_n, sgy_c, sgy_p,
    HAS_MASK: tl.constexpr, F64: tl.constexpr, LOW_PRECISION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr, CHANNELS_FASTEST: tl.constexpr,
    BIAS_GRAD: tl.constexpr,  # also sum grad_y over the pixels (the bias gradient) from the tiles read anyway
    BLOCK_M: tl.constexpr,  # a divisor of the host's ROW_ALIGN, so no block of rows straddles two images
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_weight[co, c, k] = sum over pixels of grad_y[m, co] * sample[m, c, k]: an implicit GEMM
    over the pixels that samples again instead of reading a column buffer.

    The reduction over pixels is split into SPLITS = num_programs(2) / K ranges of ROWS_PER_SPLIT
    rows of the padded row space (each image's pixels padded to P_PAD rows), so that a small weight
    still gets enough programs to fill the GPU. Each program owns one [BLOCK_N, BLOCK_K] tile of one
    tap and one range, sums it in order and stores it; the host adds the splits in order: no
    atomics, the same bits on every run. The programs of the first input-channel tile and the first
    tap also sum their grad_y tiles over the pixels: the bias gradient without another read of grad_y.
    """
    group, co, co_mask = output_channels(tl.program_id(0), COG, BLOCK_N)
    cl = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = cl < CG
    ci = group * CG + cl
    first_og = (group * CG + tl.program_id(1) * BLOCK_K) // CPG
    last_og = (group * CG + tl.minimum((tl.program_id(1) + 1) * BLOCK_K, CG) - 1) // CPG
    split = as_index(tl.program_id(2) // K, INDEX_64)
    k = tl.program_id(2) % K
    start = split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, ROWS)
    acc = to_compute(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), F64)
    bias_acc = to_compute(tl.zeros([BLOCK_N], dtype=tl.float32), F64)
    for r0 in range(start, end, BLOCK_M):
        n = r0 // P_PAD
        p = r0 % P_PAD + tl.arange(0, BLOCK_M)
        row_mask = p < P
        oy = p // WO
        ox = p % WO
        x_image = x_ptr + n * sx_n
        off_rows = off_ptr + n * soff_n + p * soff_p
        mask_rows = mask_ptr + n * sm_n + p * sm_p
        b = to_compute(tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), F64)
        for og in range(first_og, last_og + 1):
            channel = as_index(og * K + k, INDEX_64)
            dy = to_compute(tl.load(off_rows + 2 * channel * soff_c, mask=row_mask, other=0.0), F64)
            dx = to_compute(tl.load(off_rows + (2 * channel + 1) * soff_c, mask=row_mask, other=0.0), F64)
            y, x = tap_position(oy, ox, k, KW, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
            if HAS_MASK:
                modulation = to_compute(tl.load(mask_rows + channel * sm_c, mask=row_mask, other=0.0), F64)
            else:
                modulation = tl.full([BLOCK_M], 1.0, dy.dtype)
            og_mask = c_mask & (ci >= og * CPG) & (ci < (og + 1) * CPG)
            b += modulated_samples(x_image, y, x, modulation, W, H, sx_h, sx_w, as_index(ci, INDEX_64) * sx_c,
                                   row_mask, og_mask, INDEX_64, CHANNELS_FASTEST, F64, BLOCK_M, BLOCK_K)
        gy_tile = (gy_ptr + n * sgy_n + p * sgy_p)[None, :] + (as_index(co, INDEX_64) * sgy_c)[:, None]
        gy = tl.load(gy_tile, mask=co_mask[:, None] & row_mask[None, :], other=0.0)
        if BIAS_GRAD:
            bias_acc += tl.sum(to_compute(gy, F64), axis=1)
        a = gemm_operand(to_compute(gy, F64), LOW_PRECISION, gy_ptr.dtype.element_ty)
        b = gemm_operand(b, LOW_PRECISION, gy_ptr.dtype.element_ty)
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    gw = gw_ptr + ((split * COUT + co)[:, None] * CG + cl[None, :]) * K + k
    tl.store(gw, acc, mask=co_mask[:, None] & c_mask[None, :])
    if BIAS_GRAD:
        if (tl.program_id(1) == 0) & (k == 0):
            tl.store(gb_ptr + split * COUT + co, bias_acc, mask=co_mask)


@triton.jit(do_not_specialize=SIZES + ["P", "G"])
def _deform_conv_taps_kernel(
    off_ptr,  # [N, 2 * G * K, HO, WO] offsets
    key_ptr,  # [N * HO * WO, G, K, 4] int32 or int64 out: offset in grad_input (sgx_*) of each corner read, -1 where it misses
    weight_ptr,  # [N * HO * WO, G, K, 4] out: the corner's bilinear weight
    source_ptr,  # [N * HO * WO, G, K] int64 out: offset of the read's channels in the column gradient [M, K, C]
    P, C, H, W, WO, KW, K, G, CPG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    soff_n, soff_c, soff_p,
    sgx_n, sgx_c, sgx_h, sgx_w,  # grad_input strides
    F64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """List every input pixel each (output pixel, offset group, tap) reads, for the sorted backward
    (kernels/sorted_scatter.py): where its gradient goes, with which weight, from which columns."""
    n, p, row_mask = image_pixels(tl.program_id(0), P, BLOCK_M, True)
    oy = p // WO
    ox = p % WO
    g = tl.program_id(1) // K
    k = tl.program_id(1) % K
    off = off_ptr + n * soff_n + p * soff_p + 2 * (g * K + k) * soff_c
    dy = to_compute(tl.load(off, mask=row_mask, other=0.0), F64)
    dx = to_compute(tl.load(off + soff_c, mask=row_mask, other=0.0), F64)
    y, x = tap_position(oy, ox, k, KW, dy, dx, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
    m = n * P + p
    read = (m * G + g) * K + k
    tl.store(source_ptr + read, (m * K + k) * C + g * CPG, mask=row_mask)
    group_channels = (g * CPG).to(tl.int64) * sgx_c
    for t in tl.static_range(4):
        xi, yi, _, inside, weight, _, _, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
        key = n * sgx_n + yi.to(tl.int64) * sgx_h + xi.to(tl.int64) * sgx_w + group_channels
        tl.store(key_ptr + read * 4 + t, tl.where(inside, key, -1).to(key_ptr.dtype.element_ty), mask=row_mask)
        tl.store(weight_ptr + read * 4 + t, weight.to(weight_ptr.dtype.element_ty), mask=row_mask)
