"""Fused warps: the host math that turns each warp's parameters into what the sampling op takes.

The per-pixel work (the sample point, the sampling, the gradient of the parameters) runs in the
kernels of the sampling op (ops/sample.py); what runs here are a few tiny differentiable torch ops
per batch: the thin-plate-spline coefficients (one small matmul with the inverse system, solved
once per control-point set) and kornia's pixel <-> normalized change of frame (3 x 3), shared with
the plain PyTorch fallback through ``stn_triton.geometry``. Nothing here waits for the device.
"""

import torch

from stn_triton.geometry import affine_to_homography, normalized_inverse_map, tps_coefficients
from stn_triton.kernels import codes
from stn_triton.ops.sample import SampleSpec, sample


def _spec(size, transform: int, mode: str, padding_mode: str, align_corners: bool, out_dtype) -> SampleSpec:
    return SampleSpec(tuple(size), transform, codes.MODES[mode], codes.PADDING_MODES[padding_mode], align_corners,
                      out_dtype)


def affine_grid_sample(input, theta, spatial, mode, padding_mode, align_corners, out_dtype) -> torch.Tensor:
    return sample(input, theta, None, None, _spec(spatial, codes.AFFINE, mode, padding_mode, align_corners, out_dtype))


def perspective_grid_sample(input, homography, spatial, mode, padding_mode, align_corners, out_dtype) -> torch.Tensor:
    spec = _spec(spatial, codes.PROJECTIVE, mode, padding_mode, align_corners, out_dtype)
    return sample(input, homography, None, None, spec)


def tps_grid_sample(input, source_points, control_points, solver, spatial, mode, padding_mode, align_corners,
                    out_dtype) -> torch.Tensor:
    coefficients = tps_coefficients(source_points, control_points, solver)
    control_points = control_points.detach().to(coefficients.dtype).contiguous()
    spec = _spec(spatial, codes.TPS, mode, padding_mode, align_corners, out_dtype)
    return sample(input, coefficients, control_points, None, spec)


def _pixel_warp(src, inverse, transform, dsize, mode, padding_mode, align_corners, fill, out_dtype):
    """Sample through a normalized inverse map; 'fill' is zeros padding plus the fill term, in one pass."""
    padding = "zeros" if padding_mode == "fill" else padding_mode
    return sample(src, inverse, None, fill, _spec(dsize, transform, mode, padding, align_corners, out_dtype))


def warp_affine(src, M, dsize, mode, padding_mode, align_corners, fill, out_dtype) -> torch.Tensor:
    inverse = normalized_inverse_map(affine_to_homography(M), src.shape[2:], dsize, align_corners)
    return _pixel_warp(src, inverse[:, :2, :], codes.AFFINE, dsize, mode, padding_mode, align_corners, fill, out_dtype)


def warp_perspective(src, M, dsize, mode, padding_mode, align_corners, fill, out_dtype) -> torch.Tensor:
    inverse = normalized_inverse_map(M, src.shape[2:], dsize, align_corners)
    return _pixel_warp(src, inverse, codes.PROJECTIVE, dsize, mode, padding_mode, align_corners, fill, out_dtype)
