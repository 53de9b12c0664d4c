"""affine_grid: the grid kernel, the theta-gradient kernel, their autograd formulas, and the dispatch.

The grid is linear in theta, so the backward saves nothing but sizes (a graph can be
backpropagated twice, as PyTorch's can), the forward-mode tangent is the grid of the tangent, and
the backward's own gradient is the grid of its direction (double backward).
"""

from dataclasses import dataclass

import torch
import triton
from torch.library import triton_op

from stn_triton.kernels.affine_grid import _affine_grid_bwd_kernel, _affine_grid_kernel
from stn_triton.numerics import cdiv, next_power_of_2
from stn_triton.ops._dispatch import OpRules, call, fold, unfold
from stn_triton.ops._launch import grid_strides, needs_int64
from stn_triton.tuning import TunedKernel, bucket, pixel_block_configs


@dataclass(frozen=True)
class GridSpec:
    """What an affine_grid call computes besides theta."""

    size: tuple[int, ...]  # output spatial size, (H, W) or (D, H, W)
    align_corners: bool
    out_dtype: torch.dtype  # the grid's dtype (autocast's, or theta's)

    def op_args(self) -> tuple:
        return list(self.size), self.align_corners, self.out_dtype

    @classmethod
    def from_op_args(cls, args) -> "GridSpec":
        size, *rest = args
        return cls(tuple(size), *rest)


@dataclass(frozen=True)
class GridBackwardSpec:
    """The backward's spec: the forward's, and theta's dtype (the gradient's)."""

    grid: GridSpec
    theta_dtype: torch.dtype

    def op_args(self) -> tuple:
        return *self.grid.op_args(), self.theta_dtype

    @classmethod
    def from_op_args(cls, args) -> "GridBackwardSpec":
        return cls(GridSpec.from_op_args(args[:3]), args[3])


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


def _spatial(size) -> tuple[int, int, int]:
    return tuple(size) if len(size) == 3 else (1, *size)


def affine_grid_forward(theta: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """theta [N, nd, nd + 1] -> grid [N, *spec.size, nd] in ``spec.out_dtype``."""
    ndim = len(spec.size)
    grid = torch.empty((theta.shape[0], *spec.size, ndim), dtype=spec.out_dtype, device=theta.device)
    pixels = grid.numel() // ndim
    if pixels == 0:
        return grid
    d, h, w = _spatial(spec.size)
    launch = _grid_kernel.choose(f"{theta.dtype}|d{ndim}|p{bucket(pixels)}", {}, theta.device)
    launch(
        lambda meta: (cdiv(pixels, meta["BLOCK_P"]),),
        theta_ptr=theta, grid_ptr=grid, ROWS=pixels, D=d, H=h, W=w,
        st_n=theta.stride(0), st_i=theta.stride(1), st_j=theta.stride(2),
        ALIGN_CORNERS=spec.align_corners, NDIM=ndim, F64=torch.float64 in (theta.dtype, spec.out_dtype),
        COLS=next_power_of_2(ndim), INDEX_64=needs_int64(grid),
    )
    return grid


def affine_grid_backward(grad_grid: torch.Tensor, spec: GridBackwardSpec) -> torch.Tensor:
    """grad_theta [N, nd, nd + 1] (theta's dtype) from grad_grid [N, (D,) H, W, nd]."""
    ndim = grad_grid.shape[-1]
    n = grad_grid.shape[0]
    d, h, w = _spatial(spec.grid.size)
    splits = max(cdiv(d * h * w, BWD_CHUNK), 1)
    f64 = torch.float64 in (grad_grid.dtype, spec.theta_dtype)
    partial = torch.zeros((n, splits, ndim, ndim + 1), dtype=torch.float64 if f64 else torch.float32,
                          device=grad_grid.device)
    if n > 0 and d * h * w > 0:
        launch = _bwd_kernel.choose(f"{spec.theta_dtype}|d{ndim}|p{bucket(d * h * w)}", {}, grad_grid.device)
        sg_n, sg_d, sg_h, sg_w, sg_k = grid_strides(grad_grid)
        launch(
            (n, splits),
            ggrid_ptr=grad_grid, partial_ptr=partial, D=d, H=h, W=w, CHUNK=BWD_CHUNK,
            sg_n=sg_n, sg_d=sg_d, sg_h=sg_h, sg_w=sg_w, sg_k=sg_k,
            ALIGN_CORNERS=spec.grid.align_corners, NDIM=ndim, F64=f64, INDEX_64=needs_int64(grad_grid),
        )
    return partial.sum(dim=1).to(spec.theta_dtype)


@triton_op("stn_triton::affine_grid_fwd", mutates_args=())
def affine_grid_op(theta: torch.Tensor, size: list[int], align_corners: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """theta [N, nd, nd + 1] and output spatial size (H, W) or (D, H, W) -> grid [N, (D,) H, W, nd] in ``out_dtype``."""
    return affine_grid_forward(theta, GridSpec(tuple(size), align_corners, out_dtype))


@triton_op("stn_triton::affine_grid_bwd", mutates_args=())
def affine_grid_backward_op(grad_grid: torch.Tensor, size: list[int], align_corners: bool, out_dtype: torch.dtype,
                            theta_dtype: torch.dtype) -> torch.Tensor:
    """grad_theta [N, nd, nd + 1] in ``theta_dtype`` from grad_grid [N, (D,) H, W, nd]."""
    return affine_grid_backward(grad_grid, GridBackwardSpec(GridSpec(tuple(size), align_corners, out_dtype), theta_dtype))


def generate(theta: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    return call(affine_grid_op, _AffineGrid, affine_grid_forward, (theta,), spec, (theta,))


def theta_grad(grad_grid: torch.Tensor, spec: GridBackwardSpec) -> torch.Tensor:
    return call(affine_grid_backward_op, _AffineGridBackward, affine_grid_backward, (grad_grid,), spec, (grad_grid,))


def _save(ctx, tensors, spec: GridSpec, output) -> None:
    ctx.spec = GridBackwardSpec(spec, tensors[0].dtype)


def _gradients(ctx, grad_grid):
    return (theta_grad(grad_grid, ctx.spec),)


def _jvp(ctx, theta_tangent):
    return generate(theta_tangent, ctx.spec.grid)


def _vmap(info, in_dims, tensors, spec: GridSpec):
    return unfold(generate(fold(tensors[0], in_dims[0], info.batch_size), spec), info.batch_size)


def _save_backward(ctx, tensors, spec: GridBackwardSpec, output) -> None:
    ctx.spec = spec
    ctx.grad_grid_dtype = tensors[0].dtype


def _double_gradients(ctx, grad_grad_theta):
    """d<v, A^T g>/dg = A(v): the grid of the direction."""
    spec = ctx.spec.grid
    return (generate(grad_grad_theta, GridSpec(spec.size, spec.align_corners, ctx.grad_grid_dtype)),)


def _jvp_backward(ctx, grad_grid_tangent):
    return theta_grad(grad_grid_tangent, ctx.spec)


def _vmap_backward(info, in_dims, tensors, spec: GridBackwardSpec):
    return unfold(theta_grad(fold(tensors[0], in_dims[0], info.batch_size), spec), info.batch_size)


_AffineGrid = OpRules("AffineGrid", 1, affine_grid_forward, _save, _gradients, _vmap, _jvp).register(
    affine_grid_op, GridSpec)
_AffineGridBackward = OpRules("AffineGridBackward", 1, affine_grid_backward, _save_backward, _double_gradients,
                              _vmap_backward, _jvp_backward).register(affine_grid_backward_op, GridBackwardSpec)


def affine_grid(theta: torch.Tensor, size: tuple[int, ...], align_corners: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton affine_grid on validated arguments; size is the output's spatial size."""
    return generate(theta, GridSpec(tuple(size), align_corners, out_dtype))
