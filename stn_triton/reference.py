"""Plain PyTorch implementations of the fused warps, and the host math they share with the kernels.

These run when a CPU tensor is used without ``TRITON_INTERPRET=1`` (see ``stn_triton.backend``):
they build the sampling grid in memory and call ``F.grid_sample``, as one would without this
library. The helpers that are not about sampling (base positions, the thin-plate-spline solve,
kornia's pixel <-> normalized conversions) serve the Triton path as well, so both agree.
Shapes: input ``[N, C, H, W]`` (or ``[N, C, D, H, W]`` for the affine warp).
"""

import math

import torch
import torch.nn.functional as F


# Normalized coordinates beyond this are replaced by it (NaN by its negative): far outside any
# image, yet small enough that F.grid_sample's CPU index arithmetic cannot overflow on them.
COORD_LIMIT = 1.0e4


def finite_grid(grid: torch.Tensor) -> torch.Tensor:
    """``grid`` with non-finite and huge coordinates moved to +-COORD_LIMIT (NaN to -COORD_LIMIT).

    PyTorch's CPU grid_sample indexes out of bounds on them (its backward can crash); the Triton
    kernels send them outside the image the same way, so zeros padding reads 0 and border the edge.
    """
    return torch.nan_to_num(grid, nan=-COORD_LIMIT).clamp(-COORD_LIMIT, COORD_LIMIT)


def output_positions(size: int, align_corners: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """Normalized positions ``[size]`` of an output side's pixels, as ``F.affine_grid`` places them."""
    if size <= 1:
        return torch.zeros(size, dtype=dtype, device=device)
    positions = torch.linspace(-1.0, 1.0, size, dtype=dtype, device=device)
    return positions if align_corners else positions * (size - 1) / size


def base_points(spatial: tuple[int, int], align_corners: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """``[H, W, 2]`` normalized (x, y) of every output pixel."""
    h, w = spatial
    ys = output_positions(h, align_corners, dtype, device)
    xs = output_positions(w, align_corners, dtype, device)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)


def affine_grid_sample(input, theta, spatial, mode, padding_mode, align_corners):
    """``F.grid_sample(input, F.affine_grid(theta, size))`` with the grid in memory."""
    grid = finite_grid(F.affine_grid(theta, [*input.shape[:2], *spatial], align_corners=align_corners))
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def perspective_grid(homography: torch.Tensor, spatial, align_corners: bool) -> torch.Tensor:
    """``[N, H, W, 2]``: ``homography [N, 3, 3]`` applied to every base point, dehomogenized."""
    base = base_points(spatial, align_corners, homography.dtype, homography.device)
    points = torch.cat([base, torch.ones_like(base[..., :1])], dim=-1)
    mapped = torch.einsum("nij,hwj->nhwi", homography, points)
    return finite_grid(mapped[..., :2] / mapped[..., 2:])


def perspective_grid_sample(input, homography, spatial, mode, padding_mode, align_corners):
    grid = perspective_grid(homography, spatial, align_corners)
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def regular_control_points(k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[K, 2]``: a sqrt(K) x sqrt(K) grid over [-1, 1]^2, x fastest; K must be a square."""
    side = math.isqrt(k)
    if side * side != k or side < 2:
        raise ValueError(
            f"control_points is required when source_points' K is not a square of at least 4, got K = {k}"
        )
    line = torch.linspace(-1.0, 1.0, side, dtype=dtype, device=device)
    return torch.stack(torch.meshgrid(line, line, indexing="xy"), dim=-1).reshape(k, 2)


def tps_radial(squared_distance: torch.Tensor) -> torch.Tensor:
    """U(d) = d log d of a squared distance d, 0 at d = 0."""
    safe = torch.where(squared_distance > 0, squared_distance, torch.ones_like(squared_distance))
    return torch.where(squared_distance > 0, squared_distance * torch.log(safe), torch.zeros_like(squared_distance))


def tps_coefficients(source_points: torch.Tensor, control_points: torch.Tensor) -> torch.Tensor:
    """The spline through ``control_points[k] -> source_points[n, k]`` as ``[N, K + 3, 2]``.

    Rows 0..K-1 are the radial weights w_k, rows K..K+2 the affine part (a0, a_x, a_y), one column
    per output coordinate. Solved in float32 (float64 for float64) with differentiable torch ops.
    """
    dtype = torch.float64 if source_points.dtype == torch.float64 else torch.float32
    c = control_points.to(dtype)
    k = c.shape[0]
    kernel = tps_radial(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    affine = torch.cat([torch.ones_like(c[:, :1]), c], dim=1)
    system = torch.zeros(k + 3, k + 3, dtype=dtype, device=c.device)
    system[:k, :k] = kernel
    system[:k, k:] = affine
    system[k:, :k] = affine.T
    rhs = torch.cat([source_points.to(dtype), source_points.new_zeros(source_points.shape[0], 3, 2, dtype=dtype)], 1)
    return torch.linalg.solve(system, rhs)


def tps_grid(coefficients: torch.Tensor, control_points: torch.Tensor, spatial, align_corners: bool) -> torch.Tensor:
    """``[N, H, W, 2]``: the spline of ``tps_coefficients`` evaluated at every base point."""
    base = base_points(spatial, align_corners, coefficients.dtype, coefficients.device).reshape(-1, 2)
    k = control_points.shape[0]
    radial = tps_radial(((base[:, None, :] - control_points.to(base.dtype)[None]) ** 2).sum(-1))
    features = torch.cat([radial, torch.ones_like(base[:, :1]), base], dim=1)
    grid = torch.einsum("pk,nkc->npc", features, coefficients[:, : k + 3])
    return grid.reshape(coefficients.shape[0], *spatial, 2)


def tps_grid_sample(input, source_points, control_points, spatial, mode, padding_mode, align_corners):
    coefficients = tps_coefficients(source_points, control_points)
    grid = finite_grid(tps_grid(coefficients, control_points, spatial, align_corners)).to(input.dtype)
    return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


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
    dtype = torch.float64 if M.dtype == torch.float64 else torch.float32
    M = M.to(dtype)
    src_norm = _pixel_to_normalized(*src_size, align_corners, M)
    dst_norm = _pixel_to_normalized(*dsize, align_corners, M)
    return torch.linalg.inv(dst_norm @ M @ torch.linalg.inv(src_norm))


def affine_to_homography(M: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` -> ``[B, 3, 3]`` with a last row (0, 0, 1)."""
    last = torch.zeros_like(M[:, :1, :])
    last[..., 2] = 1
    return torch.cat([M, last], dim=1)


def _sample_pixel_warp(src, grid, mode, padding_mode, align_corners, fill_value):
    """kornia's sampling: ``fill`` blends fill_value by the weight the taps lose off the image."""
    if padding_mode != "fill":
        return F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    sample = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=align_corners)
    coverage = F.grid_sample(torch.ones_like(src), grid, mode=mode, padding_mode="zeros", align_corners=align_corners)
    return sample + (1 - coverage) * fill_value.view(1, -1, 1, 1)


def warp_affine(src, M, dsize, mode, padding_mode, align_corners, fill_value):
    """kornia.geometry.transform.warp_affine, with the grid in memory."""
    inverse = normalized_inverse_map(affine_to_homography(M), src.shape[2:], dsize, align_corners)
    grid = finite_grid(F.affine_grid(inverse[:, :2, :], [src.shape[0], src.shape[1], *dsize], align_corners=align_corners))
    return _sample_pixel_warp(src, grid.to(src.dtype), mode, padding_mode, align_corners, fill_value)


def warp_perspective(src, M, dsize, mode, padding_mode, align_corners, fill_value):
    """kornia.geometry.transform.warp_perspective, with the grid in memory."""
    inverse = normalized_inverse_map(M, src.shape[2:], dsize, align_corners)
    grid = perspective_grid(inverse, dsize, align_corners)
    return _sample_pixel_warp(src, grid.to(src.dtype), mode, padding_mode, align_corners, fill_value)


def _bilinear_gather(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bilinear reads of ``image [B, C, H, W]`` at pixel points ``y, x [B, P]``, zero outside -> ``[B, C, P]``.

    Floor-based weights (torchvision's arithmetic): at an integer point the derivative is the
    forward difference, as in the kernels. Non-finite points read nothing.
    """
    b, c, h, w = image.shape
    outside = torch.tensor(-4.0, dtype=y.dtype, device=y.device)
    y = torch.where(torch.isfinite(y), y, outside).clamp(-4.0, h + 4.0)
    x = torch.where(torch.isfinite(x), x, outside).clamp(-4.0, w + 4.0)
    y0, x0 = torch.floor(y), torch.floor(x)
    flat = image.reshape(b, c, h * w)
    out = 0
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yi, xi = y0 + dy, x0 + dx
        weight = (y - y0 if dy else y0 + 1 - y) * (x - x0 if dx else x0 + 1 - x)
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
        values = torch.gather(flat, 2, index[:, None, :].expand(b, c, index.shape[1]))
        out = out + (weight * inside)[:, None, :] * values
    return out


def deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask):
    """Deformable convolution as torchvision computes it: sample every tap bilinearly, build the
    column buffer [N, C * K, HO * WO], and multiply by the weight."""
    n, c, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    k = kh * kw
    ho, wo = offset.shape[2:]
    groups = c // c_per_group
    offset_groups = offset.shape[1] // (2 * k)
    ii, jj = torch.meshgrid(torch.arange(kh, device=input.device), torch.arange(kw, device=input.device), indexing="ij")
    oy = torch.arange(ho, device=input.device) * stride[0] - padding[0]
    ox = torch.arange(wo, device=input.device) * stride[1] - padding[1]
    base_y = oy[None, :, None] + (ii.reshape(k) * dilation[0])[:, None, None]  # [K, HO, 1]
    base_x = ox[None, None, :] + (jj.reshape(k) * dilation[1])[:, None, None]  # [K, 1, WO]
    offset = offset.view(n, offset_groups, k, 2, ho, wo)
    y = (base_y + offset[:, :, :, 0]).reshape(n * offset_groups, k * ho * wo)  # pixel units
    x = (base_x + offset[:, :, :, 1]).reshape(n * offset_groups, k * ho * wo)
    grouped = input.reshape(n * offset_groups, c // offset_groups, h, w)
    samples = _bilinear_gather(grouped, y, x).view(n, offset_groups, c // offset_groups, k, ho, wo)
    if mask is not None:
        samples = samples * mask.view(n, offset_groups, 1, k, ho, wo)
    columns = samples.reshape(n, groups, c_per_group * k, ho * wo)
    out = torch.einsum("gok,ngkp->ngop", weight.reshape(groups, c_out // groups, c_per_group * k), columns)
    out = out.reshape(n, c_out, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)
