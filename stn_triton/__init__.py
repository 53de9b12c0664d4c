"""stn_triton: fused Triton kernels for spatial transformers, deformable convolution and attention, and RoI pooling."""

from stn_triton import scripting, swap  # noqa: F401  (scripting registers the TorchScript ops)
from stn_triton.backend import backend
from stn_triton.functional import (
    affine_grid,
    affine_grid_sample,
    deform_conv2d,
    deform_roi_pool,
    grid_sample,
    ms_deform_attn,
    multi_scale_roi_align,
    perspective_grid_sample,
    ps_roi_align,
    roi_align,
    tps_grid_sample,
    warp_affine,
    warp_perspective,
)
from stn_triton.nn import (
    DeformConv2d,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    MSDeformAttn,
    MultiScaleRoIAlign,
    PSRoIAlign,
    RoIAlign,
    SelfDeformConv2d,
    SpatialTransformer,
)

__all__ = [
    "DeformConv2d",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "MSDeformAttn",
    "ModulatedDeformRoIPoolPack",
    "MultiScaleRoIAlign",
    "PSRoIAlign",
    "RoIAlign",
    "SelfDeformConv2d",
    "SpatialTransformer",
    "affine_grid",
    "affine_grid_sample",
    "backend",
    "deform_conv2d",
    "deform_roi_pool",
    "grid_sample",
    "ms_deform_attn",
    "multi_scale_roi_align",
    "perspective_grid_sample",
    "ps_roi_align",
    "roi_align",
    "swap",
    "tps_grid_sample",
    "warp_affine",
    "warp_perspective",
]
__version__ = "0.1.0"
