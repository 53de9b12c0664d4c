"""Sampling kernels: forward, backward, and the atomic-free backward for deterministic mode.

The sample points come from a grid in memory (grid_sample) or are computed in the kernel from a
transform (affine, projective, thin-plate spline: warp.py), so a fused warp never stores a grid.
A 4-D call runs as a 5-D one with a depth of 1 (NDIM = 2 keeps the z arithmetic out). Every
kernel takes strides for every tensor, so any layout (channels_last, expanded grad_output) runs
without a copy. A program owns BLOCK_P output pixels of one image (so that it can reduce the
gradient of that image's transform); their sample points are computed once and then reused for
BLOCK_C channels at a time.
"""

import triton
import triton.language as tl

from stn_triton.kernels.sampling import as_index, sample_point, sorted_runs, tap, to_compute, unravel_pixel
from stn_triton.kernels.warp import store_transform_grad, transform_points

# Sizes are not specialized: a size of 1 would compile a kernel of its own for each such shape.
SIZES = ["Q", "C", "D", "H", "W", "OD", "OH", "OW", "K"]


@triton.jit
def program_pixels(Q, OD, OH, OW, BLOCK_P: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's image n (scalar), its block of that image, and the block's output pixels q
    with their (d, h, w) and mask."""
    blocks = tl.cdiv(Q, BLOCK_P)
    program = tl.program_id(0)
    n = as_index(program // blocks, INDEX_64)
    block = program % blocks
    q = as_index(block, INDEX_64) * BLOCK_P + tl.arange(0, BLOCK_P)
    _, d, h, w = unravel_pixel(q, OD, OH, OW)
    return block, n, q, d, h, w, q < Q


@triton.jit
def pixel_sample_points(
    coords_ptr, ctrl_ptr, n, d, h, w, mask,
    s0, s1, s2, s3, s4, K,
    D, H, W, OD, OH, OW,
    TRANSFORM: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
    NDIM: tl.constexpr, F64: tl.constexpr,
):
    """Pixel-unit sample points of output pixels and all the chain rule needs.

    Returns (x, y, z, dx/dnx, dy/dny, dz/dnz, nx, ny, bx, by, bz, den): n* the normalized points,
    b* and den what transform_points returns for the transform's gradient.
    """
    nx, ny, nz, bx, by, bz, den = transform_points(
        coords_ptr, ctrl_ptr, n, d, h, w, mask, s0, s1, s2, s3, s4, K, OD, OH, OW, TRANSFORM, ALIGN_CORNERS, NDIM, F64
    )
    x, mx = sample_point(nx, W, MODE, PADDING, ALIGN_CORNERS)
    y, my = sample_point(ny, H, MODE, PADDING, ALIGN_CORNERS)
    if NDIM == 3:
        z, mz = sample_point(nz, D, MODE, PADDING, ALIGN_CORNERS)
    else:
        z = x * 0
        mz = x * 0
    return x, y, z, mx, my, mz, nx, ny, bx, by, bz, den


@triton.jit(do_not_specialize=SIZES)
def _sample_fwd_kernel(
    inp_ptr,  # [N, C, D_in, H_in, W_in] input (D_in = 1 for 4-D)
    coords_ptr,  # GRID: [N, D_out, H_out, W_out, NDIM] normalized points, x first; else transform parameters
    ctrl_ptr,  # TPS: control points [K, 2]; else unused
    fill_ptr,  # FILL: [C] value of the outside; else unused
    out_ptr,  # [N, C, D_out, H_out, W_out] output
    Q,  # D_out * H_out * W_out: output pixels per image
    C, D, H, W,  # channels and input spatial size
    OD, OH, OW,  # output spatial size
    K,  # TPS: control points
    si_n, si_c, si_d, si_h, si_w,  # input strides
    s0, s1, s2, s3, s4,  # coords strides: grid (n, d, h, w, k) or parameters (n, row, col)
    so_n, so_c, so_d, so_h, so_w,  # output strides
    TRANSFORM: tl.constexpr,  # GRID, AFFINE, PROJECTIVE or TPS
    MODE: tl.constexpr,  # BILINEAR, NEAREST or BICUBIC
    PADDING: tl.constexpr,  # ZEROS, BORDER or REFLECTION
    FILL: tl.constexpr,  # add (1 - weight inside the image) * fill[c], as kornia's 'fill' padding
    ALIGN_CORNERS: tl.constexpr,
    NDIM: tl.constexpr,  # 2 or 3 spatial dimensions
    TAPS: tl.constexpr,  # input pixels read per output pixel: 1 nearest, 4 / 8 bilinear, 16 bicubic
    F64: tl.constexpr,  # compute in float64 (float64 tensors) instead of float32
    INDEX_64: tl.constexpr,  # some tensor has 2^31 elements or more
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_C: tl.constexpr,  # channels per program
):
    _, n, q, od, oh, ow, p_mask = program_pixels(Q, OD, OH, OW, BLOCK_P, INDEX_64)
    x, y, z, _, _, _, _, _, _, _, _, _ = pixel_sample_points(
        coords_ptr, ctrl_ptr, n, od, oh, ow, p_mask, s0, s1, s2, s3, s4, K, D, H, W, OD, OH, OW,
        TRANSFORM, MODE, PADDING, ALIGN_CORNERS, NDIM, F64,
    )
    c = as_index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), INDEX_64)
    c_mask = c < C
    inp_image = inp_ptr + n * si_n
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=x.dtype)
    inside_weight = x * 0
    for t in tl.static_range(TAPS):
        xi, yi, zi, inside, weight, _, _, _ = tap(t, x, y, z, W, H, D, MODE, PADDING, ALIGN_CORNERS, NDIM)
        offset = as_index(zi, INDEX_64) * si_d + as_index(yi, INDEX_64) * si_h + as_index(xi, INDEX_64) * si_w
        ptrs = (inp_image + offset)[:, None] + (c * si_c)[None, :]
        value = tl.load(ptrs, mask=(inside & p_mask)[:, None] & c_mask[None, :], other=0.0)
        acc += weight[:, None] * to_compute(value, F64)
        if FILL:
            inside_weight += tl.where(inside, weight, 0.0)
    if FILL:
        fill = to_compute(tl.load(fill_ptr + c, mask=c_mask, other=0.0), F64)
        acc += (1 - inside_weight)[:, None] * fill[None, :]
    out_ptrs = (out_ptr + n * so_n + od * so_d + oh * so_h + ow * so_w)[:, None] + (c * so_c)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit(do_not_specialize=SIZES + ["PARTIALS"])
def _sample_bwd_kernel(
    gout_ptr,  # [N, C, D_out, H_out, W_out] gradient of the output (any strides, 0 included)
    inp_ptr,  # [N, C, D_in, H_in, W_in] input (read only when COORD_GRAD)
    coords_ptr, ctrl_ptr, fill_ptr,  # as in the forward
    ginp_ptr,  # [N, C, D_in, H_in, W_in] zero-filled gradient of the input, accumulated atomically
    gcoords_ptr,  # COORD_GRAD: grad_grid [N, Q, NDIM], or the transform's partial sums (warp.store_transform_grad)
    Q, C, D, H, W, OD, OH, OW, K,  # as in the forward
    PARTIALS,  # rows of partial sums per image in gcoords_ptr (a transform's gradient): >= cdiv(Q, BLOCK_P)
    sgo_n, sgo_c, sgo_d, sgo_h, sgo_w,  # grad_output strides
    si_n, si_c, si_d, si_h, si_w,  # input strides
    s0, s1, s2, s3, s4,  # coords strides
    sgi_n, sgi_c, sgi_d, sgi_h, sgi_w,  # grad_input strides
    TRANSFORM: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr, FILL: tl.constexpr,
    ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, TAPS: tl.constexpr, F64: tl.constexpr, INDEX_64: tl.constexpr,
    INPUT_GRAD: tl.constexpr,  # scatter into ginp_ptr
    COORD_GRAD: tl.constexpr,  # write gcoords_ptr
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    block, n, q, od, oh, ow, p_mask = program_pixels(Q, OD, OH, OW, BLOCK_P, INDEX_64)
    x, y, z, mx, my, mz, nx, ny, bx, by, bz, den = pixel_sample_points(
        coords_ptr, ctrl_ptr, n, od, oh, ow, p_mask, s0, s1, s2, s3, s4, K, D, H, W, OD, OH, OW,
        TRANSFORM, MODE, PADDING, ALIGN_CORNERS, NDIM, F64,
    )
    gout_pix = gout_ptr + n * sgo_n + od * sgo_d + oh * sgo_h + ow * sgo_w
    inp_image = inp_ptr + n * si_n
    ginp_image = ginp_ptr + n * sgi_n
    gx = x * 0
    gy = x * 0
    gz = x * 0
    for c0 in range(0, C, BLOCK_C):
        c = as_index(c0 + tl.arange(0, BLOCK_C), INDEX_64)
        c_mask = c < C
        gout = tl.load(gout_pix[:, None] + (c * sgo_c)[None, :], mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        gout = to_compute(gout, F64)
        if FILL:
            fill = to_compute(tl.load(fill_ptr + c, mask=c_mask, other=0.0), F64)
        for t in tl.static_range(TAPS):
            xi, yi, zi, inside, weight, dwx, dwy, dwz = tap(t, x, y, z, W, H, D, MODE, PADDING, ALIGN_CORNERS, NDIM)
            mask = (inside & p_mask)[:, None] & c_mask[None, :]
            zi = as_index(zi, INDEX_64)
            yi = as_index(yi, INDEX_64)
            xi = as_index(xi, INDEX_64)
            if INPUT_GRAD:
                ginp_ptrs = (ginp_image + zi * sgi_d + yi * sgi_h + xi * sgi_w)[:, None] + (c * sgi_c)[None, :]
                tl.atomic_add(ginp_ptrs, (weight[:, None] * gout).to(ginp_ptr.dtype.element_ty), mask=mask)
            if COORD_GRAD:
                inp_ptrs = (inp_image + zi * si_d + yi * si_h + xi * si_w)[:, None] + (c * si_c)[None, :]
                value = to_compute(tl.load(inp_ptrs, mask=mask, other=0.0), F64)
                if FILL:
                    # The fill term (1 - sum of inside weights) * fill moves against the inside taps.
                    value = tl.where(mask, value - fill[None, :], 0.0)
                value_dot_gout = tl.sum(value * gout, axis=1)
                gx += dwx * value_dot_gout
                gy += dwy * value_dot_gout
                gz += dwz * value_dot_gout
    if COORD_GRAD:
        store_transform_grad(
            gcoords_ptr, n * PARTIALS + block, n, q, Q, p_mask, gx * mx, gy * my, gz * mz, nx, ny, bx, by, bz, den, ctrl_ptr, K,
            TRANSFORM, NDIM, F64,
        )


@triton.jit(do_not_specialize=SIZES)
def _sample_taps_kernel(
    coords_ptr, ctrl_ptr,  # as in the forward
    key_ptr,  # [N * Q, TAPS] int64 out: n * D*H*W + flat input pixel of each tap, -1 where it misses
    weight_ptr,  # [N * Q, TAPS] out: each tap's weight
    Q, D, H, W, OD, OH, OW, K,
    s0, s1, s2, s3, s4,
    TRANSFORM: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
    NDIM: tl.constexpr, TAPS: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """List every (output pixel, tap) pair with its target input pixel, for the sorted backward."""
    _, n, q, od, oh, ow, p_mask = program_pixels(Q, OD, OH, OW, BLOCK_P, True)
    x, y, z, _, _, _, _, _, _, _, _, _ = pixel_sample_points(
        coords_ptr, ctrl_ptr, n, od, oh, ow, p_mask, s0, s1, s2, s3, s4, K, D, H, W, OD, OH, OW,
        TRANSFORM, MODE, PADDING, ALIGN_CORNERS, NDIM, F64,
    )
    entry = (n * Q + q) * TAPS
    for t in tl.static_range(TAPS):
        xi, yi, zi, inside, weight, _, _, _ = tap(t, x, y, z, W, H, D, MODE, PADDING, ALIGN_CORNERS, NDIM)
        flat = ((n * D + zi) * H + yi) * W + xi
        tl.store(key_ptr + entry + t, tl.where(inside, flat, -1), mask=p_mask)
        tl.store(weight_ptr + entry + t, weight.to(weight_ptr.dtype.element_ty), mask=p_mask)


@triton.jit(do_not_specialize=["E", "C", "D", "H", "W", "OD", "OH", "OW"])
def _sample_bwd_sorted_kernel(
    gout_ptr,  # [N, C, D_out, H_out, W_out] gradient of the output
    ginp_ptr,  # [N, C, D_in, H_in, W_in] zero-filled gradient of the input, each pixel written once
    sorted_key_ptr,  # [E] tap keys sorted ascending (stable), -1 first
    order_ptr,  # [E] position of each sorted key in the unsorted [N * Q, TAPS] list
    run_end_ptr,  # [E] one past the last position holding the same key
    weight_ptr,  # [N * Q, TAPS] tap weights
    E, C, D, H, W, OD, OH, OW,
    sgo_n, sgo_c, sgo_d, sgo_h, sgo_w,  # grad_output strides
    sgi_n, sgi_c, sgi_d, sgi_h, sgi_w,  # grad_input strides
    TAPS: tl.constexpr, F64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_input without atomics: the first entry of each run of equal keys sums the run, in order.

    The order of the sorted list is fixed by the stable sort, so the sums are bitwise reproducible.
    """
    e, key, first, run_end, longest = sorted_runs(sorted_key_ptr, run_end_ptr, E, BLOCK_E)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = to_compute(tl.zeros([BLOCK_E, BLOCK_C], dtype=tl.float32), F64)
    for j in range(0, longest):
        entry_mask = first & (e + j < run_end)
        entry = tl.load(order_ptr + e + j, mask=entry_mask, other=0)
        weight = to_compute(tl.load(weight_ptr + entry, mask=entry_mask, other=0.0), F64)
        n, od, oh, ow = unravel_pixel(entry // TAPS, OD, OH, OW)
        gout_pix = gout_ptr + n * sgo_n + od * sgo_d + oh * sgo_h + ow * sgo_w
        gout = tl.load(gout_pix[:, None] + (c * sgo_c)[None, :], mask=entry_mask[:, None] & c_mask[None, :], other=0.0)
        acc += weight[:, None] * to_compute(gout, F64)
    n, zi, yi, xi = unravel_pixel(tl.where(first, key, 0), D, H, W)
    ginp_pix = ginp_ptr + n * sgi_n + zi * sgi_d + yi * sgi_h + xi * sgi_w
    tl.store(ginp_pix[:, None] + (c * sgi_c)[None, :], acc.to(ginp_ptr.dtype.element_ty), mask=first[:, None] & c_mask[None, :])
