"""Fused warps: the host math that turns each warp's parameters into what the sampling op takes.

The per-pixel work (the sample point, the sampling, the gradient of the parameters) runs in the
kernels of ``stn_triton::sample``; what runs here are a few tiny differentiable torch ops per
batch: the thin-plate-spline coefficients (one small matmul with the inverse system, solved once
per control-point set) and kornia's pixel <-> normalized change of frame (3 x 3), shared with the
plain PyTorch fallback through ``stn_triton.geometry``.
"""

import torch

from stn_triton.geometry import affine_to_homography, normalized_inverse_map, tps_coefficients
from stn_triton.kernels.codes import AFFINE, PROJECTIVE, TPS
from stn_triton.ops.sample import sample


def affine_grid_sample(input, theta, spatial, mode, padding_mode, align_corners, out_dtype) -> torch.Tensor:
    return sample(input, theta, None, None, spatial, AFFINE, mode, padding_mode, align_corners, out_dtype)


def perspective_grid_sample(input, homography, spatial, mode, padding_mode, align_corners, out_dtype) -> torch.Tensor:
    return sample(input, homography, None, None, spatial, PROJECTIVE, mode, padding_mode, align_corners, out_dtype)


def tps_grid_sample(input, source_points, control_points, spatial, mode, padding_mode, align_corners,
                    out_dtype) -> torch.Tensor:
    coefficients = tps_coefficients(source_points, control_points)
    control_points = control_points.detach().to(coefficients.dtype).contiguous()
    return sample(input, coefficients, control_points, None, spatial, TPS, mode, padding_mode, align_corners, out_dtype)


def _pixel_warp(src, inverse, transform, dsize, mode, padding_mode, align_corners, fill_value, out_dtype):
    """Sample through a normalized inverse map; 'fill' is zeros padding plus the fill term, in one pass."""
    fill = fill_value.detach().contiguous() if padding_mode == "fill" else None
    padding = "zeros" if padding_mode == "fill" else padding_mode
    return sample(src, inverse, None, fill, dsize, transform, mode, padding, align_corners, out_dtype)


def warp_affine(src, M, dsize, mode, padding_mode, align_corners, fill_value, out_dtype) -> torch.Tensor:
    inverse = normalized_inverse_map(affine_to_homography(M), src.shape[2:], dsize, align_corners)
    return _pixel_warp(src, inverse[:, :2, :], AFFINE, dsize, mode, padding_mode, align_corners, fill_value, out_dtype)


def warp_perspective(src, M, dsize, mode, padding_mode, align_corners, fill_value, out_dtype) -> torch.Tensor:
    inverse = normalized_inverse_map(M, src.shape[2:], dsize, align_corners)
    return _pixel_warp(src, inverse, PROJECTIVE, dsize, mode, padding_mode, align_corners, fill_value, out_dtype)
