"""deform_conv2d as torch.library ops: the fused implicit-GEMM launches and their autograd.

Forward: one kernel samples the offset taps into the A tile and multiplies it with the weight
(no column buffer). Backward: one kernel forms the column gradient grad_y @ W^T per tap in
registers, scatters it into grad_input (atomics into a float32 buffer for half dtypes) and
reduces it into grad_offset / grad_mask (no atomics: one program per pixel block and offset
group); another forms grad_weight as an implicit GEMM over the pixels (no atomics);
grad_bias is a sum over grad_y.

Under ``torch.use_deterministic_algorithms(True)`` grad_input avoids atomics: the column
gradient is formed by a matmul per group, every (pixel, tap, offset group, corner) read lists
its target input pixel, a stable sort groups the reads by target, and a gather sums each
group in that fixed order.
"""

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
from stn_triton.ops._launch import compute_dtype, empty_like_layout, needs_int64
from stn_triton.tuning import TunedKernel, bucket

BLOCK_M, BLOCK_N, BLOCK_K = 64, 32, 32
_fwd_configs = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for m, n, k, w, s in [(64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (64, 128, 32, 4, 2), (128, 128, 32, 8, 2),
                          (64, 32, 32, 4, 2), (32, 64, 16, 4, 2)]
]
_fwd_kernel = TunedKernel(
    "deform_conv_fwd", _deform_conv_fwd_kernel, _fwd_configs,
    triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}, num_warps=4),
    autotune_key=["CG", "COG", "K", "HAS_MASK", "F64", "LOW_PRECISION"],
)


def output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    """(HO, WO) of a convolution."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


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
    cg = shared["sizes"][9]
    key = f"{input.dtype}|cg{bucket(cg)}|cog{bucket(cog)}|k{shared['sizes'][8]}|mask{mask is not None}|m{bucket(rows)}"
    kernel, tuned = _fwd_kernel(key, input.device)
    wrap_triton(kernel)[launch](
        input, offset, shared["mask"], weight, bias if bias is not None else weight, out,
        *shared["sizes"], *shared["conv"],
        *input.stride(), *offset.stride(), *shared["mask"].stride(), *weight.stride(), *out.stride(),
        HAS_BIAS=bias is not None, INDEX_64=needs_int64(input, offset, shared["mask"], out), **shared["meta"], **tuned,
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
        gx = grad_input if atomic_input_grad else input
        wrap_triton(_deform_conv_bwd_data_kernel)[(triton.cdiv(rows, BLOCK_M), shared["offset_groups"])](
            grad_output, input, offset, shared["mask"], weight, gx, columns if sorted_input_grad else gx,
            grad_offset if offset_grad else offset, grad_mask if mask_grad else shared["mask"],
            *shared["sizes"], *shared["conv"],
            *input.stride(), *offset.stride(), *shared["mask"].stride(), *weight.stride(),
            *grad_output.stride(), *gx.stride(),
            INDEX_64=index_64, INPUT_GRAD=atomic_input_grad, COLUMNS=sorted_input_grad,
            OFFSET_GRAD=offset_grad, MASK_GRAD=mask_grad,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **shared["meta"],
        )
    if atomic_input_grad:
        grad_input = grad_input.to(input.dtype)
    elif sorted_input_grad:
        grad_input = _sorted_grad_input(columns, input, offset, shared) if work else torch.zeros_like(input)
    grad_weight = input.new_empty(0)
    if weight_grad:
        grad_weight = torch.zeros(weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device)
        if work:
            cout, cg, kh, kw = weight.shape
            cog = shared["sizes"][10]
            grid = (shared["groups"] * triton.cdiv(cog, BLOCK_N), triton.cdiv(cg, BLOCK_K), kh * kw)
            wrap_triton(_deform_conv_bwd_weight_kernel)[grid](
                grad_output, input, offset, shared["mask"], grad_weight,
                *shared["sizes"], *shared["conv"],
                *input.stride(), *offset.stride(), *shared["mask"].stride(), *grad_output.stride(),
                INDEX_64=index_64, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **shared["meta"],
            )
        grad_weight = grad_weight.to(weight.dtype)
    return grad_input, grad_offset, grad_weight, grad_mask


SORTED_BLOCK_E = 64
TAPS_BLOCK_M = 128


def _sorted_grad_input(columns: torch.Tensor, input, offset, shared: dict) -> torch.Tensor:
    """grad_input from the column gradient [M, C, K] by a stable sort of the corner reads (no atomics)."""
    rows, c, h, w, _, ho, wo, kw, k, _, _, cpg = shared["sizes"]
    g = shared["offset_groups"]
    entries = rows * g * k * 4
    keys = torch.empty(entries, dtype=torch.int64, device=input.device)
    weights = torch.empty(entries, dtype=columns.dtype, device=input.device)
    wrap_triton(_deform_conv_taps_kernel)[(triton.cdiv(rows, TAPS_BLOCK_M), g * k)](
        offset, keys, weights, rows, h, w, ho, wo, kw, k, g, *shared["conv"], *offset.stride(),
        F64=shared["meta"]["F64"], BLOCK_M=TAPS_BLOCK_M,
    )
    sorted_keys, order = torch.sort(keys, stable=True)
    run_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    grad_input = torch.zeros_like(input, memory_format=torch.preserve_format)
    block_c = min(triton.next_power_of_2(cpg), 32)
    wrap_triton(_deform_conv_bwd_sorted_kernel)[(triton.cdiv(entries, SORTED_BLOCK_E), triton.cdiv(cpg, block_c))](
        columns, grad_input, sorted_keys, order, run_end, weights,
        entries, c, h, w, k, g, cpg, *grad_input.stride(),
        F64=shared["meta"]["F64"], BLOCK_E=SORTED_BLOCK_E, BLOCK_C=block_c,
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
