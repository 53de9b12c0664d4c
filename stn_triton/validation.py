"""Argument checks, one function per op: each returns the problem with a call (an exception to raise),
or None when the call is well-formed.

``stn_triton.functional`` raises the problem before any launch; ``stn_triton.swap`` routes a call to
stn_triton only when there is none (so a call stn_triton would reject reaches the original, with
the original's error); ``stn_triton.nn`` checks its modules' options with the same functions. A
message names the argument, what it got and what it expects; the exception types are those of
the op replaced (``stn_triton.errors``).
"""

import math
from collections.abc import Sequence

import torch

from stn_triton.conv_shape import DeformConvShape
from stn_triton.errors import ArgumentError, ArgumentTypeError, AssertedArgumentError, UnsupportedArgumentError
from stn_triton.numerics import FLOAT_DTYPES

MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")
# kornia's warps add 'fill': zeros padding blended with a fill value per channel.
WARP_PADDING_MODES = PADDING_MODES + ("fill",)

Problem = Exception | None


def tensor_problem(name: str, value, ndims: Sequence[int]) -> Problem:
    """``value`` is a floating-point tensor with one of ``ndims`` dimensions."""
    if not isinstance(value, torch.Tensor):
        return ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in ndims:
        wanted = " or ".join(f"{d}-D" for d in ndims)
        return ArgumentError(f"{name} must be {wanted}, got a {value.dim()}-D tensor of shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        return ArgumentTypeError(
            f"{name} must have a floating-point dtype (float32, float64, float16 or bfloat16), got {value.dtype}"
        )
    return None


def like_input_problem(name: str, value, input: torch.Tensor, shape: tuple, any_dtype: bool = False) -> Problem:
    """``value`` is a tensor of ``shape`` (None = any size there) on input's device and, unless
    ``any_dtype``, with its dtype."""
    problem = tensor_problem(name, value, (len(shape),))
    if problem is not None:
        return problem
    if any(want is not None and got != want for got, want in zip(value.shape, shape)):
        wanted = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        return ArgumentError(
            f"{name} must have shape {wanted} for input of shape {tuple(input.shape)}, got {tuple(value.shape)}"
        )
    if value.dtype != input.dtype and not any_dtype:
        return ArgumentTypeError(f"{name} must have input's dtype {input.dtype}, got {value.dtype}")
    if value.device != input.device:
        return ArgumentTypeError(f"{name} must be on input's device {input.device}, got {value.device}")
    return None


def int_sequence(name: str, value) -> tuple[int, ...]:
    """``value`` (a list, tuple or torch.Size of ints) as a tuple; raises an ArgumentTypeError naming it."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ArgumentTypeError(f"{name} must be a sequence of ints, got {value!r}")
    return tuple(value)


def sampling_options_problem(mode, padding_mode, align_corners, ndim: int,
                             padding_modes: Sequence[str] = PADDING_MODES) -> Problem:
    """mode, padding_mode and align_corners of a sampling op on ``ndim`` spatial dimensions."""
    if mode not in MODES:
        return ArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "bicubic" and ndim == 3:
        return ArgumentError("mode='bicubic' supports only 4-D input (2 spatial dimensions), got a 5-D input")
    if padding_mode not in padding_modes:
        return ArgumentError(f"padding_mode must be one of {tuple(padding_modes)}, got {padding_mode!r}")
    if not isinstance(align_corners, bool):
        return ArgumentTypeError(f"align_corners must be a bool, got {align_corners!r}")
    return None


def _autocasting(t: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)


def _spatial_problem(name: str, input: torch.Tensor) -> Problem:
    if any(s == 0 for s in input.shape[2:]):
        return ArgumentError(f"{name} must have non-empty spatial dimensions, got {name} of shape {tuple(input.shape)}")
    return None


def grid_sample_problem(input, grid, mode, padding_mode, align_corners) -> Problem:
    """``grid_sample(input, grid, mode, padding_mode, align_corners)`` (inside autocast, grid may
    have another floating-point dtype than input, as F.grid_sample takes it there)."""
    problem = tensor_problem("input", input, (4, 5)) or tensor_problem("grid", grid, (4, 5))
    if problem is not None:
        return problem
    nd = input.dim() - 2
    if grid.dim() != input.dim():
        return ArgumentError(
            f"grid must have the same number of dimensions as input ({input.dim()}), got grid of shape {tuple(grid.shape)}"
        )
    if grid.shape[-1] != nd:
        return ArgumentError(
            f"grid's last dimension must be {nd} for a {input.dim()}-D input, got grid of shape {tuple(grid.shape)}"
        )
    if grid.shape[0] != input.shape[0]:
        return ArgumentError(
            f"grid and input must have the same batch size, got input {tuple(input.shape)} and grid {tuple(grid.shape)}"
        )
    if grid.dtype != input.dtype and not _autocasting(input):
        return ArgumentTypeError(f"grid must have input's dtype {input.dtype}, got {grid.dtype}")
    if grid.device != input.device:
        return ArgumentTypeError(f"grid must be on input's device {input.device}, got {grid.device}")
    return sampling_options_problem(mode, padding_mode, align_corners, nd) or _spatial_problem("input", input)


def affine_grid_problem(theta, size, align_corners) -> Problem:
    """``affine_grid(theta, size, align_corners)``, with F.affine_grid's exception types."""
    if not isinstance(theta, torch.Tensor):
        return ArgumentTypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dtype not in FLOAT_DTYPES:
        return ArgumentError(f"theta must have a floating-point dtype (float32, float64, float16 or bfloat16), "
                             f"got {theta.dtype}")
    try:
        size = int_sequence("size", size)
    except ArgumentTypeError as problem:
        return problem
    if len(size) not in (4, 5):
        return UnsupportedArgumentError(
            f"size must have 4 (N, C, H, W) or 5 (N, C, D, H, W) entries, for 2-D and 3-D affine maps, got {size}"
        )
    nd = len(size) - 2
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (nd, nd + 1):
        return ArgumentError(
            f"theta must have shape [N, {nd}, {nd + 1}] for a size of {len(size)} entries, got {tuple(theta.shape)}"
        )
    if theta.shape[0] != size[0]:
        return ArgumentError(f"theta's batch size {theta.shape[0]} must equal size[0], got size {size}")
    if any(s <= 0 for s in size):
        return ArgumentError(f"size must hold positive entries (as F.affine_grid requires), got {size}")
    if not isinstance(align_corners, bool):
        return ArgumentTypeError(f"align_corners must be a bool, got {align_corners!r}")
    return None


def output_size_problem(size, input: torch.Tensor) -> Problem:
    """A fused warp's ``size``: None, or the full output size (N, C, spatial...) with input's N and C."""
    if size is None:
        return None
    try:
        size = int_sequence("size", size)
    except ArgumentTypeError as problem:
        return problem
    if len(size) != input.dim():
        return ArgumentError(f"size must have {input.dim()} entries (N, C, spatial...) like input, got {size}")
    if tuple(size[:2]) != tuple(input.shape[:2]):
        return ArgumentError(f"size must start with input's batch and channels {tuple(input.shape[:2])}, got size {size}")
    if any(s <= 0 for s in size[2:]):
        return ArgumentError(f"size must hold positive spatial sizes, got {size}")
    return None


def warp_problem(input, params_name: str, params, params_shape: tuple, size, mode, padding_mode, align_corners,
                 ndims=(4, 5)) -> Problem:
    """A fused warp: ``input`` with transform parameters ``params`` of ``params_shape`` (None = any
    size there; the batch is input's), output ``size``, and the sampling options."""
    problem = tensor_problem("input", input, ndims)
    if problem is not None:
        return problem
    return (
        sampling_options_problem(mode, padding_mode, align_corners, input.dim() - 2)
        or _spatial_problem("input", input)
        or like_input_problem(params_name, params, input, (input.shape[0], *params_shape), any_dtype=_autocasting(input))
        or output_size_problem(size, input)
    )


def tps_problem(input, source_points, control_points, size, mode, padding_mode, align_corners) -> Problem:
    """tps_grid_sample's arguments (control_points None: a regular grid, K a square)."""
    problem = warp_problem(input, "source_points", source_points, (None, 2), size, mode, padding_mode, align_corners,
                           ndims=(4,))
    if problem is not None:
        return problem
    k = source_points.shape[1]
    if k < 3:
        return ArgumentError(f"source_points must hold at least 3 points (K >= 3) to fix the affine part, got K = {k}")
    if control_points is None:
        side = int(k**0.5 + 0.5)
        if side * side != k or side < 2:
            return ArgumentError(
                f"control_points is required when source_points' K is not a square of at least 4, got K = {k}"
            )
        return None
    problem = tensor_problem("control_points", control_points, (2,))
    if problem is not None:
        return problem
    if tuple(control_points.shape) != (k, 2):
        return ArgumentError(
            f"control_points must have shape [K, 2] with K = {k} (source_points' K), got {tuple(control_points.shape)}"
        )
    if control_points.device != input.device:
        return ArgumentTypeError(f"control_points must be on input's device {input.device}, got {control_points.device}")
    return None


def pixel_warp_problem(src, M, matrix_shape: tuple, dsize, mode, padding_mode, align_corners, fill_value) -> Problem:
    """kornia's warp_affine / warp_perspective: src, M [B, *matrix_shape], dsize (h, w), fill_value [C]."""
    problem = tensor_problem("src", src, (4,))
    if problem is not None:
        return problem
    problem = (
        sampling_options_problem(mode, padding_mode, align_corners, 2, WARP_PADDING_MODES)
        or _spatial_problem("src", src)
        or like_input_problem("M", M, src, (src.shape[0], *matrix_shape), any_dtype=_autocasting(src))
    )
    if problem is not None:
        return problem
    if not isinstance(dsize, (list, tuple, torch.Size)) or len(dsize) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in dsize
    ):
        return ArgumentError(f"dsize must be (height, width), two positive ints, got {dsize!r}")
    if fill_value is None:
        return None
    if not isinstance(fill_value, torch.Tensor):
        try:
            fill_value = torch.as_tensor(fill_value)
        except (TypeError, ValueError, RuntimeError):
            return ArgumentTypeError(f"fill_value must be a tensor of one value per channel, got {fill_value!r}")
    if fill_value.dim() != 1 or fill_value.shape[0] != src.shape[1]:
        return ArgumentError(
            f"fill_value must hold one value per channel ({src.shape[1]}), got shape {tuple(fill_value.shape)}"
        )
    if fill_value.requires_grad:
        return ArgumentError("fill_value must not require grad: it is a constant of the warp")
    return None


def int_pair(name: str, value) -> tuple[int, int]:
    """An int or a pair of ints as a pair; raises an ArgumentTypeError naming it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise ArgumentTypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def deform_conv2d_problem(input, offset, weight, bias, stride, padding, dilation, mask) -> Problem:
    """torchvision's deform_conv2d arguments (inside autocast the tensors may differ in dtype: they
    are all computed in float32, as torchvision's autocast kernel computes them)."""
    problem = tensor_problem("input", input, (4,))
    if problem is not None:
        return problem
    try:
        stride, padding, dilation = int_pair("stride", stride), int_pair("padding", padding), int_pair("dilation", dilation)
    except ArgumentTypeError as problem:
        return problem
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        return ArgumentError(
            f"stride and dilation must be >= 1 and padding >= 0, got stride={stride}, padding={padding}, dilation={dilation}"
        )
    any_dtype = _autocasting(input)
    problem = (like_input_problem("weight", weight, input, (None, None, None, None), any_dtype)
               or like_input_problem("offset", offset, input, (None, None, None, None), any_dtype))
    if problem is not None:
        return problem
    try:
        shape = DeformConvShape.of(input.shape, offset.shape, weight.shape, stride, padding, dilation)
    except ArgumentError as problem:
        return problem
    if mask is not None:
        problem = tensor_problem("mask", mask, (4,))
        if problem is not None:
            return problem
        if tuple(mask.shape) != shape.mask_shape():
            what = "mask.shape[1] is not valid: " if mask.shape[1] != shape.mask_shape()[1] else ""
            return ArgumentError(f"{what}mask must have shape {list(shape.mask_shape())} (N, offset_groups * "
                                 f"{shape.taps}, H_out, W_out), got {tuple(mask.shape)}")
        problem = like_input_problem("mask", mask, input, shape.mask_shape(), any_dtype)
        if problem is not None:
            return problem
    if bias is not None:
        return like_input_problem("bias", bias, input, (shape.out_channels,), any_dtype)
    return None


def _int_tensor_problem(name: str, value, shape: tuple, device: torch.device) -> Problem:
    """``value`` is an integer tensor of ``shape`` on ``device`` or the CPU."""
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        return ArgumentTypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if tuple(value.shape) != shape:
        return ArgumentError(f"{name} must have shape {list(shape)}, got {tuple(value.shape)}")
    if value.device not in (device, torch.device("cpu")):
        return ArgumentTypeError(f"{name} must be on value's device {device} (or the CPU), got {value.device}")
    return None


def _level_list(spatial_shapes) -> list | None:
    """The shapes as a list of (H, W) when that is free (a list, or a CPU tensor); None for a device tensor."""
    if isinstance(spatial_shapes, torch.Tensor):
        return spatial_shapes.tolist() if spatial_shapes.device.type == "cpu" else None
    return [tuple(shape) for shape in spatial_shapes]


def ms_deform_attn_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                           im2col_step, points_per_level, softmax) -> Problem:
    """multi-scale deformable attention's arguments (Deformable DETR's, mmcv's and Hugging Face's).

    Shapes, dtypes and devices always; the levels' values (positive sizes summing to value's rows,
    starts that are their running sum) when they are free to read: a list, or tensors on the CPU. On
    the GPU they stay there unread (a read would wait for the device), and the kernel never reads
    outside value whatever they hold."""
    problem = tensor_problem("value", value, (4,))
    if problem is not None:
        return problem
    n, rows, heads, _ = value.shape
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[-1] != 2:
            return ArgumentError(f"spatial_shapes must have shape [L, 2] (H, W per level), got {tuple(spatial_shapes.shape)}")
        problem = _int_tensor_problem("spatial_shapes", spatial_shapes, tuple(spatial_shapes.shape), value.device)
        if problem is not None:
            return problem
        count = spatial_shapes.shape[0]
    elif isinstance(spatial_shapes, (list, tuple)) and all(
        isinstance(shape, (list, tuple)) and len(shape) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) for side in shape) for shape in spatial_shapes
    ):
        count = len(spatial_shapes)
    else:
        return ArgumentTypeError(f"spatial_shapes must be an integer tensor [L, 2] or a list of (H, W) pairs of ints, "
                                 f"got {spatial_shapes!r}")
    if count == 0:
        return ArgumentError("spatial_shapes must hold at least one level, got none")
    if level_start_index is not None:
        if not isinstance(level_start_index, torch.Tensor):
            return ArgumentTypeError(f"level_start_index must be an integer tensor [L] or None, got "
                                     f"{type(level_start_index).__name__}")
        problem = _int_tensor_problem("level_start_index", level_start_index, (count,), value.device)
        if problem is not None:
            return problem
    if points_per_level is not None:
        if not isinstance(points_per_level, (list, tuple)) or len(points_per_level) != count or not all(
            isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in points_per_level
        ):
            return ArgumentError(f"points_per_level must hold one positive int per level ({count}), got "
                                 f"{points_per_level!r}")
    # Locations and weights are read in their own floating dtypes (autocast makes them differ from value's).
    if points_per_level is not None:
        loc_shape = (n, None, heads, sum(points_per_level), 2)
    else:
        loc_shape = (n, None, heads, count, None, 2)
    problem = like_input_problem("sampling_locations", sampling_locations, value, loc_shape, any_dtype=True)
    if problem is not None:
        return problem
    problem = like_input_problem("attention_weights", attention_weights, value, tuple(sampling_locations.shape[:-1]),
                                 any_dtype=True)
    if problem is not None:
        return problem
    if not isinstance(im2col_step, int) or isinstance(im2col_step, bool) or im2col_step <= 0:
        return ArgumentError(f"im2col_step must be a positive int (it has no effect here), got {im2col_step!r}")
    if not isinstance(softmax, bool):
        return ArgumentTypeError(f"softmax must be a bool, got {softmax!r}")
    shapes = _level_list(spatial_shapes)
    if shapes is None:
        return None
    if any(h <= 0 or w <= 0 for h, w in shapes):
        return ArgumentError(f"spatial_shapes must hold positive (H, W) per level, got {shapes}")
    if sum(h * w for h, w in shapes) != rows:
        return ArgumentError(f"value must have sum(H * W) = {sum(h * w for h, w in shapes)} rows for spatial_shapes "
                             f"{shapes}, got value of shape {tuple(value.shape)}")
    if level_start_index is not None and level_start_index.device.type == "cpu":
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        if level_start_index.tolist() != starts:
            return ArgumentError(f"level_start_index must be the running sum of H * W of spatial_shapes, {starts}, "
                                 f"got {level_start_index.tolist()}")
    return None



# --- DCNv3 / DCNv4 ------------------------------------------------------------------------------

DCN_INT_OPTIONS = (("kernel_h", 1), ("kernel_w", 1), ("stride_h", 1), ("stride_w", 1), ("pad_h", 0), ("pad_w", 0),
                   ("dilation_h", 1), ("dilation_w", 1), ("group", 1), ("group_channels", 1))


def dcn_options_problem(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                        group_channels, offset_scale, remove_center) -> Problem:
    """DCNv3's / DCNv4's geometry (and their modules'): ints with their least values, a finite
    offset_scale, remove_center a bool (or InternImage's int 0 / 1) and then an odd kernel."""
    values = dict(zip((name for name, _ in DCN_INT_OPTIONS),
                      (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                       group_channels)))
    for name, least in DCN_INT_OPTIONS:
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool):
            return ArgumentTypeError(f"{name} must be an int, got {value!r}")
        if value < least:
            return ArgumentError(f"{name} must be >= {least}, got {value}")
    if isinstance(offset_scale, bool) or not isinstance(offset_scale, (int, float)) or not math.isfinite(offset_scale):
        return ArgumentTypeError(f"offset_scale must be a finite number, got {offset_scale!r}")
    if remove_center not in (False, True) or not isinstance(remove_center, int):
        return ArgumentTypeError(f"remove_center must be a bool (or 0 / 1), got {remove_center!r}")
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0):
        return ArgumentError(f"remove_center needs an odd kernel (it has a centre tap), got kernel_h={kernel_h}, "
                             f"kernel_w={kernel_w}")
    return None


def dcn_problem(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                group, group_channels, offset_scale, remove_center, softmax, packed: bool) -> Problem:
    """dcnv3's (packed False: offset and mask) or dcnv4's (packed True: offset_mask in ``offset``,
    mask None) arguments. The offsets and masks are read in their own floating dtypes (autocast and
    the modules' softmax make them differ from input's)."""
    problem = tensor_problem("input", input, (4,)) or dcn_options_problem(
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
        offset_scale, remove_center)
    if problem is not None:
        return problem
    if not isinstance(softmax, bool):
        return ArgumentTypeError(f"softmax must be a bool, got {softmax!r}")
    n, h, w, c = input.shape
    if c != group * group_channels:
        return ArgumentError(f"input must have group * group_channels = {group} * {group_channels} = "
                             f"{group * group_channels} channels (its last dimension: [N, H, W, C]), got input of "
                             f"shape {tuple(input.shape)}")
    if h == 0 or w == 0:
        return ArgumentError(f"input must have at least one pixel, got input of shape {tuple(input.shape)}")
    ho = (h + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    wo = (w + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    if ho < 1 or wo < 1:
        return ArgumentError(f"the output would be {ho} x {wo} pixels: input of shape {tuple(input.shape)} is too "
                             f"small for kernel {kernel_h} x {kernel_w}, dilation {dilation_h} x {dilation_w} and "
                             f"padding {pad_h} x {pad_w}")
    points = group * (kernel_h * kernel_w - remove_center)
    if packed:
        problem = like_input_problem("offset_mask", offset, input, (n, ho, wo, None), any_dtype=True)
        if problem is None and offset.shape[-1] < 3 * points:
            problem = ArgumentError(f"offset_mask must hold group * 3 * K = {3 * points} values a pixel (K = "
                                    f"{points // group} points a group; padding after them is allowed), got "
                                    f"{tuple(offset.shape)}")
        return problem
    return (like_input_problem("offset", offset, input, (n, ho, wo, 2 * points), any_dtype=True)
            or like_input_problem("mask", mask, input, (n, ho, wo, points), any_dtype=True))

# --- RoI pooling --------------------------------------------------------------------------------


def _number_problem(name: str, value) -> Problem:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ArgumentTypeError(f"{name} must be a number, got {value!r}")
    return None


def _boxes_problem(boxes, input: torch.Tensor) -> Problem:
    """torchvision's boxes: a tensor [K, 5] (batch index, x1, y1, x2, y2) or a list of [L, 4] tensors,
    one per image, on input's device and, outside autocast, in its dtype."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            return AssertedArgumentError(f"boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2), got shape "
                                         f"{tuple(boxes.shape)}")
        tensors = [("boxes", boxes)]
    elif isinstance(boxes, (list, tuple)):
        if not all(isinstance(b, torch.Tensor) and b.dim() == 2 and b.shape[1] == 4 for b in boxes):
            return AssertedArgumentError("boxes must be a Tensor[K, 5] or a list of Tensor[L, 4] (x1, y1, x2, y2), one "
                                         f"per image, got {[tuple(b.shape) if isinstance(b, torch.Tensor) else b for b in boxes]}")
        if len(boxes) == 0:
            return ArgumentError("boxes must hold one tensor per image, got an empty list")
        tensors = [(f"boxes[{i}]", b) for i, b in enumerate(boxes)]
    else:
        return AssertedArgumentError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    for name, b in tensors:
        if b.dtype not in FLOAT_DTYPES:
            return ArgumentTypeError(f"{name} must have a floating-point dtype, got {b.dtype}")
        if b.dtype != input.dtype and not _autocasting(input):
            return ArgumentTypeError(f"{name} must have input's dtype {input.dtype} (torchvision's rule), got {b.dtype}")
        if b.device != input.device:
            return ArgumentTypeError(f"{name} must be on input's device {input.device}, got {b.device}")
    return None


def _pool_options_problem(output_size, spatial_scale, sampling_ratio) -> Problem:
    try:
        size = int_pair("output_size", output_size)
    except ArgumentTypeError as problem:
        return problem
    if min(size) < 1:
        return ArgumentError(f"output_size must be positive, got {output_size!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        return ArgumentTypeError(f"sampling_ratio must be an int (<= 0: adaptive), got {sampling_ratio!r}")
    return _number_problem("spatial_scale", spatial_scale)


def roi_align_problem(input, boxes, output_size, spatial_scale, sampling_ratio, aligned) -> Problem:
    """torchvision's roi_align arguments (inside autocast the boxes may have another floating dtype)."""
    problem = tensor_problem("input", input, (4,)) or _boxes_problem(boxes, input)
    if problem is not None:
        return problem
    problem = _pool_options_problem(output_size, spatial_scale, sampling_ratio)
    if problem is not None:
        return problem
    if not isinstance(aligned, bool):
        return ArgumentTypeError(f"aligned must be a bool, got {aligned!r}")
    return None


def ps_roi_align_problem(input, boxes, output_size, spatial_scale, sampling_ratio) -> Problem:
    """torchvision's ps_roi_align arguments: roi_align's, with input channels a multiple of the bins."""
    problem = roi_align_problem(input, boxes, output_size, spatial_scale, sampling_ratio, True)
    if problem is not None:
        return problem
    ph, pw = int_pair("output_size", output_size)
    if input.shape[1] % (ph * pw) != 0:
        return ArgumentError(f"input channels must be a multiple of pooling height * pooling width ({ph} * {pw}), got "
                             f"input of shape {tuple(input.shape)}")
    return None


def deform_roi_pool_problem(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask) -> Problem:
    """mmcv's deform_roi_pool arguments, and the modulation mask of its ModulatedDeformRoIPoolPack."""
    problem = tensor_problem("input", input, (4,))
    if problem is not None:
        return problem
    if not isinstance(rois, torch.Tensor):
        return AssertedArgumentError(f"rois must be a Tensor[K, 5] (batch index, x1, y1, x2, y2), got "
                                     f"{type(rois).__name__}")
    problem = (_boxes_problem(rois, input) or _pool_options_problem(output_size, spatial_scale, sampling_ratio)
               or _number_problem("gamma", gamma))
    if problem is not None:
        return problem
    ph, pw = int_pair("output_size", output_size)
    any_dtype = _autocasting(input)
    for name, value, channels in (("offset", offset, 2), ("mask", mask, 1)):
        if value is not None:
            problem = like_input_problem(name, value, input, (rois.shape[0], channels, ph, pw), any_dtype)
            if problem is not None:
                return problem
    return None


def multi_scale_roi_align_problem(features, boxes, output_size, sampling_ratio, scales) -> Problem:
    """torchvision's MultiScaleRoIAlign pooling: feature maps [N, C, H_l, W_l] (one batch, channel
    count and device; inside autocast their dtypes may differ, as autocast makes them), boxes a list
    of [L_i, 4] tensors, one positive scale per map."""
    if not isinstance(features, (list, tuple)) or len(features) == 0:
        return ArgumentError(f"features must be a non-empty list of feature maps, got {features!r}")
    for i, f in enumerate(features):
        problem = tensor_problem(f"features[{i}]", f, (4,))
        if problem is not None:
            return problem
        first = features[0]
        if f.shape[:2] != first.shape[:2] or f.device != first.device:
            return ArgumentError(f"features must share batch size, channels and device, got features[0] of shape "
                                 f"{tuple(first.shape)} on {first.device} and features[{i}] of shape {tuple(f.shape)} "
                                 f"on {f.device}")
        if f.dtype != first.dtype and not _autocasting(first):
            return ArgumentTypeError(f"features must share a dtype, got {first.dtype} and {f.dtype}")
    if not isinstance(boxes, (list, tuple)):
        return AssertedArgumentError(f"boxes must be a list of Tensor[L, 4], one per image, got {type(boxes).__name__}")
    problem = _boxes_problem(boxes, features[0]) or _pool_options_problem(output_size, 1.0, sampling_ratio)
    if problem is not None:
        return problem
    if (not isinstance(scales, (list, tuple)) or len(scales) != len(features)
            or any(_number_problem("scales", s) is not None or s <= 0 for s in scales)):
        return ArgumentError(f"scales must hold one positive number per feature map ({len(features)}), got {scales!r}")
    return None


BLUR_PADDING_MODES = ("zeros", "reflect", "replicate")
# The longest binomial blur and the widest max window a side: each is unrolled into the kernels.
BLUR_SIZE_LIMIT = 16


def blur_options_problem(kernel_size, stride, padding_mode, max_pool_size=1, ceil_mode=False) -> Problem:
    """The options of blur_pool2d / max_blur_pool2d (and their modules): blur taps and max window of 1
    to BLUR_SIZE_LIMIT a side (ints or pairs), a positive stride, a padding mode, a bool ceil_mode."""
    try:
        sizes = {"kernel_size": int_pair("kernel_size", kernel_size), "stride": int_pair("stride", stride),
                 "max_pool_size": int_pair("max_pool_size", max_pool_size)}
    except ArgumentTypeError as problem:
        return problem
    for name in ("kernel_size", "max_pool_size"):
        if not all(1 <= s <= BLUR_SIZE_LIMIT for s in sizes[name]):
            return ArgumentError(f"{name} must be from 1 to {BLUR_SIZE_LIMIT} a side, got {sizes[name]}")
    if min(sizes["stride"]) < 1:
        return ArgumentError(f"stride must be positive, got {sizes['stride']}")
    if padding_mode not in BLUR_PADDING_MODES:
        return ArgumentError(f"padding_mode must be one of {BLUR_PADDING_MODES}, got {padding_mode!r}")
    if not isinstance(ceil_mode, bool):
        return ArgumentTypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    return None


def blur_pool_problem(input, kernel_size, stride, padding_mode, max_pool_size=1, ceil_mode=False) -> Problem:
    """blur_pool2d / max_blur_pool2d arguments: a floating-point [N, C, H, W] input, the options, a
    max window no larger than the input, and for reflect padding an axis longer than its padding
    (PyTorch's reflection pad rule)."""
    problem = tensor_problem("input", input, (4,)) or blur_options_problem(kernel_size, stride, padding_mode,
                                                                          max_pool_size, ceil_mode)
    if problem is not None:
        return problem
    (kh, kw), (mh, mw) = int_pair("kernel_size", kernel_size), int_pair("max_pool_size", max_pool_size)
    h, w = input.shape[2:]
    pooled = (mh, mw) != (1, 1)
    if h < mh or w < mw or h * w == 0:
        what = f"input for max_pool_size {(mh, mw)}" if pooled else "input"
        return ArgumentError(f"{what} must have at least {mh} x {mw} pixels, got input of shape {tuple(input.shape)}")
    if padding_mode == "reflect" and (kh // 2 >= h - mh + 1 or kw // 2 >= w - mw + 1):
        return ArgumentError(
            f"padding_mode='reflect' pads kernel_size // 2 = {(kh // 2, kw // 2)} pixels, which must be less than "
            f"the {'max-pooled ' if pooled else ''}input's size {(h - mh + 1, w - mw + 1)} (input of shape "
            f"{tuple(input.shape)})"
        )
    return None
