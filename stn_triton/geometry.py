"""Host-side geometry of the warps: the thin-plate-spline solve and kornia's pixel frames.

Used by the Triton warps (``stn_triton.ops.warp``) and by the plain PyTorch fallback
(``stn_triton.fallback``) alike, so both compute the same transform.
"""

import functools
import math
import weakref

import torch

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
    return torch.linalg.inv(system)[:, :k]


# id(control points) -> (a weak reference to them, their version, {dtype: solver}): one inversion
# per control-point set and dtype, for as long as the tensor lives and is not modified in place.
_solvers: dict[int, tuple[weakref.ref, int, dict]] = {}


def cached_tps_solver(control_points: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tps_solver`` in ``dtype``, computed once per control-point tensor (and in-place version)."""
    if torch.compiler.is_compiling():
        return tps_solver(control_points).to(dtype)
    key = id(control_points)
    entry = _solvers.get(key)
    if entry is None or entry[0]() is not control_points or entry[1] != control_points._version:
        entry = (weakref.ref(control_points, lambda _, key=key: _solvers.pop(key, None)), control_points._version, {})
        _solvers[key] = entry
    solvers = entry[2]
    if dtype not in solvers:
        solvers[dtype] = tps_solver(control_points).to(dtype)
    return solvers[dtype]


def tps_coefficients(source_points: torch.Tensor, control_points: torch.Tensor) -> torch.Tensor:
    """The spline through ``control_points[k] -> source_points[n, k]`` as ``[N, K + 3, 2]``.

    Rows 0..K-1 are the radial weights w_k, rows K..K+2 the affine part (a0, a_x, a_y), one column
    per output coordinate; in float32 (float64 for float64), differentiable in the source points.
    """
    dtype = compute_dtype(source_points.dtype)
    return cached_tps_solver(control_points, dtype) @ source_points.to(dtype)


def _pixel_to_normalized(height: int, width: int, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """kornia's normal_transform_pixel: ``[3, 3]`` mapping pixel (x, y, 1) to normalized coordinates."""
    if align_corners:
        sx, tx = (1.0, 0.0) if width == 1 else (2.0 / (width - 1.0), -1.0)
        sy, ty = (1.0, 0.0) if height == 1 else (2.0 / (height - 1.0), -1.0)
    else:
        sx, tx = 2.0 / width, (1.0 - width) / width
        sy, ty = 2.0 / height, (1.0 - height) / height
    return torch.tensor([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]], dtype=like.dtype, device=like.device)


def normalized_inverse_map(M: torch.Tensor, src_size, dsize, align_corners: bool) -> torch.Tensor:
    """``[B, 3, 3]`` destination-normalized -> source-normalized map of a pixel homography M.

    M ``[B, 3, 3]`` maps source pixels to destination pixels, as kornia's warps take it. Computed
    in float32 (float64 for float64) with differentiable torch ops.
    """
    dtype = compute_dtype(M.dtype)
    M = M.to(dtype)
    src_norm = _pixel_to_normalized(*src_size, align_corners, M)
    dst_norm = _pixel_to_normalized(*dsize, align_corners, M)
    return torch.linalg.inv(dst_norm @ M @ torch.linalg.inv(src_norm))


def affine_to_homography(M: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` -> ``[B, 3, 3]`` with a last row (0, 0, 1)."""
    last = torch.zeros_like(M[:, :1, :])
    last[..., 2] = 1
    return torch.cat([M, last], dim=1)
