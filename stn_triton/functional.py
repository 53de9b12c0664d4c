"""Drop-in functions: validate the arguments, then dispatch to a backend.

Every check here runs before any kernel launch, and every error names the argument, what it
got and what it expects.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from stn_triton import fallback, geometry
from stn_triton.backend import TORCH, backend
from stn_triton.conv_shape import DeformConvShape
from stn_triton.numerics import FLOAT_DTYPES, compute_dtype
from stn_triton.ops import affine_grid as _affine_grid_op
from stn_triton.ops import deform_conv as _deform_conv_op
from stn_triton.ops import sample as _sample_op
from stn_triton.ops import warp as _warp_op

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")


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


def _int_sequence(name: str, value) -> tuple[int, ...]:
    """``value`` (a list, tuple or torch.Size of ints) as a tuple; a TypeError naming it otherwise."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, int) for s in value):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    return tuple(value)


def _check_align_corners(align_corners) -> None:
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {align_corners!r}")


def sampled_dtype(device_type: str, input_dtype: torch.dtype, grid_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``F.grid_sample`` returns inside ``torch.autocast`` on ``device_type``.

    ATen's autocast lists ``grid_sampler`` as "promote" on CUDA (input and grid go to the wider
    of their dtypes) and as float32 on the CPU (float64 is never cast).
    """
    if device_type == "cuda":
        return torch.promote_types(input_dtype, grid_dtype)
    return torch.promote_types(torch.promote_types(input_dtype, grid_dtype), torch.float32)


def _warp_dtype(input: torch.Tensor) -> torch.dtype:
    """The output dtype of a fused warp: its input's, or inside autocast what
    ``F.grid_sample(input, F.affine_grid(theta, ...))`` returns there (F.affine_grid's batched
    matmul makes the grid in the autocast dtype, unless theta is float64)."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return input.dtype
    return sampled_dtype(device_type, input.dtype, torch.get_autocast_dtype(device_type))


def _without_autocast(device_type: str, op, *args):
    """``op(*args)`` with autocast off: the ops' own host math (the spline solve, the frames) stays
    in float32 and their outputs take the dtype chosen here, not one autocast would pick."""
    if not torch.is_autocast_enabled(device_type):
        return op(*args)
    with torch.autocast(device_type, enabled=False):
        return op(*args)


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
    autocasting = torch.is_autocast_enabled(input.device.type)
    if grid.dtype != input.dtype and not autocasting:
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
        return F.grid_sample(
            input, fallback.finite_grid(grid), mode=mode, padding_mode=padding_mode, align_corners=align_corners
        )
    out_dtype = sampled_dtype(input.device.type, input.dtype, grid.dtype) if autocasting else input.dtype
    return _without_autocast(
        input.device.type, _sample_op.grid_sample, input, grid, mode, padding_mode, align_corners, out_dtype
    )


def affine_grid(theta: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """The sampling grid of an affine map; equals ``F.affine_grid``.

    theta ``[N, 2, 3]`` with size ``(N, C, H, W)`` -> grid ``[N, H, W, 2]``; theta ``[N, 3, 4]``
    with size ``(N, C, D, H, W)`` -> grid ``[N, D, H, W, 3]``. Output pixel centres are placed on
    [-1, 1] as ``align_corners`` says, then mapped by theta. Inside ``torch.autocast`` the grid has
    the autocast dtype, as F.affine_grid's has (computed in float32 here, rounded once).
    """
    _check_tensor("theta", theta, (3,))
    size = _int_sequence("size", size)
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
    device_type = theta.device.type
    out_dtype = theta.dtype
    if torch.is_autocast_enabled(device_type) and theta.dtype != torch.float64:
        out_dtype = torch.get_autocast_dtype(device_type)  # F.affine_grid's batched matmul runs in it
    return _without_autocast(device_type, _affine_grid_op.affine_grid, theta, tuple(size[2:]), align_corners, out_dtype)


def _check_sampling(
    input, mode, padding_mode, align_corners, padding_modes=PADDING_MODES, ndims=(4, 5), name="input"
) -> None:
    """The checks every sampling op makes of its input (called ``name``) and its sampling options."""
    _check_tensor(name, input, ndims)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "bicubic" and input.dim() == 5:
        raise ValueError("mode='bicubic' supports only 4-D input, got a 5-D input")
    if padding_mode not in padding_modes:
        raise ValueError(f"padding_mode must be one of {padding_modes}, got {padding_mode!r}")
    _check_align_corners(align_corners)
    if any(s == 0 for s in input.shape[2:]):
        raise ValueError(f"{name} must have non-empty spatial dimensions, got {name} of shape {tuple(input.shape)}")


def _check_like_input(name: str, value, input: torch.Tensor, shape: tuple, any_dtype: bool = False) -> None:
    """value is a tensor of ``shape`` (None = any size there) with input's device and, unless
    ``any_dtype``, its dtype."""
    _check_tensor(name, value, (len(shape),))
    if any(want is not None and got != want for got, want in zip(value.shape, shape)):
        wanted = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{name} must have shape {wanted} for input of shape {tuple(input.shape)}, got {tuple(value.shape)}")
    if value.dtype != input.dtype and not any_dtype:
        raise TypeError(f"{name} must have input's dtype {input.dtype}, got {value.dtype}")
    if value.device != input.device:
        raise ValueError(f"{name} must be on input's device {input.device}, got {value.device}")


def _output_spatial(size, input: torch.Tensor) -> tuple[int, ...]:
    """The spatial part of ``size`` (the full output size, N and C included); input's by default."""
    if size is None:
        return tuple(input.shape[2:])
    size = _int_sequence("size", size)
    if len(size) != input.dim():
        raise ValueError(f"size must have {input.dim()} entries (N, C, spatial...) like input, got {tuple(size)}")
    if tuple(size[:2]) != tuple(input.shape[:2]):
        raise ValueError(
            f"size must start with input's batch and channels {tuple(input.shape[:2])}, got size {tuple(size)}"
        )
    if any(s <= 0 for s in size[2:]):
        raise ValueError(f"size must hold positive spatial sizes, got {tuple(size)}")
    return tuple(size[2:])


def affine_grid_sample(
    input: torch.Tensor,
    theta: torch.Tensor,
    size: Sequence[int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """``grid_sample(input, affine_grid(theta, size))`` in one pass: the grid is never stored.

    input ``[N, C, H, W]`` with theta ``[N, 2, 3]``, or ``[N, C, D, H, W]`` with theta
    ``[N, 3, 4]``; size is the full output size ``(N, C, *spatial)``, input's by default.
    Returns ``[N, C, *spatial]``. Gradients for input and theta.
    """
    _check_sampling(input, mode, padding_mode, align_corners)
    nd = input.dim() - 2
    autocasting = torch.is_autocast_enabled(input.device.type)
    _check_like_input("theta", theta, input, (input.shape[0], nd, nd + 1), any_dtype=autocasting)
    spatial = _output_spatial(size, input)
    if backend(input) == TORCH:
        return fallback.affine_grid_sample(input, theta, spatial, mode, padding_mode, align_corners)
    return _without_autocast(input.device.type, _warp_op.affine_grid_sample, input, theta, spatial, mode, padding_mode,
                             align_corners, _warp_dtype(input))


def perspective_grid_sample(
    input: torch.Tensor,
    homography: torch.Tensor,
    size: Sequence[int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Sample ``[N, C, H, W]`` input through a projective map, in one pass.

    Output pixel (x, y), normalized as ``affine_grid`` places it, samples the input at
    ``(H @ [x, y, 1])`` divided by its third coordinate (a zero there makes the point
    non-finite, which samples nothing). homography ``[N, 3, 3]``. Gradients for input and homography.
    """
    _check_sampling(input, mode, padding_mode, align_corners, ndims=(4,))
    autocasting = torch.is_autocast_enabled(input.device.type)
    _check_like_input("homography", homography, input, (input.shape[0], 3, 3), any_dtype=autocasting)
    spatial = _output_spatial(size, input)
    if backend(input) == TORCH:
        return fallback.perspective_grid_sample(input, homography, spatial, mode, padding_mode, align_corners)
    return _without_autocast(input.device.type, _warp_op.perspective_grid_sample, input, homography, spatial, mode,
                             padding_mode, align_corners, _warp_dtype(input))


def tps_grid_sample(
    input: torch.Tensor,
    source_points: torch.Tensor,
    control_points: torch.Tensor | None = None,
    size: Sequence[int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> torch.Tensor:
    """Sample ``[N, C, H, W]`` input through a thin-plate spline, in one pass.

    The spline f maps output locations to input locations (normalized coordinates, x first) with
    ``f(control_points[k]) = source_points[n, k]`` and the least bending energy:
    ``f(p) = a0 + a1 x + a2 y + sum_k w_k U(|p - c_k|^2)``, ``U(d) = d log d``. source_points
    ``[N, K, 2]``; control_points ``[K, 2]``, by default a regular sqrt(K) x sqrt(K) grid over
    [-1, 1]^2 (x fastest). The (K + 3)-square system is solved on the host with differentiable
    torch ops; the spline is evaluated per pixel in the kernel. Gradients for input and source_points.
    """
    _check_sampling(input, mode, padding_mode, align_corners, ndims=(4,))
    autocasting = torch.is_autocast_enabled(input.device.type)
    _check_like_input("source_points", source_points, input, (input.shape[0], None, 2), any_dtype=autocasting)
    k = source_points.shape[1]
    if k < 3:
        raise ValueError(f"source_points must hold at least 3 points (K >= 3) to fix the affine part, got K = {k}")
    if control_points is None:
        control_points = geometry.default_control_points(
            k, compute_dtype(input.dtype), input.device
        )
    else:
        _check_tensor("control_points", control_points, (2,))
        if tuple(control_points.shape) != (k, 2):
            raise ValueError(
                f"control_points must have shape [K, 2] with K = {k} (source_points' K), got {tuple(control_points.shape)}"
            )
        if control_points.device != input.device:
            raise ValueError(f"control_points must be on input's device {input.device}, got {control_points.device}")
    spatial = _output_spatial(size, input)
    if backend(input) == TORCH:
        return fallback.tps_grid_sample(input, source_points, control_points, spatial, mode, padding_mode, align_corners)
    return _without_autocast(input.device.type, _warp_op.tps_grid_sample, input, source_points, control_points, spatial,
                             mode, padding_mode, align_corners, _warp_dtype(input))


def _check_pixel_warp(src, M, matrix_shape, dsize, mode, padding_mode, align_corners, fill_value):
    _check_sampling(src, mode, padding_mode, align_corners, PADDING_MODES + ("fill",), ndims=(4,), name="src")
    _check_like_input("M", M, src, (src.shape[0], *matrix_shape), any_dtype=torch.is_autocast_enabled(src.device.type))
    if not isinstance(dsize, (list, tuple, torch.Size)) or len(dsize) != 2 or not all(
        isinstance(s, int) and s > 0 for s in dsize
    ):
        raise ValueError(f"dsize must be (height, width), two positive ints, got {dsize!r}")
    if fill_value is None:
        return torch.zeros(src.shape[1], dtype=src.dtype, device=src.device)
    if not isinstance(fill_value, torch.Tensor):
        fill_value = torch.as_tensor(fill_value, dtype=src.dtype, device=src.device)
    if fill_value.dim() != 1 or fill_value.shape[0] != src.shape[1]:
        raise ValueError(f"fill_value must hold one value per channel ({src.shape[1]}), got shape {tuple(fill_value.shape)}")
    if fill_value.requires_grad:
        raise ValueError("fill_value must not require grad: it is a constant of the warp")
    return fill_value.to(device=src.device, dtype=src.dtype)


def warp_affine(
    src: torch.Tensor,
    M: torch.Tensor,
    dsize: tuple[int, int],
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = True,
    fill_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kornia.geometry.transform.warp_affine`` in one pass.

    src ``[B, C, H, W]``; M ``[B, 2, 3]`` maps source pixels to destination pixels; dsize
    ``(h, w)`` of the output. padding_mode ``fill`` fills outside with ``fill_value`` ``[C]``
    (zeros by default), blended by the sampling weights as kornia does, in the same single pass.
    Gradients for src and M.
    """
    fill = _check_pixel_warp(src, M, (2, 3), dsize, mode, padding_mode, align_corners, fill_value)
    if backend(src) == TORCH:
        return fallback.warp_affine(src, M, tuple(dsize), mode, padding_mode, align_corners, fill)
    return _without_autocast(src.device.type, _warp_op.warp_affine, src, M, tuple(dsize), mode, padding_mode, align_corners,
                             fill, _warp_dtype(src))


def warp_perspective(
    src: torch.Tensor,
    M: torch.Tensor,
    dsize: tuple[int, int],
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = True,
    fill_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kornia.geometry.transform.warp_perspective`` in one pass.

    src ``[B, C, H, W]``; M ``[B, 3, 3]`` maps source pixels to destination pixels; the rest as
    ``warp_affine``. Gradients for src and M.
    """
    fill = _check_pixel_warp(src, M, (3, 3), dsize, mode, padding_mode, align_corners, fill_value)
    if backend(src) == TORCH:
        return fallback.warp_perspective(src, M, tuple(dsize), mode, padding_mode, align_corners, fill)
    return _without_autocast(src.device.type, _warp_op.warp_perspective, src, M, tuple(dsize), mode, padding_mode, align_corners,
                             fill, _warp_dtype(src))


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(value)


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deformable convolution (v1; v2 with ``mask``); equals ``torchvision.ops.deform_conv2d``.

    input ``[N, C, H, W]``; weight ``[C_out, C / groups, KH, KW]`` (groups = C // weight.shape[1]);
    offset ``[N, 2 G K, H_out, W_out]`` with K = KH * KW and G offset groups: channel 2 (g K + k)
    is the y offset of tap k = i * KW + j, + 1 the x offset; mask ``[N, G K, H_out, W_out]``;
    bias ``[C_out]``. Tap k of output (oy, ox) reads the input bilinearly at
    ``(oy * stride - padding + i * dilation + dy, ox * stride - padding + j * dilation + dx)``,
    zero outside. Returns ``[N, C_out, H_out, W_out]``. Gradients for every tensor argument.
    """
    _check_tensor("input", input, (4,))
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"stride and dilation must be >= 1 and padding >= 0, got stride={stride}, padding={padding}, dilation={dilation}"
        )
    autocasting = torch.is_autocast_enabled(input.device.type)
    _check_like_input("weight", weight, input, (None, None, None, None), any_dtype=autocasting)
    _check_like_input("offset", offset, input, (input.shape[0], None, None, None), any_dtype=autocasting)
    shape = DeformConvShape.of(input.shape, offset.shape, weight.shape, stride, padding, dilation)
    if mask is not None:
        _check_like_input("mask", mask, input, shape.mask_shape(), any_dtype=autocasting)
    if bias is not None:
        _check_like_input("bias", bias, input, (shape.out_channels,), any_dtype=autocasting)
    if autocasting:
        # torchvision's autocast rule: float32 arithmetic (float64 stays), the input's dtype out. The
        # casts are copies, as torchvision's are; beside the convolution they are small.
        x, offset, weight, bias, mask = [
            t if t is None or t.dtype == torch.float64 else t.float() for t in (input, offset, weight, bias, mask)
        ]
        with torch.autocast(input.device.type, enabled=False):
            return deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask).to(input.dtype)
    if backend(input) == TORCH:
        return fallback.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    return _deform_conv_op.deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation)
