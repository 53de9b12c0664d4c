"""stn_triton: fused Triton kernels for spatial transformers and deformable convolution."""

from stn_triton import scripting, swap  # noqa: F401  (scripting registers the TorchScript ops)
from stn_triton.backend import backend
from stn_triton.functional import (
    affine_grid,
    affine_grid_sample,
    deform_conv2d,
    grid_sample,
    ms_deform_attn,
    perspective_grid_sample,
    tps_grid_sample,
    warp_affine,
    warp_perspective,
)
from stn_triton.nn import DeformConv2d, MSDeformAttn, SelfDeformConv2d, SpatialTransformer

__all__ = [
    "DeformConv2d",
    "MSDeformAttn",
    "SelfDeformConv2d",
    "SpatialTransformer",
    "affine_grid",
    "affine_grid_sample",
    "backend",
    "deform_conv2d",
    "grid_sample",
    "ms_deform_attn",
    "perspective_grid_sample",
    "swap",
    "tps_grid_sample",
    "warp_affine",
    "warp_perspective",
]
__version__ = "0.1.0"
