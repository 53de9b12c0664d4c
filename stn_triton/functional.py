"""Drop-in functions: validate the arguments, then dispatch to a backend.

Every check here runs before any kernel launch, and every error names the argument, what it
got and what it expects.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from stn_triton.backend import TORCH, backend
from stn_triton.ops import affine_grid as _affine_grid_op
from stn_triton.ops import grid_sample as _grid_sample_op

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_tensor(name: str, value, ndims: Sequence[int]) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in ndims:
        wanted = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {wanted}, got a {value.dim()}-D tensor of shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating-point dtype (float32, float64, float16 or bfloat16), got {value.dtype}"
        )


def _check_align_corners(align_corners) -> None:
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {align_corners!r}")


def grid_sample(
    input: torch.Tensor,
    grid: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Sample ``input`` at the normalized locations in ``grid``; equals ``F.grid_sample``.

    input ``[N, C, H_in, W_in]`` with grid ``[N, H_out, W_out, 2]`` -> ``[N, C, H_out, W_out]``;
    input ``[N, C, D_in, H_in, W_in]`` with grid ``[N, D_out, H_out, W_out, 3]`` ->
    ``[N, C, D_out, H_out, W_out]``. ``grid[..., 0]`` is x (width), ``1`` is y, ``2`` is z, each in
    [-1, 1] across the input. mode: ``bilinear`` (trilinear on 5-D), ``nearest``, ``bicubic`` (4-D
    only); padding_mode: ``zeros``, ``border``, ``reflection``.
    """
    _check_tensor("input", input, (4, 5))
    _check_tensor("grid", grid, (4, 5))
    nd = input.dim() - 2
    if grid.dim() != input.dim():
        raise ValueError(
            f"grid must have the same number of dimensions as input ({input.dim()}), got grid of shape {tuple(grid.shape)}"
        )
    if grid.shape[-1] != nd:
        raise ValueError(
            f"grid's last dimension must be {nd} for a {input.dim()}-D input, got grid of shape {tuple(grid.shape)}"
        )
    if grid.shape[0] != input.shape[0]:
        raise ValueError(
            f"grid and input must have the same batch size, got input {tuple(input.shape)} and grid {tuple(grid.shape)}"
        )
    if grid.dtype != input.dtype:
        raise TypeError(f"grid must have input's dtype {input.dtype}, got {grid.dtype}")
    if grid.device != input.device:
        raise ValueError(f"grid must be on input's device {input.device}, got {grid.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "bicubic" and nd == 3:
        raise ValueError("mode='bicubic' supports only 4-D input, got a 5-D input")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    _check_align_corners(align_corners)
    if any(s == 0 for s in input.shape[2:]):
        raise ValueError(f"input must have non-empty spatial dimensions, got input of shape {tuple(input.shape)}")
    if backend(input) == TORCH:
        return F.grid_sample(input, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    return _grid_sample_op.grid_sample(input, grid, mode, padding_mode, align_corners)


def affine_grid(theta: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """The sampling grid of an affine map; equals ``F.affine_grid``.

    theta ``[N, 2, 3]`` with size ``(N, C, H, W)`` -> grid ``[N, H, W, 2]``; theta ``[N, 3, 4]``
    with size ``(N, C, D, H, W)`` -> grid ``[N, D, H, W, 3]``. Output pixel centres are placed on
    [-1, 1] as ``align_corners`` says, then mapped by theta.
    """
    _check_tensor("theta", theta, (3,))
    if isinstance(size, torch.Size):
        size = tuple(size)
    if not isinstance(size, (list, tuple)) or not all(isinstance(s, int) for s in size):
        raise TypeError(f"size must be a sequence of ints, got {size!r}")
    if len(size) not in (4, 5):
        raise ValueError(f"size must have 4 (N, C, H, W) or 5 (N, C, D, H, W) entries, got {tuple(size)}")
    nd = len(size) - 2
    if tuple(theta.shape[1:]) != (nd, nd + 1):
        raise ValueError(
            f"theta must have shape [N, {nd}, {nd + 1}] for a size of {len(size)} entries, got {tuple(theta.shape)}"
        )
    if theta.shape[0] != size[0]:
        raise ValueError(f"theta's batch size {theta.shape[0]} must equal size[0], got size {tuple(size)}")
    if any(s <= 0 for s in size):
        raise ValueError(f"size must hold positive entries (as F.affine_grid requires), got {tuple(size)}")
    _check_align_corners(align_corners)
    if backend(theta) == TORCH:
        return F.affine_grid(theta, list(size), align_corners=align_corners)
    return _affine_grid_op.affine_grid(theta, tuple(size[2:]), align_corners)
