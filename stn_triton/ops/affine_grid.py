"""affine_grid as torch.library ops: the grid kernel and the theta gradient kernel."""

import torch
import triton
from torch.library import triton_op, wrap_triton

from stn_triton.kernels.warp import _affine_grid_bwd_kernel, _affine_grid_kernel
from stn_triton.ops._launch import compute_dtype, grid_strides
from stn_triton.tuning import INTERPRETER_PIXEL_BLOCK, TunedKernel, bucket, pixel_block_configs

_grid_kernel = TunedKernel(
    "affine_grid", _affine_grid_kernel, pixel_block_configs(), INTERPRETER_PIXEL_BLOCK, autotune_key=["NDIM", "F64"]
)

_bwd_kernel = TunedKernel(
    "affine_grid_bwd", _affine_grid_bwd_kernel, pixel_block_configs(), INTERPRETER_PIXEL_BLOCK,
    autotune_key=["NDIM", "F64"],
)
# Pixels per program: enough work each, enough programs per image; a multiple of every BLOCK_P.
BWD_CHUNK = 8192


def _spatial(size: list[int]) -> tuple[int, int, int]:
    return tuple(size) if len(size) == 3 else (1, *size)


@triton_op("stn_triton::affine_grid", mutates_args=())
def affine_grid_op(theta: torch.Tensor, size: list[int], align_corners: bool) -> torch.Tensor:
    """theta [N, nd, nd + 1] and output spatial size (H, W) or (D, H, W) -> grid [N, (D,) H, W, nd]."""
    ndim = len(size)
    grid = torch.empty((theta.shape[0], *size, ndim), dtype=theta.dtype, device=theta.device)
    pixels = grid.numel() // ndim
    if pixels == 0:
        return grid
    kernel, tuned = _grid_kernel(f"{theta.dtype}|d{ndim}|p{bucket(pixels)}", theta.device)
    wrap_triton(kernel)[lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]),)](
        theta, grid, pixels, *_spatial(size), *theta.stride(),
        ALIGN_CORNERS=align_corners, NDIM=ndim, F64=theta.dtype == torch.float64, **tuned,
    )
    return grid


@triton_op("stn_triton::affine_grid_backward", mutates_args=())
def affine_grid_backward_op(grad_grid: torch.Tensor, theta: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """grad_theta [N, nd, nd + 1] from grad_grid [N, (D,) H, W, nd]."""
    ndim = theta.shape[1]
    n = theta.shape[0]
    d, h, w = _spatial(list(grad_grid.shape[1:-1]))
    splits = max(triton.cdiv(d * h * w, BWD_CHUNK), 1)
    partial = torch.zeros((n, splits, ndim, ndim + 1), dtype=compute_dtype(theta.dtype), device=theta.device)
    if n > 0 and d * h * w > 0:
        kernel, tuned = _bwd_kernel(f"{theta.dtype}|d{ndim}|p{bucket(d * h * w)}", theta.device)
        wrap_triton(kernel)[(n, splits)](
            grad_grid, partial, d, h, w, BWD_CHUNK, *grid_strides(grad_grid),
            ALIGN_CORNERS=align_corners, NDIM=ndim, F64=theta.dtype == torch.float64, **tuned,
        )
    return partial.sum(dim=1).to(theta.dtype)


def _setup_context(ctx, inputs, output):
    theta, size, align_corners = inputs
    ctx.save_for_backward(theta)
    ctx.align_corners = align_corners


def _backward(ctx, grad_grid):
    (theta,) = ctx.saved_tensors
    return affine_grid_backward_op(grad_grid, theta, ctx.align_corners), None, None


affine_grid_op.register_autograd(_backward, setup_context=_setup_context)


def affine_grid(theta: torch.Tensor, size: tuple[int, ...], align_corners: bool) -> torch.Tensor:
    """The Triton affine_grid on validated arguments; size is the output's spatial size."""
    return affine_grid_op(theta, list(size), align_corners)
