"""The sampling kernel: forward, backward and the tap list of the deterministic backward (whose
atomic-free sum is kernels/sorted_scatter.py's).

The sample points come from a grid in memory (grid_sample) or are computed in the kernel from a
transform (affine, projective, thin-plate spline: transforms.py), so a fused warp never stores a
grid. A 4-D call runs as a 5-D one with a depth of 1 (NDIM = 2 keeps the z arithmetic out).

A program owns BLOCK_P output pixels of one image (so that it can reduce the gradient of that
image's transform) and one range of channels, which it walks BLOCK_C at a time. The sample points
are computed before the channel loop; the taps (``tap()``: corners, weights, masks) are written
inside it, next to their use, and depend on no channel, so the compiler hoists them: compiled for
sm_90, grid2d_c64's forward and affine2d_c64's backward have every floor of the tap arithmetic
before the loop and none in it (perf/resources.py compiles them). Tiles are
``[BLOCK_C, BLOCK_P]``. Gathers and scatters (sampling.py: ``gather``, ``scatter``,
``scatter_add``) address their tile with the pixels in the dimension Triton gives a warp's threads
when it knows no address contiguous, so on an NCHW tensor a load or atomic instruction covers
neighbouring pixels of one channel plane (a smooth warp reads neighbouring input pixels there).
On a channels_last tensor the channel stride is 1, Triton specializes it, sees the channels
contiguous and runs the threads along them instead, with vector loads. The output, which this
library allocates, is addressed by flat pixel index so its pixels (NCHW) or channels (NHWC) are
seen contiguous too, and stored with vector stores.

Every kernel takes strides for every tensor it reads, so any layout (channels_last, an expanded
grad_output) runs without a copy.
"""

import triton
import triton.language as tl

from stn_triton.kernels import codes
from stn_triton.kernels.sampling import (
    as_index,
    gather,
    program_channels,
    sample_point,
    scatter_add,
    tap,
    to_compute,
    unravel_pixel,
)
from stn_triton.kernels.transforms import (
    AFFINE,
    GRID,
    TPS,
    base_position,
    matrix_row,
    row_dot,
    store_transform_grad,
    tps_radial,
)

FORWARD = tl.constexpr(codes.FORWARD)
BACKWARD = tl.constexpr(codes.BACKWARD)
LIST_TAPS = tl.constexpr(codes.LIST_TAPS)

# Sizes are not specialized (a size of 1 would compile a kernel of its own for each such shape), but
# for P: knowing it a multiple of 16 lets the pixel mask stay constant over a vector of NCHW stores.
SIZES = ["C", "D", "H", "W", "OD", "OH", "OW", "CP", "PARTIALS", "SPLITS"]


@triton.jit
def program_pixels(P, OD, OH, OW, BLOCK_P: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's image n (scalar), its block of that image, and the block's output pixels q
    with their (d, h, w) and mask."""
    blocks = tl.cdiv(P, BLOCK_P)
    program = tl.program_id(0)
    n = as_index(program // blocks, INDEX_64)
    block = program % blocks
    q = as_index(block, INDEX_64) * BLOCK_P + tl.arange(0, BLOCK_P)
    _, d, h, w = unravel_pixel(q, OD, OH, OW)
    return block, n, q, d, h, w, q < P


@triton.jit(do_not_specialize=SIZES)
def _sample_kernel(
    x_ptr,  # [N, C, D_in, H_in, W_in] input (D_in = 1 for 4-D); BACKWARD reads it only for COORD_GRAD
    coords_ptr,  # GRID: [N, D_out, H_out, W_out, NDIM] normalized points, x first; else transform parameters
    ctrl_ptr,  # TPS: control points [CP, 2], contiguous; else unused
    fill_ptr,  # FILL: [C] value of the outside; else unused
    y_ptr,  # FORWARD: [N, C, D_out, H_out, W_out] output, pixels dense (flat pixel stride sy_p)
    gy_ptr,  # BACKWARD: gradient of the output, any strides (0 included)
    gx_ptr,  # BACKWARD, INPUT_GRAD: zero-filled gradient of the input, accumulated atomically
    gcoords_ptr,  # BACKWARD, COORD_GRAD: per split, grad_grid [N, P, NDIM] or the transform's partial sums
    key_ptr,  # LIST_TAPS: [N * P, TAPS] int32 or int64 out: offset in grad_input (sgx_*) of each tap's pixel, -1 where it misses
    weight_ptr,  # LIST_TAPS: [N * P, TAPS] out: each tap's weight
    source_ptr,  # LIST_TAPS: [N * P] int64 out: offset in grad_output (sgy_*) of each output pixel
    P,  # D_out * H_out * W_out: output pixels per image
    C, D, H, W,  # channels and input spatial size
    OD, OH, OW,  # output spatial size
    CP,  # TPS: control points
    PARTIALS,  # COORD_GRAD of a transform: rows of partial sums per image and split, >= cdiv(P, BLOCK_P)
    SPLITS,  # channel ranges: program_id(1) takes one (BACKWARD: each writes its own point-gradient rows)
    sx_n, sx_c, sx_d, sx_h, sx_w,  # input strides
    s0, s1, s2, s3, s4,  # coords strides: grid (n, d, h, w, k) or parameters (n, row, col)
    sy_n, sy_c, sy_p,  # output strides (image, channel, flat pixel)
    sgy_n, sgy_c, sgy_d, sgy_h, sgy_w,  # grad_output strides (BACKWARD, LIST_TAPS)
    sgx_n, sgx_c, sgx_d, sgx_h, sgx_w,  # grad_input strides (BACKWARD, LIST_TAPS)
    sgc_split,  # COORD_GRAD: elements of gcoords_ptr per channel split
    PASS: tl.constexpr,  # FORWARD, BACKWARD or LIST_TAPS
    TRANSFORM: tl.constexpr,  # GRID, AFFINE, PROJECTIVE or TPS
    MODE: tl.constexpr,  # BILINEAR, NEAREST or BICUBIC
    PADDING: tl.constexpr,  # ZEROS, BORDER or REFLECTION
    FILL: tl.constexpr,  # add (1 - weight inside the image) * fill[c], as kornia's 'fill' padding
    ALIGN_CORNERS: tl.constexpr,
    NDIM: tl.constexpr,  # 2 or 3 spatial dimensions
    TAPS: tl.constexpr,  # input pixels read per output pixel: 1 nearest, 4 / 8 bilinear, 16 bicubic
    F64: tl.constexpr,  # compute in float64 (float64 tensors) instead of float32
    INDEX_64: tl.constexpr,  # some tensor has 2^31 elements or more
    INPUT_GRAD: tl.constexpr,  # BACKWARD: scatter into gx_ptr
    COORD_GRAD: tl.constexpr,  # BACKWARD: write gcoords_ptr
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_C: tl.constexpr,  # channels per step of the channel loop
    EVEN_C: tl.constexpr,  # every channel range is whole BLOCK_C steps: no channel mask (vector access along C)
):
    block, n, q, od, oh, ow, p_mask = program_pixels(P, OD, OH, OW, BLOCK_P, INDEX_64)

    # The normalized sample points (nx, ny, nz). Their loads stay in this body: the points decide
    # grad_input's atomic addresses (see transforms.py on torch.compile's mutation analysis).
    if TRANSFORM == GRID:
        g = coords_ptr + n * s0 + od * s1 + oh * s2 + ow * s3
        nx = to_compute(tl.load(g, mask=p_mask, other=0.0), F64)
        ny = to_compute(tl.load(g + s4, mask=p_mask, other=0.0), F64)
        nz = nx * 0
        if NDIM == 3:
            nz = to_compute(tl.load(g + 2 * s4, mask=p_mask, other=0.0), F64)
        bx = nx * 0
        by = bx
        bz = bx
        den = bx + 1
    else:
        bx, by, bz = base_position(od, oh, ow, OD, OH, OW, ALIGN_CORNERS, NDIM, F64)
        params = coords_ptr + n * s0
        if TRANSFORM == TPS:
            # f(p) = a0 + a_x x + a_y y + sum_k w_k U(|p - c_k|^2): rows CP..CP+2 hold the affine part.
            nx = row_dot(tl.load(params + (CP + 1) * s1), tl.load(params + (CP + 2) * s1), 0.0,
                         tl.load(params + CP * s1), bx, by, bz, F64, 2)
            ny = row_dot(tl.load(params + (CP + 1) * s1 + s2), tl.load(params + (CP + 2) * s1 + s2), 0.0,
                         tl.load(params + CP * s1 + s2), bx, by, bz, F64, 2)
            for k in range(CP):
                dx = bx - to_compute(tl.load(ctrl_ptr + 2 * k), F64)
                dy = by - to_compute(tl.load(ctrl_ptr + 2 * k + 1), F64)
                radial = tps_radial(dx * dx + dy * dy)
                nx += to_compute(tl.load(params + k * s1), F64) * radial
                ny += to_compute(tl.load(params + k * s1 + s2), F64) * radial
            nz = bx * 0
            den = nz + 1
        else:
            # AFFINE: theta's rows applied to (bx, by, [bz,] 1). PROJECTIVE: the homography's,
            # then divided by the third row's value.
            tx, ty, tz, t1 = matrix_row(params, s2, NDIM)
            nx = row_dot(tl.load(tx), tl.load(ty), tl.load(tz), tl.load(t1), bx, by, bz, F64, NDIM)
            tx, ty, tz, t1 = matrix_row(params + s1, s2, NDIM)
            ny = row_dot(tl.load(tx), tl.load(ty), tl.load(tz), tl.load(t1), bx, by, bz, F64, NDIM)
            tx, ty, tz, t1 = matrix_row(params + 2 * s1, s2, NDIM)
            if TRANSFORM == AFFINE:
                den = bx * 0 + 1
                nz = bx * 0
                if NDIM == 3:
                    nz = row_dot(tl.load(tx), tl.load(ty), tl.load(tz), tl.load(t1), bx, by, bz, F64, NDIM)
            else:
                den = row_dot(tl.load(tx), tl.load(ty), tl.load(tz), tl.load(t1), bx, by, bz, F64, NDIM)
                nx = nx / den
                ny = ny / den
                nz = bx * 0
    x, mx = sample_point(nx, W, MODE, PADDING, ALIGN_CORNERS)
    y, my = sample_point(ny, H, MODE, PADDING, ALIGN_CORNERS)
    z = x * 0
    mz = x * 0
    if NDIM == 3:
        z, mz = sample_point(nz, D, MODE, PADDING, ALIGN_CORNERS)

    if PASS == LIST_TAPS:
        # 64-bit: the list has TAPS entries per output pixel, more than any tensor has elements.
        image = n.to(tl.int64)
        output = image * P + q
        source = image * sgy_n + od.to(tl.int64) * sgy_d + oh.to(tl.int64) * sgy_h + ow.to(tl.int64) * sgy_w
        tl.store(source_ptr + output, source, mask=p_mask)
        for t in tl.static_range(TAPS):
            xi, yi, zi, inside, weight, _, _, _ = tap(t, x, y, z, W, H, D, MODE, PADDING, ALIGN_CORNERS, NDIM)
            key = image * sgx_n + zi.to(tl.int64) * sgx_d + yi.to(tl.int64) * sgx_h + xi.to(tl.int64) * sgx_w
            tl.store(key_ptr + output * TAPS + t, tl.where(inside, key, -1).to(key_ptr.dtype.element_ty), mask=p_mask)
            tl.store(weight_ptr + output * TAPS + t, weight.to(weight_ptr.dtype.element_ty), mask=p_mask)
    else:
        c_begin, c_end = program_channels(C, SPLITS, BLOCK_C)
        x_image = x_ptr + n * sx_n
        if PASS == FORWARD:
            y_pixels = y_ptr + n * sy_n + q * sy_p
            for c0 in range(c_begin, c_end, BLOCK_C):
                c = as_index(c0 + tl.arange(0, BLOCK_C), INDEX_64)
                c_mask = (c < c_end) | EVEN_C
                acc = to_compute(tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32), F64)
                inside_weight = x * 0
                for t in tl.static_range(TAPS):
                    xi, yi, zi, inside, weight, _, _, _ = tap(t, x, y, z, W, H, D, MODE, PADDING, ALIGN_CORNERS, NDIM)
                    pixel = as_index(zi, INDEX_64) * sx_d + as_index(yi, INDEX_64) * sx_h + as_index(xi, INDEX_64) * sx_w
                    mask = c_mask[:, None] & (inside & p_mask)[None, :]
                    value = gather(x_image + c * sx_c, pixel, mask)
                    acc += to_compute(value, F64) * weight[None, :]
                    if FILL:
                        inside_weight += tl.where(inside, weight, 0.0)
                if FILL:
                    fill = to_compute(tl.load(fill_ptr + c, mask=c_mask, other=0.0), F64)
                    acc += fill[:, None] * (1 - inside_weight)[None, :]
                out = y_pixels[None, :] + (c * sy_c)[:, None]
                tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=c_mask[:, None] & p_mask[None, :])
        else:
            gy_pixels = gy_ptr + n * sgy_n + od * sgy_d + oh * sgy_h + ow * sgy_w
            gx_image = gx_ptr + n * sgx_n
            # d loss / d pixel coordinate, summed over channels at the end (per-element partial
            # products first: no reduction across threads inside the loop, whichever way they run).
            gnx_tile = to_compute(tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32), F64)
            gny_tile = gnx_tile
            gnz_tile = gnx_tile
            for c0 in range(c_begin, c_end, BLOCK_C):
                c = as_index(c0 + tl.arange(0, BLOCK_C), INDEX_64)
                c_mask = (c < c_end) | EVEN_C
                tile_mask = c_mask[:, None] & p_mask[None, :]
                grad_y = to_compute(gather(c * sgy_c, gy_pixels, tile_mask), F64)
                if FILL:
                    fill = to_compute(tl.load(fill_ptr + c, mask=c_mask, other=0.0), F64)
                for t in tl.static_range(TAPS):
                    xi, yi, zi, inside, weight, dwx, dwy, dwz = tap(t, x, y, z, W, H, D, MODE, PADDING, ALIGN_CORNERS, NDIM)
                    mask = c_mask[:, None] & (inside & p_mask)[None, :]
                    zi = as_index(zi, INDEX_64)
                    yi = as_index(yi, INDEX_64)
                    xi = as_index(xi, INDEX_64)
                    if INPUT_GRAD:
                        scatter_add(c * sgx_c, gx_image + (zi * sgx_d + yi * sgx_h + xi * sgx_w),
                                    (grad_y * weight[None, :]).to(gx_ptr.dtype.element_ty), mask)
                    if COORD_GRAD:
                        value = to_compute(gather(c * sx_c, x_image + (zi * sx_d + yi * sx_h + xi * sx_w), mask), F64)
                        if FILL:
                            # The fill term (1 - sum of inside weights) * fill moves against the inside taps.
                            value = tl.where(mask, value - fill[:, None], 0.0)
                        value_gout = value * grad_y
                        gnx_tile += value_gout * dwx[None, :]
                        gny_tile += value_gout * dwy[None, :]
                        if NDIM == 3:
                            gnz_tile += value_gout * dwz[None, :]
            if COORD_GRAD:
                gnx = tl.sum(gnx_tile, axis=0) * mx
                gny = tl.sum(gny_tile, axis=0) * my
                gnz = tl.sum(gnz_tile, axis=0) * mz
                store_transform_grad(
                    gcoords_ptr + tl.program_id(1) * sgc_split, n * PARTIALS + block, n, q, P, p_mask,
                    gnx, gny, gnz, nx, ny, bx, by, bz, den, ctrl_ptr, CP, TRANSFORM, NDIM, F64,
                )
