"""grid_sample as torch.library ops: kernel launches, the autograd formula, the deterministic path.

``stn_triton::grid_sample`` and ``stn_triton::grid_sample_backward`` are ``triton_op``s, so
``torch.compile`` traces into their kernels and CUDA graphs capture them.

Backward. grad_grid needs no atomics: each program reduces its own pixels over all channels.
grad_input is a scatter (many output pixels may read one input pixel). By default it is an
``atomic_add`` into a float32 buffer (float64 for float64), so half dtypes never accumulate in
half. Under ``torch.use_deterministic_algorithms(True)`` it is a gather instead: one kernel lists
every (output pixel, tap) pair with the flat index of the input pixel it touches; a stable sort
groups the pairs by input pixel, in a fixed order; a second kernel lets the first pair of each
group sum the group's ``weight * grad_output`` in that order and write the input pixel once.
Same inputs, same order, same bits, on every run.
"""

import torch
import triton
from torch.library import triton_op, wrap_triton

from stn_triton.kernels.grid_sample import (
    _grid_sample_bwd_kernel,
    _grid_sample_bwd_sorted_kernel,
    _grid_sample_fwd_kernel,
    _grid_sample_taps_kernel,
)
from stn_triton.ops._launch import (
    compute_dtype,
    empty_like_layout,
    grid_strides,
    needs_int64,
    spatial_size,
    spatial_strides,
)
from stn_triton.tuning import INTERPRETER_PIXEL_BLOCK, autotune, pixel_block_configs

MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}
NEAREST = MODES["nearest"]
BICUBIC = MODES["bicubic"]

_fwd_kernel = autotune(pixel_block_configs(), INTERPRETER_PIXEL_BLOCK, key=["C", "MODE", "NDIM", "F64"])(
    _grid_sample_fwd_kernel
)

# The atomic backward is not autotuned: each trial would add into grad_input again.
BWD_BLOCK_P = 64
BWD_WARPS = 4
TAPS_BLOCK_P = 128
SORTED_BLOCK_E = 64


def num_taps(mode: int, ndim: int) -> int:
    """Input pixels one output pixel reads."""
    return 1 if mode == NEAREST else 16 if mode == BICUBIC else 2**ndim


def channel_block(channels: int, limit: int = 32) -> int:
    """Channels a program handles at once: all of them up to ``limit``, as a power of two."""
    return min(triton.next_power_of_2(channels), limit)


def _output_shape(input: torch.Tensor, grid: torch.Tensor) -> tuple[int, ...]:
    return (input.shape[0], input.shape[1], *grid.shape[1:-1])


@triton_op("stn_triton::grid_sample", mutates_args=())
def grid_sample_op(input: torch.Tensor, grid: torch.Tensor, mode: int, padding_mode: int, align_corners: bool) -> torch.Tensor:
    """[N, C, (D,) H, W] input sampled at grid [N, (D',) H', W', ndim] -> [N, C, (D',) H', W']."""
    out = empty_like_layout(input, _output_shape(input, grid))
    ndim = input.dim() - 2
    pixels = grid.numel() // ndim
    channels = input.shape[1]
    if out.numel() == 0:
        return out
    block_c = channel_block(channels)
    launch = lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(channels, block_c))  # noqa: E731
    wrap_triton(_fwd_kernel)[launch](
        input, grid, out,
        pixels, channels, *spatial_size(input), *spatial_size(out),
        *spatial_strides(input), *grid_strides(grid), *spatial_strides(out),
        MODE=mode, PADDING=padding_mode, ALIGN_CORNERS=align_corners, NDIM=ndim, TAPS=num_taps(mode, ndim),
        F64=input.dtype == torch.float64, INDEX_64=needs_int64(input, grid, out), BLOCK_C=block_c,
    )
    return out


@triton_op("stn_triton::grid_sample_backward", mutates_args=())
def grid_sample_backward_op(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    grid: torch.Tensor,
    mode: int,
    padding_mode: int,
    align_corners: bool,
    input_grad: bool,
    grid_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_grid); a gradient not asked for comes back as an empty tensor."""
    ndim = input.dim() - 2
    channels = input.shape[1]
    pixels = grid.numel() // ndim
    grid_grad = grid_grad and mode != NEAREST  # nearest is piecewise constant in the grid
    grad_grid = torch.zeros(grid.shape, dtype=grid.dtype, device=grid.device) if grid_grad else grid.new_empty(0)
    atomic_input_grad = input_grad and not deterministic
    if atomic_input_grad:
        grad_input = torch.zeros_like(input, dtype=compute_dtype(input.dtype), memory_format=torch.preserve_format)
    else:
        grad_input = input.new_empty(0)
    taps = num_taps(mode, ndim)
    common = dict(MODE=mode, PADDING=padding_mode, ALIGN_CORNERS=align_corners, NDIM=ndim, TAPS=taps,
                  F64=input.dtype == torch.float64)
    if pixels > 0 and channels > 0 and (atomic_input_grad or grid_grad):
        # grad_input is allocated above only when it is written, so stand in input for its pointer.
        grad_input_arg = grad_input if atomic_input_grad else input
        wrap_triton(_grid_sample_bwd_kernel)[(triton.cdiv(pixels, BWD_BLOCK_P),)](
            grad_output, input, grid, grad_input_arg, grad_grid,
            pixels, channels, *spatial_size(input), *spatial_size(grad_output),
            *spatial_strides(grad_output), *spatial_strides(input), *grid_strides(grid),
            *spatial_strides(grad_input_arg),
            INDEX_64=needs_int64(grad_output, input, grid, grad_input_arg, grad_grid),
            INPUT_GRAD=atomic_input_grad, GRID_GRAD=grid_grad,
            BLOCK_P=BWD_BLOCK_P, BLOCK_C=channel_block(channels), num_warps=BWD_WARPS, **common,
        )
    if atomic_input_grad:
        grad_input = grad_input.to(input.dtype)
    elif input_grad:
        grad_input = _deterministic_grad_input(grad_output, input, grid, taps, common)
    return grad_input, grad_grid


def _deterministic_grad_input(grad_output, input, grid, taps, common) -> torch.Tensor:
    """grad_input by sorting the taps by target pixel and summing each run in order (no atomics)."""
    ndim = input.dim() - 2
    pixels = grid.numel() // ndim
    grad_input = torch.zeros_like(input, memory_format=torch.preserve_format)
    entries = pixels * taps
    if entries == 0 or input.shape[1] == 0:
        return grad_input
    keys = torch.empty(entries, dtype=torch.int64, device=input.device)
    weights = torch.empty(entries, dtype=compute_dtype(input.dtype), device=input.device)
    wrap_triton(_grid_sample_taps_kernel)[(triton.cdiv(pixels, TAPS_BLOCK_P),)](
        grid, keys, weights,
        pixels, *spatial_size(input), *spatial_size(grad_output), *grid_strides(grid),
        BLOCK_P=TAPS_BLOCK_P, **common,
    )
    sorted_keys, order = torch.sort(keys, stable=True)
    run_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    channels = input.shape[1]
    block_c = channel_block(channels)
    wrap_triton(_grid_sample_bwd_sorted_kernel)[(triton.cdiv(entries, SORTED_BLOCK_E), triton.cdiv(channels, block_c))](
        grad_output, grad_input, sorted_keys, order, run_end, weights,
        entries, channels, *spatial_size(input), *spatial_size(grad_output),
        *spatial_strides(grad_output), *spatial_strides(grad_input),
        TAPS=taps, F64=common["F64"], BLOCK_E=SORTED_BLOCK_E, BLOCK_C=block_c,
    )
    return grad_input


def _setup_context(ctx, inputs, output):
    input, grid, mode, padding_mode, align_corners = inputs
    ctx.save_for_backward(input, grid)
    ctx.mode, ctx.padding_mode, ctx.align_corners = mode, padding_mode, align_corners


def _backward(ctx, grad_output):
    input, grid = ctx.saved_tensors
    input_grad, grid_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input, grad_grid = grid_sample_backward_op(
        grad_output, input, grid, ctx.mode, ctx.padding_mode, ctx.align_corners,
        input_grad, grid_grad, torch.are_deterministic_algorithms_enabled(),
    )
    if grid_grad and grad_grid.numel() != grid.numel():
        grad_grid = torch.zeros_like(grid)
    return (grad_input if input_grad else None), (grad_grid if grid_grad else None), None, None, None


grid_sample_op.register_autograd(_backward, setup_context=_setup_context)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: bool) -> torch.Tensor:
    """The Triton grid_sample on validated arguments (see ``stn_triton.functional.grid_sample``)."""
    return grid_sample_op(input, grid, MODES[mode], PADDING_MODES[padding_mode], align_corners)
