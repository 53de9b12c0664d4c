"""Grid generation on the GPU: the affine grid of F.affine_grid and the gradient of its theta."""

import triton
import triton.language as tl

from stn_triton.kernels.sampling import output_position, to_compute, unravel_pixel


@triton.jit
def affine_base(q, D, H, W, ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr):
    """Normalized (x, y, z) of flat output pixel q of one image of size D x H x W; z = 0 for 2-D."""
    _, d, h, w = unravel_pixel(q, D, H, W)
    x = output_position(w, W, ALIGN_CORNERS, F64)
    y = output_position(h, H, ALIGN_CORNERS, F64)
    if NDIM == 3:
        z = output_position(d, D, ALIGN_CORNERS, F64)
    else:
        z = x * 0
    return x, y, z


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
    theta = theta_ptr + n * st_n
    for i in tl.static_range(NDIM):
        row = theta + i * st_i
        value = to_compute(tl.load(row, mask=mask, other=0.0), F64) * x
        value += to_compute(tl.load(row + st_j, mask=mask, other=0.0), F64) * y
        if NDIM == 3:
            value += to_compute(tl.load(row + 2 * st_j, mask=mask, other=0.0), F64) * z
        value += to_compute(tl.load(row + NDIM * st_j, mask=mask, other=0.0), F64)
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
    rows = tl.arange(0, 4)  # i: output coordinate, padded to 4
    cols = tl.arange(0, 4)  # j: base coordinate x, y, (z,) 1, padded to 4
    acc = to_compute(tl.zeros([4, 4], dtype=tl.float32), F64)
    start = split.to(tl.int64) * CHUNK
    for q0 in range(start, tl.minimum(start + CHUNK, image), BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        mask = q < image
        x, y, z = affine_base(q, D, H, W, ALIGN_CORNERS, NDIM, F64)
        one = x * 0 + 1.0
        if NDIM == 3:
            base = tl.where(cols[None, :] == 0, x[:, None], tl.where(cols[None, :] == 1, y[:, None],
                            tl.where(cols[None, :] == 2, z[:, None], one[:, None])))
        else:
            base = tl.where(cols[None, :] == 0, x[:, None], tl.where(cols[None, :] == 1, y[:, None],
                            tl.where(cols[None, :] == 2, one[:, None], 0.0)))
        _, d, h, w = unravel_pixel(q, D, H, W)
        pix = ggrid_ptr + n.to(tl.int64) * sg_n + d * sg_d + h * sg_h + w * sg_w
        ggrid = tl.load(pix[:, None] + rows[None, :] * sg_k, mask=mask[:, None] & (rows[None, :] < NDIM), other=0.0)
        acc += tl.sum(to_compute(ggrid, F64)[:, :, None] * base[:, None, :], axis=0)
    out = partial_ptr + (n * tl.num_programs(1) + split) * (NDIM * (NDIM + 1))
    tl.store(out + rows[:, None] * (NDIM + 1) + cols[None, :], acc, mask=(rows[:, None] < NDIM) & (cols[None, :] <= NDIM))
