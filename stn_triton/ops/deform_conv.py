"""deform_conv2d: the fused implicit-GEMM launches, their autograd formulas, and the dispatch.

Forward: one kernel samples the offset taps into the A tile and multiplies it with the weight
(no column buffer). Backward: one kernel forms the column gradient grad_y @ W^T per tap in
registers, scatters it into grad_input (atomics into a float32 buffer for half dtypes) and
reduces it into grad_offset / grad_mask (no atomics: one program per pixel block and offset
group); another forms grad_weight as an implicit GEMM over the pixels, split over pixel ranges
(enough programs to fill the GPU) whose partial sums the host adds in order (no atomics), and sums
grad_y into grad_bias from the tiles it reads anyway. Configs, heuristics and table keys:
ops/deform_conv_configs.py; precision and gather layout: ops/deform_conv_policy.py.

The input is brought into the layout the kernels gather from (``gather_source``: channels-last
when a sample point's channels fill a 32-byte sector) before the op, as a differentiable copy: the
op saves the copy for its backward instead of the input (same memory), the backward gathers from
it again without a second copy, and its grad_input comes back in the copy's layout, which autograd
hands to the input as it would any gradient.

Under ``torch.use_deterministic_algorithms(True)`` grad_input avoids atomics: the data kernel
writes the column gradient, every (pixel, offset group, tap, corner) read lists its grad_input
element, and ops/sorted_scatter.py sums each element's list in a fixed order.

Double backward. The convolution is linear in the input, in the weight and in the mask, so every
gradient but the offsets' is the contraction of grad_output with a convolution linear in one of
them: its own gradient is that convolution again, and the backward with the direction in place
of the input, weight or mask (both existing kernels). The offsets' gradient needs second
derivatives of the bilinear weights and raises instead.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch.library import triton_op

from stn_triton.backend import interpreting
from stn_triton.conv_shape import DeformConvShape
from stn_triton.numerics import INT32_LIMIT, cdiv, compute_dtype
from stn_triton.ops._dispatch import OpRules, call, fold, no_forward_ad, per_sample, unfold
from stn_triton.ops._launch import empty_like_layout, multiprocessors, needs_int64
from stn_triton.ops.deform_conv_configs import (
    bwd_data_kernel,
    bwd_weight_kernel,
    fwd_kernel,
    padded_pixels,
    taps_kernel,
    weight_grad_splits,
)
from stn_triton.ops.deform_conv_policy import dot_precision, gather_channels_last, gather_source
from stn_triton.ops.sorted_scatter import key_dtype, scatter_sorted
from stn_triton.tuning import bucket


@dataclass(frozen=True)
class ConvSpec:
    """A deformable convolution's settings besides its tensors (pairs: height, width)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def op_args(self) -> tuple:
        return list(self.stride), list(self.padding), list(self.dilation)

    @classmethod
    def from_op_args(cls, args) -> "ConvSpec":
        return cls(*(tuple(pair) for pair in args))

    def shape(self, input, offset, weight) -> DeformConvShape:
        return DeformConvShape.of(input.shape, offset.shape, weight.shape, self.stride, self.padding, self.dilation)


@dataclass(frozen=True)
class ConvBackwardSpec:
    """A backward's spec: the convolution's, and which gradients it computes how."""

    conv: ConvSpec
    input_grad: bool
    offset_grad: bool
    weight_grad: bool
    mask_grad: bool
    bias_grad: bool
    deterministic: bool  # grad_input without atomics (torch.use_deterministic_algorithms)

    def op_args(self) -> tuple:
        return (*self.conv.op_args(), self.input_grad, self.offset_grad, self.weight_grad, self.mask_grad,
                self.bias_grad, self.deterministic)

    @classmethod
    def from_op_args(cls, args) -> "ConvBackwardSpec":
        return cls(ConvSpec.from_op_args(args[:3]), *args[3:])


# --- launches -----------------------------------------------------------------------------------


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
    x: torch.Tensor  # the input in the layout the kernels gather from (gather_source)
    offset: torch.Tensor  # with dense pixels
    mask: torch.Tensor  # with dense pixels; the offsets when there is no mask (never read)
    weight: torch.Tensor  # channels-last
    conv: dict  # stride_h, ..., dil_w
    meta: dict  # the constexprs every GEMM kernel takes
    key: str  # the shape part of the tuned-table keys
    heuristic_shape: dict  # what the heuristics read


def gathered_input(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The input as the kernels gather it (a differentiable copy when the layout changes)."""
    return gather_source(input, gather_channels_last(input, spec.shape(input, offset, weight)))


def _prepare(input, offset, weight, mask, spec: ConvSpec) -> _Call:
    shape = spec.shape(input, offset, weight)
    channels_fastest = gather_channels_last(input, shape)
    x = gather_source(input, channels_fastest)
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
        conv=dict(stride_h=spec.stride[0], stride_w=spec.stride[1], pad_h=spec.padding[0], pad_w=spec.padding[1],
                  dil_h=spec.dilation[0], dil_w=spec.dilation[1]),
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


def deform_conv2d_forward(input, offset, weight, bias, mask, spec: ConvSpec) -> torch.Tensor:
    """[N, C, H, W] input, offsets [N, 2 G K, HO, WO], weight [COUT, C / groups, KH, KW] -> [N, COUT, HO, WO]."""
    call = _prepare(input, offset, weight, mask, spec)
    shape = call.shape
    out = empty_like_layout(input, (shape.batch, shape.out_channels, shape.out_h, shape.out_w))
    if out.numel() == 0:
        return out
    launch = fwd_kernel.choose("fwd|" + call.key, call.heuristic_shape, input.device)
    cog, pixels = shape.group_out_channels, shape.pixels
    launch(
        lambda meta: (shape.batch * cdiv(pixels, meta["BLOCK_M"]), shape.groups * cdiv(cog, meta["BLOCK_N"])),
        x_ptr=call.x, off_ptr=call.offset, mask_ptr=call.mask, w_ptr=call.weight,
        b_ptr=bias.contiguous() if bias is not None else call.weight, y_ptr=out,  # the kernel reads b_ptr + co
        P=pixels, H=shape.height, W=shape.width, WO=shape.out_w, KW=shape.kernel_w, K=shape.taps,
        CG=shape.group_channels, COG=cog, CPG=shape.offset_group_channels, **call.conv,
        **_strides("sx", call.x), **_pixel_strides("soff", call.offset), **_pixel_strides("sm", call.mask),
        **_strides("sw", call.weight, "oihw"), **_pixel_strides("sy", out),
        HAS_BIAS=bias is not None, INDEX_64=needs_int64(call.x, call.offset, call.mask, out), **call.meta,
    )
    return out


def deform_conv2d_backward(grad_output, input, offset, weight, mask, spec: ConvBackwardSpec):
    """(grad_input, grad_offset, grad_weight, grad_mask, grad_bias); one not asked for is an empty tensor.

    grad_input comes in the layout the kernels gather from (``gather_source`` of the input)."""
    call = _prepare(input, offset, weight, mask, spec.conv)
    shape = call.shape
    grad_output = _dense_pixels(grad_output)
    mask_grad = spec.mask_grad and mask is not None
    atomic_input_grad = spec.input_grad and not spec.deterministic
    sorted_input_grad = spec.input_grad and spec.deterministic
    # A gradient not asked for is a fresh empty tensor: a custom op's outputs may not alias each other.
    empty = input.new_empty
    # With x's strides (the kernel addresses both alike), so its atomics add along contiguous channels
    # when the gather does; in float32 for half dtypes.
    gx = torch.zeros_like(call.x, dtype=compute_dtype(input.dtype)) if atomic_input_grad else empty(0)
    work = shape.rows > 0 and shape.channels > 0 and shape.out_channels > 0
    # The data kernel stores every element of these when it runs; they are zeros only when it does not.
    fresh = torch.empty if work else torch.zeros
    grad_offset = fresh(offset.shape, dtype=offset.dtype, device=offset.device) if spec.offset_grad else empty(0)
    grad_mask = fresh(mask.shape, dtype=mask.dtype, device=mask.device) if mask_grad else empty(0)
    columns = empty(0)
    if sorted_input_grad:
        columns = fresh((shape.rows, shape.taps, shape.channels), dtype=compute_dtype(input.dtype),
                        device=input.device)
    if work and (spec.input_grad or spec.offset_grad or mask_grad):
        # Never written unless INPUT_GRAD; a one-element stand-in then, since the autotuner zeroes it between trials.
        gx_arg = gx if atomic_input_grad else empty(1)
        launch = bwd_data_kernel.choose("bwd_data|" + call.key, call.heuristic_shape, input.device)
        launch(
            lambda meta: (shape.batch * cdiv(shape.pixels, meta["BLOCK_M"]), shape.offset_groups),
            gy_ptr=grad_output, x_ptr=call.x, off_ptr=call.offset, mask_ptr=call.mask, w_ptr=call.weight,
            gx_ptr=gx_arg, col_ptr=columns if sorted_input_grad else gx_arg,
            goff_ptr=grad_offset if spec.offset_grad else call.offset, gmask_ptr=grad_mask if mask_grad else call.mask,
            P=shape.pixels, C=shape.channels, H=shape.height, W=shape.width, WO=shape.out_w, KW=shape.kernel_w,
            K=shape.taps, CG=shape.group_channels, COG=shape.group_out_channels, CPG=shape.offset_group_channels,
            **call.conv, **_strides("sx", call.x), **_pixel_strides("soff", call.offset),
            **_pixel_strides("sm", call.mask), **_strides("sw", call.weight, "oihw"), **_pixel_strides("sgy", grad_output),
            INDEX_64=needs_int64(grad_output, call.x, call.offset, call.mask, gx_arg, columns),
            INPUT_GRAD=atomic_input_grad, COLUMNS=sorted_input_grad, OFFSET_GRAD=spec.offset_grad, MASK_GRAD=mask_grad,
            **call.meta,
        )
    grad_input = empty(0)
    if atomic_input_grad:
        grad_input = gx.to(input.dtype)
    elif sorted_input_grad:
        grad_input = _sorted_grad_input(columns, call) if work else torch.zeros_like(call.x)
    grad_weight = grad_bias = empty(0)
    if spec.weight_grad:
        if work:
            grad_weight, grad_bias = _weight_grad(grad_output, call, spec.bias_grad)
        else:
            grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if spec.bias_grad and grad_bias.numel() == 0:
        grad_bias = grad_output.sum(dim=(0, 2, 3))
    return grad_input, grad_offset, grad_weight, grad_mask, grad_bias


def _weight_grad(grad_output: torch.Tensor, call: _Call, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight, grad_bias or an empty tensor): the implicit GEMM over pixels, split over pixel
    ranges whose sums add in order; grad_bias from the same grad_y tiles."""
    shape = call.shape
    launch = bwd_weight_kernel.choose("bwd_weight|" + call.key, call.heuristic_shape, grad_output.device)
    cg, cog = shape.group_channels, shape.group_out_channels
    rows = shape.batch * padded_pixels(shape.pixels)
    tiles = shape.groups * cdiv(cog, launch.least("BLOCK_N")) * cdiv(cg, launch.least("BLOCK_K")) * shape.taps
    splits, rows_per_split = weight_grad_splits(rows, tiles, multiprocessors(grad_output.device))
    dtype = compute_dtype(grad_output.dtype)
    partial = torch.empty((splits, shape.out_channels, cg, shape.kernel_h, shape.kernel_w), dtype=dtype,
                          device=grad_output.device)
    bias_partial = torch.empty((splits, shape.out_channels) if bias_grad else (1,), dtype=dtype, device=grad_output.device)
    launch(
        lambda meta: (shape.groups * cdiv(cog, meta["BLOCK_N"]), cdiv(cg, meta["BLOCK_K"]), shape.taps * splits),
        gy_ptr=grad_output, x_ptr=call.x, off_ptr=call.offset, mask_ptr=call.mask, gw_ptr=partial, gb_ptr=bias_partial,
        P=shape.pixels, P_PAD=padded_pixels(shape.pixels), ROWS=rows, ROWS_PER_SPLIT=rows_per_split,
        H=shape.height, W=shape.width, WO=shape.out_w, KW=shape.kernel_w, K=shape.taps, COUT=shape.out_channels,
        CG=cg, COG=cog, CPG=shape.offset_group_channels, **call.conv,
        **_strides("sx", call.x), **_pixel_strides("soff", call.offset), **_pixel_strides("sm", call.mask),
        **_pixel_strides("sgy", grad_output),
        INDEX_64=needs_int64(grad_output, call.x, call.offset, call.mask) or splits * rows_per_split > INT32_LIMIT,
        BIAS_GRAD=bias_grad, **call.meta,
    )
    grad_bias = bias_partial.sum(dim=0).to(grad_output.dtype) if bias_grad else grad_output.new_empty(0)
    return partial.sum(dim=0).to(grad_output.dtype), grad_bias


def _sorted_grad_input(columns: torch.Tensor, call: _Call) -> torch.Tensor:
    """grad_input in the gathered layout from the column gradient [M, K, C] (ops/sorted_scatter.py)."""
    shape = call.shape
    g, k = shape.offset_groups, shape.taps
    reads = shape.rows * g * k
    keys = torch.empty(reads * 4, dtype=key_dtype(call.x.numel()), device=columns.device)
    weights = torch.empty(reads * 4, dtype=columns.dtype, device=columns.device)
    sources = torch.empty(reads, dtype=torch.int64, device=columns.device)
    grad_input = torch.zeros_like(call.x)
    launch = taps_kernel.choose("taps|" + call.key, call.heuristic_shape, columns.device)
    launch(
        lambda meta: (shape.batch * cdiv(shape.pixels, meta["BLOCK_M"]), g * k),
        off_ptr=call.offset, key_ptr=keys, weight_ptr=weights, source_ptr=sources,
        P=shape.pixels, C=shape.channels, H=shape.height, W=shape.width, WO=shape.out_w, KW=shape.kernel_w, K=k, G=g,
        CPG=shape.offset_group_channels, **call.conv, **_pixel_strides("soff", call.offset),
        **_strides("sgx", grad_input), F64=call.meta["F64"],
    )
    scatter_sorted(grad_input, grad_input.stride(1), shape.offset_group_channels, keys, weights, sources, columns, 1,
                   destinations=shape.batch * g * shape.height * shape.width, key=call.key)
    return grad_input


# --- ops, autograd, vmap --------------------------------------------------------------------------


@triton_op("stn_triton::deform_conv2d_fwd", mutates_args=())
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
    return deform_conv2d_forward(input, offset, weight, bias, mask, ConvSpec.from_op_args((stride, padding, dilation)))


@triton_op("stn_triton::deform_conv2d_bwd", mutates_args=())
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
    bias_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_offset, grad_weight, grad_mask, grad_bias); one not asked for is an empty tensor."""
    spec = ConvBackwardSpec.from_op_args((stride, padding, dilation, input_grad, offset_grad, weight_grad, mask_grad,
                                          bias_grad, deterministic))
    return deform_conv2d_backward(grad_output, input, offset, weight, mask, spec)


def convolve(input, offset, weight, bias, mask, spec: ConvSpec) -> torch.Tensor:
    """The op on an input already in its gather layout (``gathered_input``)."""
    return call(deform_conv2d_op, _DeformConv2d, deform_conv2d_forward, (input, offset, weight, bias, mask), spec,
                (input, offset, weight, bias, mask))


def convolve_grads(grad_output, input, offset, weight, mask, spec: ConvBackwardSpec):
    """The backward, differentiable in turn where ``create_graph`` asks for it."""
    return call(deform_conv2d_backward_op, _DeformConv2dBackward, deform_conv2d_backward,
                (grad_output, input, offset, weight, mask), spec, (grad_output, input, offset, weight, mask))


def _save(ctx, tensors, spec: ConvSpec, output) -> None:
    input, offset, weight, bias, mask = tensors
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.spec = spec
    ctx.has_bias = bias is not None


def _gradients(ctx, grad_output):
    input, offset, weight, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    spec = ConvBackwardSpec(ctx.spec, needs[0], needs[1], needs[2], needs[4] and mask is not None,
                            needs[3] and ctx.has_bias, torch.are_deterministic_algorithms_enabled())
    if not any((spec.input_grad, spec.offset_grad, spec.weight_grad, spec.mask_grad, spec.bias_grad)):
        return None, None, None, None, None
    grad_input, grad_offset, grad_weight, grad_mask, grad_bias = convolve_grads(
        grad_output, input, offset, weight, mask, spec)
    return (grad_input if spec.input_grad else None, grad_offset if spec.offset_grad else None,
            grad_weight if spec.weight_grad else None, grad_bias if spec.bias_grad else None,
            grad_mask if spec.mask_grad else None)


def _vmap(info, in_dims, tensors, spec: ConvSpec):
    """vmap of the forward: the vmapped dimension folded into the images, unless the weight or bias carries it."""
    if in_dims[2] is not None or in_dims[3] is not None:
        return per_sample(info, in_dims, tensors, lambda *args: convolve(*args, spec))
    size = info.batch_size
    input, offset, weight, bias, mask = tensors
    out = convolve(fold(input, in_dims[0], size), fold(offset, in_dims[1], size), weight, bias,
                   fold(mask, in_dims[4], size), spec)
    return unfold(out, size)


def _save_backward(ctx, tensors, spec: ConvBackwardSpec, output) -> None:
    ctx.save_for_backward(*tensors)
    ctx.spec = spec
    ctx.set_materialize_grads(False)


def _add(total, part):
    return part if total is None else total if part is None else total + part


def _double_gradients(ctx, grad_grad_input, grad_grad_offset, grad_grad_weight, grad_grad_mask, grad_grad_bias):
    """Gradients of (grad_input, grad_offset, grad_weight, grad_mask, grad_bias) with respect to
    (grad_output, input, offset, weight, mask): each gradient but the offsets' is linear in the input,
    weight or mask it was differentiated by, so its own gradient is a convolution and a backward."""
    spec = ctx.spec
    if grad_grad_offset is not None and spec.offset_grad:
        raise NotImplementedError(
            "stn_triton: the gradient of deform_conv2d's offsets cannot be differentiated again (it needs second "
            "derivatives of the bilinear weights); the gradients of the input, weight, mask and bias can"
        )
    grad_output, input, offset, weight, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = [None] * 5  # grad_output, input, offset, weight, mask
    conv = spec.conv

    def through(direction_input, direction_weight, direction_mask, input_grad, weight_grad, mask_grad):
        """Add d<go, D(input, weight, mask)> with one of them replaced by its direction."""
        x = input if direction_input is None else direction_input
        w = weight if direction_weight is None else direction_weight
        m = mask if direction_mask is None else direction_mask
        if needs[0]:
            grads[0] = _add(grads[0], convolve(x, offset, w, None, m, conv))
        wanted = ConvBackwardSpec(conv, input_grad and needs[1], needs[2], weight_grad and needs[3],
                                  mask_grad and needs[4] and m is not None, False, spec.deterministic)
        if wanted.input_grad or wanted.offset_grad or wanted.weight_grad or wanted.mask_grad:
            g_input, g_offset, g_weight, g_mask, _ = convolve_grads(grad_output, x, offset, w, m, wanted)
            for index, (want, grad) in enumerate(((wanted.input_grad, g_input), (wanted.offset_grad, g_offset),
                                                  (wanted.weight_grad, g_weight), (wanted.mask_grad, g_mask)), 1):
                if want:
                    grads[index] = _add(grads[index], grad)

    if grad_grad_input is not None and spec.input_grad:
        through(grad_grad_input, None, None, False, True, True)
    if grad_grad_weight is not None and spec.weight_grad:
        through(None, grad_grad_weight, None, True, False, True)
    if grad_grad_mask is not None and spec.mask_grad:
        through(None, None, grad_grad_mask, True, True, False)
    if grad_grad_bias is not None and spec.bias_grad and needs[0]:
        grads[0] = _add(grads[0], grad_grad_bias.view(1, -1, 1, 1).expand_as(grad_output))
    return tuple(grads)


def _vmap_backward(info, in_dims, tensors, spec: ConvBackwardSpec):
    """vmap of the backward: folded into the images, unless per-sample weight or bias gradients (a sum
    over the images) or a batched weight need one call per sample."""
    if spec.weight_grad or spec.bias_grad or in_dims[3] is not None:
        return per_sample(info, in_dims, tensors, lambda *args: convolve_grads(*args, spec))
    size = info.batch_size
    grad_output, input, offset, weight, mask = tensors
    grads = convolve_grads(fold(grad_output, in_dims[0], size), fold(input, in_dims[1], size),
                           fold(offset, in_dims[2], size), weight, fold(mask, in_dims[4], size), spec)
    outputs, dims = zip(*(unfold(grad, size) for grad in grads))
    return tuple(outputs), tuple(dims)


_DeformConv2d = OpRules("DeformConv2d", 5, deform_conv2d_forward, _save, _gradients, _vmap,
                        no_forward_ad("stn_triton's deform_conv2d")).register(deform_conv2d_op, ConvSpec)
_DeformConv2dBackward = OpRules("DeformConv2dBackward", 5, deform_conv2d_backward, _save_backward, _double_gradients,
                                _vmap_backward, no_forward_ad("stn_triton's deform_conv2d backward")).register(
    deform_conv2d_backward_op, ConvBackwardSpec)


def deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation) -> torch.Tensor:
    """The Triton deform_conv2d on validated arguments (pairs for stride, padding, dilation)."""
    spec = ConvSpec(tuple(stride), tuple(padding), tuple(dilation))
    return convolve(gathered_input(input, offset, weight, spec), offset, weight, bias, mask, spec)
