"""affine_grid as torch.library ops: the grid kernel and the theta gradient kernel."""

import torch
import triton
from torch.library import triton_op

from stn_triton.kernels.affine_grid import _affine_grid_bwd_kernel, _affine_grid_kernel
from stn_triton.numerics import cdiv, compute_dtype
from stn_triton.ops._dispatch import call, eager_function
from stn_triton.ops._launch import grid_strides
from stn_triton.tuning import TunedKernel, bucket, pixel_block_configs


def _heuristic(**_) -> triton.Config:
    """A few loads and stores per pixel: 256 pixels on 4 warps (two per thread)."""
    return triton.Config({"BLOCK_P": 256}, num_warps=4)


_grid_kernel = TunedKernel(
    "affine_grid", _affine_grid_kernel, pixel_block_configs(), _heuristic, ["NDIM", "F64"], writes=("grid_ptr",)
)
_bwd_kernel = TunedKernel(
    "affine_grid_bwd", _affine_grid_bwd_kernel, pixel_block_configs(), _heuristic, ["NDIM", "F64"],
    writes=("partial_ptr",),
)
# Pixels per program: enough work each, enough programs per image; a multiple of every BLOCK_P.
BWD_CHUNK = 8192


def _spatial(size: list[int]) -> tuple[int, int, int]:
    return tuple(size) if len(size) == 3 else (1, *size)


def affine_grid_forward(theta: torch.Tensor, size: list[int], align_corners: bool, out_dtype: torch.dtype) -> torch.Tensor:
    ndim = len(size)
    grid = torch.empty((theta.shape[0], *size, ndim), dtype=out_dtype, device=theta.device)
    pixels = grid.numel() // ndim
    if pixels == 0:
        return grid
    d, h, w = _spatial(size)
    launch = _grid_kernel.choose(f"{theta.dtype}|d{ndim}|p{bucket(pixels)}", {}, theta.device)
    launch(
        lambda meta: (cdiv(pixels, meta["BLOCK_P"]),),
        theta_ptr=theta, grid_ptr=grid, P=pixels, D=d, H=h, W=w,
        st_n=theta.stride(0), st_i=theta.stride(1), st_j=theta.stride(2),
        ALIGN_CORNERS=align_corners, NDIM=ndim, F64=theta.dtype == torch.float64,
    )
    return grid


def affine_grid_backward(grad_grid: torch.Tensor, theta: torch.Tensor, align_corners: bool) -> torch.Tensor:
    ndim = theta.shape[1]
    n = theta.shape[0]
    d, h, w = _spatial(list(grad_grid.shape[1:-1]))
    splits = max(cdiv(d * h * w, BWD_CHUNK), 1)
    partial = torch.zeros((n, splits, ndim, ndim + 1), dtype=compute_dtype(theta.dtype), device=theta.device)
    if n > 0 and d * h * w > 0:
        launch = _bwd_kernel.choose(f"{theta.dtype}|d{ndim}|p{bucket(d * h * w)}", {}, theta.device)
        sg_n, sg_d, sg_h, sg_w, sg_k = grid_strides(grad_grid)
        launch(
            (n, splits),
            ggrid_ptr=grad_grid, partial_ptr=partial, D=d, H=h, W=w, CHUNK=BWD_CHUNK,
            sg_n=sg_n, sg_d=sg_d, sg_h=sg_h, sg_w=sg_w, sg_k=sg_k,
            ALIGN_CORNERS=align_corners, NDIM=ndim, F64=theta.dtype == torch.float64,
        )
    return partial.sum(dim=1).to(theta.dtype)


@triton_op("stn_triton::affine_grid", mutates_args=())
def affine_grid_op(theta: torch.Tensor, size: list[int], align_corners: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """theta [N, nd, nd + 1] and output spatial size (H, W) or (D, H, W) -> grid [N, (D,) H, W, nd] in ``out_dtype``."""
    return affine_grid_forward(theta, size, align_corners, out_dtype)


@triton_op("stn_triton::affine_grid_backward", mutates_args=())
def affine_grid_backward_op(grad_grid: torch.Tensor, theta: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """grad_theta [N, nd, nd + 1] from grad_grid [N, (D,) H, W, nd]."""
    return affine_grid_backward(grad_grid, theta, align_corners)


def _save(ctx, inputs, output):
    theta, size, align_corners, out_dtype = inputs
    ctx.save_for_backward(theta)
    ctx.align_corners = align_corners


def _gradients(ctx, grad_grid, backward):
    (theta,) = ctx.saved_tensors
    return backward(grad_grid, theta, ctx.align_corners), None, None, None


affine_grid_op.register_autograd(lambda ctx, grad: _gradients(ctx, grad, affine_grid_backward_op), setup_context=_save)
_AffineGrid = eager_function("AffineGrid", affine_grid_forward, _save, _gradients, affine_grid_backward)


def affine_grid(theta: torch.Tensor, size: tuple[int, ...], align_corners: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton affine_grid on validated arguments; size is the output's spatial size."""
    return call(affine_grid_op, _AffineGrid, affine_grid_forward, (theta, list(size), align_corners, out_dtype), (theta,))
