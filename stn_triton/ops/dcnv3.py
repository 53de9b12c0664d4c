"""DCNv3 and DCNv4 (InternImage, FlashInternImage): the launches, the autograd formulas, the dispatch.

Their op is a single-level deformable aggregation: for each output pixel, group g and kernel point
k, a bilinear read of the group's channels at the pixel's kernel tap moved by a learnt offset,
weighted by a mask value and summed over the points. That is multi-scale deformable attention on
one level with its queries on the output grid, so it runs on the same kernel
(kernels/ms_deform_attn.py with GRID): the input ``[N, H, W, G * D]`` is the value ``[N, H * W, G,
D]`` (a view: a dense NHWC tensor and an NCHW-strided view both flatten without a copy), the offsets
``[N, Ho, Wo, G * K * 2]`` are the locations ``[N, Ho * Wo, G, K, 2]`` and each point's position is
computed in the kernel from the output pixel, its kernel tap and the offset; nothing of the sampling
grid exists in memory. DCNv4's ``offset_mask`` packs each group's 2K offsets and K mask values in one
row (padded to a multiple of 8): the kernel reads both from it through strides, and its backward
writes both gradients into one buffer of the same layout.

Double backward as the attention's: the input's gradient is linear in grad_output, so its gradient is
the forward again (and the offsets' and masks' gradients with the direction as the input); those
of the offsets and masks cannot be differentiated again and raise.
"""

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch.library import triton_op

from stn_triton.numerics import compute_dtype
from stn_triton.ops._dispatch import OpRules, call, constant, fold, no_forward_ad, per_sample, unfold
from stn_triton.ops.ms_deform_attn import (
    AttnBackwardSpec,
    AttnSpec,
    Grid,
    Levels,
    attention_forward,
    points_backward,
)


@dataclass(frozen=True)
class DcnSpec:
    """What a DCNv3 / DCNv4 call computes besides its tensors."""

    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    group: int
    offset_scale: float
    remove_center: bool
    packed: bool  # DCNv4: ``offset`` is offset_mask (per group 2K offsets then K mask values), no mask tensor
    softmax: bool  # the mask values are logits: softmax over each group's K points in the kernel
    out_dtype: torch.dtype

    def op_args(self) -> tuple:
        return (self.kernel_h, self.kernel_w, self.stride_h, self.stride_w, self.pad_h, self.pad_w, self.dilation_h,
                self.dilation_w, self.group, self.offset_scale, self.remove_center, self.packed, self.softmax,
                self.out_dtype)

    @classmethod
    def from_op_args(cls, args) -> "DcnSpec":
        return cls(*args)

    @property
    def points(self) -> int:
        return self.kernel_h * self.kernel_w - self.remove_center

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(Ho, Wo) of an input of ``height`` x ``width``: a convolution's."""
        return ((height + 2 * self.pad_h - (self.dilation_h * (self.kernel_h - 1) + 1)) // self.stride_h + 1,
                (width + 2 * self.pad_w - (self.dilation_w * (self.kernel_w - 1) + 1)) // self.stride_w + 1)

    def taps(self) -> list[tuple[int, int]]:
        """Each point's kernel tap (x, y) from the kernel's centre, in pixels, in the offsets' order:
        x-major (InternImage's and DCNv4's), the centre left out with ``remove_center``."""
        half_w = self.dilation_w * (self.kernel_w - 1) // 2
        half_h = self.dilation_h * (self.kernel_h - 1) // 2
        return [(i * self.dilation_w - half_w, j * self.dilation_h - half_h)
                for i in range(self.kernel_w) for j in range(self.kernel_h)
                if not (self.remove_center and i == self.kernel_w // 2 and j == self.kernel_h // 2)]


@dataclass(frozen=True)
class DcnBackwardSpec:
    dcn: DcnSpec
    input_grad: bool
    offset_grad: bool
    mask_grad: bool
    deterministic: bool

    def op_args(self) -> tuple:
        return *self.dcn.op_args(), self.input_grad, self.offset_grad, self.mask_grad, self.deterministic

    @classmethod
    def from_op_args(cls, args) -> "DcnBackwardSpec":
        return cls(DcnSpec.from_op_args(args[:14]), *args[14:])


@functools.lru_cache(maxsize=256)
def _tables(height: int, width: int, spec: DcnSpec, dtype: torch.dtype, device: torch.device):
    """The kernel's tables for one geometry, copied to the device once: the level's shape and start,
    its point table, and the taps ``[K, 3]`` (tap x and y times the offset scale, the scale) in the
    compute dtype."""
    scale = spec.offset_scale
    return (constant([[height, width]], torch.int64, device), constant([0], torch.int64, device),
            constant([[spec.points, 0, 0]], torch.int32, device),
            constant([(scale * x, scale * y, scale) for x, y in spec.taps()], dtype, device))


def tables(input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], spec: DcnSpec):
    """(shapes, starts, points, taps) of a validated call."""
    f64 = torch.float64 in (input.dtype, offset.dtype, None if mask is None else mask.dtype)
    return _tables(input.shape[1], input.shape[2], spec, torch.float64 if f64 else torch.float32, input.device)


def _grid(taps: torch.Tensor, width: int, spec: DcnSpec) -> Grid:
    return Grid(taps, width, spec.stride_h, spec.stride_w, spec.dilation_h * (spec.kernel_h - 1) // 2 - spec.pad_h,
                spec.dilation_w * (spec.kernel_w - 1) // 2 - spec.pad_w, spec.packed)


def _attention_views(input, offset, mask, spec: DcnSpec):
    """(value [N, H * W, G, D], locations [N, Q, G, K, 2], weights [N, Q, G, K], Wo) as the kernel
    reads them: views where the strides allow (reshape copies otherwise)."""
    n, h, w, c = input.shape
    g, k = spec.group, spec.points
    ho, wo = spec.output_size(h, w)
    value = input.reshape(n, h * w, g, c // g)
    if spec.packed:
        rows = offset.reshape(n, ho * wo, offset.shape[-1]).narrow(-1, 0, g * 3 * k).unflatten(-1, (g, 3 * k))
        return value, rows.narrow(-1, 0, 2 * k).unflatten(-1, (k, 2)), rows.narrow(-1, 2 * k, k), wo
    return value, offset.reshape(n, ho * wo, g, k, 2), mask.reshape(n, ho * wo, g, k), wo


def dcn_forward(input, offset, mask, shapes, starts, points, taps, spec: DcnSpec) -> torch.Tensor:
    """input [N, H, W, G * D] -> [N, Ho, Wo, G * D] (see ``stn_triton.dcnv3`` / ``dcnv4``)."""
    value, loc, attn, wo = _attention_views(input, offset, mask, spec)
    out = attention_forward(value, shapes, starts, points, loc, attn, AttnSpec(spec.softmax, spec.out_dtype),
                            _grid(taps, wo, spec))
    return out.view(input.shape[0], -1, wo, input.shape[3])


def dcn_backward(grad_output, input, offset, mask, shapes, starts, points, taps, spec: DcnBackwardSpec):
    """(grad_input, grad_offset, grad_mask); one not asked for (and DCNv4's grad_mask) is an empty tensor."""
    dcn = spec.dcn
    value, loc, attn, wo = _attention_views(input, offset, mask, dcn)
    n, queries, g, k = attn.shape
    attn_spec = AttnBackwardSpec(AttnSpec(dcn.softmax, dcn.out_dtype), spec.input_grad, spec.offset_grad,
                                 spec.mask_grad or (dcn.packed and spec.offset_grad), spec.deterministic)
    empty = input.new_empty
    if dcn.packed:
        # One buffer in offset_mask's layout; the kernel writes every offset and mask entry, the padding is 0.
        grad_offset = empty(0)
        if spec.offset_grad:
            grad_offset = torch.empty((n, queries, offset.shape[-1]), dtype=compute_dtype(offset.dtype),
                                      device=offset.device)
            grad_offset.narrow(-1, g * 3 * k, offset.shape[-1] - g * 3 * k).zero_()
        grad_mask, strides = empty(0), (offset.shape[-1], 3 * k)
    else:
        grad_offset = torch.zeros((n, queries, g, k, 2), dtype=compute_dtype(offset.dtype), device=offset.device) \
            if spec.offset_grad else empty(0)
        grad_mask = torch.zeros((n, queries, g, k), dtype=compute_dtype(mask.dtype), device=mask.device) \
            if spec.mask_grad else empty(0)
        strides = (g * k * 2, k * 2)
    grad_output = grad_output.reshape(n, queries, grad_output.shape[-1])
    grad_value = points_backward(grad_output, value, Levels(shapes, starts, points), loc, attn, attn_spec,
                                 _grid(taps, wo, dcn), grad_offset, grad_mask, strides)
    grad_input = grad_value.view(input.shape) if spec.input_grad else grad_value
    if spec.offset_grad:
        grad_offset = grad_offset.view(offset.shape).to(offset.dtype)
    if spec.mask_grad:
        grad_mask = grad_mask.view(mask.shape).to(mask.dtype)
    return grad_input, grad_offset, grad_mask


# --- ops, autograd, vmap --------------------------------------------------------------------------

@triton_op("stn_triton::dcn_aggregate_fwd", mutates_args=())
def dcn_op(input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], shapes: torch.Tensor,
           starts: torch.Tensor, points: torch.Tensor, taps: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int,
           stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, offset_scale: float,
           remove_center: bool, packed: bool, softmax: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """input [N, H, W, C], offset (DCNv4: offset_mask), mask (DCNv4: None) and the kernel's tables ->
    [N, Ho, Wo, C] in ``out_dtype``."""
    spec = DcnSpec(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, offset_scale,
                   remove_center, packed, softmax, out_dtype)
    return dcn_forward(input, offset, mask, shapes, starts, points, taps, spec)


@triton_op("stn_triton::dcn_aggregate_bwd", mutates_args=())
def dcn_backward_op(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor],
                    shapes: torch.Tensor, starts: torch.Tensor, points: torch.Tensor, taps: torch.Tensor,
                    kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                    dilation_h: int, dilation_w: int, group: int, offset_scale: float, remove_center: bool,
                    packed: bool, softmax: bool, out_dtype: torch.dtype, input_grad: bool, offset_grad: bool,
                    mask_grad: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_offset, grad_mask); one not asked for is an empty tensor."""
    spec = DcnBackwardSpec(DcnSpec(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                                   offset_scale, remove_center, packed, softmax, out_dtype),
                           input_grad, offset_grad, mask_grad, deterministic)
    return dcn_backward(grad_output, input, offset, mask, shapes, starts, points, taps, spec)


def aggregate(input, offset, mask, tables_: tuple, spec: DcnSpec) -> torch.Tensor:
    return call(dcn_op, _Dcn, dcn_forward, (input, offset, mask, *tables_), spec, (input, offset, mask))


def aggregate_grads(grad_output, input, offset, mask, tables_: tuple, spec: DcnBackwardSpec):
    return call(dcn_backward_op, _DcnBackward, dcn_backward, (grad_output, input, offset, mask, *tables_), spec,
                (grad_output, input, offset, mask))


def _save(ctx, tensors, spec: DcnSpec, output) -> None:
    ctx.save_for_backward(*tensors)
    ctx.spec = spec


def _gradients(ctx, grad_output):
    input, offset, mask, *tables_ = ctx.saved_tensors
    needs = ctx.needs_input_grad
    spec = DcnBackwardSpec(ctx.spec, needs[0], needs[1], mask is not None and needs[2],
                           torch.are_deterministic_algorithms_enabled())
    if not (spec.input_grad or spec.offset_grad or spec.mask_grad):
        return (None,) * 7
    grad_input, grad_offset, grad_mask = aggregate_grads(grad_output, input, offset, mask, tuple(tables_), spec)
    return (grad_input if spec.input_grad else None, grad_offset if spec.offset_grad else None,
            grad_mask if spec.mask_grad else None, None, None, None, None)


def _vmap(info, in_dims, tensors, spec: DcnSpec):
    if any(dim is not None for dim in in_dims[3:]):
        return per_sample(info, in_dims, tensors, lambda *args: aggregate(*args[:3], args[3:], spec))
    size = info.batch_size
    input, offset, mask, *tables_ = tensors
    out = aggregate(fold(input, in_dims[0], size), fold(offset, in_dims[1], size), fold(mask, in_dims[2], size),
                    tuple(tables_), spec)
    return unfold(out, size)


def _save_backward(ctx, tensors, spec: DcnBackwardSpec, output) -> None:
    grad_output, input, offset, mask, *tables_ = tensors
    ctx.save_for_backward(grad_output, offset, mask, *tables_)
    ctx.spec = spec
    ctx.set_materialize_grads(False)


def _double_gradients(ctx, grad_grad_input, grad_grad_offset, grad_grad_mask):
    """grad_input = A^T(grad_output) is linear in grad_output: its gradient is the forward and the
    offsets' and masks' gradients with the direction as the input."""
    spec = ctx.spec
    if (grad_grad_offset is not None and spec.offset_grad) or (grad_grad_mask is not None and spec.mask_grad):
        raise NotImplementedError(
            "stn_triton: the gradients of dcnv3's / dcnv4's offsets and masks cannot be differentiated again; the "
            "input's gradient can (a gradient penalty on the input differentiates through it)"
        )
    if grad_grad_input is None:
        return (None,) * 8
    grad_output, offset, mask, *tables_ = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_grad_output = grad_offset = grad_mask = None
    if needs[0]:
        grad_grad_output = aggregate(grad_grad_input, offset, mask, tuple(tables_),
                                     replace(spec.dcn, out_dtype=grad_output.dtype))
    if needs[2] or needs[3]:
        points_spec = DcnBackwardSpec(spec.dcn, False, needs[2], mask is not None and needs[3], spec.deterministic)
        _, grad_offset, grad_mask = aggregate_grads(grad_output, grad_grad_input, offset, mask, tuple(tables_),
                                                    points_spec)
        grad_offset = grad_offset if needs[2] else None
        grad_mask = grad_mask if points_spec.mask_grad else None
    return grad_grad_output, None, grad_offset, grad_mask, None, None, None, None


def _vmap_backward(info, in_dims, tensors, spec: DcnBackwardSpec):
    if any(dim is not None for dim in in_dims[4:]):
        return per_sample(info, in_dims, tensors, lambda *args: aggregate_grads(*args[:4], args[4:], spec))
    size = info.batch_size
    grad_output, input, offset, mask, *tables_ = tensors
    grads = aggregate_grads(fold(grad_output, in_dims[0], size), fold(input, in_dims[1], size),
                            fold(offset, in_dims[2], size), fold(mask, in_dims[3], size), tuple(tables_), spec)
    outputs, dims = zip(*(unfold(grad, size) for grad in grads))
    return tuple(outputs), tuple(dims)


_Dcn = OpRules("DCNAggregate", 7, dcn_forward, _save, _gradients, _vmap,
               no_forward_ad("stn_triton's dcnv3 / dcnv4")).register(dcn_op, DcnSpec)
_DcnBackward = OpRules("DCNAggregateBackward", 8, dcn_backward, _save_backward, _double_gradients, _vmap_backward,
                       no_forward_ad("stn_triton's dcnv3 / dcnv4 backward")).register(dcn_backward_op, DcnBackwardSpec)


def dcn_aggregate(input, offset, mask, spec: DcnSpec) -> torch.Tensor:
    """The Triton op on validated arguments."""
    return aggregate(input, offset, mask, tables(input, offset, mask, spec), spec)
