"""Fused warps: the host math that turns each warp's parameters into what the sampling op takes.

The per-pixel work (the sample point, the sampling, the gradient of the parameters) runs in the
kernels of ``stn_triton::sample``; what runs here are a few tiny differentiable torch ops per
batch: the thin-plate-spline solve ((K + 3)-square) and kornia's pixel <-> normalized change of
frame (3 x 3), shared with the plain PyTorch fallback in ``stn_triton.reference``.
"""

import torch

from stn_triton import reference
from stn_triton.ops.grid_sample import AFFINE, PROJECTIVE, TPS, sample


def affine_grid_sample(input, theta, spatial, mode, padding_mode, align_corners) -> torch.Tensor:
    return sample(input, theta, None, None, spatial, AFFINE, mode, padding_mode, align_corners)


def perspective_grid_sample(input, homography, spatial, mode, padding_mode, align_corners) -> torch.Tensor:
    return sample(input, homography, None, None, spatial, PROJECTIVE, mode, padding_mode, align_corners)


def tps_grid_sample(input, source_points, control_points, spatial, mode, padding_mode, align_corners) -> torch.Tensor:
    coefficients = reference.tps_coefficients(source_points, control_points)
    control_points = control_points.detach().to(coefficients.dtype).contiguous()
    return sample(input, coefficients, control_points, None, spatial, TPS, mode, padding_mode, align_corners)


def _pixel_warp(src, inverse, transform, dsize, mode, padding_mode, align_corners, fill_value) -> torch.Tensor:
    """Sample through a normalized inverse map; 'fill' is zeros padding plus the fill term, in one pass."""
    fill = fill_value.detach().contiguous() if padding_mode == "fill" else None
    padding = "zeros" if padding_mode == "fill" else padding_mode
    return sample(src, inverse, None, fill, dsize, transform, mode, padding, align_corners)


def warp_affine(src, M, dsize, mode, padding_mode, align_corners, fill_value) -> torch.Tensor:
    inverse = reference.normalized_inverse_map(reference.affine_to_homography(M), src.shape[2:], dsize, align_corners)
    return _pixel_warp(src, inverse[:, :2, :], AFFINE, dsize, mode, padding_mode, align_corners, fill_value)


def warp_perspective(src, M, dsize, mode, padding_mode, align_corners, fill_value) -> torch.Tensor:
    inverse = reference.normalized_inverse_map(M, src.shape[2:], dsize, align_corners)
    return _pixel_warp(src, inverse, PROJECTIVE, dsize, mode, padding_mode, align_corners, fill_value)
