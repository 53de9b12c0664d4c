"""affine_grid on the GPU: the grid kernel and the theta-gradient kernel.

The fused warps never store a grid (sample.py computes their points in the sampling kernel); these
kernels serve ``stn_triton.affine_grid``, the drop-in for ``F.affine_grid``. Index arithmetic is
32-bit unless a tensor needs 64 (INDEX_64), and each program stores its pixels' points as one
``[BLOCK_P, COLS]`` tile of the contiguous grid (COLS: NDIM rounded up to a power of two).
"""

import triton
import triton.language as tl

from stn_triton.kernels.sampling import as_index, to_compute, unravel_pixel
from stn_triton.kernels.transforms import base_position, outer_sum


@triton.jit
def affine_base(q, D, H, W, ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr):
    """Normalized (x, y, z) of flat output pixel q of one image of size D x H x W; z = 0 for 2-D."""
    _, d, h, w = unravel_pixel(q, D, H, W)
    return base_position(d, h, w, D, H, W, ALIGN_CORNERS, NDIM, F64)


@triton.jit(do_not_specialize=["ROWS", "D", "H", "W"])
def _affine_grid_kernel(
    theta_ptr,  # [N, NDIM, NDIM + 1] affine maps, output -> input, normalized coordinates
    grid_ptr,  # [N, D, H, W, NDIM] contiguous out: sample points (D = 1 for 2-D)
    ROWS, D, H, W,  # N * D * H * W output pixels, and the output spatial size
    st_n, st_i, st_j,  # theta strides
    ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr,
    COLS: tl.constexpr,  # NDIM rounded up to a power of two: the grid tile's columns
    INDEX_64: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = as_index(tl.program_id(0), INDEX_64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = p < ROWS
    image = D * H * W
    n = p // image
    x, y, z = affine_base(p % image, D, H, W, ALIGN_CORNERS, NDIM, F64)
    i = tl.arange(0, COLS)  # the output coordinate: x, y (, z)
    tile_mask = mask[:, None] & (i < NDIM)[None, :]
    row = theta_ptr + n[:, None] * st_n + i[None, :] * st_i
    value = to_compute(tl.load(row, mask=tile_mask, other=0.0), F64) * x[:, None]
    value += to_compute(tl.load(row + st_j, mask=tile_mask, other=0.0), F64) * y[:, None]
    if NDIM == 3:
        value += to_compute(tl.load(row + 2 * st_j, mask=tile_mask, other=0.0), F64) * z[:, None]
    value += to_compute(tl.load(row + NDIM * st_j, mask=tile_mask, other=0.0), F64)
    tl.store(grid_ptr + p[:, None] * NDIM + i[None, :], value.to(grid_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=["D", "H", "W", "CHUNK"])
def _affine_grid_bwd_kernel(
    ggrid_ptr,  # [N, D, H, W, NDIM] gradient of the grid (any strides)
    partial_ptr,  # [N, SPLITS, NDIM, NDIM + 1] contiguous out: per-chunk sums of grad_theta
    D, H, W,  # output spatial size
    CHUNK,  # pixels of one image summed by one program (a multiple of BLOCK_P)
    sg_n, sg_d, sg_h, sg_w, sg_k,  # grad_grid strides
    ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """grad_theta[n, i, j] = sum over pixels of grad_grid[n, pixel, i] * base[pixel, j], base = (x, y, (z,) 1).

    Each program sums one chunk of one image in a fixed order, and the host adds the chunks:
    no atomics, so the result is the same on every run.
    """
    n = as_index(tl.program_id(0), INDEX_64)
    split = as_index(tl.program_id(1), INDEX_64)
    image = D * H * W
    rows = tl.arange(0, 4)  # i: output coordinate
    cols = tl.arange(0, 4)  # j: base coordinate x, y, (z,) 1
    acc = to_compute(tl.zeros([4, 4], dtype=tl.float32), F64)
    start = split * CHUNK
    for q0 in range(start, tl.minimum(start + CHUNK, image), BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        mask = q < image
        x, y, z = affine_base(q, D, H, W, ALIGN_CORNERS, NDIM, F64)
        _, d, h, w = unravel_pixel(q, D, H, W)
        g = ggrid_ptr + n * sg_n + d * sg_d + h * sg_h + w * sg_w
        gx = to_compute(tl.load(g, mask=mask, other=0.0), F64)
        gy = to_compute(tl.load(g + sg_k, mask=mask, other=0.0), F64)
        one = x * 0 + 1
        if NDIM == 3:
            gz = to_compute(tl.load(g + 2 * sg_k, mask=mask, other=0.0), F64)
            acc += outer_sum(gx, gy, gz, x, y, z, one)
        else:
            acc += outer_sum(gx, gy, x * 0, x, y, one, x * 0)
    out = partial_ptr + (n * tl.num_programs(1) + split) * (NDIM * (NDIM + 1))
    tl.store(out + rows[:, None] * (NDIM + 1) + cols[None, :], acc, mask=(rows[:, None] < NDIM) & (cols[None, :] <= NDIM))
