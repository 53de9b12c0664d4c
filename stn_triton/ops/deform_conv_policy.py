"""How deform_conv2d computes: the tl.dot precision of float32 GEMMs and the layout its gathers read.

Two public knobs, each with a setter (perf/ sets them to time the alternatives side by side):
``set_float32_precision`` and ``set_gather_layout``.

float32 GEMMs follow PyTorch's switches as torchvision's do: TF32 when ``torch.backends.cuda.matmul``
allows it (``torch.set_float32_matmul_precision("high")`` or ``"medium"``, or ``allow_tf32``); else
the float32 precision set here. "tf32x3" (the default) splits each operand into a TF32 head and a
TF32 tail and adds three tensor-core products (tail x tail dropped): about 2^-21 relative error per
product against float32 FMA's 2^-24, both under the error of the float32 accumulation they share.
Emulated at dcn_r50's reduction length (9 x 256), its error against float64 is float32 FMA's (2.6e-7
RMS relative; TF32 alone 2.9e-4). Three TF32 products still take 1/2.5 of the time of FMA on an H100
(495 against 67 TFLOP/s). "ieee" is float32 FMA, for comparison.

Gather layout: the kernels read one contiguous run of channels per (pixel, tap, corner) from
channels-last memory, with a warp's threads along the channels. An NCHW input whose channel runs
fill at least a 32-byte sector is copied to channels-last first (one read and one write of the
input, against up to 4 corners x K taps x output-channel blocks gathers of each element); one with
shorter runs is gathered as it is, threads along pixels.
"""

import torch

from stn_triton.conv_shape import DeformConvShape
from stn_triton.ops._launch import channels_last

FLOAT32_PRECISIONS = ("tf32x3", "ieee", "tf32")
GATHER_LAYOUTS = ("auto", "channels_last", "input")
SECTOR_BYTES = 32  # the unit of a global memory transaction

_float32_precision = "tf32x3"
_gather_layout = "auto"


def set_float32_precision(precision: str) -> None:
    """The tl.dot precision of float32 GEMMs that PyTorch's switches keep in float32 (see the module)."""
    global _float32_precision
    if precision not in FLOAT32_PRECISIONS:
        raise ValueError(f"precision must be one of {FLOAT32_PRECISIONS}, got {precision!r}")
    _float32_precision = precision


def float32_precision() -> str:
    return _float32_precision


def set_gather_layout(layout: str) -> None:
    """"auto" (``gather_channels_last``'s rule), "channels_last" (always: copy an NCHW input), or
    "input" (never copy: channels-fastest only from channels-last memory)."""
    global _gather_layout
    if layout not in GATHER_LAYOUTS:
        raise ValueError(f"layout must be one of {GATHER_LAYOUTS}, got {layout!r}")
    _gather_layout = layout


def gather_layout() -> str:
    return _gather_layout


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
    return "tf32" if tf32_allowed() else _float32_precision


def gather_channels_last(input: torch.Tensor, shape: DeformConvShape) -> bool:
    """Whether the kernels gather channels-fastest from channels-last memory (copying an NCHW input).

    Yes when one sample point's channels, the run a program reads from one offset group of one
    conv group, fill at least one 32-byte sector: then a warp's load of one (pixel, corner) is one
    transaction per sector instead of one per channel. Shorter runs gather along pixels, which
    neighbouring output pixels make neighbouring.
    """
    if _gather_layout == "channels_last":
        return True
    if _gather_layout == "input":
        return channels_last(input)
    run = min(shape.group_channels, shape.offset_group_channels) * input.element_size()
    return run >= SECTOR_BYTES


def gather_source(input: torch.Tensor, channels_fastest: bool) -> torch.Tensor:
    """The tensor the kernels gather from: dense NCHW or channels-last, so that a zeros_like of it
    (grad_input's buffer) has its strides exactly; channels-last when gathering channels-fastest. A
    view that is dense in neither (a channel slice) is made dense in the layout it has."""
    if channels_fastest or (channels_last(input) and not input.is_contiguous(memory_format=torch.channels_last)):
        return input.contiguous(memory_format=torch.channels_last)
    if input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last):
        return input
    return input.contiguous()
