"""Host-side geometry of the warps: the thin-plate-spline solve and kornia's pixel frames.

Used by the Triton warps (``stn_triton.ops.warp``) and by the plain PyTorch fallback
(``stn_triton.fallback``) alike, so both compute the same transform.
"""

import functools
import math

import torch

from stn_triton.derived import derived
from stn_triton.numerics import compute_dtype


def regular_control_points(k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[K, 2]``: a sqrt(K) x sqrt(K) grid over [-1, 1]^2, x fastest; K must be a square."""
    side = math.isqrt(k)
    if side * side != k or side < 2:
        raise ValueError(
            f"control_points is required when source_points' K is not a square of at least 4, got K = {k}"
        )
    line = torch.linspace(-1.0, 1.0, side, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(line, line, indexing="xy"), dim=-1).reshape(k, 2)


@functools.cache
def default_control_points(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``regular_control_points``, one tensor per (K, dtype, device): its spline solve is then cached too.

    Internal to the ops, which never write it; modules take a copy of their own.
    """
    return regular_control_points(k, dtype, device)


def tps_radial(squared_distance: torch.Tensor) -> torch.Tensor:
    """U(d) = d log d of a squared distance d, 0 at d = 0."""
    safe = torch.where(squared_distance > 0, squared_distance, torch.ones_like(squared_distance))
    return torch.where(squared_distance > 0, squared_distance * torch.log(safe), torch.zeros_like(squared_distance))


def tps_solver(control_points: torch.Tensor) -> torch.Tensor:
    """``[K + 3, K]``: the rows of the inverse spline system that map K source points to coefficients.

    The system [[U(|c_i - c_j|^2), P], [P^T, 0]] with P = [1, c] depends on the control points
    alone; inverted once in float64 (it is small, and often ill-conditioned for clustered points),
    only its first K columns matter since the right-hand side's last 3 rows are 0.
    """
    c = control_points.detach().to(torch.float64)
    k = c.shape[0]
    affine = torch.cat([torch.ones_like(c[:, :1]), c], dim=1)
    system = torch.zeros(k + 3, k + 3, dtype=torch.float64, device=c.device)
    system[:k, :k] = tps_radial(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    system[:k, k:] = affine
    system[k:, :k] = affine.T
    return torch.linalg.inv_ex(system, check_errors=False).inverse[:, :k]


def cached_tps_solver(control_points: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tps_solver`` in ``dtype``, computed once per control-point tensor (and in-place version)."""
    return derived(control_points, ("tps_solver", dtype), lambda points: tps_solver(points).to(dtype))


def tps_coefficients(source_points: torch.Tensor, control_points: torch.Tensor,
                     solver: torch.Tensor | None = None) -> torch.Tensor:
    """The spline through ``control_points[k] -> source_points[n, k]`` as ``[N, K + 3, 2]``.

    Rows 0..K-1 are the radial weights w_k, rows K..K+2 the affine part (a0, a_x, a_y), one column
    per output coordinate; in float32 (float64 for float64), differentiable in the source points.
    ``solver``: the control points' ``tps_solver`` when the caller keeps it (a module's buffer, so
    that a compiled graph does not invert the system on every call); else it is cached per tensor.
    """
    dtype = compute_dtype(source_points.dtype)
    solver = cached_tps_solver(control_points, dtype) if solver is None else solver.to(dtype)
    return solver @ source_points.to(dtype)


def _pixel_to_normalized(height: int, width: int, align_corners: bool) -> tuple[float, float, float, float]:
    """kornia's normal_transform_pixel as (sx, tx, sy, ty): normalized x = sx * pixel x + tx, y likewise."""
    if align_corners:
        sx, tx = (1.0, 0.0) if width == 1 else (2.0 / (width - 1.0), -1.0)
        sy, ty = (1.0, 0.0) if height == 1 else (2.0 / (height - 1.0), -1.0)
    else:
        sx, tx = 2.0 / width, (1.0 - width) / width
        sy, ty = 2.0 / height, (1.0 - height) / height
    return sx, tx, sy, ty


def normalized_inverse_map(M: torch.Tensor, src_size, dsize, align_corners: bool) -> torch.Tensor:
    """``[B, 3, 3]`` destination-normalized -> source-normalized map of a pixel homography M.

    M ``[B, 3, 3]`` maps source pixels to destination pixels, as kornia's warps take it; kornia inverts
    ``dst_norm @ M @ src_norm^-1``, which is ``src_norm @ M^-1 @ dst_norm^-1``: the two frames are a
    scale and a shift per axis, applied here as arithmetic on rows and columns, so that nothing is
    copied from the host. Computed in float32 (float64 for float64) with differentiable torch ops, M
    inverted without checking for singularity (a check waits for the device): a singular M gives
    non-finite points, which sample nothing.
    """
    M = M.to(compute_dtype(M.dtype))
    inverse = torch.linalg.inv_ex(M, check_errors=False).inverse
    sx, tx, sy, ty = _pixel_to_normalized(*src_size, align_corners)
    dx, ux, dy, uy = _pixel_to_normalized(*dsize, align_corners)
    rows = torch.stack([sx * inverse[:, 0] + tx * inverse[:, 2], sy * inverse[:, 1] + ty * inverse[:, 2],
                        inverse[:, 2]], dim=1)
    return torch.stack([rows[:, :, 0] / dx, rows[:, :, 1] / dy,
                        rows[:, :, 2] - rows[:, :, 0] * (ux / dx) - rows[:, :, 1] * (uy / dy)], dim=2)


def affine_to_homography(M: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` -> ``[B, 3, 3]`` with a last row (0, 0, 1)."""
    last = torch.zeros_like(M[:, :1, :])
    last[..., 2] = 1
    return torch.cat([M, last], dim=1)
