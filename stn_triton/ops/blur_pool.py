"""Blur pooling and max-blur pooling (anti-aliased downsampling): launches, autograd, dispatch.

One op pair serves both: ``stn_triton::blur_pool_fwd`` (blur_pool2d is the max window 1 x 1) and
``stn_triton::blur_pool_bwd``, the gather-form backward of kernels/blur_pool.py, atomic-free and so
deterministic whatever ``torch.use_deterministic_algorithms`` says.

Autograd. The output is linear in the max map, and the max map picks one input per window
(piecewise constant argmaxes), so: the forward-mode tangent is the blur of the tangent routed
through x's argmaxes (the forward with ROUTE); grad_input is linear in grad_output, so the
backward's own gradient by grad_output is that same routed forward of its direction, and by the
input it is zero almost everywhere (None, as F.max_pool2d's double backward gives); the routed
forward's own gradient is the backward again. blur_pool2d's backward keeps no tensor at all.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch.library import triton_op

from stn_triton.kernels import codes
from stn_triton.kernels.blur_pool import _blur_pool_bwd_kernel, _blur_pool_kernel
from stn_triton.numerics import cdiv, next_power_of_2
from stn_triton.ops._dispatch import OpRules, call, fold, unfold
from stn_triton.ops._launch import channels_last, empty_like_layout, needs_int64
from stn_triton.tuning import TunedKernel, bucket

PADDINGS = {"zeros": codes.ZEROS, "reflect": codes.REFLECTION, "replicate": codes.BORDER}


@dataclass(frozen=True)
class BlurSpec:
    """What a (max-)blur pooling call computes besides its tensors."""

    kernel_size: tuple[int, int]  # binomial taps (KH, KW)
    stride: tuple[int, int]
    window: tuple[int, int]  # the max window (1, 1): no max
    padding: int  # PADDINGS' value
    out_dtype: torch.dtype

    def op_args(self) -> tuple:
        return list(self.kernel_size), list(self.stride), list(self.window), self.padding, self.out_dtype

    @classmethod
    def from_op_args(cls, args) -> "BlurSpec":
        kernel_size, stride, window, *rest = args
        return cls(tuple(kernel_size), tuple(stride), tuple(window), *rest)

    @property
    def max_pools(self) -> bool:
        return self.window != (1, 1)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The strided output of an [H, W] input: every padding mode pads K - 1 in all."""
        return (h - self.window[0]) // self.stride[0] + 1, (w - self.window[1]) // self.stride[1] + 1


@dataclass(frozen=True)
class BlurBackwardSpec:
    blur: BlurSpec
    input_size: tuple[int, int]  # (H, W) of the input
    input_dtype: torch.dtype  # grad_input's dtype
    input_channels_last: bool  # grad_input's layout

    def op_args(self) -> tuple:
        return *self.blur.op_args(), list(self.input_size), self.input_dtype, self.input_channels_last

    @classmethod
    def from_op_args(cls, args) -> "BlurBackwardSpec":
        size, *rest = args[5:]
        return cls(BlurSpec.from_op_args(args[:5]), tuple(size), *rest)


# --- configs ------------------------------------------------------------------------------------

INTERPRETER_CONFIG = triton.Config({"BLOCK_C": 4, "BLOCK_P": 32}, num_warps=4)
# (BLOCK_C, BLOCK_P, num_warps): one channel of many pixels on NCHW memory (a warp along the
# pixels), tiles of 8 to 64 channels on channels_last memory (a warp along the channels).
CONFIGS = [triton.Config({"BLOCK_C": c, "BLOCK_P": p}, num_warps=w)
           for c, p, w in [(1, 128, 4), (1, 256, 4), (1, 512, 4), (1, 512, 8), (1, 1024, 8), (2, 128, 4),
                           (2, 256, 4), (4, 128, 4), (8, 64, 4), (16, 32, 4), (32, 16, 4), (32, 32, 4),
                           (64, 8, 4), (64, 16, 4), (64, 16, 8), (128, 8, 8), (8, 16, 4), (16, 8, 4), (32, 4, 4)]]


def heuristic(channels: int, nhwc: bool) -> triton.Config:
    """NCHW: 256 pixels of one channel on 4 warps, two a thread, a warp's loads along a row. channels_last:
    up to 64 contiguous channels by enough pixels for 512 elements, on 4 warps."""
    if nhwc:
        block_c = max(8, min(next_power_of_2(channels), 64))
        return triton.Config({"BLOCK_C": block_c, "BLOCK_P": 512 // block_c}, num_warps=4)
    return triton.Config({"BLOCK_C": 1, "BLOCK_P": 256}, num_warps=4)


def bwd_heuristic(channels: int, nhwc: bool, windows: int) -> triton.Config:
    """The forward's tiles for a plain blur. Over max windows (``windows`` = MH * MW > 1) each element
    holds its windows' input block and the grad_output block of their outputs ((2M - 1)^2 + U^2
    values): one element a thread, 128 a tile, so that the registers leave more warps resident
    (sm_90 static, 2 x 2 windows, triton 3.9 / 3.6: fp32 NCHW 1 x 128 takes 80 / 56 registers where
    1 x 256 takes 105 / 117; bf16 channels_last 32 x 4 takes 70 / 54 where 64 x 8 takes 161)."""
    if windows == 1:
        return heuristic(channels, nhwc)
    if nhwc:
        block_c = max(8, min(next_power_of_2(channels), 32))
        return triton.Config({"BLOCK_C": block_c, "BLOCK_P": 128 // block_c}, num_warps=4)
    return triton.Config({"BLOCK_C": 1, "BLOCK_P": 128}, num_warps=4)


AUTOTUNE_KEY = ["KH", "KW", "SH", "SW", "MH", "MW", "PADDING", "F64"]
fwd_kernel = TunedKernel("blur_pool_fwd", _blur_pool_kernel, CONFIGS, heuristic, AUTOTUNE_KEY + ["ROUTE"],
                         writes=("y_ptr",), interpreter_config=INTERPRETER_CONFIG)
bwd_kernel = TunedKernel("blur_pool_bwd", _blur_pool_bwd_kernel, CONFIGS, bwd_heuristic, AUTOTUNE_KEY,
                         writes=("gx_ptr",), interpreter_config=INTERPRETER_CONFIG)


# --- launches -----------------------------------------------------------------------------------


def _key(pass_: str, dtype: torch.dtype, nhwc: bool, channels: int, pixels: int, spec: BlurSpec) -> str:
    return (f"{pass_}|{dtype}|{'nhwc' if nhwc else 'nchw'}|c{bucket(channels)}|p{bucket(pixels)}"
            f"|k{spec.kernel_size}|s{spec.stride}|m{spec.window}|pad{spec.padding}")


def _sizes(spec: BlurSpec) -> dict:
    (kh, kw), (sh, sw), (mh, mw) = spec.kernel_size, spec.stride, spec.window
    return dict(KH=kh, KW=kw, SH=sh, SW=sw, MH=mh, MW=mw, PADDING=spec.padding)


def blur_forward(x: torch.Tensor, routed: torch.Tensor | None, spec: BlurSpec) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, OH, OW] in ``spec.out_dtype`` and x's layout; with ``routed`` (x's
    shape), the blur of routed's values at x's argmaxes instead of x's maxima."""
    n, c, h, w = x.shape
    oh, ow = spec.output_size(h, w)
    out = empty_like_layout(x, (n, c, oh, ow), dtype=spec.out_dtype)
    if out.numel() == 0:
        return out
    nhwc = channels_last(x)
    d = routed if routed is not None else x
    launch = fwd_kernel.choose(_key("fwd" if routed is None else "route", x.dtype, nhwc, c, oh * ow, spec),
                               dict(channels=c, nhwc=nhwc), x.device)
    launch(
        lambda meta: (n * cdiv(oh * ow, meta["BLOCK_P"]), cdiv(c, meta["BLOCK_C"])),
        x_ptr=x, d_ptr=d, y_ptr=out, N=n, C=c, H=h, W=w, OH=oh, OW=ow,
        **dict(zip(("sx_n", "sx_c", "sx_h", "sx_w"), x.stride())),
        **dict(zip(("sd_n", "sd_c", "sd_h", "sd_w"), d.stride())),
        **dict(zip(("sy_n", "sy_c", "sy_h", "sy_w"), out.stride())),
        **_sizes(spec), ROUTE=routed is not None, F64=torch.float64 in (x.dtype, d.dtype, spec.out_dtype),
        INDEX_64=needs_int64(x, d, out),
    )
    return out


def blur_backward(grad_output: torch.Tensor, x: torch.Tensor | None, spec: BlurBackwardSpec) -> torch.Tensor:
    """grad_input [N, C, H, W] (the input's dtype and layout) from grad_output [N, C, OH, OW]; x is
    the input of a max-blur pooling (its argmaxes route the gradient), None for a plain blur."""
    blur = spec.blur
    n, c, oh, ow = grad_output.shape
    h, w = spec.input_size
    layout = torch.channels_last if spec.input_channels_last else torch.contiguous_format
    grad = torch.empty((n, c, h, w), dtype=spec.input_dtype, device=grad_output.device, memory_format=layout)
    if grad.numel() == 0:
        return grad
    source = x if x is not None else grad
    (kh, kw), (sh, sw) = blur.kernel_size, blur.stride
    reflect = blur.padding == codes.REFLECTION
    lift_h, lift_w = int(reflect and kh % 2 == 0), int(reflect and kw % 2 == 0)
    launch = bwd_kernel.choose(_key("bwd", spec.input_dtype, spec.input_channels_last, c, h * w, blur),
                               dict(channels=c, nhwc=spec.input_channels_last,
                                    windows=blur.window[0] * blur.window[1]), grad_output.device)
    launch(
        lambda meta: (n * cdiv(h * w, meta["BLOCK_P"]), cdiv(c, meta["BLOCK_C"])),
        x_ptr=source, gy_ptr=grad_output, gx_ptr=grad, N=n, C=c, H=h, W=w, OH=oh, OW=ow,
        **dict(zip(("sx_n", "sx_c", "sx_h", "sx_w"), source.stride())),
        **dict(zip(("sg_n", "sg_c", "sg_h", "sg_w"), grad_output.stride())),
        **dict(zip(("sgx_n", "sgx_c", "sgx_h", "sgx_w"), grad.stride())),
        **_sizes(blur), TH=cdiv(kh, sh) + lift_h, TW=cdiv(kw, sw) + lift_w, LIFT_H=lift_h, LIFT_W=lift_w,
        F64=torch.float64 in (source.dtype, grad_output.dtype, grad.dtype),
        INDEX_64=needs_int64(source, grad_output, grad),
    )
    return grad


# --- ops, autograd, vmap --------------------------------------------------------------------------


@triton_op("stn_triton::blur_pool_fwd", mutates_args=())
def blur_pool_op(input: torch.Tensor, routed: Optional[torch.Tensor], kernel_size: list[int], stride: list[int],
                 window: list[int], padding: int, out_dtype: torch.dtype) -> torch.Tensor:
    """[N, C, H, W] (and the tensor routed through its argmaxes, or None) -> [N, C, OH, OW]."""
    return blur_forward(input, routed, BlurSpec.from_op_args((kernel_size, stride, window, padding, out_dtype)))


@triton_op("stn_triton::blur_pool_bwd", mutates_args=())
def blur_pool_backward_op(grad_output: torch.Tensor, input: Optional[torch.Tensor], kernel_size: list[int],
                          stride: list[int], window: list[int], padding: int, out_dtype: torch.dtype,
                          input_size: list[int], input_dtype: torch.dtype, input_channels_last: bool) -> torch.Tensor:
    """grad_input [N, C, H, W] from grad_output [N, C, OH, OW] (and the input of a max-blur pooling)."""
    spec = BlurBackwardSpec.from_op_args((kernel_size, stride, window, padding, out_dtype, input_size, input_dtype,
                                          input_channels_last))
    return blur_backward(grad_output, input, spec)


def pool(x: torch.Tensor, routed: torch.Tensor | None, spec: BlurSpec) -> torch.Tensor:
    return call(blur_pool_op, _BlurPool, blur_forward, (x, routed), spec, (x, routed))


def pool_grad(grad_output: torch.Tensor, x: torch.Tensor | None, spec: BlurBackwardSpec) -> torch.Tensor:
    return call(blur_pool_backward_op, _BlurPoolBackward, blur_backward, (grad_output, x), spec, (grad_output, x))


def _routed_blur(x: torch.Tensor | None, direction: torch.Tensor, spec: BlurSpec) -> torch.Tensor:
    """The output's derivative along ``direction``: its blur through x's argmaxes (a plain blur of it
    without a max)."""
    if not spec.max_pools:
        return pool(direction, None, spec)
    return pool(x, direction, spec)


def _save(ctx, tensors, spec: BlurSpec, output) -> None:
    x, routed = tensors
    ctx.routed = routed is not None
    kept = x if spec.max_pools else None
    ctx.save_for_backward(kept)
    ctx.save_for_forward(kept)  # the jvp reads the argmaxes too
    ctx.spec = BlurBackwardSpec(spec, tuple(x.shape[2:]), (x if routed is None else routed).dtype, channels_last(x))


def _gradients(ctx, grad_output):
    """The input's gradient; a routed blur is linear in what it routes, whose gradient is then the
    same gather through x's argmaxes (and x's own is zero)."""
    (x,) = ctx.saved_tensors
    grad = pool_grad(grad_output, x, ctx.spec)
    return (None, grad) if ctx.routed else (grad, None)


def _jvp(ctx, x_tangent, routed_tangent):
    (x,) = ctx.saved_tensors
    return _routed_blur(x, x_tangent, ctx.spec.blur)


def _vmap(info, in_dims, tensors, spec: BlurSpec):
    x, routed = (fold(t, d, info.batch_size) for t, d in zip(tensors, in_dims))
    return unfold(pool(x, routed, spec), info.batch_size)


def _save_backward(ctx, tensors, spec: BlurBackwardSpec, output) -> None:
    ctx.save_for_backward(tensors[1])
    ctx.save_for_forward(tensors[1])
    ctx.spec = spec
    ctx.grad_dtype = tensors[0].dtype
    ctx.set_materialize_grads(False)


def _double_gradients(ctx, grad_grad_input):
    """grad_input is linear in grad_output: its gradient by grad_output is the routed blur of the
    direction; by the input (whose argmaxes are piecewise constant) it is zero."""
    if grad_grad_input is None or not ctx.needs_input_grad[0]:
        return None, None
    (x,) = ctx.saved_tensors
    blur = ctx.spec.blur
    spec = BlurSpec(blur.kernel_size, blur.stride, blur.window, blur.padding, ctx.grad_dtype)
    return _routed_blur(x, grad_grad_input, spec), None


def _jvp_backward(ctx, grad_output_tangent, x_tangent):
    (x,) = ctx.saved_tensors
    return pool_grad(grad_output_tangent, x, ctx.spec)


def _vmap_backward(info, in_dims, tensors, spec: BlurBackwardSpec):
    grad_output, x = (fold(t, d, info.batch_size) for t, d in zip(tensors, in_dims))
    return unfold(pool_grad(grad_output, x, spec), info.batch_size)


_BlurPool = OpRules("BlurPool", 2, blur_forward, _save, _gradients, _vmap, _jvp).register(blur_pool_op, BlurSpec)
_BlurPoolBackward = OpRules("BlurPoolBackward", 2, blur_backward, _save_backward, _double_gradients, _vmap_backward,
                            _jvp_backward).register(blur_pool_backward_op, BlurBackwardSpec)


def blur_pool(input: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], window: tuple[int, int],
              padding_mode: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton op on validated arguments."""
    return pool(input, None, BlurSpec(kernel_size, stride, window, PADDINGS[padding_mode], out_dtype))
