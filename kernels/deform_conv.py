"""Deformable convolution (DCN v1/v2) as an implicit GEMM: sampling and GEMM in one kernel.

Rows of the GEMM are output pixels m = (n, oy, ox) (flattened over the batch), columns output
channels, and the reduction runs over taps k = (i, j) of the kernel window and input channels.
Each A tile is sampled bilinearly at the tap's offset position, scaled by the modulation mask,
and fed to ``tl.dot`` straight from registers: no im2col column buffer ever reaches memory.
The bilinear read is the sampling arithmetic of sampling.py in pixel units with zero padding,
which is torchvision's rule (a point at or beyond -1 / the size reads nothing).
"""

import triton
import triton.language as tl

from stn_triton.kernels.sampling import BILINEAR, ZEROS, as_index, keep_indexable, sorted_runs, tap, to_compute

SIZES = ["M", "C", "H", "W", "COUT", "HO", "WO", "KW", "K", "CG", "COG", "CPG"]


@triton.jit
def output_rows(m, HO, WO):
    """Flat output pixel m -> (n, oy, ox)."""
    ox = m % WO
    rest = m // WO
    return rest // HO, rest % HO, ox


@triton.jit
def deform_sample(
    x_rows,  # [BLOCK_M] pointers to input[n] of each row
    off_rows,  # [BLOCK_M] pointers to offset[n, 0, oy, ox] of each row
    mask_rows,  # [BLOCK_M] pointers to mask[n, 0, oy, ox] of each row (HAS_MASK)
    oy, ox, row_mask,  # [BLOCK_M] output position of each row and its validity
    ci, col_mask,  # [BLOCK_K] input channels of the columns and their validity
    g,  # offset group of the columns: a scalar (ROW_GROUP) or one per column [BLOCK_K]
    k, KW, K,  # tap k = i * KW + j of K
    H, W,
    sx_c, sx_h, sx_w, so_c, sm_c,  # input strides; offset and mask channel strides
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, F64: tl.constexpr, INDEX_64: tl.constexpr,
    ROW_GROUP: tl.constexpr,  # every column is in offset group g: one sample point per row
):
    """Tap k of input channels ci at each row's offset position: ``[BLOCK_M, BLOCK_K]`` tiles.

    With ROW_GROUP the offsets, the corners and their weights are computed once per row and only
    the reads are per channel; otherwise once per (row, column), since columns may belong to
    different offset groups. Returns (value, d value / dy, d value / dx, modulation), all in the
    compute dtype.
    """
    tile_mask = row_mask[:, None] & col_mask[None, :]
    x_tile = x_rows[:, None] + (as_index(ci, INDEX_64) * sx_c)[None, :]
    channel = as_index(2 * (g * K + k), INDEX_64)  # the offset channel of dy (scalar or per column)
    if ROW_GROUP:
        dy = to_compute(tl.load(off_rows + channel * so_c, mask=row_mask, other=0.0), F64)
        dx = to_compute(tl.load(off_rows + (channel + 1) * so_c, mask=row_mask, other=0.0), F64)
        y = keep_indexable(oy * stride_h - pad_h + (k // KW) * dil_h + dy)[:, None]
        x = keep_indexable(ox * stride_w - pad_w + (k % KW) * dil_w + dx)[:, None]
    else:
        dy = to_compute(tl.load(off_rows[:, None] + (channel * so_c)[None, :], mask=tile_mask, other=0.0), F64)
        dx = to_compute(tl.load(off_rows[:, None] + ((channel + 1) * so_c)[None, :], mask=tile_mask, other=0.0), F64)
        y = keep_indexable((oy * stride_h - pad_h + (k // KW) * dil_h)[:, None] + dy)
        x = keep_indexable((ox * stride_w - pad_w + (k % KW) * dil_w)[:, None] + dx)
    # y, x: [BLOCK_M, 1] (ROW_GROUP) or [BLOCK_M, BLOCK_K]; the corners broadcast over the columns.
    zero = tile_mask.to(x.dtype) * 0
    value = zero
    value_dy = zero
    value_dx = zero
    for t in tl.static_range(4):
        xi, yi, _, inside, weight, dwx, dwy, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
        v = tl.load(x_tile + as_index(yi, INDEX_64) * sx_h + as_index(xi, INDEX_64) * sx_w, mask=inside & tile_mask, other=0.0)
        v = to_compute(v, F64)
        value += weight * v
        value_dy += dwy * v
        value_dx += dwx * v
    if HAS_MASK:
        if ROW_GROUP:
            modulation = zero + to_compute(tl.load(mask_rows + as_index(g * K + k, INDEX_64) * sm_c, mask=row_mask, other=0.0), F64)[:, None]
        else:
            mask_tile = mask_rows[:, None] + (as_index(g * K + k, INDEX_64) * sm_c)[None, :]
            modulation = to_compute(tl.load(mask_tile, mask=tile_mask, other=0.0), F64)
    else:
        modulation = zero + 1
    return value, value_dy, value_dx, modulation


@triton.jit
def gemm_operand(x, LOW_PRECISION: tl.constexpr, dtype: tl.constexpr):
    """A tile as tl.dot takes it: in the tensors' half dtype for tensor cores, else as computed."""
    if LOW_PRECISION:
        return x.to(dtype)
    else:
        return x


@triton.jit(do_not_specialize=SIZES)
def _deform_conv_fwd_kernel(
    x_ptr,  # [N, C, H, W] input
    off_ptr,  # [N, 2 * G * K, HO, WO] offsets: channel 2 (g K + k) is dy, + 1 is dx
    mask_ptr,  # [N, G * K, HO, WO] modulation (HAS_MASK)
    w_ptr,  # [COUT, CG, KH, KW] weight
    b_ptr,  # [COUT] bias (HAS_BIAS)
    out_ptr,  # [N, COUT, HO, WO] output
    M, C, H, W, COUT, HO, WO, KW, K,  # M = N * HO * WO rows; K = KH * KW taps
    CG, COG, CPG,  # input channels per conv group, output channels per conv group, input channels per offset group
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    sm_n, sm_c, sm_h, sm_w,
    sw_o, sw_i, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, F64: tl.constexpr,
    LOW_PRECISION: tl.constexpr,  # feed tl.dot half operands (float16 / bfloat16 tensors)
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for float32 operands: "ieee" is exact
    INDEX_64: tl.constexpr,
    ROW_GROUP: tl.constexpr,  # one offset group (G = 1): sample points per row, not per (row, channel)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m = as_index(tl.program_id(0), INDEX_64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = m < M
    n, oy, ox = output_rows(m, HO, WO)
    blocks_per_group = tl.cdiv(COG, BLOCK_N)
    group = tl.program_id(1) // blocks_per_group
    co = group * COG + (tl.program_id(1) % blocks_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < (group + 1) * COG
    x_rows = x_ptr + n * sx_n
    off_rows = off_ptr + n * so_n + oy * so_h + ox * so_w
    mask_rows = mask_ptr + n * sm_n + oy * sm_h + ox * sm_w
    acc = to_compute(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), F64)
    for k in range(0, K):
        for c0 in range(0, CG, BLOCK_K):
            cl = c0 + tl.arange(0, BLOCK_K)
            c_mask = cl < CG
            ci = group * CG + cl
            value, _, _, modulation = deform_sample(
                x_rows, off_rows, mask_rows, oy, ox, row_mask, ci, c_mask, 0 if ROW_GROUP else ci // CPG, k, KW, K, H, W,
                sx_c, sx_h, sx_w, so_c, sm_c, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, F64, INDEX_64,
                ROW_GROUP,
            )
            w_tile = w_ptr + (co * sw_o)[None, :] + (cl * sw_i)[:, None] + (k // KW) * sw_h + (k % KW) * sw_w
            weight = tl.load(w_tile, mask=c_mask[:, None] & co_mask[None, :], other=0.0)
            a = gemm_operand(value * modulation, LOW_PRECISION, w_ptr.dtype.element_ty)
            b = gemm_operand(to_compute(weight, F64), LOW_PRECISION, w_ptr.dtype.element_ty)
            acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += to_compute(tl.load(b_ptr + co, mask=co_mask, other=0.0), F64)[None, :]
    out = (out_ptr + n * sy_n + oy * sy_h + ox * sy_w)[:, None] + (as_index(co, INDEX_64) * sy_c)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & co_mask[None, :])


@triton.jit(do_not_specialize=SIZES)
def _deform_conv_bwd_data_kernel(
    gy_ptr,  # [N, COUT, HO, WO] gradient of the output
    x_ptr, off_ptr, mask_ptr, w_ptr,  # as in the forward
    gx_ptr,  # [N, C, H, W] zero-filled gradient of the input, accumulated atomically (INPUT_GRAD)
    col_ptr,  # [M, C, K] contiguous out: the modulated column gradient (COLUMNS)
    goff_ptr,  # [N, 2 * G * K, HO, WO] contiguous gradient of the offsets (OFFSET_GRAD)
    gmask_ptr,  # [N, G * K, HO, WO] contiguous gradient of the mask (MASK_GRAD)
    M, C, H, W, COUT, HO, WO, KW, K, CG, COG, CPG,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    sm_n, sm_c, sm_h, sm_w,
    sw_o, sw_i, sw_h, sw_w,
    sgy_n, sgy_c, sgy_h, sgy_w,
    sgx_n, sgx_c, sgx_h, sgx_w,
    HAS_MASK: tl.constexpr, F64: tl.constexpr, LOW_PRECISION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    INPUT_GRAD: tl.constexpr,  # scatter into gx_ptr with atomics
    COLUMNS: tl.constexpr,  # write the column gradient instead, for the sorted (deterministic) backward
    OFFSET_GRAD: tl.constexpr, MASK_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: a block of output pixels and one offset group g, every tap and channel of g.

    The column gradient grad_y @ W^T of each (tap, channel chunk) is formed in registers; it is
    scattered into grad_input through the bilinear weights and reduced over g's channels into
    grad_offset and grad_mask, which this program alone writes (no atomics there).
    """
    m = as_index(tl.program_id(0), INDEX_64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = m < M
    n, oy, ox = output_rows(m, HO, WO)
    g = tl.program_id(1)
    x_rows = x_ptr + n * sx_n
    off_rows = off_ptr + n * so_n + oy * so_h + ox * so_w
    mask_rows = mask_ptr + n * sm_n + oy * sm_h + ox * sm_w
    gy_rows = gy_ptr + n * sgy_n + oy * sgy_h + ox * sgy_w
    gx_rows = gx_ptr + n * sgx_n
    first_group = (g * CPG) // CG
    last_group = ((g + 1) * CPG - 1) // CG
    for k in range(0, K):
        grad_dy = to_compute(tl.zeros([BLOCK_M], dtype=tl.float32), F64)
        grad_dx = grad_dy
        grad_mod = grad_dy
        for group in range(first_group, last_group + 1):
            lo = tl.maximum(g * CPG, group * CG)
            hi = tl.minimum((g + 1) * CPG, (group + 1) * CG)
            for c0 in range(lo, hi, BLOCK_K):
                ci = c0 + tl.arange(0, BLOCK_K)
                c_mask = ci < hi
                cl = ci - group * CG
                gcol = to_compute(tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32), F64)
                for co0 in range(group * COG, (group + 1) * COG, BLOCK_N):
                    co = co0 + tl.arange(0, BLOCK_N)
                    co_mask = co < (group + 1) * COG
                    gy_tile = gy_rows[:, None] + (as_index(co, INDEX_64) * sgy_c)[None, :]
                    gy = tl.load(gy_tile, mask=row_mask[:, None] & co_mask[None, :], other=0.0)
                    w_tile = w_ptr + (co * sw_o)[:, None] + (cl * sw_i)[None, :] + (k // KW) * sw_h + (k % KW) * sw_w
                    weight = tl.load(w_tile, mask=co_mask[:, None] & c_mask[None, :], other=0.0)
                    a = gemm_operand(to_compute(gy, F64), LOW_PRECISION, w_ptr.dtype.element_ty)
                    b = gemm_operand(to_compute(weight, F64), LOW_PRECISION, w_ptr.dtype.element_ty)
                    gcol += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=gcol.dtype)
                value, value_dy, value_dx, modulation = deform_sample(
                    x_rows, off_rows, mask_rows, oy, ox, row_mask, ci, c_mask, g, k, KW, K, H, W,
                    sx_c, sx_h, sx_w, so_c, sm_c, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, F64, INDEX_64,
                    True,
                )
                if MASK_GRAD:
                    grad_mod += tl.sum(gcol * value, axis=1)
                if OFFSET_GRAD:
                    grad_dy += tl.sum(gcol * modulation * value_dy, axis=1)
                    grad_dx += tl.sum(gcol * modulation * value_dx, axis=1)
                if INPUT_GRAD:
                    _scatter_input_grad(
                        gx_rows, off_rows, oy, ox, row_mask, ci, c_mask, g, k, KW, K, H, W,
                        gcol * modulation, sgx_c, sgx_h, sgx_w, so_c, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                        F64, INDEX_64, gx_ptr.dtype.element_ty,
                    )
                if COLUMNS:
                    cols = col_ptr + (m[:, None] * C + ci[None, :]) * K + k
                    tl.store(cols, gcol * modulation, mask=row_mask[:, None] & c_mask[None, :])
        pixel = oy * WO + ox
        if OFFSET_GRAD:
            goff = goff_ptr + (n * (2 * (C // CPG) * K) + 2 * (g * K + k)) * (HO * WO) + pixel
            tl.store(goff, grad_dy.to(goff_ptr.dtype.element_ty), mask=row_mask)
            tl.store(goff + HO * WO, grad_dx.to(goff_ptr.dtype.element_ty), mask=row_mask)
        if MASK_GRAD:
            gmask = gmask_ptr + (n * ((C // CPG) * K) + g * K + k) * (HO * WO) + pixel
            tl.store(gmask, grad_mod.to(gmask_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _scatter_input_grad(
    gx_rows, off_rows, oy, ox, row_mask, ci, c_mask, g, k, KW, K, H, W,
    grad,  # [BLOCK_M, BLOCK_K] gradient of each row's sample of each channel
    sgx_c, sgx_h, sgx_w, so_c, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    F64: tl.constexpr, INDEX_64: tl.constexpr, dtype: tl.constexpr,
):
    """Add each sample's gradient into its four input pixels, weighted as the forward read them."""
    tile_mask = row_mask[:, None] & c_mask[None, :]
    channel = as_index(2 * (g * K + k), INDEX_64)
    dy = to_compute(tl.load(off_rows + channel * so_c, mask=row_mask, other=0.0), F64)
    dx = to_compute(tl.load(off_rows + (channel + 1) * so_c, mask=row_mask, other=0.0), F64)
    y = keep_indexable(oy * stride_h - pad_h + (k // KW) * dil_h + dy)
    x = keep_indexable(ox * stride_w - pad_w + (k % KW) * dil_w + dx)
    for t in tl.static_range(4):
        xi, yi, _, inside, weight, _, _, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
        pixel = as_index(yi, INDEX_64) * sgx_h + as_index(xi, INDEX_64) * sgx_w
        ptrs = (gx_rows + pixel)[:, None] + (as_index(ci, INDEX_64) * sgx_c)[None, :]
        tl.atomic_add(ptrs, (weight[:, None] * grad).to(dtype), mask=inside[:, None] & tile_mask)


@triton.jit(do_not_specialize=SIZES + ["ROWS_PER_SPLIT"])
def _deform_conv_bwd_weight_kernel(
    gy_ptr,  # [N, COUT, HO, WO] gradient of the output
    x_ptr, off_ptr, mask_ptr,  # as in the forward
    gw_ptr,  # [SPLITS, COUT, CG, KH, KW] contiguous out: each split's sum, in the compute dtype
    M, C, H, W, COUT, HO, WO, KW, K, CG, COG, CPG,
    ROWS_PER_SPLIT,  # output pixels (GEMM rows) each split sums
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    so_n, so_c, so_h, so_w,
    sm_n, sm_c, sm_h, sm_w,
    sgy_n, sgy_c, sgy_h, sgy_w,
    HAS_MASK: tl.constexpr, F64: tl.constexpr, LOW_PRECISION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    ROW_GROUP: tl.constexpr,  # one offset group (G = 1): sample points per row, not per (row, channel)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_weight[co, c, k] = sum over pixels of grad_y[m, co] * sample[m, c, k]: an implicit GEMM
    over the pixels that samples again instead of reading a column buffer.

    The reduction over pixels is split into SPLITS = num_programs(2) / K ranges of ROWS_PER_SPLIT
    rows, so that a small weight still gets enough programs to fill the GPU. Each program owns one
    [BLOCK_N, BLOCK_K] tile of one tap and one range, sums it in order and stores it; the host adds
    the splits in order: no atomics, the same bits on every run.
    """
    blocks_per_group = tl.cdiv(COG, BLOCK_N)
    group = tl.program_id(0) // blocks_per_group
    co = group * COG + (tl.program_id(0) % blocks_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < (group + 1) * COG
    cl = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = cl < CG
    ci = group * CG + cl
    split = as_index(tl.program_id(2) // K, INDEX_64)
    k = tl.program_id(2) % K
    start = split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    acc = to_compute(tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), F64)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        row_mask = m < end
        n, oy, ox = output_rows(m, HO, WO)
        value, _, _, modulation = deform_sample(
            x_ptr + n * sx_n, off_ptr + n * so_n + oy * so_h + ox * so_w, mask_ptr + n * sm_n + oy * sm_h + ox * sm_w,
            oy, ox, row_mask, ci, c_mask, 0 if ROW_GROUP else ci // CPG, k, KW, K, H, W,
            sx_c, sx_h, sx_w, so_c, sm_c, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK, F64, INDEX_64,
            ROW_GROUP,
        )
        gy_rows = gy_ptr + n * sgy_n + oy * sgy_h + ox * sgy_w
        gy_tile = gy_rows[None, :] + (as_index(co, INDEX_64) * sgy_c)[:, None]
        gy = tl.load(gy_tile, mask=co_mask[:, None] & row_mask[None, :], other=0.0)
        a = gemm_operand(to_compute(gy, F64), LOW_PRECISION, gy_ptr.dtype.element_ty)
        b = gemm_operand(value * modulation, LOW_PRECISION, gy_ptr.dtype.element_ty)
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    gw = gw_ptr + ((split * COUT + co)[:, None] * CG + cl[None, :]) * K + k
    tl.store(gw, acc, mask=co_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=SIZES)
def _deform_conv_taps_kernel(
    off_ptr,  # [N, 2 * G * K, HO, WO] offsets
    key_ptr,  # [M, G, K, 4] int64 out: ((n G + g) H + y) W + x of each corner read, -1 where it misses
    weight_ptr,  # [M, G, K, 4] out: the corner's bilinear weight
    M, H, W, HO, WO, KW, K, G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    so_n, so_c, so_h, so_w,
    F64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """List every input pixel each (output pixel, offset group, tap) reads, for the sorted backward."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = m < M
    n, oy, ox = output_rows(m, HO, WO)
    g = tl.program_id(1) // K
    k = tl.program_id(1) % K
    off = off_ptr + n * so_n + oy * so_h + ox * so_w + 2 * (g * K + k) * so_c
    y = keep_indexable(oy * stride_h - pad_h + (k // KW) * dil_h + to_compute(tl.load(off, mask=row_mask, other=0.0), F64))
    x = keep_indexable(ox * stride_w - pad_w + (k % KW) * dil_w + to_compute(tl.load(off + so_c, mask=row_mask, other=0.0), F64))
    entry = ((m * G + g) * K + k) * 4
    for t in tl.static_range(4):
        xi, yi, _, inside, weight, _, _, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
        key = ((n * G + g) * H + yi) * W + xi
        tl.store(key_ptr + entry + t, tl.where(inside, key, -1), mask=row_mask)
        tl.store(weight_ptr + entry + t, weight.to(weight_ptr.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=["E", "C", "H", "W", "K", "G", "CPG"])
def _deform_conv_bwd_sorted_kernel(
    col_ptr,  # [M, C, K] modulated column gradient
    gx_ptr,  # [N, C, H, W] zero-filled gradient of the input, each (pixel, channel) written once
    sorted_key_ptr,  # [E] keys of _deform_conv_taps_kernel sorted ascending (stable), -1 first
    order_ptr,  # [E] position of each sorted key in the unsorted list
    run_end_ptr,  # [E] one past the last position holding the same key
    weight_ptr,  # [E] corner weights, unsorted
    E, C, H, W, K, G, CPG,
    sgx_n, sgx_c, sgx_h, sgx_w,
    F64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_input without atomics: the first entry of each run of equal keys sums the run, in order."""
    e, key, first, run_end, longest = sorted_runs(sorted_key_ptr, run_end_ptr, E, BLOCK_E)
    safe_key = tl.where(first, key, 0)
    x = safe_key % W
    rest = safe_key // W
    y = rest % H
    rest = rest // H
    g = rest % G
    n = rest // G
    cl = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = g[:, None] * CPG + cl[None, :]
    tile_mask = first[:, None] & (cl < CPG)[None, :]
    acc = to_compute(tl.zeros([BLOCK_E, BLOCK_C], dtype=tl.float32), F64)
    for j in range(0, longest):
        entry_mask = first & (e + j < run_end)
        entry = tl.load(order_ptr + e + j, mask=entry_mask, other=0)
        weight = to_compute(tl.load(weight_ptr + entry, mask=entry_mask, other=0.0), F64)
        k = (entry // 4) % K
        m = entry // (4 * K * G)
        column = tl.load(col_ptr + (m[:, None] * C + c) * K + k[:, None], mask=entry_mask[:, None] & tile_mask, other=0.0)
        acc += weight[:, None] * to_compute(column, F64)
    gx = (gx_ptr + n * sgx_n + y * sgx_h + x * sgx_w)[:, None] + c * sgx_c
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=tile_mask)
