"""Where a warp's output pixels sample, and the gradient of its transform: device helpers.

The sampling kernel (sample.py) computes each output pixel's normalized position as
affine_grid places it (``base_position``), maps it through the transform, and in the backward
reduces the points' gradient into the transform's parameters (``store_transform_grad``); the
affine_grid kernels (affine_grid.py) share the positions and the reduction.

Why the kernels load the transform parameters themselves rather than passing pointers here:
torch.compile's mutation analysis (run on the kernel's TTIR, where helpers are still calls)
counts every pointer passed to a helper as written when the helper's result reaches a store or
atomic address, and the sample points decide grad_input's atomic addresses. So these helpers
take values; only store_transform_grad takes pointers, and nothing it returns addresses memory.
"""

import triton
import triton.language as tl

from stn_triton.kernels import codes
from stn_triton.kernels.sampling import to_compute

GRID = tl.constexpr(codes.GRID)
AFFINE = tl.constexpr(codes.AFFINE)
PROJECTIVE = tl.constexpr(codes.PROJECTIVE)
TPS = tl.constexpr(codes.TPS)


@triton.jit
def output_position(i, size, ALIGN_CORNERS: tl.constexpr, F64: tl.constexpr):
    """Normalized position in [-1, 1] of pixel i of an output side of `size` pixels.

    PyTorch's affine_grid base: linspace(-1, 1, size) (computed from the nearer end, as ATen's
    linspace is), scaled by (size - 1) / size when not align_corners; 0 for a side of one pixel.
    """
    i_f = to_compute(i, F64)
    size_f = to_compute(i * 0 + size, F64)
    step = 2.0 / tl.where(size_f > 1, size_f - 1, 1.0)
    from_start = i_f * step - 1.0
    from_end = 1.0 - (size_f - 1 - i_f) * step
    pos = tl.where(i < size // 2, from_start, from_end)
    if not ALIGN_CORNERS:
        pos = pos * (size_f - 1) / size_f
    return tl.where(size_f > 1, pos, 0.0)


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
def matrix_row(row_ptr, s_col, NDIM: tl.constexpr):
    """Pointers to the x, y, z and constant entries of one row of a transform matrix.

    For NDIM == 2 the z pointer repeats the x one; the caller adds no z term there.
    """
    if NDIM == 3:
        return row_ptr, row_ptr + s_col, row_ptr + 2 * s_col, row_ptr + 3 * s_col
    else:
        return row_ptr, row_ptr + s_col, row_ptr, row_ptr + 2 * s_col


@triton.jit
def row_dot(tx, ty, tz, t1, bx, by, bz, F64: tl.constexpr, NDIM: tl.constexpr):
    """One matrix row applied to the homogeneous position (bx, by, [bz,] 1)."""
    value = to_compute(tx, F64) * bx + to_compute(ty, F64) * by + to_compute(t1, F64)
    if NDIM == 3:
        value += to_compute(tz, F64) * bz
    return value


@triton.jit
def tps_radial(d):
    """U(d) = d log d of a squared distance d, 0 at d = 0."""
    return tl.where(d > 0, d * tl.log(tl.where(d > 0, d, 1.0)), 0.0)


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


@triton.jit
def store_transform_grad(
    grad_ptr,  # GRID: grad_grid [N, P, NDIM]; AFFINE / PROJECTIVE: [rows, 4, 4]; TPS: [rows, CP + 3, 2]
    row, n, q, P, mask,  # this program's row of partial sums, its image, its pixels and their validity
    gnx, gny, gnz,  # d loss / d normalized sample point, per pixel (0 where masked)
    x, y,  # the sample points (PROJECTIVE)
    bx, by, bz, den,  # the output pixels' base positions, and the projective divisor
    ctrl_ptr, CP,
    TRANSFORM: tl.constexpr, NDIM: tl.constexpr, F64: tl.constexpr,
):
    """Write the gradient of the transform: per pixel for a grid, else this program's partial sums.

    A transform's partial sums go to the program's own ``row`` (one per block of pixels of an image,
    rows of an image adjacent), whatever the block size, so the buffer's layout stays the same.
    The partial sums of all programs are added on the host: no atomics, a fixed order.
    """
    if TRANSFORM == GRID:
        g = grad_ptr + (n * P + q) * NDIM
        tl.store(g, gnx.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(g + 1, gny.to(grad_ptr.dtype.element_ty), mask=mask)
        if NDIM == 3:
            tl.store(g + 2, gnz.to(grad_ptr.dtype.element_ty), mask=mask)
    elif TRANSFORM == TPS:
        partial = grad_ptr + row * (CP + 3) * 2
        for k in range(CP):
            dx = bx - to_compute(tl.load(ctrl_ptr + 2 * k), F64)
            dy = by - to_compute(tl.load(ctrl_ptr + 2 * k + 1), F64)
            radial = tps_radial(dx * dx + dy * dy)
            tl.store(partial + 2 * k, tl.sum(gnx * radial, axis=0))
            tl.store(partial + 2 * k + 1, tl.sum(gny * radial, axis=0))
        tl.store(partial + 2 * CP, tl.sum(gnx, axis=0))
        tl.store(partial + 2 * CP + 1, tl.sum(gny, axis=0))
        tl.store(partial + 2 * CP + 2, tl.sum(gnx * bx, axis=0))
        tl.store(partial + 2 * CP + 3, tl.sum(gny * bx, axis=0))
        tl.store(partial + 2 * CP + 4, tl.sum(gnx * by, axis=0))
        tl.store(partial + 2 * CP + 5, tl.sum(gny * by, axis=0))
    else:
        one = bx * 0 + 1
        if TRANSFORM == AFFINE:
            if NDIM == 3:
                acc = outer_sum(gnx, gny, gnz, bx, by, bz, one)
            else:
                acc = outer_sum(gnx, gny, gnz, bx, by, one, bx * 0)
        else:
            # d(u/den)/dH[0, j] = b_j / den and d(u/den)/dH[2, j] = -(u/den) b_j / den (same for v);
            # a non-finite point has no gradient and must not turn 0 * inf into NaN.
            finite = mask & (tl.abs(x) < 3.0e38) & (tl.abs(y) < 3.0e38) & (den != 0)
            safe_den = tl.where(finite, den, 1.0)
            gnx = tl.where(finite, gnx / safe_den, 0.0)
            gny = tl.where(finite, gny / safe_den, 0.0)
            gnz = -(gnx * tl.where(finite, x, 0.0) + gny * tl.where(finite, y, 0.0))
            acc = outer_sum(gnx, gny, gnz, bx, by, one, bx * 0)
        rows = tl.arange(0, 4)
        cols = tl.arange(0, 4)
        tl.store(grad_ptr + row * 16 + rows[:, None] * 4 + cols[None, :], acc)
