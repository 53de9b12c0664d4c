"""The shape arithmetic of a deformable convolution: sizes, groups and the output, from the arguments.

Shared by argument validation (``stn_triton.validation``), the swap's routing and the op launchers
(``stn_triton.ops.deform_conv``), so that all three agree on what a call computes.
"""

from typing import NamedTuple

from stn_triton.errors import ArgumentError


def output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    """(HO, WO) of a convolution."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


class DeformConvShape(NamedTuple):
    """The sizes of one deform_conv2d: input [batch, channels, height, width], weight
    [out_channels, channels / groups, kernel_h, kernel_w], offsets [batch, 2 offset_groups taps,
    out_h, out_w]."""

    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    groups: int
    offset_groups: int
    out_h: int
    out_w: int

    @classmethod
    def of(cls, input_shape, offset_shape, weight_shape, stride, padding, dilation) -> "DeformConvShape":
        """The shape of a call with 4-D input, offset and weight; an ArgumentError naming the argument
        when their sizes do not fit together (stride, padding, dilation: valid pairs).

        The offset's channel count is checked first, as torchvision checks it, with torchvision's
        words at the start of the message (its own tests match them)."""
        n, c, h, w = input_shape
        c_out, c_per_group, kh, kw = weight_shape
        taps = kh * kw
        if taps == 0 or offset_shape[1] == 0 or offset_shape[1] % (2 * taps) != 0:
            raise ArgumentError(
                f"the shape of the offset tensor at dimension 1 is not valid: offset must have "
                f"2 * offset_groups * {taps} channels for a {kh}x{kw} kernel, got {offset_shape[1]}"
            )
        if c_per_group == 0 or c % c_per_group != 0:
            raise ArgumentError(
                f"weight.shape[1] ({c_per_group}) must divide input's {c} channels, got weight of shape {tuple(weight_shape)}"
            )
        groups = c // c_per_group
        if c_out % groups != 0:
            raise ArgumentError(f"weight's {c_out} output channels must be divisible by groups = {groups}")
        offset_groups = offset_shape[1] // (2 * taps)
        if c % offset_groups != 0:
            raise ArgumentError(f"offset's {offset_groups} offset groups must divide input's {c} channels")
        if offset_shape[0] != n:
            raise ArgumentError(f"offset must have input's batch size {n}, got offset of shape {tuple(offset_shape)}")
        out_h, out_w = output_size(h, w, kh, kw, stride, padding, dilation)
        if out_h <= 0 or out_w <= 0:
            raise ArgumentError(f"the output would be empty: input {tuple(input_shape)}, kernel {kh}x{kw}, "
                                f"stride {stride}, padding {padding}, dilation {dilation}")
        if tuple(offset_shape[2:]) != (out_h, out_w):
            raise ArgumentError(
                f"offset must have the output's spatial size {(out_h, out_w)}, got {tuple(offset_shape[2:])}"
            )
        return cls(n, c, h, w, c_out, kh, kw, groups, offset_groups, out_h, out_w)

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def group_channels(self) -> int:
        """Input channels per convolution group (CG)."""
        return self.channels // self.groups

    @property
    def group_out_channels(self) -> int:
        """Output channels per convolution group (COG)."""
        return self.out_channels // self.groups

    @property
    def offset_group_channels(self) -> int:
        """Input channels per offset group (CPG)."""
        return self.channels // self.offset_groups

    @property
    def pixels(self) -> int:
        """Output pixels per image (P)."""
        return self.out_h * self.out_w

    @property
    def rows(self) -> int:
        """Rows of the implicit GEMM: every output pixel of the batch."""
        return self.batch * self.pixels

    def mask_shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.offset_groups * self.taps, self.out_h, self.out_w
