"""Drop-in functions: validate the arguments, then dispatch to a backend.

Every check runs before any kernel launch (``stn_triton.validation``, one function per op), and
every error names the argument, what it got and what it expects, with the exception type of the
op replaced (``stn_triton.errors``).
"""

import functools
import math
import warnings
from collections.abc import Sequence
from typing import List, Union

import torch
import torch.nn.functional as F

from stn_triton import fallback, geometry, validation
from stn_triton.backend import TORCH, backend
from stn_triton.derived import derived
from stn_triton.kernels import codes
from stn_triton.numerics import compute_dtype
from stn_triton.ops import affine_grid as _affine_grid_op
from stn_triton.ops import blur_pool as _blur_pool_op
from stn_triton.ops import dcnv3 as _dcn_op
from stn_triton.ops import deform_conv as _deform_conv_op
from stn_triton.ops import ms_deform_attn as _attention_op
from stn_triton.ops import roi as _roi_op
from stn_triton.ops import sample as _sample_op
from stn_triton.ops import warp as _warp_op
from stn_triton.ops._dispatch import constant

MODES = validation.MODES
PADDING_MODES = validation.PADDING_MODES


def _raise(problem) -> None:
    if problem is not None:
        raise problem


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
    _raise(validation.grid_sample_problem(input, grid, mode, padding_mode, align_corners))
    if backend(input) == TORCH:
        return F.grid_sample(
            input, fallback.finite_grid(grid), mode=mode, padding_mode=padding_mode, align_corners=align_corners
        )
    device_type = input.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    out_dtype = sampled_dtype(device_type, input.dtype, grid.dtype) if autocasting else input.dtype
    return _without_autocast(device_type, _sample_op.grid_sample, input, grid, mode, padding_mode, align_corners,
                             out_dtype)


def affine_grid(theta: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """The sampling grid of an affine map; equals ``F.affine_grid``.

    theta ``[N, 2, 3]`` with size ``(N, C, H, W)`` -> grid ``[N, H, W, 2]``; theta ``[N, 3, 4]``
    with size ``(N, C, D, H, W)`` -> grid ``[N, D, H, W, 3]``. Output pixel centres are placed on
    [-1, 1] as ``align_corners`` says, then mapped by theta. Inside ``torch.autocast`` the grid has
    the autocast dtype, as F.affine_grid's has (computed in float32 here, rounded once).
    """
    _raise(validation.affine_grid_problem(theta, size, align_corners))
    size = tuple(size)
    if align_corners and 1 in size[2:]:
        warnings.warn(
            "Since version 1.3.0, affine_grid behavior has changed for unit-size grids when align_corners=True. "
            "This is not an intended use case of affine_grid. See the documentation of affine_grid for details.",
            stacklevel=2,
        )
    if backend(theta) == TORCH:
        return F.affine_grid(theta, list(size), align_corners=align_corners)
    device_type = theta.device.type
    out_dtype = theta.dtype
    if torch.is_autocast_enabled(device_type) and theta.dtype != torch.float64:
        out_dtype = torch.get_autocast_dtype(device_type)  # F.affine_grid's batched matmul runs in it
    return _without_autocast(device_type, _affine_grid_op.affine_grid, theta, size[2:], align_corners, out_dtype)


def _output_spatial(size, input: torch.Tensor) -> tuple[int, ...]:
    """The spatial part of a validated ``size`` (the full output size, N and C included); input's by default."""
    return tuple(input.shape[2:]) if size is None else tuple(size)[2:]


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
    nd = input.dim() - 2 if isinstance(input, torch.Tensor) else 2
    _raise(validation.warp_problem(input, "theta", theta, (nd, nd + 1), size, mode, padding_mode, align_corners))
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
    _raise(validation.warp_problem(input, "homography", homography, (3, 3), size, mode, padding_mode, align_corners,
                                   ndims=(4,)))
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
    torch ops (once per control-point tensor); the spline is evaluated per pixel in the kernel.
    Gradients for input and source_points.
    """
    return tps_grid_sample_solved(input, source_points, control_points, None, size, mode, padding_mode, align_corners)


def tps_grid_sample_solved(input, source_points, control_points, solver, size, mode, padding_mode, align_corners):
    """``tps_grid_sample`` with the control points' inverse system ``solver`` (``geometry.tps_solver``) given,
    as SpatialTransformer keeps it in a buffer; None: solved once per control-point tensor."""
    _raise(validation.tps_problem(input, source_points, control_points, size, mode, padding_mode, align_corners))
    if control_points is None:
        control_points = geometry.default_control_points(source_points.shape[1], compute_dtype(input.dtype),
                                                         input.device)
    spatial = _output_spatial(size, input)
    if backend(input) == TORCH:
        return fallback.tps_grid_sample(input, source_points, control_points, spatial, mode, padding_mode, align_corners)
    return _without_autocast(input.device.type, _warp_op.tps_grid_sample, input, source_points, control_points, solver,
                             spatial, mode, padding_mode, align_corners, _warp_dtype(input))


@functools.lru_cache(maxsize=64)
def _zero_fill(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The default fill value: zeros, one tensor per (channels, dtype, device), never written."""
    return constant([0.0] * channels, dtype, device)


def _fill(src: torch.Tensor, padding_mode: str, fill_value) -> torch.Tensor | None:
    """The fill values a 'fill' warp blends in, as a [C] tensor of src's dtype on src's device (a
    tensor elsewhere is copied there once, not on every call); None for other paddings."""
    if padding_mode != "fill":
        return None
    if fill_value is None:
        return _zero_fill(src.shape[1], src.dtype, src.device)
    if not isinstance(fill_value, torch.Tensor):
        return torch.as_tensor(fill_value, dtype=src.dtype, device=src.device)
    if fill_value.device == src.device and fill_value.dtype == src.dtype and fill_value.is_contiguous():
        return fill_value.detach()
    return derived(fill_value, ("fill", src.device, src.dtype),
                   lambda value: value.detach().to(device=src.device, dtype=src.dtype).contiguous())


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
    _raise(validation.pixel_warp_problem(src, M, (2, 3), dsize, mode, padding_mode, align_corners, fill_value))
    fill = _fill(src, padding_mode, fill_value)
    if backend(src) == TORCH:
        return fallback.warp_affine(src, M, tuple(dsize), mode, padding_mode, align_corners, fill)
    return _without_autocast(src.device.type, _warp_op.warp_affine, src, M, tuple(dsize), mode, padding_mode,
                             align_corners, fill, _warp_dtype(src))


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
    _raise(validation.pixel_warp_problem(src, M, (3, 3), dsize, mode, padding_mode, align_corners, fill_value))
    fill = _fill(src, padding_mode, fill_value)
    if backend(src) == TORCH:
        return fallback.warp_perspective(src, M, tuple(dsize), mode, padding_mode, align_corners, fill)
    return _without_autocast(src.device.type, _warp_op.warp_perspective, src, M, tuple(dsize), mode, padding_mode,
                             align_corners, fill, _warp_dtype(src))


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
    _raise(validation.deform_conv2d_problem(input, offset, weight, bias, stride, padding, dilation, mask))
    stride, padding, dilation = (validation.int_pair(name, value) for name, value in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if torch.is_autocast_enabled(input.device.type):
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


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
    points_per_level: Sequence[int] | None = None,
    softmax: bool = False,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR): bilinear reads of every level's value map
    at learnt locations, summed with attention weights, in one kernel.

    value ``[N, S, M, D]`` (S = sum of H_l * W_l, the levels' rows one after another; M heads of D
    channels); spatial_shapes: an integer tensor ``[L, 2]`` of (H_l, W_l), read on the device (never
    copied to the host), or a list of (H, W) pairs (as Hugging Face's ``spatial_shapes_list``);
    level_start_index ``[L]``: each level's first row (None: their running sum);
    sampling_locations ``[N, Lq, M, L, P, 2]`` as (x, y) in [0, 1] of the level (outside reads zeros);
    attention_weights ``[N, Lq, M, L, P]``. ``points_per_level`` (RT-DETRv2's ``num_points_list``):
    per-level point counts, with locations ``[N, Lq, M, sum(P_l), 2]`` and weights
    ``[N, Lq, M, sum(P_l)]``. ``softmax=True``: the weights are logits, softmaxed over each head's
    points (all levels) inside the kernel. Returns ``[N, Lq, M * D]``, channel ``m * D + d``; value's
    dtype (inside autocast, what the composition returns: on CUDA the promotion of the three dtypes,
    on the CPU float32), computed and accumulated in float32 (float64 for float64), each tensor read
    in its own dtype. Equals the per-level ``grid_sample`` composition every model ships.
    ``im2col_step`` is accepted for the signature of Deformable DETR's and mmcv's op and has no
    effect: the whole batch runs in one launch. Gradients for value, locations and weights
    (deterministic under ``torch.use_deterministic_algorithms(True)``).
    """
    _raise(validation.ms_deform_attn_problem(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights, im2col_step, points_per_level, softmax))
    levels = spatial_shapes.shape[0] if isinstance(spatial_shapes, torch.Tensor) else len(spatial_shapes)
    points = tuple(points_per_level) if points_per_level is not None else (sampling_locations.shape[4],) * levels
    device_type = value.device.type
    out_dtype = value.dtype
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.promote_types(sampled_dtype(device_type, value.dtype, sampling_locations.dtype),
                                        attention_weights.dtype)
    if backend(value) == TORCH:
        return fallback.ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, points, softmax,
                                       out_dtype)
    return _without_autocast(device_type, _attention_op.ms_deform_attn, value, spatial_shapes, level_start_index,
                             sampling_locations, attention_weights, points, softmax, out_dtype)



def _dcn(input, offset, mask, geometry: tuple, group, group_channels, offset_scale, remove_center, softmax,
         packed: bool) -> torch.Tensor:
    _raise(validation.dcn_problem(input, offset, mask, *geometry, group, group_channels, offset_scale, remove_center,
                                  softmax, packed))
    spec = _dcn_op.DcnSpec(*geometry, group, float(offset_scale), bool(remove_center), packed, softmax, input.dtype)
    op = fallback.dcn_aggregate if backend(input) == TORCH else _dcn_op.dcn_aggregate
    return _without_autocast(input.device.type, op, input, offset, mask, spec)


def dcnv3(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int,
          stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
          offset_scale: float, remove_center: bool = False) -> torch.Tensor:
    """DCNv3 (InternImage): the deformable aggregation of ``DCNv3Function`` / ``dcnv3_core_pytorch``
    in one kernel, no sampling grid in memory.

    input ``[N, H, W, C]`` (C = group * group_channels; any strides: a dense NHWC tensor and an
    NCHW-strided view are read in place), offset ``[N, Ho, Wo, group * K * 2]`` ((x, y) per point,
    in pixels), mask ``[N, Ho, Wo, group * K]`` (already softmaxed, as InternImage's module does),
    K = kernel_h * kernel_w points (one fewer with ``remove_center``, which needs an odd kernel) in
    x-major tap order. Output pixel (i, j), group g, channel d: the sum over the points p of
    ``mask_p * bilinear(input[..., g, d], (x_p, y_p))``, zeros outside the image (the zero padding),
    with ``x_p = j * stride_w + (dilation_w * (kernel_w - 1)) // 2 - pad_w + offset_scale * (tap_x_p
    + offset_x_p)`` in pixels (tap_x_p the point's kernel column times dilation_w, from the centre)
    and y_p alike. ``pad_h`` pads the height
    (InternImage's CUDA kernel's meaning; its PyTorch core swaps pad_h and pad_w when they differ).
    Returns ``[N, Ho, Wo, C]`` (Ho, Wo a convolution's) in input's dtype, also inside autocast, as
    the CUDA op; computed in float32 (float64 when a tensor is float64), each tensor read in its
    own dtype. Gradients for input, offset and mask (deterministic under
    ``torch.use_deterministic_algorithms(True)``); non-finite offsets read and write nothing.
    """
    return _dcn(input, offset, mask, (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w),
                group, group_channels, offset_scale, remove_center, False, False)


def dcnv4(input: torch.Tensor, offset_mask: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
          pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
          offset_scale: float, remove_center: bool = False, softmax: bool = False) -> torch.Tensor:
    """DCNv4 (FlashInternImage): ``dcnv3``'s aggregation with DCNv4's packed ``offset_mask``
    ``[N, Ho, Wo, L]``: for each group, its K * 2 offsets ((x, y) per point) then its K mask values,
    the groups one after another, L >= group * 3 * K (DCNv4's modules pad it to a multiple of 8;
    the padding is never read and gets a zero gradient). The mask values are used as they are
    (DCNv4's default), or softmaxed over each group's K points in the kernel with ``softmax=True``.
    Everything else, the output and the gradients (input and offset_mask) as ``dcnv3``'s.
    """
    return _dcn(input, offset_mask, None,
                (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w), group, group_channels,
                offset_scale, remove_center, softmax, True)


def boxes_to_rois(boxes: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
    """torchvision's boxes as RoIs ``[K, 5]``: a tensor as it is, a list of ``[L_i, 4]`` tensors (one
    per image) concatenated behind a column of image indices in the boxes' dtype. Scriptable."""
    if isinstance(boxes, torch.Tensor):
        return boxes
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids, dim=0), torch.cat(boxes, dim=0)], dim=1)


def _roi_pool(input, rois, offset, mask, kind: int, output_size, spatial_scale, sampling_ratio, aligned, gamma):
    """Dispatch a validated RoI pooling call: the input's dtype out, computed in float32 (float64 for
    float64) whatever autocast says, which is torchvision's autocast rule."""
    size = validation.int_pair("output_size", output_size)
    if backend(input) == TORCH:
        return fallback.roi_pool(input, rois, offset, mask, kind, size, spatial_scale, sampling_ratio, aligned, gamma)
    return _without_autocast(input.device.type, _roi_op.roi_pool, input, rois, offset, mask, kind, size,
                             spatial_scale, sampling_ratio, aligned, gamma, input.dtype)


def roi_align(
    input: torch.Tensor,
    boxes,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoI align (Mask R-CNN); equals ``torchvision.ops.roi_align`` in every argument.

    input ``[N, C, H, W]``; boxes a tensor ``[K, 5]`` (image index, x1, y1, x2, y2) or a list of
    ``[L_i, 4]`` tensors, one per image, in box units (``spatial_scale`` maps them to input
    pixels). Bin (ph, pw) of ``output_size`` (an int or (PH, PW)) averages a grid of bilinear
    samples, ``sampling_ratio`` a side (<= 0: ``ceil(RoI side / output side)``). ``aligned=False``
    is the legacy rule (no half-pixel shift, RoIs at least 1 x 1), True Detectron2's. Returns
    ``[K, C, PH, PW]`` in input's dtype and layout (channels_last kept), computed in float32
    (float64 for float64), inside autocast too (torchvision's rule). Gradients for input
    (deterministic under ``torch.use_deterministic_algorithms(True)``, in no more memory than
    grad_input); the boxes get none, as in torchvision.
    """
    _raise(validation.roi_align_problem(input, boxes, output_size, spatial_scale, sampling_ratio, aligned))
    return _roi_pool(input, boxes_to_rois(boxes), None, None, codes.ROI_ALIGN, output_size, spatial_scale,
                     sampling_ratio, aligned, 0.0)


def ps_roi_align(
    input: torch.Tensor,
    boxes,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> torch.Tensor:
    """Position-sensitive RoI align (R-FCN); equals ``torchvision.ops.ps_roi_align``.

    As ``roi_align`` with ``aligned=True``, except that output channel c of bin b reads input
    channel ``c * PH * PW + b``: input ``[N, C_out * PH * PW, H, W]`` -> ``[K, C_out, PH, PW]``. A
    bin without samples (an empty RoI under adaptive sampling) is 0 / 0, as in torchvision.
    """
    _raise(validation.ps_roi_align_problem(input, boxes, output_size, spatial_scale, sampling_ratio))
    return _roi_pool(input, boxes_to_rois(boxes), None, None, codes.PS_ROI_ALIGN, output_size, spatial_scale,
                     sampling_ratio, True, 0.0)


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deformable RoI pooling (Deformable ConvNets v1; v2 with ``mask``); equals mmcv's ``deform_roi_pool``
    (and ``ModulatedDeformRoIPoolPack``'s ``deform_roi_pool(...) * mask``).

    RoI align with the half-pixel shift (``aligned=True``) in which bin (ph, pw) of RoI k starts
    shifted by ``gamma * (width, height) * offset[k, :, ph, pw]`` (offset ``[K, 2, PH, PW]``, x
    first; None: no shift) and is multiplied by ``mask[k, 0, ph, pw]`` (mask ``[K, 1, PH, PW]``).
    rois ``[K, 5]`` as roi_align's. Gradients for input, offset and mask.
    """
    _raise(validation.deform_roi_pool_problem(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                                              mask))
    return _roi_pool(input, rois, offset, mask, codes.DEFORM_ROI_POOL, output_size, spatial_scale, sampling_ratio,
                     True, gamma)


def fpn_levels(boxes, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
               eps: float = 1e-6) -> torch.Tensor:
    """The FPN paper's level of each box (its equation 1), as torchvision's LevelMapper computes it:
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)`` clamped to [k_min, k_max],
    less k_min. boxes: a list of [L_i, 4] tensors -> [sum L_i] int64, on the boxes' device (no sync)."""
    concatenated = torch.cat(list(boxes), dim=0)
    if not concatenated.is_floating_point() or concatenated.dtype in (torch.float16, torch.bfloat16):
        concatenated = concatenated.float()
    area = (concatenated[:, 2] - concatenated[:, 0]) * (concatenated[:, 3] - concatenated[:, 1])
    s = torch.sqrt(area)
    levels = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    return (torch.clamp(levels, min=k_min, max=k_max).to(torch.int64) - k_min).to(torch.int64)


def multi_scale_roi_align(
    features,
    boxes,
    output_size,
    sampling_ratio: int,
    scales,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    aligned: bool = False,
) -> torch.Tensor:
    """torchvision's MultiScaleRoIAlign pooling: each box pooled from the FPN level its size maps to.

    features: the feature maps ``[N, C, H_l, W_l]``, finest first, scales their ``spatial_scale``
    (powers of two, as ``MultiScaleRoIAlign`` infers them); boxes a list of ``[L_i, 4]`` tensors in
    image pixels, one per image. Each box's level is torchvision's (``fpn_levels`` between the
    first and last scale's levels) and the box is pooled as ``roi_align(features[level], ...,
    spatial_scale=scales[level], sampling_ratio, aligned)`` would pool it; returns ``[sum L_i, C, PH,
    PW]`` in the first map's dtype. Unlike torchvision's, no index of a level's boxes is computed:
    one launch a level pools its boxes into the one output, with no host sync.
    """
    _raise(validation.multi_scale_roi_align_problem(features, boxes, output_size, sampling_ratio, scales))
    rois = boxes_to_rois(boxes)
    size = validation.int_pair("output_size", output_size)
    if len(features) == 1:
        return _roi_pool(features[0], rois, None, None, codes.ROI_ALIGN, size, scales[0], sampling_ratio, aligned,
                         0.0)
    k_min = int(-math.log2(scales[0]))
    k_max = int(-math.log2(scales[-1]))
    levels = fpn_levels(boxes, k_min, k_max, canonical_scale, canonical_level)
    return _multi_scale(list(features), rois, levels, size, scales, sampling_ratio, aligned)


def _multi_scale(features: list, rois, levels, size, scales, sampling_ratio, aligned) -> torch.Tensor:
    """Dispatch validated multi-level pooling (levels [K] in [0, len(features)))."""
    first = features[0]
    if backend(first) == TORCH:
        out = first.new_zeros((rois.shape[0], first.shape[1], *size))
        for level, (x, scale) in enumerate(zip(features, scales)):
            pooled = fallback.roi_pool(x, rois, None, None, codes.ROI_ALIGN, size, scale, sampling_ratio, aligned, 0.0)
            out = torch.where((levels == level)[:, None, None, None], pooled.to(out.dtype), out)
        return out
    return _without_autocast(first.device.type, _roi_op.multi_scale_roi_align, features, rois, levels, size,
                             list(scales), sampling_ratio, aligned, first.dtype)


def _blur_dtype(input: torch.Tensor) -> torch.dtype:
    """The output dtype of a blur pooling: the input's, or inside autocast what the composition's
    depthwise ``F.conv2d`` returns there (the autocast dtype, unless the input is float64)."""
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type) and input.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return input.dtype


def _blur_pool(input, kernel_size, stride, max_pool_size, padding_mode) -> torch.Tensor:
    """Dispatch a validated (max-)blur pooling, computed in float32 (float64 for float64)."""
    sizes = (validation.int_pair("kernel_size", kernel_size), validation.int_pair("stride", stride),
             validation.int_pair("max_pool_size", max_pool_size))
    out_dtype = _blur_dtype(input)
    if backend(input) == TORCH:
        return _without_autocast(input.device.type, fallback.blur_pool, input, *sizes, padding_mode, out_dtype)
    return _without_autocast(input.device.type, _blur_pool_op.blur_pool, input, *sizes, padding_mode, out_dtype)


def blur_pool2d(input: torch.Tensor, kernel_size=3, stride=2, padding_mode: str = "zeros") -> torch.Tensor:
    """Anti-aliased downsampling (Zhang, ICML 2019): a binomial blur, then the stride, in one pass.

    input ``[N, C, H, W]`` -> ``[N, C, ceil(H / stride), ceil(W / stride)]``: the depthwise
    correlation with the normalized binomial (Pascal) kernel of ``kernel_size`` taps (an int or
    (KH, KW), 1 to 16; weights ``C(k - 1, i) / 2^(k - 1)``), the input padded ``(k - 1) // 2``
    before and ``k // 2`` after by ``padding_mode``: ``zeros`` equals ``kornia.filters.blur_pool2d``,
    ``reflect`` / ``replicate`` equal antialiased-cnns' ``BlurPool(C, pad_type, filt_size, stride)``
    (filter size 1 is its plain subsampling ``x[..., ::stride, ::stride]``). Only the strided output
    is computed and written; no padded copy is made. Computed in float32 (float64 for float64);
    the input's dtype and layout out (channels_last kept), inside autocast the autocast dtype
    (the composition's conv2d's). Gradients for input, deterministic (a gather, no atomics).
    """
    _raise(validation.blur_pool_problem(input, kernel_size, stride, padding_mode))
    return _blur_pool(input, kernel_size, stride, 1, padding_mode)


def max_blur_pool2d(input: torch.Tensor, kernel_size=3, stride=2, max_pool_size=2, ceil_mode: bool = False,
                    padding_mode: str = "zeros") -> torch.Tensor:
    """MaxBlurPool (Zhang, ICML 2019): a max over ``max_pool_size`` windows at stride 1, then
    ``blur_pool2d``, in one pass; equals ``kornia.filters.max_blur_pool2d`` (and with
    ``padding_mode='reflect'`` antialiased-cnns' ``nn.MaxPool2d(max_pool_size, stride=1)`` followed
    by its ``BlurPool``).

    input ``[N, C, H, W]`` -> ``[N, C, ceil((H - m + 1) / stride), ceil((W - m + 1) / stride)]``. The
    max windows follow ``F.max_pool2d`` (no padding; a NaN wins; of equal values the first in
    row-major order takes the gradient); their maxima are never stored, only the strided output.
    ``ceil_mode`` has no effect (at stride 1 floor and ceil agree), as in kornia. Dtypes, layout,
    autocast and the deterministic backward as ``blur_pool2d``'s.
    """
    _raise(validation.blur_pool_problem(input, kernel_size, stride, padding_mode, max_pool_size, ceil_mode))
    return _blur_pool(input, kernel_size, stride, max_pool_size, padding_mode)
