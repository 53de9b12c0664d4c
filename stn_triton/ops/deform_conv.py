"""deform_conv2d as torch.library ops: the shape arithmetic, the fused implicit-GEMM launches, their autograd.

Forward: one kernel samples the offset taps into the A tile and multiplies it with the weight
(no column buffer). Backward: one kernel forms the column gradient grad_y @ W^T per tap in
registers, scatters it into grad_input (atomics into a float32 buffer for half dtypes) and
reduces it into grad_offset / grad_mask (no atomics: one program per pixel block and offset
group); another forms grad_weight as an implicit GEMM over the pixels, split over pixel ranges
(enough programs to fill the GPU) whose partial sums the host adds in order (no atomics);
grad_bias is a sum over grad_y. Every kernel has a config space, a heuristic for shapes no tuned
table holds, and a tuned-table key (``stn_triton.tuning``).

Under ``torch.use_deterministic_algorithms(True)`` grad_input avoids atomics: the data kernel
writes the column gradient, every (pixel, tap, offset group, corner) read lists its target input
pixel, a stable sort groups the reads by target, and a gather sums each group in that fixed order.

Gather layout: the kernels read one contiguous run of channels per (pixel, tap, corner) from
channels-last memory, with a warp's threads along the channels. An NCHW input whose channel
runs fill at least a 32-byte sector is copied to channels-last first (one read and one write of
the input, against up to 4 corners x K taps x output-channel blocks gathers of each element);
one with shorter runs is gathered as it is, threads along pixels (``gather_channels_last``).
The weight is always taken channels-last, so that a GEMM B tile is contiguous along its
reduction (input channel) dimension.

float32 GEMMs follow PyTorch's switches as torchvision's do: TF32 when
``torch.backends.cuda.matmul`` allows it (``torch.set_float32_matmul_precision("high")`` or
``"medium"``, or ``allow_tf32``); else ``FLOAT32_PRECISION`` (``dot_precision``).
"""

from typing import NamedTuple, Optional

import torch
import triton
from torch.library import triton_op

from stn_triton.backend import interpreting
from stn_triton.conv_shape import DeformConvShape
from stn_triton.kernels.deform_conv import (
    _deform_conv_bwd_data_kernel,
    _deform_conv_bwd_sorted_kernel,
    _deform_conv_bwd_weight_kernel,
    _deform_conv_fwd_kernel,
    _deform_conv_taps_kernel,
)
from stn_triton.numerics import INT32_LIMIT, cdiv, compute_dtype, next_power_of_2
from stn_triton.ops._dispatch import call as dispatch
from stn_triton.ops._dispatch import eager_function
from stn_triton.ops._launch import channels_last, empty_like_layout, multiprocessors, needs_int64
from stn_triton.tuning import TunedKernel, bucket

# --- precision and layout -----------------------------------------------------------------------

# tl.dot precision of float32 GEMMs that PyTorch's switches keep in float32. "tf32x3" splits each
# operand into a TF32 head and a TF32 tail and adds three tensor-core products (tail x tail dropped):
# about 2^-21 relative error per product against float32 FMA's 2^-24, both under the error of the
# float32 accumulation they share. Emulated at dcn_r50's reduction length (9 x 256), its error against
# float64 is float32 FMA's (2.6e-7 RMS relative; TF32 alone 2.9e-4). Three TF32 products still take
# 1/2.5 of the time of FMA on an H100 (495 against 67 TFLOP/s). "ieee" is float32 FMA, for comparison.
FLOAT32_PRECISION = "tf32x3"


def tf32_allowed() -> bool:
    """Whether PyTorch lets float32 matrix products round their inputs to TF32, as cuBLAS reads it."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9: the setting, resolved
    if precision is not None:
        return precision == "tf32"
    return matmul.allow_tf32


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot input precision of the deform_conv kernels for tensors of ``dtype``."""
    if dtype != torch.float32:
        return "ieee"  # float64 is exact; half operands ignore it
    return "tf32" if tf32_allowed() else FLOAT32_PRECISION


# "auto": gather_channels_last's rule; "channels_last": always (copying an NCHW input); "input":
# never copy (gather along channels only from channels-last memory). perf/ sets it to time both.
GATHER_LAYOUT = "auto"
SECTOR_BYTES = 32  # the unit of a global memory transaction


def gather_channels_last(input: torch.Tensor, shape: DeformConvShape) -> bool:
    """Whether the kernels gather channels-fastest from channels-last memory (copying an NCHW input).

    Yes when one sample point's channels, the run a program reads from one offset group of one
    conv group, fill at least one 32-byte sector: then a warp's load of one (pixel, corner) is one
    transaction per sector instead of one per channel. Shorter runs gather along pixels, which
    neighbouring output pixels make neighbouring.
    """
    if GATHER_LAYOUT == "channels_last":
        return True
    if GATHER_LAYOUT == "input":
        return channels_last(input)
    run = min(shape.group_channels, shape.offset_group_channels) * input.element_size()
    return run >= SECTOR_BYTES


def _gather_source(input: torch.Tensor, channels_fastest: bool) -> torch.Tensor:
    """The tensor the kernels gather from: contiguous NCHW or channels-last, so that a zeros_like of it
    (grad_input's buffer) has its strides exactly; channels-last when gathering channels-fastest."""
    if channels_fastest:
        return input.contiguous(memory_format=torch.channels_last)
    if input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last):
        return input
    return input.contiguous()


def pixel_stride(t: torch.Tensor) -> int | None:
    """The stride of the flat pixel p = y * W + x of a [N, C, H, W] tensor; None when no single stride steps it."""
    _, _, h, w = t.shape
    if w == 1:
        return t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(3)
    return None


def _dense_pixels(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its pixels are not evenly spaced (the kernels address them flat)."""
    return t if pixel_stride(t) is not None else t.contiguous()


def _strides(prefix: str, t: torch.Tensor, dims: str = "nchw") -> dict[str, int]:
    """{prefix_n, prefix_c, prefix_h, prefix_w} strides of a [N, C, H, W] tensor (``dims`` names them)."""
    return {f"{prefix}_{dim}": stride for dim, stride in zip(dims, t.stride())}


def _pixel_strides(prefix: str, t: torch.Tensor) -> dict[str, int]:
    """{prefix_n, prefix_c, prefix_p} strides of a [N, C, H, W] tensor with dense pixels."""
    return {f"{prefix}_n": t.stride(0), f"{prefix}_c": t.stride(1), f"{prefix}_p": pixel_stride(t)}


class _Call(NamedTuple):
    """What every launch of one deform_conv2d call shares."""

    shape: DeformConvShape
    x: torch.Tensor  # the input the kernels gather from (a channels-last copy, or the input)
    offset: torch.Tensor  # with dense pixels
    mask: torch.Tensor  # with dense pixels; the offsets when there is no mask (never read)
    weight: torch.Tensor  # channels-last
    conv: dict  # stride_h, ..., dil_w
    meta: dict  # the constexprs every GEMM kernel takes
    key: str  # the shape part of the tuned-table keys
    heuristic_shape: dict  # what the heuristics read


def _prepare(input, offset, weight, mask, stride, padding, dilation) -> _Call:
    shape = DeformConvShape.of(input.shape, offset.shape, weight.shape, stride, padding, dilation)
    channels_fastest = gather_channels_last(input, shape)
    x = _gather_source(input, channels_fastest)
    low_precision = input.dtype in (torch.float16, torch.bfloat16)
    if interpreting() and input.dtype == torch.bfloat16:
        low_precision = False  # the interpreter's bfloat16 tl.dot is wrong; float32 operands are exact
    precision = dot_precision(input.dtype)
    offset = _dense_pixels(offset)
    layout = "nhwc" if channels_fastest else "nchw"
    return _Call(
        shape=shape,
        x=x,
        offset=offset,
        mask=_dense_pixels(mask) if mask is not None else offset,
        weight=weight.contiguous(memory_format=torch.channels_last),
        conv=dict(stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
                  dil_h=dilation[0], dil_w=dilation[1]),
        meta=dict(HAS_MASK=mask is not None, F64=input.dtype == torch.float64, LOW_PRECISION=low_precision,
                  INPUT_PRECISION=precision, CHANNELS_FASTEST=channels_fastest),
        key=(f"{input.dtype}|{precision}|cg{bucket(shape.group_channels)}|cog{bucket(shape.group_out_channels)}"
             f"|cpg{bucket(shape.offset_group_channels)}|k{shape.taps}|mask{mask is not None}"
             f"|m{bucket(shape.rows)}|{layout}"),
        heuristic_shape=dict(rows=shape.rows, group_channels=shape.group_channels,
                             group_out_channels=shape.group_out_channels,
                             offset_group_channels=shape.offset_group_channels, dtype=input.dtype,
                             channels_fastest=channels_fastest),
    )


# --- configs ------------------------------------------------------------------------------------

# Under the interpreter programs run one after another in numpy: few, large ones.
INTERPRETER_BLOCKS = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)
GEMM_KEY = ["CG", "COG", "CPG", "K", "HAS_MASK", "F64", "LOW_PRECISION", "INPUT_PRECISION", "CHANNELS_FASTEST"]


def _block_configs(blocks) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in blocks]


def _channel_block(group_channels: int, offset_group_channels: int, widest: int) -> int:
    """Input channels per GEMM step: a power of two from 16 (tl.dot's least) to ``widest``, no wider than a run."""
    return max(16, min(widest, next_power_of_2(min(group_channels, offset_group_channels))))


# BLOCK_M: output pixels (GEMM rows: 32, 64 or 128); BLOCK_N: output channels; BLOCK_K: input channels of
# one tap. Every config below compiles spill-free for sm_90 in float32 (tf32x3 and tf32), float16 and
# bfloat16 at dcn_r50's shape (triton 3.9, ptxas 13.4; an NCHW input gathered channels-last); the
# heuristics' picks list their registers per thread as (tf32x3 / tf32 / bfloat16).
FWD_CONFIGS = _block_configs([(64, 128, 32, 8, 2), (64, 64, 32, 8, 2), (128, 64, 32, 8, 2), (64, 64, 32, 4, 2),
                              (64, 64, 16, 4, 2), (128, 64, 16, 8, 3), (32, 32, 16, 4, 2)])
DATA_CONFIGS = _block_configs([(64, 32, 32, 8, 2), (64, 32, 16, 4, 2), (128, 32, 16, 8, 2)])
WEIGHT_CONFIGS = _block_configs([(64, 64, 64, 8, 2), (64, 128, 32, 8, 2), (32, 32, 16, 4, 2)])
# float64 multiplies on FMA units (no tensor cores): small tiles, 134-188 registers in every kernel.
FLOAT64_BLOCKS = (32, 32, 16, 4, 2)


def _config(blocks) -> triton.Config:
    return _block_configs([blocks])[0]


def _fwd_heuristic(rows, group_channels, group_out_channels, offset_group_channels, dtype, channels_fastest):
    """64 pixels x 128 output channels on 8 warps (226 / 164 / 127 registers): each gathered A tile then
    serves twice the output channels that 64 would, at the same one program of 8 warps per SM in float32
    (two in half precision). Groups of fewer than 128 output channels: 64 (158 / 144 / 100)."""
    if dtype == torch.float64:
        return _config(FLOAT64_BLOCKS)
    block_n = 128 if group_out_channels >= 128 else 64
    return _config((64, block_n, _channel_block(group_channels, offset_group_channels, 32), 8, 2))


def _data_heuristic(rows, group_channels, group_out_channels, offset_group_channels, dtype, channels_fastest):
    """64 pixels x 32 input channels on 8 warps, the column gradient summed over 32 output channels at a
    time (248 / 217 / 205 registers): the column gradient, one gathered corner and the MMA operands are
    live at once; 4 warps, 64-channel tiles or 32-pixel tiles spill in float32."""
    if dtype == torch.float64:
        return _config(FLOAT64_BLOCKS)
    return _config((64, 32, _channel_block(group_channels, offset_group_channels, 32), 8, 2))


def _weight_heuristic(rows, group_channels, group_out_channels, offset_group_channels, dtype, channels_fastest):
    """64 output channels x 64 input channels, reduced over 64 pixels at a time on 8 warps
    (246 / 186 / 164 registers): a 64-row tile is the least the Hopper tensor-core MMA takes."""
    if dtype == torch.float64:
        return _config(FLOAT64_BLOCKS)
    return _config((64, 64, _channel_block(group_channels, offset_group_channels, 64), 8, 2))


_fwd_kernel = TunedKernel(
    "deform_conv_fwd", _deform_conv_fwd_kernel, FWD_CONFIGS, _fwd_heuristic, GEMM_KEY,
    writes=("out_ptr",), interpreter_config=INTERPRETER_BLOCKS,
)
_bwd_data_kernel = TunedKernel(
    "deform_conv_bwd_data", _deform_conv_bwd_data_kernel, DATA_CONFIGS, _data_heuristic,
    GEMM_KEY + ["INPUT_GRAD", "COLUMNS", "OFFSET_GRAD", "MASK_GRAD"],
    writes=("gx_ptr", "col_ptr", "goff_ptr", "gmask_ptr"), reset_to_zero=["gx_ptr"], interpreter_config=INTERPRETER_BLOCKS,
)
_bwd_weight_kernel = TunedKernel(
    "deform_conv_bwd_weight", _deform_conv_bwd_weight_kernel, WEIGHT_CONFIGS, _weight_heuristic, GEMM_KEY,
    writes=("gw_ptr",), interpreter_config=INTERPRETER_BLOCKS,
)
# The taps kernel is integer arithmetic and two stores per corner: 32-48 registers in every config.
_taps_kernel = TunedKernel(
    "deform_conv_taps", _deform_conv_taps_kernel,
    [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (64, 128, 256) for w in (2, 4, 8)],
    lambda **shape: triton.Config({"BLOCK_M": 128}, num_warps=4), ["K", "G", "F64"],
    writes=("key_ptr", "weight_ptr"), interpreter_config=triton.Config({"BLOCK_M": 128}, num_warps=4),
)
# The sorted gather is spill-free with 4 warps at every BLOCK_E (perf/results/static/sm90.csv).
_sorted_kernel = TunedKernel(
    "deform_conv_bwd_sorted", _deform_conv_bwd_sorted_kernel,
    [triton.Config({"BLOCK_E": e}, num_warps=w) for e in (32, 64, 128) for w in (4, 8)],
    lambda **shape: triton.Config({"BLOCK_E": 64}, num_warps=4), ["CPG", "K", "F64"],
    writes=("gx_ptr",), interpreter_config=triton.Config({"BLOCK_E": 64}, num_warps=4),
)

# The weight gradient's pixel reduction is split until there are this many programs per SM (at
# 64 x 64 tiles), each split summing at least MIN_SPLIT_ROWS pixels.
PROGRAMS_PER_SM = 4
MIN_SPLIT_ROWS = 256
ROW_ALIGN = 128  # the largest BLOCK_M: images are padded to it in grad_weight's row space


def padded_pixels(pixels: int) -> int:
    """An image's rows in grad_weight's row space: its pixels rounded up to a multiple of ROW_ALIGN."""
    return cdiv(pixels, ROW_ALIGN) * ROW_ALIGN


def weight_grad_splits(rows: int, tiles: int, sms: int) -> tuple[int, int]:
    """(splits, rows per split) of grad_weight's reduction over ``rows`` rows for ``tiles`` output tiles."""
    splits = max(1, min(cdiv(PROGRAMS_PER_SM * sms, tiles), rows // MIN_SPLIT_ROWS))
    rows_per_split = cdiv(cdiv(rows, splits), ROW_ALIGN) * ROW_ALIGN
    return cdiv(rows, rows_per_split), rows_per_split


# --- ops ----------------------------------------------------------------------------------------


def deform_conv2d_forward(input, offset, weight, bias, mask, stride, padding, dilation) -> torch.Tensor:
    """[N, C, H, W] input, offsets [N, 2 G K, HO, WO], weight [COUT, C / groups, KH, KW] -> [N, COUT, HO, WO]."""
    call = _prepare(input, offset, weight, mask, stride, padding, dilation)
    shape = call.shape
    out = empty_like_layout(input, (shape.batch, shape.out_channels, shape.out_h, shape.out_w))
    if out.numel() == 0:
        return out
    launch = _fwd_kernel.choose("fwd|" + call.key, call.heuristic_shape, input.device)
    cog, pixels = shape.group_out_channels, shape.pixels
    launch(
        lambda meta: (shape.batch * cdiv(pixels, meta["BLOCK_M"]), shape.groups * cdiv(cog, meta["BLOCK_N"])),
        x_ptr=call.x, off_ptr=call.offset, mask_ptr=call.mask, w_ptr=call.weight,
        b_ptr=bias.contiguous() if bias is not None else call.weight, out_ptr=out,  # the kernel reads b_ptr + co
        P=pixels, H=shape.height, W=shape.width, WO=shape.out_w, KW=shape.kernel_w, K=shape.taps,
        CG=shape.group_channels, COG=cog, CPG=shape.offset_group_channels, **call.conv,
        **_strides("sx", call.x), **_pixel_strides("so", call.offset), **_pixel_strides("sm", call.mask),
        **_strides("sw", call.weight, "oihw"), **_pixel_strides("sy", out),
        HAS_BIAS=bias is not None, INDEX_64=needs_int64(call.x, call.offset, call.mask, out), **call.meta,
    )
    return out


def deform_conv2d_backward(grad_output, input, offset, weight, mask, stride, padding, dilation, input_grad,
                           offset_grad, weight_grad, mask_grad, deterministic):
    """(grad_input, grad_offset, grad_weight, grad_mask); one not asked for is an empty tensor."""
    call = _prepare(input, offset, weight, mask, stride, padding, dilation)
    shape = call.shape
    grad_output = _dense_pixels(grad_output)
    mask_grad = mask_grad and mask is not None
    atomic_input_grad = input_grad and not deterministic
    sorted_input_grad = input_grad and deterministic
    # A gradient not asked for is a fresh empty tensor: a custom op's outputs may not alias each other.
    empty = input.new_empty
    # With x's strides (the kernel addresses both alike), so its atomics add along contiguous channels
    # when the gather does; in float32 for half dtypes.
    gx = torch.zeros_like(call.x, dtype=compute_dtype(input.dtype)) if atomic_input_grad else empty(0)
    work = shape.rows > 0 and shape.channels > 0 and shape.out_channels > 0
    # The data kernel stores every element of these when it runs; they are zeros only when it does not.
    fresh = torch.empty if work else torch.zeros
    grad_offset = fresh(offset.shape, dtype=offset.dtype, device=offset.device) if offset_grad else empty(0)
    grad_mask = fresh(mask.shape, dtype=mask.dtype, device=mask.device) if mask_grad else empty(0)
    columns = empty(0)
    if sorted_input_grad:
        columns = fresh((shape.rows, shape.taps, shape.channels), dtype=compute_dtype(input.dtype),
                        device=input.device)
    if work and (input_grad or offset_grad or mask_grad):
        # Never written unless INPUT_GRAD; a one-element stand-in then, since the autotuner zeroes it between trials.
        gx_arg = gx if atomic_input_grad else empty(1)
        launch = _bwd_data_kernel.choose("bwd_data|" + call.key, call.heuristic_shape, input.device)
        launch(
            lambda meta: (shape.batch * cdiv(shape.pixels, meta["BLOCK_M"]), shape.offset_groups),
            gy_ptr=grad_output, x_ptr=call.x, off_ptr=call.offset, mask_ptr=call.mask, w_ptr=call.weight,
            gx_ptr=gx_arg, col_ptr=columns if sorted_input_grad else gx_arg,
            goff_ptr=grad_offset if offset_grad else call.offset, gmask_ptr=grad_mask if mask_grad else call.mask,
            P=shape.pixels, C=shape.channels, H=shape.height, W=shape.width, WO=shape.out_w, KW=shape.kernel_w,
            K=shape.taps, CG=shape.group_channels, COG=shape.group_out_channels, CPG=shape.offset_group_channels,
            **call.conv, **_strides("sx", call.x), **_pixel_strides("so", call.offset),
            **_pixel_strides("sm", call.mask), **_strides("sw", call.weight, "oihw"), **_pixel_strides("sgy", grad_output),
            INDEX_64=needs_int64(grad_output, call.x, call.offset, call.mask, gx_arg, columns),
            INPUT_GRAD=atomic_input_grad, COLUMNS=sorted_input_grad, OFFSET_GRAD=offset_grad, MASK_GRAD=mask_grad,
            **call.meta,
        )
    grad_input = empty(0)
    if atomic_input_grad:
        grad_input = gx.to(input.dtype, memory_format=_memory_format(input))
    elif sorted_input_grad:
        grad_input = _sorted_grad_input(columns, call) if work else torch.zeros_like(call.x)
        grad_input = grad_input.to(memory_format=_memory_format(input))
    grad_weight = empty(0)
    if weight_grad:
        grad_weight = _weight_grad(grad_output, call) if work else torch.zeros_like(
            weight, memory_format=torch.contiguous_format)
    return grad_input, grad_offset, grad_weight, grad_mask


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format a gradient of ``t`` is returned in: ``t``'s own, as the autograd engine prefers."""
    return torch.channels_last if channels_last(t) else torch.contiguous_format


def _weight_grad(grad_output: torch.Tensor, call: _Call) -> torch.Tensor:
    """grad_weight: the implicit GEMM over pixels, split over pixel ranges whose sums add in order."""
    shape = call.shape
    launch = _bwd_weight_kernel.choose("bwd_weight|" + call.key, call.heuristic_shape, grad_output.device)
    cg, cog = shape.group_channels, shape.group_out_channels
    rows = shape.batch * padded_pixels(shape.pixels)
    tiles = shape.groups * cdiv(cog, launch.least("BLOCK_N")) * cdiv(cg, launch.least("BLOCK_K")) * shape.taps
    splits, rows_per_split = weight_grad_splits(rows, tiles, multiprocessors(grad_output.device))
    partial = torch.empty((splits, shape.out_channels, cg, shape.kernel_h, shape.kernel_w),
                          dtype=compute_dtype(grad_output.dtype), device=grad_output.device)
    launch(
        lambda meta: (shape.groups * cdiv(cog, meta["BLOCK_N"]), cdiv(cg, meta["BLOCK_K"]), shape.taps * splits),
        gy_ptr=grad_output, x_ptr=call.x, off_ptr=call.offset, mask_ptr=call.mask, gw_ptr=partial,
        P=shape.pixels, P_PAD=padded_pixels(shape.pixels), ROWS=rows, ROWS_PER_SPLIT=rows_per_split,
        H=shape.height, W=shape.width, WO=shape.out_w, KW=shape.kernel_w, K=shape.taps, COUT=shape.out_channels,
        CG=cg, COG=cog, CPG=shape.offset_group_channels, **call.conv,
        **_strides("sx", call.x), **_pixel_strides("so", call.offset), **_pixel_strides("sm", call.mask),
        **_pixel_strides("sgy", grad_output),
        INDEX_64=needs_int64(grad_output, call.x, call.offset, call.mask) or splits * rows_per_split > INT32_LIMIT,
        **call.meta,
    )
    return partial.sum(dim=0).to(grad_output.dtype)


def _sorted_grad_input(columns: torch.Tensor, call: _Call) -> torch.Tensor:
    """grad_input in the gathered layout from the column gradient [M, K, C] by a stable sort of the corner reads."""
    shape = call.shape
    g, k = shape.offset_groups, shape.taps
    entries = shape.rows * g * k * 4
    keys = torch.empty(entries, dtype=torch.int64, device=columns.device)
    weights = torch.empty(entries, dtype=columns.dtype, device=columns.device)
    launch = _taps_kernel.choose("taps|" + call.key, call.heuristic_shape, columns.device)
    launch(
        lambda meta: (shape.batch * cdiv(shape.pixels, meta["BLOCK_M"]), g * k),
        off_ptr=call.offset, key_ptr=keys, weight_ptr=weights,
        P=shape.pixels, H=shape.height, W=shape.width, WO=shape.out_w, KW=shape.kernel_w, K=k, G=g,
        **call.conv, **_pixel_strides("so", call.offset), F64=call.meta["F64"],
    )
    sorted_keys, order = torch.sort(keys, stable=True)
    run_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    grad_input = torch.zeros_like(call.x)
    cpg = shape.offset_group_channels
    block_c = min(next_power_of_2(cpg), 32)
    launch = _sorted_kernel.choose("sorted|" + call.key, call.heuristic_shape, columns.device)
    launch(
        lambda meta: (cdiv(entries, meta["BLOCK_E"]), cdiv(cpg, block_c)),
        col_ptr=columns, gx_ptr=grad_input, sorted_key_ptr=sorted_keys, order_ptr=order, run_end_ptr=run_end,
        weight_ptr=weights, E=entries, C=shape.channels, H=shape.height, W=shape.width, K=k, G=g, CPG=cpg,
        **_strides("sgx", grad_input), F64=call.meta["F64"], BLOCK_C=block_c,
    )
    return grad_input


@triton_op("stn_triton::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """[N, C, H, W] input, offsets [N, 2 G K, HO, WO], weight [COUT, C / groups, KH, KW] -> [N, COUT, HO, WO]."""
    return deform_conv2d_forward(input, offset, weight, bias, mask, stride, padding, dilation)


@triton_op("stn_triton::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward_op(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    mask: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    input_grad: bool,
    offset_grad: bool,
    weight_grad: bool,
    mask_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_offset, grad_weight, grad_mask); one not asked for is an empty tensor."""
    return deform_conv2d_backward(grad_output, input, offset, weight, mask, stride, padding, dilation, input_grad,
                                  offset_grad, weight_grad, mask_grad, deterministic)


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.conv = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _gradients(ctx, grad_output, backward):
    """The autograd formula of both ways in; ``backward`` is the backward op or its implementation."""
    input, offset, weight, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_input, grad_offset, grad_weight, grad_mask = backward(
        grad_output, input, offset, weight, mask, *ctx.conv,
        needs[0], needs[1], needs[2], needs[4] and mask is not None, torch.are_deterministic_algorithms_enabled(),
    )
    grad_bias = grad_output.sum(dim=(0, 2, 3)) if ctx.has_bias and needs[3] else None
    return (
        grad_input if needs[0] else None,
        grad_offset if needs[1] else None,
        grad_weight if needs[2] else None,
        grad_bias,
        grad_mask if needs[4] and mask is not None else None,
        None, None, None,
    )


deform_conv2d_op.register_autograd(lambda ctx, grad: _gradients(ctx, grad, deform_conv2d_backward_op),
                                   setup_context=_setup_context)
_DeformConv2d = eager_function("DeformConv2d", deform_conv2d_forward, _setup_context, _gradients, deform_conv2d_backward)


def deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation) -> torch.Tensor:
    """The Triton deform_conv2d on validated arguments (pairs for stride, padding, dilation)."""
    inputs = (input, offset, weight, bias, mask, list(stride), list(padding), list(dilation))
    return dispatch(deform_conv2d_op, _DeformConv2d, deform_conv2d_forward, inputs, (input, offset, weight, bias, mask))
