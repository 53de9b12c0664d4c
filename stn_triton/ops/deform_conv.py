"""deform_conv2d as torch.library ops: the fused implicit-GEMM launches and their autograd.

Forward: one kernel samples the offset taps into the A tile and multiplies it with the weight
(no column buffer). Backward: one kernel forms the column gradient grad_y @ W^T per tap in
registers, scatters it into grad_input (atomics into a float32 buffer for half dtypes) and
reduces it into grad_offset / grad_mask (no atomics: one program per pixel block and offset
group); another forms grad_weight as an implicit GEMM over the pixels, split over pixel ranges
(enough programs to fill the GPU) whose partial sums the host adds in order (no atomics);
grad_bias is a sum over grad_y. Every kernel has a config space and a tuned-table key
(``stn_triton.tuning``); the ones that add with atomics are zeroed between autotuning trials.

Under ``torch.use_deterministic_algorithms(True)`` grad_input avoids atomics: the column
gradient is formed by a matmul per group, every (pixel, tap, offset group, corner) read lists
its target input pixel, a stable sort groups the reads by target, and a gather sums each
group in that fixed order.
"""

import functools
from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from stn_triton.backend import interpreting
from stn_triton.kernels.deform_conv import (
    _deform_conv_bwd_data_kernel,
    _deform_conv_bwd_sorted_kernel,
    _deform_conv_bwd_weight_kernel,
    _deform_conv_fwd_kernel,
    _deform_conv_taps_kernel,
)
from stn_triton.ops._launch import channels_last, compute_dtype, empty_like_layout, needs_int64
from stn_triton.tuning import TunedKernel, bucket, pixel_block_configs

INTERPRETER_BLOCKS = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)
BLOCKS_KEY = ["CG", "COG", "K", "HAS_MASK", "F64", "LOW_PRECISION"]
ROW_GROUP_KEY = BLOCKS_KEY + ["ROW_GROUP"]


def _block_configs(blocks) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in blocks]


# BLOCK_M: output pixels (GEMM rows); BLOCK_N: output channels; BLOCK_K: input channels of one tap.
_fwd_kernel = TunedKernel(
    "deform_conv_fwd", _deform_conv_fwd_kernel,
    _block_configs([(64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (64, 128, 32, 4, 2), (128, 128, 32, 8, 2),
                    (64, 32, 32, 4, 2), (32, 64, 16, 4, 2)]),
    INTERPRETER_BLOCKS, autotune_key=ROW_GROUP_KEY,
)
# The data gradient holds a [BLOCK_M, BLOCK_K] column-gradient tile and three sampled tiles of
# that size at once: smaller tiles than the forward.
_bwd_data_kernel = TunedKernel(
    "deform_conv_bwd_data", _deform_conv_bwd_data_kernel,
    _block_configs([(64, 32, 32, 4, 2), (64, 64, 32, 4, 2), (128, 32, 32, 8, 2), (128, 64, 32, 8, 2),
                    (32, 32, 32, 4, 2), (64, 32, 16, 4, 2)]),
    INTERPRETER_BLOCKS, autotune_key=BLOCKS_KEY + ["INPUT_GRAD", "COLUMNS", "OFFSET_GRAD", "MASK_GRAD"],
    reset_to_zero=["gx_ptr"],
)
# The weight gradient reduces over BLOCK_M pixels at a time into a [BLOCK_N, BLOCK_K] tile; a wider
# tile samples each input value for more output channels at once.
_bwd_weight_kernel = TunedKernel(
    "deform_conv_bwd_weight", _deform_conv_bwd_weight_kernel,
    _block_configs([(64, 32, 32, 4, 2), (64, 64, 64, 4, 2), (128, 64, 64, 8, 2), (32, 64, 64, 4, 2),
                    (64, 128, 64, 8, 2), (64, 64, 32, 4, 2)]),
    INTERPRETER_BLOCKS, autotune_key=ROW_GROUP_KEY,
)
_taps_kernel = TunedKernel(
    "deform_conv_taps", _deform_conv_taps_kernel,
    pixel_block_configs(name="BLOCK_M"),
    triton.Config({"BLOCK_M": 128}, num_warps=4), autotune_key=["K", "G", "F64"],
)
_sorted_kernel = TunedKernel(
    "deform_conv_bwd_sorted", _deform_conv_bwd_sorted_kernel,
    pixel_block_configs((32, 64, 128), name="BLOCK_E"),
    triton.Config({"BLOCK_E": 64}, num_warps=4), autotune_key=["CPG", "K", "F64"],
)

# The weight gradient's pixel reduction is split until there are this many programs per SM (at
# 64 x 64 tiles), each split summing at least MIN_SPLIT_ROWS pixels.
PROGRAMS_PER_SM = 4
MIN_SPLIT_ROWS = 256
INTERPRETER_SMS = 132  # under the interpreter: split as on an H100, so the CPU tests take the same path


def output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    """(HO, WO) of a convolution."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def _shape_key(pass_: str, input: torch.Tensor, shared: dict) -> str:
    """A deform_conv kernel's key in the tuned tables: pass, dtype, bucketed GEMM sizes, taps, mask, layout."""
    rows, _, _, _, _, _, _, _, k, cg, cog, _ = shared["sizes"]
    layout = "nhwc" if channels_last(input) else "nchw"
    return (f"{pass_}|{input.dtype}|cg{bucket(cg)}|cog{bucket(cog)}|k{k}|g{shared['offset_groups']}"
            f"|mask{shared['meta']['HAS_MASK']}|m{bucket(rows)}|{layout}")


def weight_grad_splits(rows: int, tiles: int, sms: int) -> tuple[int, int]:
    """(splits, rows per split) of grad_weight's reduction over ``rows`` pixels for ``tiles`` output tiles."""
    splits = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), rows // MIN_SPLIT_ROWS))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), 128) * 128  # whole blocks of up to 128 rows
    return triton.cdiv(rows, rows_per_split), rows_per_split


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _shared(input, offset, weight, mask, stride, padding, dilation) -> dict:
    """Sizes, strides and flags every deform_conv kernel takes."""
    n, c, h, w = input.shape
    cout, cg, kh, kw = weight.shape
    k = kh * kw
    g = offset.shape[1] // (2 * k)
    ho, wo = offset.shape[2:]
    low_precision = input.dtype in (torch.float16, torch.bfloat16)
    if interpreting() and input.dtype == torch.bfloat16:
        low_precision = False  # the interpreter's bfloat16 tl.dot is wrong; float32 operands are exact
    return dict(
        sizes=(n * ho * wo, c, h, w, cout, ho, wo, kw, k, cg, cout // (c // cg), c // g),
        conv=(*stride, *padding, *dilation),
        mask=mask if mask is not None else offset,
        meta=dict(HAS_MASK=mask is not None, F64=input.dtype == torch.float64, LOW_PRECISION=low_precision,
                  INPUT_PRECISION="ieee"),
        groups=c // cg,
        offset_groups=g,
    )


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
    shared = _shared(input, offset, weight, mask, stride, padding, dilation)
    out = empty_like_layout(input, (input.shape[0], weight.shape[0], *offset.shape[2:]))
    rows = shared["sizes"][0]
    if out.numel() == 0:
        return out
    cog = shared["sizes"][10]
    groups = shared["groups"]
    launch = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), groups * triton.cdiv(cog, meta["BLOCK_N"]))  # noqa: E731
    kernel, tuned = _fwd_kernel(_shape_key("fwd", input, shared), input.device)
    wrap_triton(kernel)[launch](
        input, offset, shared["mask"], weight, bias if bias is not None else weight, out,
        *shared["sizes"], *shared["conv"],
        *input.stride(), *offset.stride(), *shared["mask"].stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, INDEX_64=needs_int64(input, offset, shared["mask"], out),
        ROW_GROUP=shared["offset_groups"] == 1, **shared["meta"], **tuned,
    )
    return out


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
    shared = _shared(input, offset, weight, mask, stride, padding, dilation)
    rows = shared["sizes"][0]
    index_64 = needs_int64(grad_output, input, offset, shared["mask"])
    mask_grad = mask_grad and mask is not None
    atomic_input_grad = input_grad and not deterministic
    # A gradient not asked for is a fresh empty tensor: a custom op's outputs may not alias each other.
    grad_input = (
        torch.zeros_like(input, dtype=compute_dtype(input.dtype), memory_format=torch.preserve_format)
        if atomic_input_grad else input.new_empty(0)
    )
    grad_offset = torch.zeros(offset.shape, dtype=offset.dtype, device=offset.device) if offset_grad else input.new_empty(0)
    grad_mask = torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device) if mask_grad else input.new_empty(0)
    sorted_input_grad = input_grad and deterministic
    columns = input.new_empty(0)
    if sorted_input_grad:
        columns = torch.zeros((rows, input.shape[1], weight.shape[2] * weight.shape[3]),
                              dtype=compute_dtype(input.dtype), device=input.device)
    work = rows > 0 and input.shape[1] > 0 and weight.shape[0] > 0
    if work and (input_grad or offset_grad or mask_grad):
        # Never written unless INPUT_GRAD; a one-element stand-in then, since the autotuner zeroes it between trials.
        gx = grad_input if atomic_input_grad else input.new_zeros((1, 1, 1, 1))
        kernel, tuned = _bwd_data_kernel(_shape_key("bwd_data", input, shared), input.device)
        wrap_triton(kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), shared["offset_groups"])](
            grad_output, input, offset, shared["mask"], weight, gx, columns if sorted_input_grad else gx,
            grad_offset if offset_grad else offset, grad_mask if mask_grad else shared["mask"],
            *shared["sizes"], *shared["conv"],
            *input.stride(), *offset.stride(), *shared["mask"].stride(), *weight.stride(),
            *grad_output.stride(), *gx.stride(),
            INDEX_64=index_64, INPUT_GRAD=atomic_input_grad, COLUMNS=sorted_input_grad,
            OFFSET_GRAD=offset_grad, MASK_GRAD=mask_grad, **shared["meta"], **tuned,
        )
    if atomic_input_grad:
        grad_input = grad_input.to(input.dtype)
    elif sorted_input_grad:
        grad_input = _sorted_grad_input(columns, input, offset, shared) if work else torch.zeros_like(input)
    grad_weight = input.new_empty(0)
    if weight_grad:
        grad_weight = _weight_grad(grad_output, input, offset, weight, shared, index_64) if work else (
            torch.zeros_like(weight, memory_format=torch.contiguous_format))
    return grad_input, grad_offset, grad_weight, grad_mask


def _weight_grad(grad_output, input, offset, weight, shared: dict, index_64: bool) -> torch.Tensor:
    """grad_weight: the implicit GEMM over pixels, split over pixel ranges whose sums add in order."""
    rows = shared["sizes"][0]
    cout, cg, kh, kw = weight.shape
    cog = shared["sizes"][10]
    groups = shared["groups"]
    tiles = groups * triton.cdiv(cog, 64) * triton.cdiv(cg, 64) * kh * kw
    splits, rows_per_split = weight_grad_splits(rows, tiles, _multiprocessors(input.device))
    partial = torch.empty((splits, *weight.shape), dtype=compute_dtype(weight.dtype), device=weight.device)
    kernel, tuned = _bwd_weight_kernel(_shape_key("bwd_weight", input, shared), input.device)
    launch = lambda meta: (groups * triton.cdiv(cog, meta["BLOCK_N"]), triton.cdiv(cg, meta["BLOCK_K"]), kh * kw * splits)  # noqa: E731
    wrap_triton(kernel)[launch](
        grad_output, input, offset, shared["mask"], partial,
        *shared["sizes"], rows_per_split, *shared["conv"],
        *input.stride(), *offset.stride(), *shared["mask"].stride(), *grad_output.stride(),
        INDEX_64=index_64, ROW_GROUP=shared["offset_groups"] == 1, **shared["meta"], **tuned,
    )
    return partial.sum(dim=0).to(weight.dtype)


def _sorted_grad_input(columns: torch.Tensor, input, offset, shared: dict) -> torch.Tensor:
    """grad_input from the column gradient [M, C, K] by a stable sort of the corner reads (no atomics)."""
    rows, c, h, w, _, ho, wo, kw, k, _, _, cpg = shared["sizes"]
    g = shared["offset_groups"]
    entries = rows * g * k * 4
    keys = torch.empty(entries, dtype=torch.int64, device=input.device)
    weights = torch.empty(entries, dtype=columns.dtype, device=input.device)
    kernel, tuned = _taps_kernel(_shape_key("taps", input, shared), input.device)
    wrap_triton(kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), g * k)](
        offset, keys, weights, rows, h, w, ho, wo, kw, k, g, *shared["conv"], *offset.stride(),
        F64=shared["meta"]["F64"], **tuned,
    )
    sorted_keys, order = torch.sort(keys, stable=True)
    run_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    grad_input = torch.zeros_like(input, memory_format=torch.preserve_format)
    block_c = min(triton.next_power_of_2(cpg), 32)
    kernel, tuned = _sorted_kernel(_shape_key("sorted", input, shared), input.device)
    wrap_triton(kernel)[lambda meta: (triton.cdiv(entries, meta["BLOCK_E"]), triton.cdiv(cpg, block_c))](
        columns, grad_input, sorted_keys, order, run_end, weights,
        entries, c, h, w, k, g, cpg, *grad_input.stride(),
        F64=shared["meta"]["F64"], BLOCK_C=block_c, **tuned,
    )
    return grad_input


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.conv = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_output):
    input, offset, weight, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_input, grad_offset, grad_weight, grad_mask = deform_conv2d_backward_op(
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


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation) -> torch.Tensor:
    """The Triton deform_conv2d on validated arguments (pairs for stride, padding, dilation)."""
    return deform_conv2d_op(input, offset, weight, bias, mask, list(stride), list(padding), list(dilation))
