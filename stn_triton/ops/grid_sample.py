"""Sampling as torch.library ops: kernel launches, the autograd formula, the deterministic path.

One op pair serves grid_sample and every fused warp: ``stn_triton::sample`` takes the sample
points either as a grid or as transform parameters (``transform`` says which; see
kernels/warp.py) and ``stn_triton::sample_backward`` returns the gradients of the input and of
that grid or those parameters. Both are ``triton_op``s, so ``torch.compile`` traces into their
kernels and CUDA graphs capture them.

Backward. The gradient of the points needs no atomics: each program reduces its own pixels over
all channels (and, for a transform, over its pixels, into per-program partial sums that the host
adds in a fixed order). grad_input is a scatter (many output pixels may read one input pixel).
By default it is an ``atomic_add`` into a float32 buffer (float64 for float64), so half dtypes
never accumulate in half. Under ``torch.use_deterministic_algorithms(True)`` it is a gather
instead: one kernel lists every (output pixel, tap) pair with the flat index of the input pixel
it touches; a stable sort groups the pairs by input pixel, in a fixed order; a second kernel lets
the first pair of each group sum the group's ``weight * grad_output`` in that order and write the
input pixel once. Same inputs, same order, same bits, on every run.
"""

import math
from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from stn_triton.kernels.grid_sample import (
    _sample_bwd_kernel,
    _sample_bwd_sorted_kernel,
    _sample_fwd_kernel,
    _sample_taps_kernel,
)
from stn_triton.ops._launch import (
    channels_last,
    compute_dtype,
    empty_like_layout,
    grid_strides,
    needs_int64,
    spatial_size,
    spatial_strides,
)
from stn_triton.tuning import INTERPRETER_PIXEL_BLOCK, TunedKernel, bucket, pixel_block_configs

MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}
GRID, AFFINE, PROJECTIVE, TPS = 0, 1, 2, 3
NEAREST = MODES["nearest"]
BICUBIC = MODES["bicubic"]

_fwd_kernel = TunedKernel(
    "sample_fwd", _sample_fwd_kernel, pixel_block_configs(), INTERPRETER_PIXEL_BLOCK,
    autotune_key=["C", "TRANSFORM", "MODE", "NDIM", "F64"],
)

# Small blocks with many warps first: the first config is the one deterministic algorithms take
# for an untuned shape, and at 32 channels per block larger blocks spill (perf/results/static/sm90.csv).
_bwd_kernel = TunedKernel(
    "sample_bwd", _sample_bwd_kernel, pixel_block_configs((32, 64, 128), warps=(8, 4, 2)),
    triton.Config({"BLOCK_P": 64}, num_warps=4),
    autotune_key=["C", "TRANSFORM", "MODE", "NDIM", "F64", "INPUT_GRAD", "COORD_GRAD"], reset_to_zero=["ginp_ptr"],
)
_taps_kernel = TunedKernel(
    "sample_taps", _sample_taps_kernel, pixel_block_configs(), INTERPRETER_PIXEL_BLOCK,
    autotune_key=["TRANSFORM", "MODE", "NDIM", "F64"],
)
_sorted_kernel = TunedKernel(
    "sample_bwd_sorted", _sample_bwd_sorted_kernel,
    pixel_block_configs((32, 64, 128), name="BLOCK_E"),
    triton.Config({"BLOCK_E": 64}, num_warps=4), autotune_key=["C", "TAPS", "F64"],
)


def num_taps(mode: int, ndim: int) -> int:
    """Input pixels one output pixel reads."""
    return 1 if mode == NEAREST else 16 if mode == BICUBIC else 2**ndim


def channel_block(channels: int, limit: int = 32) -> int:
    """Channels a program handles at once: all of them up to ``limit``, as a power of two."""
    return min(triton.next_power_of_2(channels), limit)


def _shape_key(pass_: str, input: torch.Tensor, transform: int, mode: int, pixels_per_image: int) -> str:
    """A sampling kernel's key in the tuned tables: pass, dtype, transform, mode, bucketed sizes, layout."""
    layout = "nhwc" if channels_last(input) else "nchw"
    return (f"{pass_}|{input.dtype}|t{transform}|m{mode}|d{input.dim() - 2}|c{bucket(input.shape[1])}"
            f"|p{bucket(pixels_per_image)}|{layout}")


def _coords_strides(coords: torch.Tensor, transform: int) -> tuple[int, ...]:
    """Strides the kernels take for the points: the grid's (n, d, h, w, k) or the parameters' (n, row, col)."""
    return grid_strides(coords) if transform == GRID else (*coords.stride(), 0, 0)


def _spatial(size: list[int]) -> tuple[int, int, int]:
    return tuple(size) if len(size) == 3 else (1, *size)


def _common(input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners) -> dict:
    """The launch arguments every sampling kernel shares."""
    ndim = input.dim() - 2
    return dict(
        args=(coords, control_points if control_points is not None else coords, fill if fill is not None else coords),
        sizes=(*spatial_size(input), *_spatial(size), 0 if control_points is None else control_points.shape[0]),
        strides=_coords_strides(coords, transform),
        meta=dict(TRANSFORM=transform, MODE=mode, PADDING=padding_mode, ALIGN_CORNERS=align_corners, NDIM=ndim,
                  TAPS=num_taps(mode, ndim), F64=input.dtype == torch.float64),
        fill=fill is not None,
    )


@triton_op("stn_triton::sample", mutates_args=())
def sample_op(
    input: torch.Tensor,
    coords: torch.Tensor,
    control_points: Optional[torch.Tensor],
    fill: Optional[torch.Tensor],
    size: list[int],
    transform: int,
    mode: int,
    padding_mode: int,
    align_corners: bool,
) -> torch.Tensor:
    """[N, C, (D,) H, W] input sampled at the points of ``coords`` -> [N, C, *size].

    coords: a grid [N, *size, ndim] (transform GRID), theta [N, ndim, ndim + 1] (AFFINE), a
    homography [N, 3, 3] (PROJECTIVE) or spline coefficients [N, K + 3, 2] over control_points
    [K, 2] (TPS). fill [C]: kornia's 'fill' padding on top of zeros padding.
    """
    out = empty_like_layout(input, (*input.shape[:2], *size))
    pixels_per_image = math.prod(size)
    channels = input.shape[1]
    if out.numel() == 0:
        return out
    block_c = channel_block(channels)
    common = _common(input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners)
    launch = lambda meta: (input.shape[0] * triton.cdiv(pixels_per_image, meta["BLOCK_P"]), triton.cdiv(channels, block_c))  # noqa: E731
    kernel, tuned = _fwd_kernel(_shape_key("fwd", input, transform, mode, pixels_per_image), input.device)
    wrap_triton(kernel)[launch](
        input, *common["args"], out,
        pixels_per_image, channels, *common["sizes"],
        *spatial_strides(input), *common["strides"], *spatial_strides(out),
        FILL=common["fill"], INDEX_64=needs_int64(input, coords, out), BLOCK_C=block_c, **common["meta"], **tuned,
    )
    return out


@triton_op("stn_triton::sample_backward", mutates_args=())
def sample_backward_op(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    coords: torch.Tensor,
    control_points: Optional[torch.Tensor],
    fill: Optional[torch.Tensor],
    size: list[int],
    transform: int,
    mode: int,
    padding_mode: int,
    align_corners: bool,
    input_grad: bool,
    coords_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_coords); a gradient not asked for comes back as an empty tensor."""
    n, channels = input.shape[:2]
    ndim = input.dim() - 2
    pixels_per_image = math.prod(size)
    coords_grad = coords_grad and mode != NEAREST  # nearest is piecewise constant in the points
    atomic_input_grad = input_grad and not deterministic
    common = _common(input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners)
    key = _shape_key("bwd" if atomic_input_grad else "bwd-coords", input, transform, mode, pixels_per_image)
    kernel, tuned = _bwd_kernel(key, input.device)
    # A transform's gradient is one row of partial sums per block of pixels; the rows an image gets
    # are fixed by the smallest block the launch may use, so any tuned block fits the buffer.
    partials = triton.cdiv(pixels_per_image, _bwd_kernel.smallest("BLOCK_P", tuned))
    grad_coords = _coords_grad_buffer(coords, transform, n * partials, ndim) if coords_grad else coords.new_empty(0)
    if atomic_input_grad:
        grad_input = torch.zeros_like(input, dtype=compute_dtype(input.dtype), memory_format=torch.preserve_format)
        grad_input_arg = grad_input
    else:
        grad_input = input.new_empty(0)
        # Never written; a one-element stand-in, since the autotuner zeroes this argument between trials.
        grad_input_arg = input.new_zeros((1,) * input.dim())
    if n * pixels_per_image > 0 and channels > 0 and (atomic_input_grad or coords_grad):
        launch = lambda meta: (n * triton.cdiv(pixels_per_image, meta["BLOCK_P"]),)  # noqa: E731
        wrap_triton(kernel)[launch](
            grad_output, input, *common["args"], grad_input_arg, grad_coords,
            pixels_per_image, channels, *common["sizes"], partials,
            *spatial_strides(grad_output), *spatial_strides(input), *common["strides"],
            *spatial_strides(grad_input_arg),
            FILL=common["fill"], INDEX_64=needs_int64(grad_output, input, coords, grad_input_arg, grad_coords),
            INPUT_GRAD=atomic_input_grad, COORD_GRAD=coords_grad, BLOCK_C=channel_block(channels),
            **common["meta"], **tuned,
        )
    if atomic_input_grad:
        grad_input = grad_input.to(input.dtype)
    elif input_grad:
        grad_input = _deterministic_grad_input(grad_output, input, pixels_per_image, common)
    if coords_grad:
        grad_coords = _finish_coords_grad(grad_coords, coords, transform, n, ndim)
    return grad_input, grad_coords


def _coords_grad_buffer(coords: torch.Tensor, transform: int, rows: int, ndim: int) -> torch.Tensor:
    """What the backward kernel writes the points' gradient into (see warp.store_transform_grad)."""
    if transform == GRID:
        return torch.zeros(coords.shape, dtype=coords.dtype, device=coords.device)
    shape = (coords.shape[1], 2) if transform == TPS else (4, 4)
    return torch.zeros((rows, *shape), dtype=compute_dtype(coords.dtype), device=coords.device)


def _finish_coords_grad(buffer: torch.Tensor, coords: torch.Tensor, transform: int, n: int, ndim: int) -> torch.Tensor:
    """Add each image's rows of partial sums of a transform's gradient (in row order) and shape them."""
    if transform == GRID:
        return buffer
    per_image = buffer.view(n, -1, *buffer.shape[1:]).sum(dim=1)
    if transform != TPS:
        per_image = per_image[:, : coords.shape[1], : coords.shape[2]]
    return per_image.to(coords.dtype)


def _deterministic_grad_input(grad_output, input, pixels_per_image: int, common: dict) -> torch.Tensor:
    """grad_input by sorting the taps by target pixel and summing each run in order (no atomics)."""
    grad_input = torch.zeros_like(input, memory_format=torch.preserve_format)
    n, channels = input.shape[:2]
    taps = common["meta"]["TAPS"]
    entries = n * pixels_per_image * taps
    if entries == 0 or channels == 0:
        return grad_input
    keys = torch.empty(entries, dtype=torch.int64, device=input.device)
    weights = torch.empty(entries, dtype=compute_dtype(input.dtype), device=input.device)
    transform, mode = common["meta"]["TRANSFORM"], common["meta"]["MODE"]
    kernel, tuned = _taps_kernel(_shape_key("taps", input, transform, mode, pixels_per_image), input.device)
    wrap_triton(kernel)[lambda meta: (n * triton.cdiv(pixels_per_image, meta["BLOCK_P"]),)](
        *common["args"][:2], keys, weights,
        pixels_per_image, *common["sizes"], *common["strides"],
        **common["meta"], **tuned,
    )
    sorted_keys, order = torch.sort(keys, stable=True)
    run_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    block_c = channel_block(channels)
    kernel, tuned = _sorted_kernel(_shape_key("sorted", input, transform, mode, pixels_per_image), input.device)
    wrap_triton(kernel)[lambda meta: (triton.cdiv(entries, meta["BLOCK_E"]), triton.cdiv(channels, block_c))](
        grad_output, grad_input, sorted_keys, order, run_end, weights,
        entries, channels, *common["sizes"][:-1],
        *spatial_strides(grad_output), *spatial_strides(grad_input),
        TAPS=taps, F64=common["meta"]["F64"], BLOCK_C=block_c, **tuned,
    )
    return grad_input


def _setup_context(ctx, inputs, output):
    input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners = inputs
    ctx.save_for_backward(input, coords, control_points, fill)
    ctx.options = (size, transform, mode, padding_mode, align_corners)


def _backward(ctx, grad_output):
    input, coords, control_points, fill = ctx.saved_tensors
    input_grad, coords_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input, grad_coords = sample_backward_op(
        grad_output, input, coords, control_points, fill, *ctx.options,
        input_grad, coords_grad, torch.are_deterministic_algorithms_enabled(),
    )
    if coords_grad and grad_coords.numel() != coords.numel():
        grad_coords = torch.zeros_like(coords)
    return (grad_input if input_grad else None), (grad_coords if coords_grad else None), *([None] * 7)


sample_op.register_autograd(_backward, setup_context=_setup_context)


def sample(input, coords, control_points, fill, size, transform, mode: str, padding_mode: str, align_corners: bool):
    """The sampling op on validated arguments, modes and paddings by name."""
    return sample_op(
        input, coords, control_points, fill, list(size), transform, MODES[mode], PADDING_MODES[padding_mode], align_corners
    )


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: bool) -> torch.Tensor:
    """The Triton grid_sample on validated arguments (see ``stn_triton.functional.grid_sample``)."""
    return sample(input, grid, None, None, grid.shape[1:-1], GRID, mode, padding_mode, align_corners)
