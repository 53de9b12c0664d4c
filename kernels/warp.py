"""Grid generation on the GPU: where each output pixel samples, and the gradient of the transform.

affine_grid's kernels write the grid; the sampling kernels of grid_sample.py call
transform_points / store_transform_grad instead, so a fused warp never stores its grid.
"""

import triton
import triton.language as tl

from stn_triton.kernels.sampling import output_position, to_compute, unravel_pixel


# Where a sampling kernel's points come from.
GRID = tl.constexpr(0)  # read from a grid tensor [N, (D,) H, W, NDIM]
AFFINE = tl.constexpr(1)  # theta [N, NDIM, NDIM + 1] applied to the output pixel's position
PROJECTIVE = tl.constexpr(2)  # homography [N, 3, 3] applied, then divided by the third coordinate
TPS = tl.constexpr(3)  # thin-plate spline, coefficients [N, K + 3, 2] over control points [K, 2]


@triton.jit
def base_position(d, h, w, D, H, W, ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr):
    """Normalized (x, y, z) of output pixel (d, h, w) of an output of size D x H x W; z = 0 for 2-D."""
    x = output_position(w, W, ALIGN_CORNERS, F64)
    y = output_position(h, H, ALIGN_CORNERS, F64)
    if NDIM == 3:
        z = output_position(d, D, ALIGN_CORNERS, F64)
    else:
        z = x * 0
    return x, y, z


@triton.jit
def affine_base(q, D, H, W, ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr):
    """Normalized (x, y, z) of flat output pixel q of one image of size D x H x W; z = 0 for 2-D."""
    _, d, h, w = unravel_pixel(q, D, H, W)
    return base_position(d, h, w, D, H, W, ALIGN_CORNERS, NDIM, F64)


@triton.jit
def outer_sum(r0, r1, r2, c0, c1, c2, c3):
    """[4, 4] tile of sum over pixels of r_i * c_j (row 3 is 0): a parameter gradient per [i, j]."""
    rows = tl.arange(0, 4)
    cols = tl.arange(0, 4)
    coef = tl.where(rows[None, :] == 0, r0[:, None], tl.where(rows[None, :] == 1, r1[:, None],
                    tl.where(rows[None, :] == 2, r2[:, None], 0.0)))
    base = tl.where(cols[None, :] == 0, c0[:, None], tl.where(cols[None, :] == 1, c1[:, None],
                    tl.where(cols[None, :] == 2, c2[:, None], c3[:, None])))
    return tl.sum(coef[:, :, None] * base[:, None, :], axis=0)


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



@triton.jit
def tps_radial(d):
    """U(d) = d log d of a squared distance d, 0 at d = 0."""
    return tl.where(d > 0, d * tl.log(tl.where(d > 0, d, 1.0)), 0.0)


@triton.jit
def _param(row_ptr, i, j, s_i, s_j, F64: tl.constexpr):
    """One scalar transform parameter [i, j] of the program's image, in the compute dtype."""
    return to_compute(tl.load(row_ptr + i * s_i + j * s_j), F64)


@triton.jit
def transform_points(
    coords_ptr,  # GRID: the grid; else the image's transform parameters
    ctrl_ptr,  # TPS: control points [K, 2], contiguous
    n, d, h, w, mask,  # image (scalar), output pixel position and validity
    s0, s1, s2, s3, s4,  # GRID: grid strides (n, d, h, w, k); else parameter strides (n, row, col)
    K,  # TPS: number of control points
    OD, OH, OW,  # output spatial size
    TRANSFORM: tl.constexpr, ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr,
):
    """Normalized sample points of output pixels, and what their gradient chains through.

    Returns (x, y, z, base x, base y, base z, denominator): the base is the output pixel's own
    normalized position (as affine_grid places it), the denominator the projective divisor.
    """
    if TRANSFORM == GRID:
        g = coords_ptr + n * s0 + d * s1 + h * s2 + w * s3
        x = to_compute(tl.load(g, mask=mask, other=0.0), F64)
        y = to_compute(tl.load(g + s4, mask=mask, other=0.0), F64)
        if NDIM == 3:
            z = to_compute(tl.load(g + 2 * s4, mask=mask, other=0.0), F64)
        else:
            z = x * 0
        return x, y, z, x * 0, x * 0, x * 0, x * 0 + 1
    bx, by, bz = base_position(d, h, w, OD, OH, OW, ALIGN_CORNERS, NDIM, F64)
    params = coords_ptr + n * s0
    if TRANSFORM == AFFINE:
        if NDIM == 3:
            x = _param(params, 0, 0, s1, s2, F64) * bx + _param(params, 0, 1, s1, s2, F64) * by
            x += _param(params, 0, 2, s1, s2, F64) * bz + _param(params, 0, 3, s1, s2, F64)
            y = _param(params, 1, 0, s1, s2, F64) * bx + _param(params, 1, 1, s1, s2, F64) * by
            y += _param(params, 1, 2, s1, s2, F64) * bz + _param(params, 1, 3, s1, s2, F64)
            z = _param(params, 2, 0, s1, s2, F64) * bx + _param(params, 2, 1, s1, s2, F64) * by
            z += _param(params, 2, 2, s1, s2, F64) * bz + _param(params, 2, 3, s1, s2, F64)
        else:
            x = _param(params, 0, 0, s1, s2, F64) * bx + _param(params, 0, 1, s1, s2, F64) * by
            x += _param(params, 0, 2, s1, s2, F64)
            y = _param(params, 1, 0, s1, s2, F64) * bx + _param(params, 1, 1, s1, s2, F64) * by
            y += _param(params, 1, 2, s1, s2, F64)
            z = bx * 0
        return x, y, z, bx, by, bz, bx * 0 + 1
    elif TRANSFORM == PROJECTIVE:
        u = _param(params, 0, 0, s1, s2, F64) * bx + _param(params, 0, 1, s1, s2, F64) * by
        u += _param(params, 0, 2, s1, s2, F64)
        v = _param(params, 1, 0, s1, s2, F64) * bx + _param(params, 1, 1, s1, s2, F64) * by
        v += _param(params, 1, 2, s1, s2, F64)
        den = _param(params, 2, 0, s1, s2, F64) * bx + _param(params, 2, 1, s1, s2, F64) * by
        den += _param(params, 2, 2, s1, s2, F64)
        return u / den, v / den, bx * 0, bx, by, bz, den
    else:
        x = _param(params, K, 0, s1, s2, F64) + _param(params, K + 1, 0, s1, s2, F64) * bx
        x += _param(params, K + 2, 0, s1, s2, F64) * by
        y = _param(params, K, 1, s1, s2, F64) + _param(params, K + 1, 1, s1, s2, F64) * bx
        y += _param(params, K + 2, 1, s1, s2, F64) * by
        for k in range(K):
            dx = bx - to_compute(tl.load(ctrl_ptr + 2 * k), F64)
            dy = by - to_compute(tl.load(ctrl_ptr + 2 * k + 1), F64)
            radial = tps_radial(dx * dx + dy * dy)
            x += _param(params, k, 0, s1, s2, F64) * radial
            y += _param(params, k, 1, s1, s2, F64) * radial
        return x, y, bx * 0, bx, by, bz, bx * 0 + 1


@triton.jit
def store_transform_grad(
    out_ptr,  # GRID: grad_grid [N, Q, NDIM]; AFFINE / PROJECTIVE: [rows, 4, 4]; TPS: [rows, K + 3, 2]
    row, n, q, Q, mask,  # this program's row of partial sums, its image, its pixels and their validity
    gx, gy, gz,  # d loss / d normalized sample point, per pixel (0 where masked)
    x, y,  # the sample points (PROJECTIVE)
    bx, by, bz, den,  # from transform_points
    ctrl_ptr, K,
    TRANSFORM: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr,
):
    """Write the gradient of the transform: per pixel for a grid, else this program's partial sums.

    A transform's partial sums go to the program's own ``row`` (one per block of pixels of an image,
    rows of an image adjacent), whatever the block size, so the buffer's layout stays the same.

    The partial sums of all programs are added on the host: no atomics, a fixed order.
    """
    if TRANSFORM == GRID:
        g = out_ptr + (n * Q + q) * NDIM
        tl.store(g, gx.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(g + 1, gy.to(out_ptr.dtype.element_ty), mask=mask)
        if NDIM == 3:
            tl.store(g + 2, gz.to(out_ptr.dtype.element_ty), mask=mask)
    elif TRANSFORM == TPS:
        partial = out_ptr + row * (K + 3) * 2
        for k in range(K):
            dx = bx - to_compute(tl.load(ctrl_ptr + 2 * k), F64)
            dy = by - to_compute(tl.load(ctrl_ptr + 2 * k + 1), F64)
            radial = tps_radial(dx * dx + dy * dy)
            tl.store(partial + 2 * k, tl.sum(gx * radial, axis=0))
            tl.store(partial + 2 * k + 1, tl.sum(gy * radial, axis=0))
        tl.store(partial + 2 * K, tl.sum(gx, axis=0))
        tl.store(partial + 2 * K + 1, tl.sum(gy, axis=0))
        tl.store(partial + 2 * K + 2, tl.sum(gx * bx, axis=0))
        tl.store(partial + 2 * K + 3, tl.sum(gy * bx, axis=0))
        tl.store(partial + 2 * K + 4, tl.sum(gx * by, axis=0))
        tl.store(partial + 2 * K + 5, tl.sum(gy * by, axis=0))
    else:
        one = bx * 0 + 1
        if TRANSFORM == AFFINE:
            if NDIM == 3:
                acc = outer_sum(gx, gy, gz, bx, by, bz, one)
            else:
                acc = outer_sum(gx, gy, gz, bx, by, one, bx * 0)
        else:
            # d(u/den)/dH[0, j] = b_j / den and d(u/den)/dH[2, j] = -(u/den) b_j / den (same for v);
            # a non-finite point has no gradient and must not turn 0 * inf into NaN.
            finite = mask & (tl.abs(x) < 3.0e38) & (tl.abs(y) < 3.0e38) & (den != 0)
            safe_den = tl.where(finite, den, 1.0)
            gx = tl.where(finite, gx / safe_den, 0.0)
            gy = tl.where(finite, gy / safe_den, 0.0)
            gz = -(gx * tl.where(finite, x, 0.0) + gy * tl.where(finite, y, 0.0))
            acc = outer_sum(gx, gy, gz, bx, by, one, bx * 0)
        rows = tl.arange(0, 4)
        cols = tl.arange(0, 4)
        tl.store(out_ptr + row * 16 + rows[:, None] * 4 + cols[None, :], acc)
