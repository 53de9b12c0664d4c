"""Sampling: the launches of the sampling engine, its autograd formulas, and the dispatch.

One op pair serves grid_sample and every fused warp: ``stn_triton::sample_fwd`` takes the sample
points either as a grid or as transform parameters (``SampleSpec.transform`` says which; see
kernels/codes.py) and ``stn_triton::sample_bwd`` returns the gradients of the input and of that
grid or those parameters. Both are ``triton_op``s, so ``torch.compile`` traces into their kernels
and CUDA graphs capture them; eager calls take the equivalent autograd.Functions
(ops/_dispatch.py).

Backward. The gradient of the points needs no atomics: each program reduces its own pixels over
its channels (and, for a transform, over its pixels, into per-program partial sums that the host
adds in a fixed order). grad_input is a scatter (many output pixels may read one input pixel).
By default it is an ``atomic_add`` into a float32 buffer (float64 for float64), so half dtypes
never accumulate in half. Under ``torch.use_deterministic_algorithms(True)`` it is a gather
instead: the kernel lists every (output pixel, tap) pair with the grad_input element it adds to,
and ops/sorted_scatter.py sums each element's list in a fixed order.

Double backward. grad_input is linear in grad_output, ``S^T(grad_output)``, so its own gradient
is the forward again (d<v, grad_input>/d grad_output = S(v)) and the points' gradient with v in
place of the input (d<v, grad_input>/d points = G(v, grad_output)): both kernels exist, and a
gradient penalty on the input (WGAN-GP, R1) differentiates through them. The gradient of the
points' gradient needs second derivatives of the tap weights and raises instead.
"""

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch.library import triton_op

from stn_triton.kernels import codes
from stn_triton.numerics import cdiv, compute_dtype
from stn_triton.ops._dispatch import OpRules, call, fold, no_forward_ad, per_sample, unfold
from stn_triton.ops._launch import (
    channels_last,
    empty_like_layout,
    grid_strides,
    multiprocessors,
    named_strides,
    needs_int64,
    spatial_size,
)
from stn_triton.ops.sample_configs import bwd_kernel, fwd_kernel, taps_kernel
from stn_triton.ops.sorted_scatter import key_dtype, scatter_sorted
from stn_triton.tuning import bucket


@dataclass(frozen=True)
class SampleSpec:
    """What a sampling call computes besides its tensors: built once per call, kept for the backward."""

    size: tuple[int, ...]  # output spatial size, (H, W) or (D, H, W)
    transform: int  # where the points come from: codes.GRID, AFFINE, PROJECTIVE or TPS
    mode: int  # codes.BILINEAR, NEAREST or BICUBIC
    padding: int  # codes.ZEROS, BORDER or REFLECTION ('fill' is ZEROS plus a fill tensor)
    align_corners: bool
    out_dtype: torch.dtype

    def op_args(self) -> tuple:
        return list(self.size), self.transform, self.mode, self.padding, self.align_corners, self.out_dtype

    @classmethod
    def from_op_args(cls, args) -> "SampleSpec":
        size, *rest = args
        return cls(tuple(size), *rest)

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def pixels(self) -> int:
        """Output pixels per image (P)."""
        return math.prod(self.size)

    @property
    def taps(self) -> int:
        """Input pixels one output pixel reads."""
        return 1 if self.mode == codes.NEAREST else 16 if self.mode == codes.BICUBIC else 2**self.ndim


@dataclass(frozen=True)
class SampleBackwardSpec:
    """A backward's spec: the forward's, and which gradients it computes how."""

    sample: SampleSpec
    input_grad: bool
    coords_grad: bool
    deterministic: bool  # grad_input without atomics (torch.use_deterministic_algorithms)

    def op_args(self) -> tuple:
        return *self.sample.op_args(), self.input_grad, self.coords_grad, self.deterministic

    @classmethod
    def from_op_args(cls, args) -> "SampleBackwardSpec":
        return cls(SampleSpec.from_op_args(args[:6]), *args[6:])


# --- launches -----------------------------------------------------------------------------------


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


def heuristic_shape(input: torch.Tensor, spec: SampleSpec, backward: bool) -> dict:
    """What the sampling heuristic reads of a call."""
    return dict(channels=input.shape[1], nhwc=channels_last(input), taps=spec.taps, backward=backward)


def shape_key(pass_: str, input: torch.Tensor, spec: SampleSpec) -> str:
    """A sampling kernel's key in the tuned tables: pass, dtype, transform, mode, bucketed sizes, layout."""
    layout = "nhwc" if channels_last(input) else "nchw"
    return (f"{pass_}|{input.dtype}|t{spec.transform}|m{spec.mode}|d{spec.ndim}|c{bucket(input.shape[1])}"
            f"|p{bucket(spec.pixels)}|{layout}")


def _coords_strides(coords: torch.Tensor, transform: int) -> dict[str, int]:
    """The points' strides by kernel name: the grid's (n, d, h, w, k) or the parameters' (n, row, col)."""
    strides = grid_strides(coords) if transform == codes.GRID else (*coords.stride(), 0, 0)
    return dict(zip(("s0", "s1", "s2", "s3", "s4"), strides))


def _arguments(input, coords, control_points, fill, spec: SampleSpec) -> dict:
    """The kernel arguments every pass shares, by name; passes add their own and override stand-ins.

    A pointer a pass does not use gets ``coords`` as a stand-in (never read or written there).
    Input, points and output may differ in dtype (autocast); the kernel computes in float64 when
    any of them is float64, else in float32.
    """
    d, h, w = spatial_size(input)
    od, oh, ow = spec.size if spec.ndim == 3 else (1, *spec.size)
    stand_in = coords
    return dict(
        x_ptr=input, coords_ptr=coords, ctrl_ptr=control_points if control_points is not None else stand_in,
        fill_ptr=fill if fill is not None else stand_in, y_ptr=stand_in, gy_ptr=stand_in, gx_ptr=stand_in,
        gcoords_ptr=stand_in, key_ptr=stand_in, weight_ptr=stand_in, source_ptr=stand_in,
        P=od * oh * ow, C=input.shape[1], D=d, H=h, W=w, OD=od, OH=oh, OW=ow,
        CP=0 if control_points is None else control_points.shape[0], PARTIALS=0, SPLITS=1,
        **named_strides("sx", input), **_coords_strides(coords, spec.transform),
        sy_n=0, sy_c=0, sy_p=0, **dict.fromkeys(("sgy_n", "sgy_c", "sgy_d", "sgy_h", "sgy_w"), 0),
        **dict.fromkeys(("sgx_n", "sgx_c", "sgx_d", "sgx_h", "sgx_w"), 0), sgc_split=0,
        PASS=codes.FORWARD, TRANSFORM=spec.transform, MODE=spec.mode, PADDING=spec.padding, FILL=fill is not None,
        ALIGN_CORNERS=spec.align_corners, NDIM=spec.ndim, TAPS=spec.taps,
        F64=torch.float64 in (input.dtype, coords.dtype, spec.out_dtype),
        INDEX_64=False, INPUT_GRAD=False, COORD_GRAD=False, EVEN_C=False,
    )


def sample_forward(input, coords, control_points, fill, spec: SampleSpec) -> torch.Tensor:
    """[N, C, (D,) H, W] input sampled at the points of ``coords`` -> [N, C, *spec.size] (see ``sample_op``)."""
    out = empty_like_layout(input, (*input.shape[:2], *spec.size), spec.out_dtype)
    if out.numel() == 0:
        return out
    images, channels = input.shape[:2]
    pixels = spec.pixels
    launch = fwd_kernel.choose(shape_key("fwd", input, spec), heuristic_shape(input, spec, False), input.device)
    splits = channel_splits(images, pixels, channels, launch, input.device)
    args = _arguments(input, coords, control_points, fill, spec)
    args.update(y_ptr=out, sy_n=out.stride(0), sy_c=out.stride(1), sy_p=out.stride(-1), SPLITS=splits,
                EVEN_C=channels % launch.most("BLOCK_C") == 0, INDEX_64=needs_int64(input, coords, out))
    launch(lambda meta: (images * cdiv(pixels, meta["BLOCK_P"]), splits), **args)
    return out


def sample_backward(grad_output, input, coords, control_points, fill, spec: SampleBackwardSpec):
    """(grad_input, grad_coords); a gradient not asked for comes back as an empty tensor, one asked
    for always has its tensor's shape."""
    forward = spec.sample
    images, channels = input.shape[:2]
    pixels = forward.pixels
    coords_grad = spec.coords_grad and forward.mode != codes.NEAREST  # nearest is piecewise constant in the points
    atomic_input_grad = spec.input_grad and not spec.deterministic
    args = _arguments(input, coords, control_points, fill, forward)
    grad_input = input.new_empty(0)
    if atomic_input_grad:
        grad_input = torch.zeros_like(input, dtype=compute_dtype(input.dtype), memory_format=torch.preserve_format)
    grad_coords = coords.new_empty(0)
    work = images * pixels > 0 and channels > 0
    if work and (atomic_input_grad or coords_grad):
        key = shape_key("bwd" if atomic_input_grad else "bwd-coords", input, forward)
        launch = bwd_kernel.choose(key, heuristic_shape(input, forward, True), input.device)
        splits = channel_splits(images, pixels, channels, launch, input.device)
        # A transform's gradient is one row of partial sums per block of pixels; the rows an image gets
        # are fixed by the smallest block the launch may use, so any block fits the buffer.
        partials = cdiv(pixels, launch.least("BLOCK_P"))
        if coords_grad:
            grad_coords = _coords_grad_buffer(coords, forward.transform, splits, images * partials)
            args.update(gcoords_ptr=grad_coords, PARTIALS=partials, sgc_split=grad_coords[0].numel())
        if atomic_input_grad:
            args.update(gx_ptr=grad_input, **named_strides("sgx", grad_input))
        else:
            # Never written; a one-element stand-in, since the autotuner zeroes this argument between trials.
            args.update(gx_ptr=input.new_empty(1))
        args.update(
            gy_ptr=grad_output, **named_strides("sgy", grad_output), SPLITS=splits, PASS=codes.BACKWARD,
            EVEN_C=channels % launch.most("BLOCK_C") == 0,
            INPUT_GRAD=atomic_input_grad, COORD_GRAD=coords_grad,
            INDEX_64=needs_int64(grad_output, input, coords, args["gx_ptr"], args["gcoords_ptr"]),
        )
        launch(lambda meta: (images * cdiv(pixels, meta["BLOCK_P"]), splits), **args)
    if atomic_input_grad:
        grad_input = grad_input.to(input.dtype)
    elif spec.input_grad:
        grad_input = _deterministic_grad_input(grad_output, input, forward, args)
    if coords_grad:
        grad_coords = _finish_coords_grad(grad_coords, coords, forward.transform, images) if work else torch.zeros_like(coords)
    elif spec.coords_grad:
        grad_coords = torch.zeros_like(coords)
    return grad_input, grad_coords


def _coords_grad_buffer(coords: torch.Tensor, transform: int, splits: int, rows: int) -> torch.Tensor:
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


def _deterministic_grad_input(grad_output, input, spec: SampleSpec, args: dict) -> torch.Tensor:
    """grad_input without atomics: list every (output pixel, tap) contribution, then sum each input
    pixel's contributions in a fixed order (ops/sorted_scatter.py)."""
    grad_input = torch.zeros_like(input, memory_format=torch.preserve_format)
    images, channels = input.shape[:2]
    outputs = images * spec.pixels
    entries = outputs * spec.taps
    if entries == 0 or channels == 0:
        return grad_input
    keys = torch.empty(entries, dtype=key_dtype(grad_input.numel()), device=input.device)
    weights = torch.empty(entries, dtype=compute_dtype(input.dtype), device=input.device)
    sources = torch.empty(outputs, dtype=torch.int64, device=input.device)
    key = shape_key("taps", input, spec)
    launch = taps_kernel.choose(key, heuristic_shape(input, spec, True), input.device)
    args.update(key_ptr=keys, weight_ptr=weights, source_ptr=sources, PASS=codes.LIST_TAPS, SPLITS=1,
                INPUT_GRAD=False, COORD_GRAD=False, INDEX_64=needs_int64(input, args["coords_ptr"]),
                **named_strides("sgy", grad_output), **named_strides("sgx", grad_input))
    launch(lambda meta: (images * cdiv(spec.pixels, meta["BLOCK_P"]),), **args)
    scatter_sorted(grad_input, grad_input.stride(1), channels, keys, weights, sources, grad_output,
                   grad_output.stride(1), destinations=grad_input.numel() // max(channels, 1), key=key)
    return grad_input


# --- ops, autograd, vmap --------------------------------------------------------------------------


@triton_op("stn_triton::sample_fwd", mutates_args=())
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
    spec = SampleSpec(tuple(size), transform, mode, padding_mode, align_corners, out_dtype)
    return sample_forward(input, coords, control_points, fill, spec)


@triton_op("stn_triton::sample_bwd", mutates_args=())
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
    spec = SampleBackwardSpec(SampleSpec(tuple(size), transform, mode, padding_mode, align_corners, out_dtype),
                              input_grad, coords_grad, deterministic)
    return sample_backward(grad_output, input, coords, control_points, fill, spec)


def sample(input, coords, control_points, fill, spec: SampleSpec) -> torch.Tensor:
    """The sampling op: through its Function when a gradient or transform needs it (see _dispatch.call)."""
    return call(sample_op, _Sample, sample_forward, (input, coords, control_points, fill), spec, (input, coords))


def sample_grads(grad_output, input, coords, control_points, fill, spec: SampleBackwardSpec):
    """The sampling backward, differentiable in turn where ``create_graph`` asks for it."""
    return call(sample_backward_op, _SampleBackward, sample_backward, (grad_output, input, coords, control_points, fill),
                spec, (grad_output, input, coords))


def _save(ctx, tensors, spec: SampleSpec, output) -> None:
    ctx.save_for_backward(*tensors)
    ctx.spec = spec


def _gradients(ctx, grad_output):
    input, coords, control_points, fill = ctx.saved_tensors
    input_grad, coords_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (input_grad or coords_grad):
        return None, None, None, None
    spec = SampleBackwardSpec(ctx.spec, input_grad, coords_grad, torch.are_deterministic_algorithms_enabled())
    grad_input, grad_coords = sample_grads(grad_output, input, coords, control_points, fill, spec)
    return (grad_input if input_grad else None), (grad_coords if coords_grad else None), None, None


def _foldable(in_dims) -> bool:
    """Only (input, points, ...) carry the vmapped dimension: the control points and fill that follow do not."""
    return all(dim is None for dim in in_dims[2:])


def _vmap(info, in_dims, tensors, spec: SampleSpec):
    """vmap of the forward: the vmapped dimension folded into the images."""
    if not _foldable(in_dims):
        return per_sample(info, in_dims, tensors, lambda *args: sample(*args, spec))
    size = info.batch_size
    input, coords, control_points, fill = tensors
    out = sample(fold(input, in_dims[0], size), fold(coords, in_dims[1], size), control_points, fill, spec)
    return unfold(out, size)


def _save_backward(ctx, tensors, spec: SampleBackwardSpec, output) -> None:
    grad_output, _, coords, control_points, _ = tensors
    ctx.save_for_backward(grad_output, coords, control_points)
    ctx.spec = spec
    ctx.set_materialize_grads(False)


def _double_gradients(ctx, grad_grad_input, grad_grad_coords):
    """Gradients of (grad_input, grad_coords) with respect to (grad_output, input, coords, ...)."""
    spec = ctx.spec
    if grad_grad_coords is not None and spec.coords_grad and spec.sample.mode != codes.NEAREST:
        raise NotImplementedError(
            "stn_triton: the gradient of the sample points (grid, theta, homography or source points) cannot be "
            "differentiated again (it needs second derivatives of the tap weights); the input's gradient can "
            "(a gradient penalty on the input differentiates through it)"
        )
    if grad_grad_input is None:
        return None, None, None, None, None
    grad_output, coords, control_points = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_grad_output = grad_coords = None
    if needs[0]:  # d<v, S^T(go)>/d go = S(v)
        forward = replace(spec.sample, out_dtype=grad_output.dtype)
        grad_grad_output = sample(grad_grad_input, coords, control_points, None, forward)
    if needs[2]:  # d<v, S^T(go)>/d points = the points' gradient with v as the input
        coords_spec = SampleBackwardSpec(spec.sample, False, True, spec.deterministic)
        _, grad_coords = sample_grads(grad_output, grad_grad_input, coords, control_points, None, coords_spec)
    return grad_grad_output, None, grad_coords, None, None


def _vmap_backward(info, in_dims, tensors, spec: SampleBackwardSpec):
    """vmap of the backward (batched gradients, per-sample gradients): folded as the forward is."""
    if not _foldable(in_dims[1:]):
        return per_sample(info, in_dims, tensors, lambda *args: sample_grads(*args, spec))
    size = info.batch_size
    grad_output, input, coords, control_points, fill = tensors
    grad_input, grad_coords = sample_grads(fold(grad_output, in_dims[0], size), fold(input, in_dims[1], size),
                                           fold(coords, in_dims[2], size), control_points, fill, spec)
    (grad_input, input_dim), (grad_coords, coords_dim) = unfold(grad_input, size), unfold(grad_coords, size)
    return (grad_input, grad_coords), (input_dim, coords_dim)


_Sample = OpRules("Sample", 4, sample_forward, _save, _gradients, _vmap,
                  no_forward_ad("stn_triton's grid_sample")).register(sample_op, SampleSpec)
_SampleBackward = OpRules("SampleBackward", 5, sample_backward, _save_backward, _double_gradients, _vmap_backward,
                          no_forward_ad("stn_triton's grid_sample backward")).register(
    sample_backward_op, SampleBackwardSpec)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, align_corners: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton grid_sample on validated arguments (see ``stn_triton.functional.grid_sample``)."""
    spec = SampleSpec(tuple(grid.shape[1:-1]), codes.GRID, codes.MODES[mode], codes.PADDING_MODES[padding_mode],
                      align_corners, out_dtype)
    return sample(input, grid, None, None, spec)
