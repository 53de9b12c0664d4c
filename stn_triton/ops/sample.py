"""Sampling: kernel launches, the autograd formula, the deterministic path, and the dispatch.

One op pair serves grid_sample and every fused warp: ``stn_triton::sample`` takes the sample
points either as a grid or as transform parameters (``transform`` says which; see
kernels/codes.py) and ``stn_triton::sample_backward`` returns the gradients of the input and of
that grid or those parameters. Both are ``triton_op``s, so ``torch.compile`` traces into their
kernels and CUDA graphs capture them. Outside torch.compile the same implementations run under
a plain ``autograd.Function``: the custom-op dispatcher costs several times a kernel launch on
the host, which a small call would feel.

Backward. The gradient of the points needs no atomics: each program reduces its own pixels over
its channels (and, for a transform, over its pixels, into per-program partial sums that the host
adds in a fixed order). grad_input is a scatter (many output pixels may read one input pixel).
By default it is an ``atomic_add`` into a float32 buffer (float64 for float64), so half dtypes
never accumulate in half. Under ``torch.use_deterministic_algorithms(True)`` it is a gather
instead: the kernel lists every (output pixel, tap) pair with the flat index of the input pixel
it touches; a stable sort groups the pairs by input pixel, in a fixed order; a second kernel
lets the first pair of each group sum the group's ``weight * grad_output`` in that order and
write the input pixel once. Same inputs, same order, same bits, on every run.
"""

import math
from typing import Optional

import torch
import triton
from torch.library import triton_op

from stn_triton.kernels import codes
from stn_triton.kernels.sample import _sample_bwd_sorted_kernel, _sample_kernel
from stn_triton.numerics import cdiv, compute_dtype, next_power_of_2
from stn_triton.ops._dispatch import call, eager_function
from stn_triton.ops._launch import (
    channels_last,
    empty_like_layout,
    grid_strides,
    multiprocessors,
    named_strides,
    needs_int64,
    spatial_size,
)
from stn_triton.tuning import TunedKernel, bucket

# Under the interpreter: programs run one after another in numpy, so large pixel blocks; a channel
# block of 4 so that the CPU tests with more channels also take the split-channel path.
INTERPRETER_CONFIG = triton.Config({"BLOCK_P": 128, "BLOCK_C": 4}, num_warps=4)


def _configs(blocks) -> list[triton.Config]:
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in blocks]


# (BLOCK_P, BLOCK_C, num_warps). NCHW runs a warp's threads along pixels (four each): at 512
# pixels the warps split the pixels too, at 128 they split the channels. channels_last runs them
# along channels (vectors of four): wide channel blocks, fewer pixels.
SAMPLE_CONFIGS = _configs([
    (512, 4, 4), (512, 2, 4), (512, 1, 4), (256, 4, 2), (128, 4, 4), (128, 2, 4), (128, 1, 4), (256, 8, 8),
    (1024, 2, 8),
    (32, 64, 4), (16, 64, 4), (8, 64, 4), (64, 32, 4), (32, 32, 4), (16, 32, 4), (128, 16, 4), (64, 16, 4),
    (32, 16, 4),
])


def sample_heuristic(channels: int, nhwc: bool, taps: int, backward: bool) -> triton.Config:
    """The config for a shape no tuned table holds: spill-free on sm_90 in the static compile
    (triton 3.9's ptxas), with many loads in flight per thread.

    NCHW: the forward at 512 pixels x 4 channels per step on 4 warps (bilinear 2-D 141-191
    registers by dtype and transform, trilinear 142); the backward, which holds three more tiles
    and scatters, and bicubic's 16 taps at 128 pixels (92-168 and 128 registers). channels_last: a
    warp along up to 64 contiguous channels, 2048 tile elements per step (1024 in the backward,
    512 for bicubic). perf/results/static/sm90.csv has every config.
    """
    if nhwc and channels >= 16:
        block_c = min(next_power_of_2(channels), 64)
        elements = 512 if taps > 8 else 1024 if backward else 2048
        return triton.Config({"BLOCK_P": max(elements // block_c, 8), "BLOCK_C": block_c}, num_warps=4)
    if taps > 8:
        block_p, block_c = 128, 2
    elif backward:
        block_p, block_c = 128, 4
    else:
        block_p, block_c = 512, 4
    return triton.Config({"BLOCK_P": block_p, "BLOCK_C": min(next_power_of_2(channels), block_c)}, num_warps=4)


AUTOTUNE_KEY = ["C", "PASS", "TRANSFORM", "MODE", "NDIM", "F64", "INPUT_GRAD", "COORD_GRAD"]
_fwd_kernel = TunedKernel(
    "sample_fwd", _sample_kernel, SAMPLE_CONFIGS, sample_heuristic, AUTOTUNE_KEY, writes=("out_ptr",),
    interpreter_config=INTERPRETER_CONFIG,
)
_bwd_kernel = TunedKernel(
    "sample_bwd", _sample_kernel, SAMPLE_CONFIGS, sample_heuristic, AUTOTUNE_KEY,
    writes=("ginp_ptr", "gcoords_ptr"), reset_to_zero=["ginp_ptr"], interpreter_config=INTERPRETER_CONFIG,
)
_taps_kernel = TunedKernel(
    "sample_taps", _sample_kernel, _configs([(128, 1, 4), (256, 1, 4), (256, 1, 8), (512, 1, 8)]),
    lambda **shape: triton.Config({"BLOCK_P": 256, "BLOCK_C": 1}, num_warps=4), AUTOTUNE_KEY,
    writes=("key_ptr", "weight_ptr"), interpreter_config=triton.Config({"BLOCK_P": 128, "BLOCK_C": 1}, num_warps=4),
)


def _sorted_heuristic(channels: int, nhwc: bool, **_) -> triton.Config:
    """The sorted gather's tile is the backward's, entries in place of pixels."""
    config = sample_heuristic(channels, nhwc, taps=4, backward=True)
    return triton.Config({"BLOCK_E": config.kwargs["BLOCK_P"], "BLOCK_C": config.kwargs["BLOCK_C"]},
                         num_warps=config.num_warps)


_sorted_kernel = TunedKernel(
    "sample_bwd_sorted", _sample_bwd_sorted_kernel,
    [triton.Config({"BLOCK_E": e, "BLOCK_C": c}, num_warps=w)
     for e, c, w in [(128, 4, 4), (128, 2, 4), (128, 1, 4), (256, 4, 8), (32, 64, 4), (16, 64, 4), (8, 64, 4), (32, 32, 4),
                     (64, 16, 4)]],
    _sorted_heuristic, ["C", "TAPS", "F64"], writes=("ginp_ptr",),
    interpreter_config=triton.Config({"BLOCK_E": 64, "BLOCK_C": 4}, num_warps=4),
)


def num_taps(mode: int, ndim: int) -> int:
    """Input pixels one output pixel reads."""
    return 1 if mode == codes.NEAREST else 16 if mode == codes.BICUBIC else 2**ndim


def channel_splits(images: int, pixels: int, channels: int, launch, device: torch.device) -> int:
    """Channel ranges to split the work into, so that a call with few pixels still fills the GPU.

    One range while the pixel blocks alone give four programs per SM; else as many ranges as
    make up the difference, each at least one channel block.
    """
    programs = images * cdiv(pixels, launch.least("BLOCK_P"))
    target = 4 * multiprocessors(device)
    if programs >= target:
        return 1
    return max(1, min(cdiv(channels, launch.least("BLOCK_C")), cdiv(target, programs)))


def _shape(input: torch.Tensor, mode: int, backward: bool) -> dict:
    return dict(channels=input.shape[1], nhwc=channels_last(input), taps=num_taps(mode, input.dim() - 2),
                backward=backward)


def _shape_key(pass_: str, input: torch.Tensor, transform: int, mode: int, pixels_per_image: int) -> str:
    """A sampling kernel's key in the tuned tables: pass, dtype, transform, mode, bucketed sizes, layout."""
    layout = "nhwc" if channels_last(input) else "nchw"
    return (f"{pass_}|{input.dtype}|t{transform}|m{mode}|d{input.dim() - 2}|c{bucket(input.shape[1])}"
            f"|p{bucket(pixels_per_image)}|{layout}")


def _coords_strides(coords: torch.Tensor, transform: int) -> dict[str, int]:
    """The points' strides by kernel name: the grid's (n, d, h, w, k) or the parameters' (n, row, col)."""
    strides = grid_strides(coords) if transform == codes.GRID else (*coords.stride(), 0, 0)
    return dict(zip(("s0", "s1", "s2", "s3", "s4"), strides))


def _arguments(input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners,
               out_dtype) -> dict:
    """The kernel arguments every pass shares, by name; passes add their own and override stand-ins.

    A pointer a pass does not use gets ``coords`` as a stand-in (never read or written there).
    Input, points and output may differ in dtype (autocast); the kernel computes in float64 when
    any of them is float64, else in float32.
    """
    ndim = input.dim() - 2
    d, h, w = spatial_size(input)
    od, oh, ow = size if ndim == 3 else (1, *size)
    stand_in = coords
    return dict(
        inp_ptr=input, coords_ptr=coords, ctrl_ptr=control_points if control_points is not None else stand_in,
        fill_ptr=fill if fill is not None else stand_in, out_ptr=stand_in, gout_ptr=stand_in, ginp_ptr=stand_in,
        gcoords_ptr=stand_in, key_ptr=stand_in, weight_ptr=stand_in,
        Q=od * oh * ow, C=input.shape[1], D=d, H=h, W=w, OD=od, OH=oh, OW=ow,
        K=0 if control_points is None else control_points.shape[0], PARTIALS=0, SPLITS=1,
        **named_strides("si", input), **_coords_strides(coords, transform),
        so_n=0, so_c=0, so_q=0, **dict.fromkeys(("sgo_n", "sgo_c", "sgo_d", "sgo_h", "sgo_w"), 0),
        **dict.fromkeys(("sgi_n", "sgi_c", "sgi_d", "sgi_h", "sgi_w"), 0), sgc_split=0,
        PASS=codes.FORWARD, TRANSFORM=transform, MODE=mode, PADDING=padding_mode, FILL=fill is not None,
        ALIGN_CORNERS=align_corners, NDIM=ndim, TAPS=num_taps(mode, ndim),
        F64=torch.float64 in (input.dtype, coords.dtype, out_dtype),
        INDEX_64=False, INPUT_GRAD=False, COORD_GRAD=False, EVEN_C=False,
    )


def sample_forward(input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners, out_dtype):
    """[N, C, (D,) H, W] input sampled at the points of ``coords`` -> [N, C, *size] (see ``sample_op``)."""
    out = empty_like_layout(input, (*input.shape[:2], *size), out_dtype)
    if out.numel() == 0:
        return out
    images, channels = input.shape[:2]
    pixels = math.prod(size)
    launch = _fwd_kernel.choose(_shape_key("fwd", input, transform, mode, pixels), _shape(input, mode, False),
                                input.device)
    splits = channel_splits(images, pixels, channels, launch, input.device)
    args = _arguments(input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners, out_dtype)
    args.update(out_ptr=out, so_n=out.stride(0), so_c=out.stride(1), so_q=out.stride(-1), SPLITS=splits,
                EVEN_C=channels % launch.most("BLOCK_C") == 0, INDEX_64=needs_int64(input, coords, out))
    launch(lambda meta: (images * cdiv(pixels, meta["BLOCK_P"]), splits), **args)
    return out


def sample_backward(grad_output, input, coords, control_points, fill, size, transform, mode, padding_mode,
                    align_corners, out_dtype, input_grad, coords_grad, deterministic):
    """(grad_input, grad_coords); a gradient not asked for comes back as an empty tensor."""
    images, channels = input.shape[:2]
    ndim = input.dim() - 2
    pixels = math.prod(size)
    coords_grad = coords_grad and mode != codes.NEAREST  # nearest is piecewise constant in the points
    atomic_input_grad = input_grad and not deterministic
    args = _arguments(input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners, out_dtype)
    grad_input = input.new_empty(0)
    if atomic_input_grad:
        grad_input = torch.zeros_like(input, dtype=compute_dtype(input.dtype), memory_format=torch.preserve_format)
    grad_coords = coords.new_empty(0)
    work = images * pixels > 0 and channels > 0
    if work and (atomic_input_grad or coords_grad):
        key = _shape_key("bwd" if atomic_input_grad else "bwd-coords", input, transform, mode, pixels)
        launch = _bwd_kernel.choose(key, _shape(input, mode, True), input.device)
        splits = channel_splits(images, pixels, channels, launch, input.device)
        # A transform's gradient is one row of partial sums per block of pixels; the rows an image gets
        # are fixed by the smallest block the launch may use, so any block fits the buffer.
        partials = cdiv(pixels, launch.least("BLOCK_P"))
        if coords_grad:
            grad_coords = _coords_grad_buffer(coords, transform, splits, images * partials, ndim)
            args.update(gcoords_ptr=grad_coords, PARTIALS=partials, sgc_split=grad_coords[0].numel())
        if atomic_input_grad:
            args.update(ginp_ptr=grad_input, **named_strides("sgi", grad_input))
        else:
            # Never written; a one-element stand-in, since the autotuner zeroes this argument between trials.
            args.update(ginp_ptr=input.new_empty(1))
        args.update(
            gout_ptr=grad_output, **named_strides("sgo", grad_output), SPLITS=splits, PASS=codes.BACKWARD,
            EVEN_C=channels % launch.most("BLOCK_C") == 0,
            INPUT_GRAD=atomic_input_grad, COORD_GRAD=coords_grad,
            INDEX_64=needs_int64(grad_output, input, coords, args["ginp_ptr"], args["gcoords_ptr"]),
        )
        launch(lambda meta: (images * cdiv(pixels, meta["BLOCK_P"]), splits), **args)
    if atomic_input_grad:
        grad_input = grad_input.to(input.dtype)
    elif input_grad:
        grad_input = _deterministic_grad_input(grad_output, input, pixels, args)
    if coords_grad:
        grad_coords = _finish_coords_grad(grad_coords, coords, transform, images) if work else torch.zeros_like(coords)
    return grad_input, grad_coords


def _coords_grad_buffer(coords: torch.Tensor, transform: int, splits: int, rows: int, ndim: int) -> torch.Tensor:
    """What the backward kernel writes the points' gradient into, per channel split (see transforms.store_transform_grad)."""
    if transform == codes.GRID:  # every split writes every point
        return torch.empty((splits, *coords.shape), dtype=compute_dtype(coords.dtype), device=coords.device)
    # Rows past the blocks a launch uses are never written and must add nothing.
    shape = (coords.shape[1], 2) if transform == codes.TPS else (4, 4)
    return torch.zeros((splits, rows, *shape), dtype=compute_dtype(coords.dtype), device=coords.device)


def _finish_coords_grad(buffer: torch.Tensor, coords: torch.Tensor, transform: int, images: int) -> torch.Tensor:
    """Add the splits and each image's rows of partial sums (in order), and shape them as ``coords``."""
    total = buffer[0] if buffer.shape[0] == 1 else buffer.sum(dim=0)
    if transform == codes.GRID:
        return total.to(coords.dtype)
    per_image = total.view(images, -1, *total.shape[1:]).sum(dim=1)
    if transform != codes.TPS:
        per_image = per_image[:, : coords.shape[1], : coords.shape[2]]
    return per_image.to(coords.dtype)


def _deterministic_grad_input(grad_output, input, pixels: int, args: dict) -> torch.Tensor:
    """grad_input by sorting the taps by target pixel and summing each run in order (no atomics)."""
    grad_input = torch.zeros_like(input, memory_format=torch.preserve_format)
    images, channels = input.shape[:2]
    taps = args["TAPS"]
    entries = images * pixels * taps
    if entries == 0 or channels == 0:
        return grad_input
    keys = torch.empty(entries, dtype=torch.int64, device=input.device)
    weights = torch.empty(entries, dtype=compute_dtype(input.dtype), device=input.device)
    transform, mode = args["TRANSFORM"], args["MODE"]
    launch = _taps_kernel.choose(_shape_key("taps", input, transform, mode, pixels), _shape(input, mode, True),
                                 input.device)
    args.update(key_ptr=keys, weight_ptr=weights, PASS=codes.LIST_TAPS, SPLITS=1, INPUT_GRAD=False, COORD_GRAD=False,
                INDEX_64=needs_int64(input, args["coords_ptr"]))
    launch(lambda meta: (images * cdiv(pixels, meta["BLOCK_P"]),), **args)
    sorted_keys, order = torch.sort(keys, stable=True)
    run_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    launch = _sorted_kernel.choose(_shape_key("sorted", input, transform, mode, pixels), _shape(input, mode, True),
                                   input.device)
    launch(
        lambda meta: (cdiv(entries, meta["BLOCK_E"]), cdiv(channels, meta["BLOCK_C"])),
        gout_ptr=grad_output, ginp_ptr=grad_input, sorted_key_ptr=sorted_keys, order_ptr=order, run_end_ptr=run_end,
        weight_ptr=weights, E=entries, C=channels, D=args["D"], H=args["H"], W=args["W"],
        OD=args["OD"], OH=args["OH"], OW=args["OW"], **named_strides("sgo", grad_output),
        **named_strides("sgi", grad_input), TAPS=taps, F64=args["F64"], EVEN_C=channels % launch.most("BLOCK_C") == 0,
    )
    return grad_input


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
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[N, C, (D,) H, W] input sampled at the points of ``coords`` -> [N, C, *size] in ``out_dtype``.

    coords: a grid [N, *size, ndim] (transform GRID), theta [N, ndim, ndim + 1] (AFFINE), a
    homography [N, 3, 3] (PROJECTIVE) or spline coefficients [N, K + 3, 2] over control_points
    [K, 2] (TPS). fill [C]: kornia's 'fill' padding on top of zeros padding.
    """
    return sample_forward(input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners,
                          out_dtype)


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
    out_dtype: torch.dtype,
    input_grad: bool,
    coords_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_coords); a gradient not asked for comes back as an empty tensor."""
    return sample_backward(grad_output, input, coords, control_points, fill, size, transform, mode, padding_mode,
                           align_corners, out_dtype, input_grad, coords_grad, deterministic)


def _save(ctx, inputs, output) -> None:
    input, coords, control_points, fill, size, transform, mode, padding_mode, align_corners, out_dtype = inputs
    ctx.save_for_backward(input, coords, control_points, fill)
    ctx.options = (size, transform, mode, padding_mode, align_corners, out_dtype)


def _gradients(ctx, grad_output, backward):
    """The autograd formula of both ways in; ``backward`` is the backward op or its implementation."""
    input, coords, control_points, fill = ctx.saved_tensors
    input_grad, coords_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input, grad_coords = backward(
        grad_output, input, coords, control_points, fill, *ctx.options,
        input_grad, coords_grad, torch.are_deterministic_algorithms_enabled(),
    )
    if coords_grad and grad_coords.numel() != coords.numel():
        grad_coords = torch.zeros_like(coords)
    return (grad_input if input_grad else None), (grad_coords if coords_grad else None), *([None] * 8)


sample_op.register_autograd(lambda ctx, grad: _gradients(ctx, grad, sample_backward_op), setup_context=_save)
_Sample = eager_function("Sample", sample_forward, _save, _gradients, sample_backward)


def sample(input, coords, control_points, fill, size, transform, mode: str, padding_mode: str, align_corners: bool,
           out_dtype: torch.dtype):
    """The sampling op on validated arguments, modes and paddings by name."""
    inputs = (input, coords, control_points, fill, list(size), transform, codes.MODES[mode],
              codes.PADDING_MODES[padding_mode], align_corners, out_dtype)
    return call(sample_op, _Sample, sample_forward, inputs, (input, coords))


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton grid_sample on validated arguments (see ``stn_triton.functional.grid_sample``)."""
    return sample(input, grid, None, None, grid.shape[1:-1], codes.GRID, mode, padding_mode, align_corners, out_dtype)
