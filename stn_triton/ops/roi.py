"""RoI pooling (RoI align, position-sensitive RoI align, deformable RoI pooling): launches, autograd, dispatch.

One op pair serves every kind and every level count: ``stn_triton::roi_pool_fwd`` takes the RoIs
``[K, 5]``, optionally each RoI's pyramid level (MultiScaleRoIAlign: then one launch per level
pools that level's RoIs into the one output, with no index selection and no host sync), the
deformable offsets and mask, and up to ``MAX_LEVELS`` feature maps; ``stn_triton::roi_pool_bwd``
returns the gradients of every feature map, of the offsets and of the mask.

Backward. The offsets' and mask's gradients are reductions over a bin's channels and samples,
made by the program that owns the bin. grad_input is a scatter: by default atomics into a
float32 buffer (float64 for float64) by the forward's programs; under
``torch.use_deterministic_algorithms(True)`` a gather by input pixel tiles
(kernels/roi.py, ``_roi_pixels_kernel``) that writes every element once, in a fixed order, with
no memory beyond grad_input itself (torchvision's deterministic path samples every RoI at H x W
points instead).

Double backward. grad_input is linear in grad_output, so its gradient is the forward again with
the direction as the input, and the offsets' and mask's gradients with the direction as the
input; the gradients of the offsets and mask cannot be differentiated again and raise.
"""

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
from torch.library import triton_op

from stn_triton.kernels import codes
from stn_triton.kernels.roi import _roi_bins_kernel, _roi_pixels_kernel
from stn_triton.numerics import cdiv, compute_dtype, next_power_of_2
from stn_triton.ops._dispatch import OpRules, call, no_forward_ad, per_sample
from stn_triton.ops._launch import channels_last, empty_like_layout, needs_int64
from stn_triton.tuning import TunedKernel, bucket

# Feature maps one call pools from (FPN's P2-P6); MultiScaleRoIAlign pools more in several calls.
MAX_LEVELS = 5


@dataclass(frozen=True)
class RoISpec:
    """What a RoI pooling call computes besides its tensors."""

    kind: int  # codes.ROI_ALIGN, PS_ROI_ALIGN or DEFORM_ROI_POOL
    output_size: tuple[int, int]  # (PH, PW) bins
    scales: tuple[float, ...]  # each level's spatial_scale (box units -> its pixels)
    sampling_ratio: int  # samples a bin side; <= 0: adaptive
    aligned: bool  # ROI_ALIGN: the half-pixel shift (the other kinds always shift)
    gamma: float  # DEFORM_ROI_POOL: the offsets' scale
    out_dtype: torch.dtype

    def op_args(self) -> tuple:
        return (self.kind, self.output_size[0], self.output_size[1], list(self.scales), self.sampling_ratio,
                self.aligned, self.gamma, self.out_dtype)

    @classmethod
    def from_op_args(cls, args) -> "RoISpec":
        kind, ph, pw, scales, *rest = args
        return cls(kind, (ph, pw), tuple(scales), *rest)

    @property
    def bins(self) -> int:
        return self.output_size[0] * self.output_size[1]


@dataclass(frozen=True)
class RoIBackwardSpec:
    roi: RoISpec
    input_grad: bool
    offset_grad: bool
    mask_grad: bool
    deterministic: bool

    def op_args(self) -> tuple:
        return *self.roi.op_args(), self.input_grad, self.offset_grad, self.mask_grad, self.deterministic

    @classmethod
    def from_op_args(cls, args) -> "RoIBackwardSpec":
        return cls(RoISpec.from_op_args(args[:8]), *args[8:])


# --- configs ------------------------------------------------------------------------------------

BINS_INTERPRETER_CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_C": 4}, num_warps=4)
# (BLOCK_B, BLOCK_C, num_warps): lanes along the bins for NCHW, along the channels for channels_last.
BINS_CONFIGS = [triton.Config({"BLOCK_B": b, "BLOCK_C": c}, num_warps=w)
                for b, c, w in [(64, 16, 4), (128, 8, 4), (32, 32, 4), (64, 8, 4), (128, 16, 8), (32, 16, 2),
                                (16, 64, 4), (8, 128, 4), (32, 64, 8), (16, 32, 2), (16, 16, 4), (256, 1, 4),
                                (128, 4, 4), (256, 4, 8)]]


def bins_heuristic(channels: int, nhwc: bool) -> triton.Config:
    """1024 tile elements on 4 warps: up to 64 contiguous channels a lane block on channels_last
    memory (vector loads), else 64 (RoI, bin) lanes by 16 channels; a map of one to four channels
    (Mask R-CNN's mask targets pool one-channel masks) spends no lanes on absent channels."""
    if nhwc:
        block_c = max(8, min(next_power_of_2(channels), 64))
        return triton.Config({"BLOCK_B": 1024 // block_c, "BLOCK_C": block_c}, num_warps=4)
    if channels == 1:
        return triton.Config({"BLOCK_B": 256, "BLOCK_C": 1}, num_warps=4)
    if channels <= 4:
        return triton.Config({"BLOCK_B": 128, "BLOCK_C": 4}, num_warps=4)
    return triton.Config({"BLOCK_B": 64, "BLOCK_C": 16}, num_warps=4)


PIXELS_INTERPRETER_CONFIG = triton.Config({"BLOCK_H": 4, "BLOCK_W": 4, "BLOCK_C": 4}, num_warps=4)
PIXELS_CONFIGS = [triton.Config({"BLOCK_H": h, "BLOCK_W": w, "BLOCK_C": c}, num_warps=nw)
                  for h, w, c, nw in [(8, 16, 32, 4), (8, 32, 16, 4), (16, 16, 16, 4), (8, 8, 64, 4),
                                      (4, 8, 64, 4), (8, 16, 64, 8), (16, 32, 8, 4), (4, 4, 128, 4),
                                      (16, 32, 1, 4), (16, 16, 4, 4)]]


def pixels_heuristic(channels: int, nhwc: bool) -> triton.Config:
    """A tile of 128 pixels (rows of 16 along NCHW's contiguous width) by 32 channels, or of 32
    pixels by 64 contiguous channels on channels_last memory; 4 warps. Maps of one to four
    channels take more pixels instead of absent channels."""
    if nhwc:
        return triton.Config({"BLOCK_H": 4, "BLOCK_W": 8, "BLOCK_C": 64}, num_warps=4)
    if channels == 1:
        return triton.Config({"BLOCK_H": 16, "BLOCK_W": 32, "BLOCK_C": 1}, num_warps=4)
    if channels <= 4:
        return triton.Config({"BLOCK_H": 16, "BLOCK_W": 16, "BLOCK_C": 4}, num_warps=4)
    return triton.Config({"BLOCK_H": 8, "BLOCK_W": 16, "BLOCK_C": 32}, num_warps=4)


AUTOTUNE_KEY = ["PASS", "KIND", "OFFSET", "MASK", "INPUT_GRAD", "OFFSET_GRAD", "MASK_GRAD", "F64"]
fwd_kernel = TunedKernel("roi_pool_fwd", _roi_bins_kernel, BINS_CONFIGS, bins_heuristic, AUTOTUNE_KEY,
                         writes=("y_ptr",), interpreter_config=BINS_INTERPRETER_CONFIG)
bwd_kernel = TunedKernel("roi_pool_bwd", _roi_bins_kernel, BINS_CONFIGS, bins_heuristic, AUTOTUNE_KEY,
                         writes=("gx_ptr", "goffset_ptr", "gmask_ptr"), reset_to_zero=["gx_ptr"],
                         interpreter_config=BINS_INTERPRETER_CONFIG)
pixels_kernel = TunedKernel("roi_pool_pixels", _roi_pixels_kernel, PIXELS_CONFIGS, pixels_heuristic,
                            ["KIND", "OFFSET", "MASK", "F64"], writes=("gx_ptr",),
                            interpreter_config=PIXELS_INTERPRETER_CONFIG)


# --- launches -----------------------------------------------------------------------------------


def _key(pass_: str, x: torch.Tensor, rois: torch.Tensor, spec: RoISpec) -> str:
    layout = "nhwc" if channels_last(x) else "nchw"
    return f"{pass_}|{x.dtype}|{layout}|c{bucket(x.shape[1])}|k{bucket(rois.shape[0])}|b{spec.bins}|kind{spec.kind}"


def _shape(x: torch.Tensor) -> dict:
    return dict(channels=x.shape[1], nhwc=channels_last(x))


def _arguments(rois, levels, offset, mask, features, spec: RoISpec) -> dict:
    """What every launch shares; a pointer a launch does not use gets ``rois`` as a stand-in."""
    ph, pw = spec.output_size
    stand_in = rois
    args = dict(
        rois_ptr=rois, levels_ptr=levels if levels is not None else stand_in,
        offset_ptr=offset if offset is not None else stand_in, mask_ptr=mask if mask is not None else stand_in,
        K=rois.shape[0], PH=ph, PW=pw, SR=spec.sampling_ratio, gamma=spec.gamma,
        sr_k=rois.stride(0), sr_c=rois.stride(1), sl_k=levels.stride(0) if levels is not None else 0,
        KIND=spec.kind, ALIGNED=spec.aligned, OFFSET=offset is not None, MASK=mask is not None,
        LEVELS=levels is not None, ZERO_OTHERS=False,
        F64=torch.float64 in (rois.dtype, *(t.dtype for t in (offset, mask, *features) if t is not None)),
    )
    args.update(zip(("so_k", "so_c", "so_h", "so_w"), offset.stride() if offset is not None else (0,) * 4))
    args.update(zip(("sm_k", "sm_h", "sm_w"), (mask.stride(0), *mask.stride()[2:]) if mask is not None else (0,) * 3))
    return args


def _level_arguments(x: torch.Tensor, level: int, spec: RoISpec) -> dict:
    n, _, h, w = x.shape
    return dict(N=n, H=h, W=w, LEVEL=level, scale=spec.scales[level])


def roi_forward(rois, levels, offset, mask, *features, spec: RoISpec) -> torch.Tensor:
    """[K, C_out, PH, PW] from the features (see ``stn_triton.roi_align``)."""
    features = [f for f in features if f is not None]
    first = features[0]
    channels = first.shape[1] // spec.bins if spec.kind == codes.PS_ROI_ALIGN else first.shape[1]
    shape = (rois.shape[0], channels, *spec.output_size)
    out = empty_like_layout(first, shape, dtype=spec.out_dtype)
    # With levels, the first launch also writes 0 to the bins of the other levels' RoIs (those of
    # another call's levels stay 0: a pyramid of more than MAX_LEVELS maps pools in several calls),
    # so the output takes no separate zeroing pass, unless a map without pixels skips its launch.
    zeroed = any(f.shape[2] * f.shape[3] == 0 for f in features)
    if zeroed:
        out.zero_()
    if out.numel() == 0:
        return out
    args = _arguments(rois, levels, offset, mask, features, spec)
    args.update(y_ptr=out, gy_ptr=out, gx_ptr=out, goffset_ptr=out, gmask_ptr=out, C=channels,
                sy_k=out.stride(0), sy_c=out.stride(1), sy_b=out.stride(3), sgy_k=0, sgy_c=0, sgy_h=0, sgy_w=0,
                sgx_n=0, sgx_c=0, sgx_h=0, sgx_w=0, PASS=codes.FORWARD, INPUT_GRAD=False, OFFSET_GRAD=False,
                MASK_GRAD=False)
    lanes = rois.shape[0] * spec.bins
    for level, x in enumerate(features):
        if x.shape[2] * x.shape[3] == 0:
            continue
        launch = fwd_kernel.choose(_key("fwd", x, rois, spec), _shape(x), x.device)
        args.update(_level_arguments(x, level, spec), x_ptr=x, sx_n=x.stride(0), sx_c=x.stride(1),
                    sx_h=x.stride(2), sx_w=x.stride(3), EVEN_C=channels % launch.most("BLOCK_C") == 0,
                    INDEX_64=needs_int64(x, out, rois), ZERO_OTHERS=levels is not None and level == 0 and not zeroed)
        launch(lambda meta: (cdiv(lanes, meta["BLOCK_B"]), cdiv(channels, meta["BLOCK_C"])), **args)
    return out


def roi_backward(grad_output, rois, levels, offset, mask, *features, spec: RoIBackwardSpec):
    """(grad of each feature map (MAX_LEVELS slots), grad_offset, grad_mask); one not asked for is empty."""
    roi = spec.roi
    present = [f for f in features if f is not None]

    def empty():  # one per unused return: an op's returns may not alias each other
        return rois.new_empty(0)

    k = rois.shape[0]
    ph, pw = roi.output_size
    grad_offset = torch.zeros((k, 2, ph, pw), dtype=compute_dtype(offset.dtype), device=rois.device) \
        if spec.offset_grad else empty()
    grad_mask = torch.zeros((k, ph, pw), dtype=compute_dtype(mask.dtype), device=rois.device) \
        if spec.mask_grad else empty()
    atomic = spec.input_grad and not spec.deterministic
    grads = [empty_like_layout(f, f.shape, dtype=compute_dtype(f.dtype)).zero_() if atomic else empty() for f in present]
    channels = grad_output.shape[1]
    args = _arguments(rois, levels, offset, mask, present, roi)
    args.update(gy_ptr=grad_output, y_ptr=grad_output, C=channels, sy_k=0, sy_c=0, sy_b=0,
                **dict(zip(("sgy_k", "sgy_c", "sgy_h", "sgy_w"), grad_output.stride())))
    points = spec.offset_grad or spec.mask_grad
    if grad_output.numel() > 0 and (atomic or points):
        lanes = k * roi.bins
        for level, x in enumerate(present):
            if x.shape[2] * x.shape[3] == 0:
                continue
            launch = bwd_kernel.choose(_key("bwd" if atomic else "bwd-points", x, rois, roi), _shape(x), x.device)
            gx = grads[level] if atomic else x.new_empty(1)
            args.update(_level_arguments(x, level, roi), x_ptr=x, sx_n=x.stride(0), sx_c=x.stride(1),
                        sx_h=x.stride(2), sx_w=x.stride(3), gx_ptr=gx,
                        **dict(zip(("sgx_n", "sgx_c", "sgx_h", "sgx_w"), gx.stride() if atomic else (0,) * 4)),
                        goffset_ptr=grad_offset if spec.offset_grad else x.new_empty(1),
                        gmask_ptr=grad_mask if spec.mask_grad else x.new_empty(1),
                        PASS=codes.BACKWARD, INPUT_GRAD=atomic, OFFSET_GRAD=spec.offset_grad,
                        MASK_GRAD=spec.mask_grad, EVEN_C=channels % launch.most("BLOCK_C") == 0,
                        INDEX_64=needs_int64(x, grad_output, rois, gx))
            launch(lambda meta: (cdiv(lanes, meta["BLOCK_B"]), 1 if points else cdiv(channels, meta["BLOCK_C"])),
                   **args)
    if atomic:
        grads = [g.to(f.dtype) for g, f in zip(grads, present)]
    elif spec.input_grad:
        grads = [_deterministic_grad_input(grad_output, x, level, args, roi) for level, x in enumerate(present)]
    grads += [empty() for _ in range(MAX_LEVELS - len(grads))]
    return (*grads, grad_offset.to(offset.dtype) if spec.offset_grad else grad_offset,
            grad_mask.to(mask.dtype) if spec.mask_grad else grad_mask)


def _deterministic_grad_input(grad_output, x, level: int, args: dict, spec: RoISpec) -> torch.Tensor:
    """One feature map's grad_input without atomics: each input pixel tile gathers from every RoI
    in order (kernels/roi.py)."""
    grad = empty_like_layout(x, x.shape)
    if grad.numel() == 0:
        return grad
    n, c, h, w = x.shape
    launch = pixels_kernel.choose(_key("pixels", x, args["rois_ptr"], spec), _shape(x), x.device)
    per_bin = c // spec.bins if spec.kind == codes.PS_ROI_ALIGN else c
    launch(
        lambda meta: (n * cdiv(h, meta["BLOCK_H"]) * cdiv(w, meta["BLOCK_W"]),
                      cdiv(per_bin, meta["BLOCK_C"]) * (spec.bins if spec.kind == codes.PS_ROI_ALIGN else 1)),
        rois_ptr=args["rois_ptr"], levels_ptr=args["levels_ptr"], offset_ptr=args["offset_ptr"],
        mask_ptr=args["mask_ptr"], gy_ptr=grad_output, gx_ptr=grad, K=args["K"], N=n, C=c, H=h, W=w,
        PH=args["PH"], PW=args["PW"], SR=args["SR"], LEVEL=level, scale=spec.scales[level], gamma=args["gamma"],
        sr_k=args["sr_k"], sr_c=args["sr_c"], sl_k=args["sl_k"], so_k=args["so_k"], so_c=args["so_c"],
        so_h=args["so_h"], so_w=args["so_w"], sm_k=args["sm_k"], sm_h=args["sm_h"], sm_w=args["sm_w"],
        **dict(zip(("sgy_k", "sgy_c", "sgy_h", "sgy_w"), grad_output.stride())),
        **dict(zip(("sgx_n", "sgx_c", "sgx_h", "sgx_w"), grad.stride())),
        KIND=spec.kind, ALIGNED=spec.aligned, OFFSET=args["OFFSET"], MASK=args["MASK"], LEVELS=args["LEVELS"],
        F64=args["F64"], INDEX_64=needs_int64(grad, grad_output, args["rois_ptr"]),
        EVEN_C=per_bin % launch.most("BLOCK_C") == 0,
    )
    return grad


# --- ops, autograd, vmap --------------------------------------------------------------------------


@triton_op("stn_triton::roi_pool_fwd", mutates_args=())
def roi_op(rois: torch.Tensor, levels: Optional[torch.Tensor], offset: Optional[torch.Tensor],
           mask: Optional[torch.Tensor], f0: torch.Tensor, f1: Optional[torch.Tensor], f2: Optional[torch.Tensor],
           f3: Optional[torch.Tensor], f4: Optional[torch.Tensor], kind: int, pooled_height: int, pooled_width: int,
           scales: list[float], sampling_ratio: int, aligned: bool, gamma: float,
           out_dtype: torch.dtype) -> torch.Tensor:
    """RoIs [K, 5], each RoI's level (or None), offsets, mask and feature maps -> [K, C_out, PH, PW]."""
    spec = RoISpec(kind, (pooled_height, pooled_width), tuple(scales), sampling_ratio, aligned, gamma, out_dtype)
    return roi_forward(rois, levels, offset, mask, f0, f1, f2, f3, f4, spec=spec)


@triton_op("stn_triton::roi_pool_bwd", mutates_args=())
def roi_backward_op(grad_output: torch.Tensor, rois: torch.Tensor, levels: Optional[torch.Tensor],
                    offset: Optional[torch.Tensor], mask: Optional[torch.Tensor], f0: torch.Tensor,
                    f1: Optional[torch.Tensor], f2: Optional[torch.Tensor], f3: Optional[torch.Tensor],
                    f4: Optional[torch.Tensor], kind: int, pooled_height: int, pooled_width: int,
                    scales: list[float], sampling_ratio: int, aligned: bool, gamma: float, out_dtype: torch.dtype,
                    input_grad: bool, offset_grad: bool, mask_grad: bool, deterministic: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """(grad of f0..f4, grad_offset, grad_mask); one not asked for is an empty tensor."""
    spec = RoIBackwardSpec(RoISpec(kind, (pooled_height, pooled_width), tuple(scales), sampling_ratio, aligned, gamma,
                                   out_dtype), input_grad, offset_grad, mask_grad, deterministic)
    return roi_backward(grad_output, rois, levels, offset, mask, f0, f1, f2, f3, f4, spec=spec)


def _forward(rois, levels, offset, mask, f0, f1, f2, f3, f4, spec):
    return roi_forward(rois, levels, offset, mask, f0, f1, f2, f3, f4, spec=spec)


def _backward(grad_output, rois, levels, offset, mask, f0, f1, f2, f3, f4, spec):
    return roi_backward(grad_output, rois, levels, offset, mask, f0, f1, f2, f3, f4, spec=spec)


def pool(rois, levels, offset, mask, features: list, spec: RoISpec) -> torch.Tensor:
    slots = (*features, *[None] * (MAX_LEVELS - len(features)))
    return call(roi_op, _RoIPool, _forward, (rois, levels, offset, mask, *slots), spec, (offset, mask, *features))


def pool_grads(grad_output, rois, levels, offset, mask, features: list, spec: RoIBackwardSpec):
    slots = (*features, *[None] * (MAX_LEVELS - len(features)))
    return call(roi_backward_op, _RoIPoolBackward, _backward, (grad_output, rois, levels, offset, mask, *slots), spec,
                (grad_output, offset, mask, *features))


def _present(slots) -> list:
    return [f for f in slots if f is not None]


def _save(ctx, tensors, spec: RoISpec, output) -> None:
    ctx.save_for_backward(*tensors)
    ctx.spec = spec


def _gradients(ctx, grad_output):
    rois, levels, offset, mask, *slots = ctx.saved_tensors
    needs = ctx.needs_input_grad
    spec = RoIBackwardSpec(ctx.spec, any(needs[4:]), needs[2], needs[3], torch.are_deterministic_algorithms_enabled())
    if not (spec.input_grad or spec.offset_grad or spec.mask_grad):
        return (None,) * 9
    grads = pool_grads(grad_output, rois, levels, offset, mask, _present(slots), spec)
    feature_grads = [g if need and f is not None else None for g, f, need in zip(grads[:MAX_LEVELS], slots, needs[4:])]
    grad_offset = grads[MAX_LEVELS].view(offset.shape) if spec.offset_grad else None
    grad_mask = grads[MAX_LEVELS + 1].view(mask.shape) if spec.mask_grad else None
    return None, None, grad_offset, grad_mask, *feature_grads


def _vmap(info, in_dims, tensors, spec: RoISpec):
    """RoIs index their images, so a batch of calls cannot fold into one: one call per sample."""
    return per_sample(info, in_dims, tensors,
                      lambda rois, levels, offset, mask, *slots: pool(rois, levels, offset, mask, _present(slots), spec))


def _save_backward(ctx, tensors, spec: RoIBackwardSpec, output) -> None:
    grad_output, rois, levels, offset, mask, *slots = tensors
    # The features' values are not needed (grad_input is linear in grad_output, and the second
    # derivatives below take the direction as the input): keep only what a zero direction needs.
    ctx.save_for_backward(grad_output, rois, levels, offset, mask)
    ctx.features = [None if f is None else (f.shape, f.dtype, f.device) for f in slots]
    ctx.spec = spec
    ctx.set_materialize_grads(False)


def _double_gradients(ctx, *grad_grads):
    """grad_input is linear in grad_output: its gradient is the forward, and the offsets' and mask's
    gradients, with the direction as the input."""
    spec = ctx.spec
    grad_grad_features = grad_grads[:MAX_LEVELS]
    grad_grad_offset, grad_grad_mask = grad_grads[MAX_LEVELS:]
    if (grad_grad_offset is not None and spec.offset_grad) or (grad_grad_mask is not None and spec.mask_grad):
        raise NotImplementedError(
            "stn_triton: the gradients of deform_roi_pool's offset and mask cannot be differentiated again; the "
            "input's gradient can (a gradient penalty on the input differentiates through it)"
        )
    if all(g is None for g in grad_grad_features):
        return (None,) * 10
    grad_output, rois, levels, offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    directions = [g if g is not None else torch.zeros(f[0], dtype=f[1], device=f[2])
                  for g, f in zip(grad_grad_features, ctx.features) if f is not None]
    grad_grad_output = grad_offset = grad_mask = None
    if needs[0]:
        grad_grad_output = pool(rois, levels, offset, mask, directions, replace(spec.roi, out_dtype=grad_output.dtype))
    if needs[3] or needs[4]:
        points_spec = RoIBackwardSpec(spec.roi, False, needs[3], needs[4], spec.deterministic)
        grads = pool_grads(grad_output, rois, levels, offset, mask, directions, points_spec)
        grad_offset = grads[MAX_LEVELS].view(offset.shape) if needs[3] else None
        grad_mask = grads[MAX_LEVELS + 1].view(mask.shape) if needs[4] else None
    return grad_grad_output, None, None, grad_offset, grad_mask, *[None] * MAX_LEVELS


def _vmap_backward(info, in_dims, tensors, spec: RoIBackwardSpec):
    return per_sample(info, in_dims, tensors,
                      lambda g, rois, levels, offset, mask, *slots: pool_grads(g, rois, levels, offset, mask,
                                                                               _present(slots), spec))


_RoIPool = OpRules("RoIPool", 9, _forward, _save, _gradients, _vmap,
                   no_forward_ad("stn_triton's RoI pooling")).register(roi_op, RoISpec)
_RoIPoolBackward = OpRules("RoIPoolBackward", 10, _backward, _save_backward, _double_gradients, _vmap_backward,
                           no_forward_ad("stn_triton's RoI pooling backward")).register(roi_backward_op,
                                                                                        RoIBackwardSpec)


def roi_pool(input, rois, offset, mask, kind: int, output_size: tuple[int, int], spatial_scale: float,
             sampling_ratio: int, aligned: bool, gamma: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton op on validated arguments, one feature map."""
    spec = RoISpec(kind, output_size, (float(spatial_scale),), int(sampling_ratio), bool(aligned), float(gamma),
                   out_dtype)
    return pool(rois, None, offset, mask, [input], spec)


def multi_scale_roi_align(features: list, rois, levels, output_size: tuple[int, int], scales, sampling_ratio: int,
                          aligned: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """RoI align of each RoI from the feature map its level names (levels [K] integer): one call per
    MAX_LEVELS feature maps, each leaving the other calls' RoIs 0, summed."""
    out = None
    for first in range(0, len(features), MAX_LEVELS):
        chunk = list(features[first:first + MAX_LEVELS])
        spec = RoISpec(codes.ROI_ALIGN, output_size, tuple(float(s) for s in scales[first:first + MAX_LEVELS]),
                       int(sampling_ratio), bool(aligned), 0.0, out_dtype)
        part = pool(rois, levels - first if first else levels, None, None, chunk, spec)
        out = part if out is None else out + part
    return out
