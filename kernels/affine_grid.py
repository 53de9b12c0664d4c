"""affine_grid on the GPU: the grid kernel and the theta-gradient kernel.

The fused warps never store a grid (grid_sample.py computes their points in the sampling
kernel); these kernels serve ``stn_triton.affine_grid``, the drop-in for ``F.affine_grid``.
"""

import triton
import triton.language as tl

from stn_triton.kernels.sampling import to_compute, unravel_pixel
from stn_triton.kernels.transforms import base_position, matrix_row, outer_sum, row_dot


@triton.jit
def affine_base(q, D, H, W, ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr):
    """Normalized (x, y, z) of flat output pixel q of one image of size D x H x W; z = 0 for 2-D."""
    _, d, h, w = unravel_pixel(q, D, H, W)
    return base_position(d, h, w, D, H, W, ALIGN_CORNERS, NDIM, F64)


@triton.jit(do_not_specialize=["P", "D", "H", "W"])
def _affine_grid_kernel(
    theta_ptr,  # [N, NDIM, NDIM + 1] affine maps, output -> input, normalized coordinates
    grid_ptr,  # [N, D, H, W, NDIM] contiguous out: sample points (D = 1 for 2-D)
    P, D, H, W,  # N * D * H * W output pixels, and the output spatial size
    st_n, st_i, st_j,  # theta strides
    ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = p < P
    image = D * H * W
    n = p // image
    x, y, z = affine_base(p % image, D, H, W, ALIGN_CORNERS, NDIM, F64)
    for i in tl.static_range(NDIM):
        tx, ty, tz, t1 = matrix_row(theta_ptr + n * st_n + i * st_i, st_j, NDIM)
        value = row_dot(
            tl.load(tx, mask=mask, other=0.0), tl.load(ty, mask=mask, other=0.0), tl.load(tz, mask=mask, other=0.0),
            tl.load(t1, mask=mask, other=0.0), x, y, z, F64, NDIM,
        )
        tl.store(grid_ptr + p * NDIM + i, value.to(grid_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["D", "H", "W", "CHUNK"])
def _affine_grid_bwd_kernel(
    ggrid_ptr,  # [N, D, H, W, NDIM] gradient of the grid (any strides)
    partial_ptr,  # [N, SPLITS, NDIM, NDIM + 1] contiguous out: per-chunk sums of grad_theta
    D, H, W,  # output spatial size
    CHUNK,  # pixels of one image summed by one program (a multiple of BLOCK_P)
    sg_n, sg_d, sg_h, sg_w, sg_k,  # grad_grid strides
    ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_theta[n, i, j] = sum over pixels of grad_grid[n, pixel, i] * base[pixel, j], base = (x, y, (z,) 1).

    Each program sums one chunk of one image in a fixed order, and the host adds the chunks:
    no atomics, so the result is the same on every run.
    """
    n = tl.program_id(0)
    split = tl.program_id(1)
    image = D * H * W
    rows = tl.arange(0, 4)  # i: output coordinate
    cols = tl.arange(0, 4)  # j: base coordinate x, y, (z,) 1
    acc = to_compute(tl.zeros([4, 4], dtype=tl.float32), F64)
    start = split.to(tl.int64) * CHUNK
    for q0 in range(start, tl.minimum(start + CHUNK, image), BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        mask = q < image
        x, y, z = affine_base(q, D, H, W, ALIGN_CORNERS, NDIM, F64)
        _, d, h, w = unravel_pixel(q, D, H, W)
        g = ggrid_ptr + n.to(tl.int64) * sg_n + d * sg_d + h * sg_h + w * sg_w
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
