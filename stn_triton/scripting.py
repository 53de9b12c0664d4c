"""TorchScript: every public function and module scripts, through registered ``torch.ops.stn_triton`` ops.

TorchScript cannot compile the Python functions of ``stn_triton.functional`` (their validation,
dispatch and autocast rules are plain Python), and deployment code scripts whole models. So each
public function is also a registered op, ``torch.ops.stn_triton.<name>``, with the function's own
schema and defaults, whose CompositeImplicitAutograd kernel is the Python function itself
(validation, backends and autograd included); and each function names, through
``__prepare_scriptable__``, a TorchScript twin that calls that op. ``torch.jit.script`` of a
function, or of a module whose ``forward`` calls one, compiles the twin: the scripted graph calls
the registered op, which runs the same Python as an eager call.
"""

from typing import List, Optional, Union

import torch
from torch.jit.annotations import BroadcastingList2

from stn_triton import functional

_LIBRARY = torch.library.Library("stn_triton", "FRAGMENT")
_SAMPLING = "str mode='bilinear', str padding_mode='zeros', bool align_corners=False"
_SCHEMAS = {
    "grid_sample": f"grid_sample(Tensor input, Tensor grid, {_SAMPLING}) -> Tensor",
    "affine_grid": "affine_grid(Tensor theta, int[] size, bool align_corners=False) -> Tensor",
    "affine_grid_sample": f"affine_grid_sample(Tensor input, Tensor theta, int[]? size=None, {_SAMPLING}) -> Tensor",
    "perspective_grid_sample": (f"perspective_grid_sample(Tensor input, Tensor homography, int[]? size=None, "
                                f"{_SAMPLING}) -> Tensor"),
    "tps_grid_sample": (f"tps_grid_sample(Tensor input, Tensor source_points, Tensor? control_points=None, "
                        f"int[]? size=None, {_SAMPLING}) -> Tensor"),
    "tps_grid_sample_solved": ("tps_grid_sample_solved(Tensor input, Tensor source_points, Tensor? control_points, "
                               "Tensor? solver, int[]? size, str mode, str padding_mode, bool align_corners) -> Tensor"),
    "warp_affine": ("warp_affine(Tensor src, Tensor M, int[] dsize, str mode='bilinear', str padding_mode='zeros', "
                    "bool align_corners=True, Tensor? fill_value=None) -> Tensor"),
    "warp_perspective": ("warp_perspective(Tensor src, Tensor M, int[] dsize, str mode='bilinear', "
                         "str padding_mode='zeros', bool align_corners=True, Tensor? fill_value=None) -> Tensor"),
    "deform_conv2d": ("deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias=None, int[2] stride=1, "
                      "int[2] padding=0, int[2] dilation=1, Tensor? mask=None) -> Tensor"),
    "ms_deform_attn": ("ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor? level_start_index, "
                       "Tensor sampling_locations, Tensor attention_weights, int im2col_step=64, "
                       "int[]? points_per_level=None, bool softmax=False) -> Tensor"),
    "dcnv3": ("dcnv3(Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, int stride_h, int stride_w, "
              "int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, float offset_scale, "
              "bool remove_center=False) -> Tensor"),
    "dcnv4": ("dcnv4(Tensor input, Tensor offset_mask, int kernel_h, int kernel_w, int stride_h, int stride_w, "
              "int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, float offset_scale, "
              "bool remove_center=False, bool softmax=False) -> Tensor"),
    "roi_align": ("roi_align(Tensor input, Tensor boxes, int[2] output_size, float spatial_scale=1.0, "
                  "int sampling_ratio=-1, bool aligned=False) -> Tensor"),
    "ps_roi_align": ("ps_roi_align(Tensor input, Tensor boxes, int[2] output_size, float spatial_scale=1.0, "
                     "int sampling_ratio=-1) -> Tensor"),
    "deform_roi_pool": ("deform_roi_pool(Tensor input, Tensor rois, Tensor? offset, int[2] output_size, "
                        "float spatial_scale=1.0, int sampling_ratio=0, float gamma=0.1, Tensor? mask=None) -> Tensor"),
    "multi_scale_roi_align": ("multi_scale_roi_align(Tensor[] features, Tensor[] boxes, int[2] output_size, "
                              "int sampling_ratio, float[] scales, int canonical_scale=224, int canonical_level=4, "
                              "bool aligned=False) -> Tensor"),
    "blur_pool2d": "blur_pool2d(Tensor input, int[2] kernel_size=3, int[2] stride=2, str padding_mode='zeros') -> Tensor",
    "max_blur_pool2d": ("max_blur_pool2d(Tensor input, int[2] kernel_size=3, int[2] stride=2, int[2] max_pool_size=2, "
                        "bool ceil_mode=False, str padding_mode='zeros') -> Tensor"),
}
for _name, _schema in _SCHEMAS.items():
    _LIBRARY.define(_schema)
    _LIBRARY.impl(_name, getattr(functional, _name), "CompositeImplicitAutograd")


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.grid_sample(input, grid, mode, padding_mode, align_corners)


def affine_grid(theta: torch.Tensor, size: list[int], align_corners: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.affine_grid(theta, size, align_corners)


def affine_grid_sample(input: torch.Tensor, theta: torch.Tensor, size: Optional[list[int]] = None,
                       mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.affine_grid_sample(input, theta, size, mode, padding_mode, align_corners)


def perspective_grid_sample(input: torch.Tensor, homography: torch.Tensor, size: Optional[list[int]] = None,
                            mode: str = "bilinear", padding_mode: str = "zeros",
                            align_corners: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.perspective_grid_sample(input, homography, size, mode, padding_mode, align_corners)


def tps_grid_sample(input: torch.Tensor, source_points: torch.Tensor, control_points: Optional[torch.Tensor] = None,
                    size: Optional[list[int]] = None, mode: str = "bilinear", padding_mode: str = "zeros",
                    align_corners: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.tps_grid_sample(input, source_points, control_points, size, mode, padding_mode,
                                                align_corners)


def tps_grid_sample_solved(input: torch.Tensor, source_points: torch.Tensor, control_points: Optional[torch.Tensor],
                           solver: Optional[torch.Tensor], size: Optional[list[int]], mode: str, padding_mode: str,
                           align_corners: bool) -> torch.Tensor:
    return torch.ops.stn_triton.tps_grid_sample_solved(input, source_points, control_points, solver, size, mode,
                                                       padding_mode, align_corners)


def warp_affine(src: torch.Tensor, M: torch.Tensor, dsize: list[int], mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = True,
                fill_value: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.stn_triton.warp_affine(src, M, dsize, mode, padding_mode, align_corners, fill_value)


def warp_perspective(src: torch.Tensor, M: torch.Tensor, dsize: list[int], mode: str = "bilinear",
                     padding_mode: str = "zeros", align_corners: bool = True,
                     fill_value: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.stn_triton.warp_perspective(src, M, dsize, mode, padding_mode, align_corners, fill_value)


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                  dilation: tuple[int, int] = (1, 1), mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.stn_triton.deform_conv2d(input, offset, weight, bias, [stride[0], stride[1]],
                                              [padding[0], padding[1]], [dilation[0], dilation[1]], mask)


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: Optional[torch.Tensor],
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor, im2col_step: int = 64,
                   points_per_level: Optional[list[int]] = None, softmax: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                               attention_weights, im2col_step, points_per_level, softmax)



def dcnv3(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int,
          stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
          offset_scale: float, remove_center: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.dcnv3(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)


def dcnv4(input: torch.Tensor, offset_mask: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
          pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
          offset_scale: float, remove_center: bool = False, softmax: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.dcnv4(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
                                      softmax)

def roi_align(input: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]], output_size: BroadcastingList2[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.roi_align(input, functional.boxes_to_rois(boxes), output_size, spatial_scale,
                                          sampling_ratio, aligned)


def ps_roi_align(input: torch.Tensor, boxes: Union[torch.Tensor, List[torch.Tensor]],
                 output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> torch.Tensor:
    return torch.ops.stn_triton.ps_roi_align(input, functional.boxes_to_rois(boxes), output_size, spatial_scale,
                                             sampling_ratio)


def deform_roi_pool(input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor],
                    output_size: BroadcastingList2[int], spatial_scale: float = 1.0, sampling_ratio: int = 0,
                    gamma: float = 0.1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.stn_triton.deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma,
                                                mask)


def multi_scale_roi_align(features: List[torch.Tensor], boxes: List[torch.Tensor], output_size: BroadcastingList2[int],
                          sampling_ratio: int, scales: List[float], canonical_scale: int = 224,
                          canonical_level: int = 4, aligned: bool = False) -> torch.Tensor:
    return torch.ops.stn_triton.multi_scale_roi_align(features, boxes, output_size, sampling_ratio, scales,
                                                      canonical_scale, canonical_level, aligned)


def blur_pool2d(input: torch.Tensor, kernel_size: BroadcastingList2[int] = 3, stride: BroadcastingList2[int] = 2,
                padding_mode: str = "zeros") -> torch.Tensor:
    return torch.ops.stn_triton.blur_pool2d(input, kernel_size, stride, padding_mode)


def max_blur_pool2d(input: torch.Tensor, kernel_size: BroadcastingList2[int] = 3, stride: BroadcastingList2[int] = 2,
                    max_pool_size: BroadcastingList2[int] = 2, ceil_mode: bool = False,
                    padding_mode: str = "zeros") -> torch.Tensor:
    return torch.ops.stn_triton.max_blur_pool2d(input, kernel_size, stride, max_pool_size, ceil_mode, padding_mode)


def _scripted_twin(name: str):
    twin = globals()[name]
    return lambda: twin


for _name in _SCHEMAS:
    getattr(functional, _name).__prepare_scriptable__ = _scripted_twin(_name)
