"""stn_triton: fused Triton kernels for spatial transformers and deformable convolution."""

from stn_triton.backend import backend
from stn_triton.functional import affine_grid, grid_sample

__all__ = ["affine_grid", "backend", "grid_sample"]
__version__ = "0.1.0"
