"""nn.Modules built on the fused ops: the spatial transformer, deformable convolutions, multi-scale
deformable attention, DCNv3 / DCNv4, RoI pooling, CoordConv and blur pooling."""

import math
import warnings
from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init
from torch.nn.modules.utils import _pair

from stn_triton import functional, validation
from stn_triton.geometry import regular_control_points, tps_solver

TRANSFORMS = ("affine", "projective", "tps")


def _check_size(name: str, value, lengths: Sequence[int]) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints of one of ``lengths``; a clear error otherwise."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if (
        not isinstance(value, (list, tuple))
        or len(value) not in lengths
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)
    ):
        wanted = " or ".join({2: "(H, W)", 3: "(D, H, W)"}[n] for n in lengths)
        raise ValueError(f"{name} must be {wanted}, positive ints, got {value!r}")
    return tuple(value)


def default_localization(in_channels: int, spatial_dims: int) -> nn.Sequential:
    """The localisation body of the original STN: (conv, max-pool, ReLU) x 2, then a hidden FC layer.

    Maps ``[N, in_channels, *spatial]`` to features ``[N, 32]`` for any spatial size: the convs
    keep the size (padded), the pools round up (so a 1-pixel side survives), and an adaptive
    average pool brings whatever is left to 3 per side before the FC layer.
    """
    conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
    max_pool = (nn.MaxPool2d, nn.MaxPool3d)[spatial_dims - 2]
    adaptive_pool = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[spatial_dims - 2]
    return nn.Sequential(
        conv(in_channels, 8, kernel_size=7, padding=3),
        max_pool(2, ceil_mode=True),
        nn.ReLU(),
        conv(8, 10, kernel_size=5, padding=2),
        max_pool(2, ceil_mode=True),
        nn.ReLU(),
        adaptive_pool(3),
        nn.Flatten(),
        nn.Linear(10 * 3**spatial_dims, 32),
        nn.ReLU(),
    )


def _feature_count(localization: nn.Module, in_channels: int, input_size: tuple[int, ...]) -> int:
    """How many features ``localization`` makes of one input: a dry run on zeros.

    Runs in eval mode (batch norm would refuse a batch of one in training mode) without grad,
    on the device and dtype of the module's first floating-point parameter or buffer; lazy
    layers get materialized by it.
    """
    tensors = [t for t in (*localization.parameters(), *localization.buffers()) if t.is_floating_point()]
    known = [t for t in tensors if not isinstance(t, nn.parameter.UninitializedTensorMixin)]
    device = known[0].device if known else torch.device("cpu")
    dtype = known[0].dtype if known else torch.get_default_dtype()
    was_training = localization.training
    localization.eval()
    try:
        with torch.no_grad():
            features = localization(torch.zeros(1, in_channels, *input_size, device=device, dtype=dtype))
    except Exception as error:
        raise ValueError(
            f"localization failed on an input of shape [1, {in_channels}, {', '.join(map(str, input_size))}] "
            f"(in_channels and input_size as given): {error}"
        ) from error
    finally:
        localization.train(was_training)
    if not isinstance(features, torch.Tensor) or features.dim() < 2 or features.shape[0] != 1:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"localization must map [N, C, *spatial] to features [N, F], got {got} for N = 1")
    return features[0].numel()


class SpatialTransformer(nn.Module):
    """A spatial transformer (Jaderberg et al., 2015): a localisation net regresses a transform of
    its input, and the fused op samples the input through it.

    Args:
        in_channels: C, the input's channels.
        input_size: the input's spatial size, ``(H, W)``; or ``(D, H, W)`` for volumes with
            ``transform='affine'``.
        transform: ``'affine'`` (theta ``[N, 2, 3]``, or ``[N, 3, 4]`` for volumes),
            ``'projective'`` (homography ``[N, 3, 3]``) or ``'tps'`` (thin-plate spline: source
            points ``[N, K, 2]`` for K control points on a regular grid over [-1, 1]^2).
        localization: a module mapping the input ``[N, C, *input_size]`` to features ``[N, F]``
            (anything else is flattened from dim 1); by default a small conv net in the spirit of
            the original STN (:func:`default_localization`). A final ``nn.Linear(F, P)`` is
            appended, as ``head``, to regress the P parameters; F is found by running
            ``localization`` once on zeros at construction.
        output_size: the output's spatial size, ``input_size`` by default.
        num_control_points: K for ``transform='tps'``, a square of at least 4 (4, 9, 16, ...).
        mode, padding_mode, align_corners: as :func:`stn_triton.functional.affine_grid_sample`.

    ``head`` starts at the identity transform (weight 0, bias = the identity parameters), so the
    module starts as the identity map (exactly, up to rounding, when ``output_size`` equals
    ``input_size``).

    Shapes: input ``[N, C, *input_size]`` -> output ``[N, C, *output_size]``.
    """

    def __init__(
        self,
        in_channels: int,
        input_size: Sequence[int],
        transform: str = "affine",
        localization: nn.Module | None = None,
        output_size: Sequence[int] | None = None,
        num_control_points: int = 16,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        align_corners: bool = False,
    ):
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels <= 0:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        input_size = _check_size("input_size", input_size, (2, 3) if transform == "affine" else (2,))
        spatial_dims = len(input_size)
        output_size = input_size if output_size is None else _check_size("output_size", output_size, (spatial_dims,))
        if transform == "tps":
            side = math.isqrt(num_control_points) if isinstance(num_control_points, int) else 0
            if isinstance(num_control_points, bool) or side < 2 or side * side != num_control_points:
                raise ValueError(
                    f"num_control_points must be a square of at least 4 (a regular grid of control points), "
                    f"got {num_control_points!r}"
                )
        problem = validation.sampling_options_problem(mode, padding_mode, align_corners, spatial_dims)
        if problem is not None:
            raise problem
        if localization is not None and not isinstance(localization, nn.Module):
            raise TypeError(f"localization must be an nn.Module or None, got {type(localization).__name__}")

        self.in_channels = in_channels
        self.input_size = input_size
        self.output_size = output_size
        self.transform = transform
        self.mode = mode
        self.padding_mode = padding_mode
        self.align_corners = align_corners

        if transform == "affine":
            identity = torch.eye(spatial_dims, spatial_dims + 1)
        elif transform == "projective":
            identity = torch.eye(3)
        else:
            identity = regular_control_points(num_control_points, torch.get_default_dtype(), "cpu")
        # The spline's control points, and their inverse system kept beside them (not in the state_dict:
        # it is derived), so that no call, compiled or not, solves the system again.
        self.register_buffer("control_points", identity if transform == "tps" else None)
        self.register_buffer("tps_solver", tps_solver(identity) if transform == "tps" else None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module._solve())
        # The shape ``forward`` gives the regressed parameters, as the functional op takes them.
        self.params_shape = tuple(identity.shape)
        self._input_shape = [in_channels, *input_size]

        if localization is None:
            localization = default_localization(in_channels, spatial_dims)
        self.localization = localization
        self.head = nn.Linear(_feature_count(localization, in_channels, input_size), identity.numel())
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(identity.flatten())

    def _solve(self) -> None:
        """Solve the spline system of the control points again (loaded, moved or cast), in float64."""
        if self.control_points is not None:
            self.tps_solver = tps_solver(self.control_points)

    def _apply(self, fn, recurse=True):
        # .half() or .to(dtype) would cast the solver like any buffer; it is solved again instead.
        super()._apply(fn, recurse)
        self._solve()
        return self

    def forward(self, x: torch.Tensor,
                return_params: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Warp ``x`` ``[N, C, *input_size]`` to ``[N, C, *output_size]``.

        With ``return_params=True`` returns ``(warped, params)``, params as the functional op
        takes them: theta ``[N, 2, 3]`` (``[N, 3, 4]`` for volumes), homography ``[N, 3, 3]``, or
        source points ``[N, K, 2]``. Scriptable (``torch.jit.script``).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(self._input_shape) + 1 or list(x.shape[1:]) != self._input_shape:
            wanted = ", ".join([str(side) for side in self._input_shape])
            got = ", ".join([str(side) for side in x.shape])
            raise ValueError(f"x must have shape [N, {wanted}] (in_channels, *input_size), got ({got})")
        params = self.head(self.localization(x).flatten(1)).view(x.shape[0], self.params_shape[0], self.params_shape[1])
        size = [x.shape[0], x.shape[1]]
        for side in self.output_size:
            size.append(side)
        control_points = self.control_points
        if self.transform == "affine":
            warped = functional.affine_grid_sample(x, params, size, self.mode, self.padding_mode, self.align_corners)
        elif self.transform == "projective":
            warped = functional.perspective_grid_sample(x, params, size, self.mode, self.padding_mode,
                                                        self.align_corners)
        else:
            warped = functional.tps_grid_sample_solved(x, params, control_points, self.tps_solver, size, self.mode,
                                                       self.padding_mode, self.align_corners)
        if return_params:
            return warped, params
        return warped

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, input_size={self.input_size}, transform={self.transform!r}, "
            f"output_size={self.output_size}, mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
            f"align_corners={self.align_corners}"
        )


class DeformConv2d(nn.Module):
    """Deformable convolution with its weight and bias; a drop-in for ``torchvision.ops.DeformConv2d``.

    Same constructor, attributes, initialisation and ``state_dict`` keys (``weight``
    ``[out_channels, in_channels / groups, KH, KW]``, ``bias`` ``[out_channels]``), so a
    torchvision checkpoint loads unchanged. ``forward(input [N, C, H, W], offset
    [N, 2 G K, H_out, W_out], mask=None [N, G K, H_out, W_out])`` -> ``[N, out_channels, H_out, W_out]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                                   ("dilation", dilation, 1)):
            if min(_pair(value)) < least:
                raise ValueError(f"{name} must be at least {least}, got {value!r}")
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: Kaiming-uniform weight, bias uniform in +-1/sqrt(fan_in)."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return functional.deform_conv2d(
            input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class SelfDeformConv2d(DeformConv2d):
    """A deformable convolution that predicts its own offsets (and mask) from its input.

    As mmcv's ``ModulatedDeformConv2dPack``: a plain convolution ``offset_conv`` of the same
    kernel, stride, padding and dilation maps the input to ``3 G K`` channels (``2 G K``
    offsets, ``G K`` mask logits; only the offsets when ``modulated=False``), initialised to
    zero. The mask is ``2 * sigmoid(logits)`` (mmcv uses ``sigmoid``, which starts at one half), so
    at initialisation the offsets are 0, the mask is 1, and the module is exactly a plain
    convolution with its ``weight`` and ``bias``. ``forward(input)``, or
    ``forward(input, return_offsets=True)`` -> ``(output, offset, mask)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, offset_groups: int = 1, modulated: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if not isinstance(offset_groups, int) or offset_groups < 1 or in_channels % offset_groups != 0:
            raise ValueError(f"offset_groups ({offset_groups}) must divide in_channels ({in_channels})")
        self.offset_groups = offset_groups
        self.modulated = modulated
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.offset_conv = nn.Conv2d(
            in_channels, (3 if modulated else 2) * offset_groups * taps, self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
        )
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, input: torch.Tensor, return_offsets: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        predicted = self.offset_conv(input)
        offsets = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset = predicted[:, :offsets]
        mask: Optional[torch.Tensor] = None
        if self.modulated:
            mask = 2 * torch.sigmoid(predicted[:, offsets:])
        out = functional.deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                                       dilation=self.dilation, mask=mask)
        if return_offsets:
            return out, offset, mask
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", offset_groups={self.offset_groups}, modulated={self.modulated}"


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention, Deformable DETR's ``MSDeformAttn``: same constructor,
    parameter names, shapes and initialisation (a Deformable-DETR or DINO checkpoint's state_dict
    loads unchanged), and the same forward.

    ``forward(query [N, Lq, C], reference_points [N, Lq, L, 2] (x, y in [0, 1]) or [N, Lq, L, 4]
    (cx, cy, w, h), input_flatten [N, S, C], input_spatial_shapes [L, 2] (H, W), input_level_start_index
    [L], input_padding_mask=None [N, S] (True: padding))`` -> ``[N, Lq, C]``. The attention logits go
    to the kernel, which takes their softmax over each head's points itself (one pass and one
    tensor fewer than softmax-then-attention).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        if not _is_power_of_2(d_model // n_heads):
            warnings.warn("You'd better set d_model in MSDeformAttn to make the dimension of each attention head a "
                          "power of 2 which is more efficient in our CUDA implementation.", stacklevel=2)
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Deformable DETR's: the offsets' bias points each head in its own direction (one per head around
        the circle, point i at i + 1 times it), the attention starts uniform, the projections xavier."""
        init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid.view(-1))
        init.constant_(self.attention_weights.weight, 0.0)
        init.constant_(self.attention_weights.bias, 0.0)
        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0.0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, queries, _ = query.shape
        rows = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, rows, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, queries, self.n_heads, self.n_levels, self.n_points, 2)
        logits = self.attention_weights(query).view(n, queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead.")
        out = functional.ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, logits,
                                        self.im2col_step, None, True)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"


def _output_size(value) -> tuple[int, int]:
    size = _pair(value)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"output_size must be a positive int or a pair of them, got {value!r}")
    return tuple(size)


class RoIAlign(nn.Module):
    """``roi_align`` with its options; a drop-in for ``torchvision.ops.RoIAlign`` (same constructor,
    attributes and repr). ``forward(input [N, C, H, W], rois [K, 5] or a list of [L_i, 4])`` ->
    ``[K, C, PH, PW]``."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        _output_size(output_size)
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: torch.Tensor, rois: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        return functional.roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                                    self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class PSRoIAlign(nn.Module):
    """``ps_roi_align`` with its options; a drop-in for ``torchvision.ops.PSRoIAlign``."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int):
        super().__init__()
        _output_size(output_size)
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: torch.Tensor, rois: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        return functional.ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio})")


def _infer_scale(feature: torch.Tensor, original_size: List[int]) -> float:
    """torchvision's: the power of two nearest to the feature map's height over the image's."""
    approx_scale = float(feature.shape[-2]) / float(original_size[0])
    return 2 ** float(torch.tensor(approx_scale).log2().round())


class MultiScaleRoIAlign(nn.Module):
    """torchvision's ``MultiScaleRoIAlign`` (Faster / Mask / Keypoint R-CNN's box and mask poolers):
    same constructor, attributes (``featmap_names``, ``output_size``, ``sampling_ratio``,
    ``scales``, ``canonical_scale``, ``canonical_level``) and forward, with every level pooled by one
    launch into one output (``stn_triton.multi_scale_roi_align``: no index of a level's boxes, no
    host sync). It can take the place of torchvision's in a built model
    (``model.roi_heads.box_roi_pool = stn_triton.MultiScaleRoIAlign(...)``); ``aligned`` (keyword,
    default False as torchvision's) selects Detectron2's half-pixel rule.

    ``forward(x: {name: [N, C, H_l, W_l]}, boxes: list of [L_i, 4] in image pixels, image_shapes:
    list of (H, W))`` -> ``[sum L_i, C, PH, PW]``; the scales are inferred from the first call's
    shapes, as torchvision infers them.
    """

    __annotations__ = {"scales": Optional[List[float]]}

    def __init__(self, featmap_names: List[str], output_size, sampling_ratio: int, *, canonical_scale: int = 224,
                 canonical_level: int = 4, aligned: bool = False):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(_output_size(output_size))
        self.scales: Optional[List[float]] = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned

    def _setup_scales(self, features: List[torch.Tensor], image_shapes: List[Tuple[int, int]]) -> List[float]:
        if len(image_shapes) == 0:
            raise ValueError("images list should not be empty")
        max_x = 0
        max_y = 0
        for shape in image_shapes:
            max_x = max(shape[0], max_x)
            max_y = max(shape[1], max_y)
        return [_infer_scale(feat, [max_x, max_y]) for feat in features]

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        features: List[torch.Tensor] = []
        for name, feature in x.items():
            if name in self.featmap_names:
                features.append(feature)
        scales = self.scales
        if scales is None:
            scales = self._setup_scales(features, image_shapes)
            self.scales = scales
        return functional.multi_scale_roi_align(features, boxes, self.output_size, self.sampling_ratio, scales,
                                                self.canonical_scale, self.canonical_level, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")


class DeformRoIPool(nn.Module):
    """mmcv's ``DeformRoIPool``: ``forward(input [N, C, H, W], rois [K, 5], offset=None [K, 2, PH, PW])``
    -> ``[K, C, PH, PW]`` (``stn_triton.deform_roi_pool``)."""

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__()
        self.output_size = _output_size(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input: torch.Tensor, rois: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        return functional.deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                                          self.sampling_ratio, self.gamma)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")


def _head(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    """mmcv's fully connected offset / mask head, ``layers`` Linear layers with ReLU between, the last
    one zero (so the head starts at 0)."""
    modules: List[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
    if layers == 3:
        modules += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
    modules.append(nn.Linear(hidden, out_features))
    nn.init.zeros_(modules[-1].weight)
    nn.init.zeros_(modules[-1].bias)
    return nn.Sequential(*modules)


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack``: RoI align, a three-layer head ``offset_fc`` predicting each bin's
    offset from it (last layer zero: the pack starts as plain RoI align), then deformable RoI
    pooling at those offsets. Same parameters and ``state_dict`` keys as mmcv's, so its checkpoints
    load. ``forward(input [N, output_channels, H, W], rois [K, 5])`` -> ``[K, output_channels, PH, PW]``."""

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _head(bins * output_channels, deform_fc_channels, bins * 2, 3)

    def _plain(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """The RoI align the heads read."""
        if input.shape[1] != self.output_channels:
            raise ValueError(f"input must have output_channels = {self.output_channels} channels, got input of shape "
                             f"{list(input.shape)}")
        return functional.deform_roi_pool(input, rois, None, self.output_size, self.spatial_scale, self.sampling_ratio,
                                          self.gamma)

    def _offset(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.offset_fc(pooled.flatten(1)).view(pooled.shape[0], 2, self.output_size[0], self.output_size[1])

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pooled = self._plain(input, rois)
        return functional.deform_roi_pool(input, rois, self._offset(pooled), self.output_size, self.spatial_scale,
                                          self.sampling_ratio, self.gamma)


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack`` (Deformable ConvNets v2): ``DeformRoIPoolPack`` plus a
    two-layer head ``mask_fc`` whose sigmoid modulates each bin, applied inside the pooling kernel.
    Same parameters, ``state_dict`` keys and initialisation as mmcv's: the offset head starts at
    zero and the mask head's last layer too, so the pack starts as RoI align times sigmoid(0) = 0.5,
    exactly as mmcv's does."""

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = _head(bins * output_channels, deform_fc_channels, bins, 2)
        self.mask_fc.append(nn.Sigmoid())

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pooled = self._plain(input, rois)
        mask = self.mask_fc(pooled.flatten(1)).view(pooled.shape[0], 1, self.output_size[0], self.output_size[1])
        return functional.deform_roi_pool(input, rois, self._offset(pooled), self.output_size, self.spatial_scale,
                                          self.sampling_ratio, self.gamma, mask)


def coordinates(height: int, width: int, with_r: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """CoordConv's coordinate channels ``[2 or 3, height, width]``: x = 2 col / (W - 1) - 1 (along the
    width), y = 2 row / (H - 1) - 1 (along the height), both in [-1, 1] (0 along an axis of one
    pixel), and with ``with_r`` the radius sqrt(x^2 + y^2); the paper's channels, in its order."""
    ys = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device) if height > 1 else \
        torch.zeros(1, dtype=dtype, device=device)
    xs = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device) if width > 1 else \
        torch.zeros(1, dtype=dtype, device=device)
    channels = [xs[None, :].expand(height, width), ys[:, None].expand(height, width)]
    if with_r:
        channels.append(torch.sqrt(channels[0] * channels[0] + channels[1] * channels[1]))
    return torch.stack(channels)


class AddCoords(nn.Module):
    """CoordConv's input (Liu et al., NeurIPS 2018): ``input [N, C, H, W]`` with the coordinate
    channels x, y (and r with ``with_r``) appended -> ``[N, C + 2 (3), H, W]`` (see ``coordinates``),
    in input's dtype. For a convolution over them, ``CoordConv2d`` computes the same without
    building them per image."""

    def __init__(self, with_r: bool = False):
        super().__init__()
        self.with_r = with_r

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4:
            raise ValueError(f"input must be 4-D [N, C, H, W], got shape {list(input.shape)}")
        n, _, h, w = input.shape
        coords = coordinates(h, w, self.with_r, input.dtype, input.device)
        return torch.cat([input, coords[None].expand(n, -1, -1, -1)], dim=1)

    def extra_repr(self) -> str:
        return f"with_r={self.with_r}"


class CoordConv2d(nn.Module):
    """A convolution over the input with CoordConv's coordinate channels appended (``AddCoords``, then
    ``nn.Conv2d(in_channels + 2 (3), out_channels, ...)``), computed without appending them: the
    coordinates are the same for every image, so their share of the output is one position-dependent
    map, the coordinate channels convolved at batch size 1 with their slice of the weight, added to
    the convolution of the input with the rest. The weight, its gradient (the coordinate slice's
    through the batch-1 convolution) and the ``state_dict`` (``conv.weight``, ``conv.bias``) are the
    concatenation's. ``groups`` must be 1 (the appended channels would otherwise fall into the last
    group only)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", with_r: bool = False):
        super().__init__()
        if groups != 1:
            raise ValueError(f"groups must be 1 for CoordConv2d (the coordinate channels belong to no group), "
                             f"got {groups}")
        self.in_channels = in_channels
        self.with_r = with_r
        self.conv = nn.Conv2d(in_channels + (3 if with_r else 2), out_channels, kernel_size, stride, padding,
                              dilation, 1, bias, padding_mode)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(f"input must be [N, {self.in_channels}, H, W], got shape {list(input.shape)}")
        weight = self.conv.weight
        out = self.conv._conv_forward(input, weight[:, :self.in_channels], self.conv.bias)
        coords = coordinates(input.shape[2], input.shape[3], self.with_r, input.dtype, input.device)
        return out + self.conv._conv_forward(coords[None], weight[:, self.in_channels:], None)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, with_r={self.with_r}"


class BlurPool2d(nn.Module):
    """Anti-aliased downsampling, ``blur_pool2d``: a drop-in for kornia's ``BlurPool2D(kernel_size,
    stride)`` (zeros padding) and, as ``BlurPool2d(filt_size, stride, pad_type)`` with ``'reflect'``,
    ``'replicate'`` or ``'zeros'``, for antialiased-cnns' ``BlurPool(channels, pad_type, filt_size,
    stride)`` (whose ``pad_off`` it does not take; it has no weights, so channels need not be given).
    ``forward(input [N, C, H, W])`` -> ``[N, C, ceil(H / stride), ceil(W / stride)]``."""

    def __init__(self, kernel_size: Union[int, Tuple[int, int]] = 3, stride: Union[int, Tuple[int, int]] = 2,
                 padding_mode: str = "zeros"):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding_mode = padding_mode
        problem = validation.blur_options_problem(kernel_size, stride, padding_mode)
        if problem is not None:
            raise problem

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.blur_pool2d(input, self.kernel_size, self.stride, self.padding_mode)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding_mode={self.padding_mode!r}"


class MaxBlurPool2d(nn.Module):
    """MaxBlurPool, ``max_blur_pool2d``: a drop-in for kornia's ``MaxBlurPool2D(kernel_size, stride,
    max_pool_size, ceil_mode)`` and, with ``padding_mode='reflect'``, for antialiased-cnns'
    ``nn.Sequential(nn.MaxPool2d(max_pool_size, stride=1), BlurPool(channels, 'reflect', kernel_size,
    stride))``, in one pass. ``forward(input [N, C, H, W])`` -> ``[N, C, ceil((H - m + 1) / stride),
    ceil((W - m + 1) / stride)]``."""

    def __init__(self, kernel_size: Union[int, Tuple[int, int]] = 3, stride: Union[int, Tuple[int, int]] = 2,
                 max_pool_size: Union[int, Tuple[int, int]] = 2, ceil_mode: bool = False, padding_mode: str = "zeros"):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.max_pool_size = max_pool_size
        self.ceil_mode = ceil_mode
        self.padding_mode = padding_mode
        problem = validation.blur_options_problem(kernel_size, stride, padding_mode, max_pool_size, ceil_mode)
        if problem is not None:
            raise problem

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.max_blur_pool2d(input, self.kernel_size, self.stride, self.max_pool_size, self.ceil_mode,
                                          self.padding_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, max_pool_size={self.max_pool_size}, "
                f"ceil_mode={self.ceil_mode}, padding_mode={self.padding_mode!r}")


class ToChannelsLast(nn.Module):
    """``[N, C, H, W]`` -> ``[N, H, W, C]`` (a permuted view): InternImage's ``to_channels_last``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


_DCN_ACTIVATIONS = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU}


def _dcn_norm(channels: int, norm_layer: str) -> nn.Sequential:
    """InternImage's ``build_norm_layer(channels, norm_layer, 'channels_first', 'channels_last')``:
    its module indices, so that checkpoints' ``dw_conv.1.*`` keys load."""
    if norm_layer == "LN":
        return nn.Sequential(ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), ToChannelsLast())
    raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")


class _DcnModule(nn.Module):
    """What DCNv3 and DCNv4 share: their options as attributes (InternImage's names), the center
    feature scale, the repr."""

    def _options(self, channels: int, kernel_size: int, stride: int, pad: int, dilation: int, group: int,
                 offset_scale: float, center_feature_scale: bool, remove_center: bool) -> None:
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1 or channels % group != 0:
            raise ValueError(f"channels must be divisible by group, but got {channels} and {group}")
        problem = validation.dcn_options_problem(kernel_size, kernel_size, stride, stride, pad, pad, dilation,
                                                 dilation, group, channels // group, offset_scale, remove_center)
        if problem is not None:
            raise problem
        self.offset_scale = offset_scale
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.pad = pad
        self.group = group
        self.group_channels = channels // group
        self.center_feature_scale = bool(center_feature_scale)
        self.remove_center = int(remove_center)

    def _add_centre_scale(self) -> None:
        """The center feature scale's parameters (zero: the gate starts at one half), after the layers."""
        if self.center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(
                torch.zeros((self.group, self.channels), dtype=torch.float))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(self.group, dtype=torch.float))

    def _scale_by_centre(self, x: torch.Tensor, x_proj: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """InternImage's center feature scale: a sigmoid gate per group from ``query`` blends the
        aggregation ``x`` with the projected input ``x_proj``."""
        scale = torch.sigmoid(F.linear(query, self.center_feature_scale_proj_weight,
                                       self.center_feature_scale_proj_bias))
        scale = scale[..., None].repeat(1, 1, 1, 1, self.channels // self.group).flatten(-2)
        return x * (1 - scale) + x_proj * scale

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}, "
                f"dilation={self.dilation}, group={self.group}, offset_scale={self.offset_scale}, "
                f"center_feature_scale={self.center_feature_scale}, remove_center={bool(self.remove_center)}")


class DCNv3(_DcnModule):
    """InternImage's ``DCNv3`` module (ops_dcnv3/modules/dcnv3.py) on ``stn_triton.dcnv3``: same
    constructor, parameter names, shapes and initialisation (an InternImage checkpoint's state_dict
    loads unchanged) and the same forward: ``input_proj``, a depthwise convolution with norm and
    activation making the offsets (``offset``) and the mask logits (``mask``, softmaxed over each
    group's points), the aggregation, optionally the center feature scale, ``output_proj``.

    ``forward(input [N, H, W, C])`` -> ``[N, H, W, C]`` (with the default stride 1 and ``pad =
    (kernel_size - 1) // 2 * dilation``, as InternImage uses it). Unlike the CUDA module, any group
    width works (a power of 2 is fastest; the same warning is given otherwise), on any GPU, on the
    CPU and in bfloat16.
    """

    center_feature_scale: torch.jit.Final[bool]

    def __init__(self, channels: int = 64, kernel_size: int = 3, dw_kernel_size: Optional[int] = None,
                 stride: int = 1, pad: int = 1, dilation: int = 1, group: int = 4, offset_scale: float = 1.0,
                 act_layer: str = "GELU", norm_layer: str = "LN", center_feature_scale: bool = False,
                 remove_center: bool = False):
        super().__init__()
        self._options(channels, kernel_size, stride, pad, dilation, group, offset_scale, center_feature_scale,
                      remove_center)
        if act_layer not in _DCN_ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {tuple(_DCN_ACTIVATIONS)}, got {act_layer!r}")
        if not _is_power_of_2(channels // group):
            warnings.warn("You'd better set channels in DCNv3 to make the dimension of each attention head a power "
                          "of 2 which is more efficient in our CUDA implementation.", stacklevel=2)
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.dw_kernel_size = dw_kernel_size
        points = group * (kernel_size * kernel_size - self.remove_center)
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=dw_kernel_size, stride=1, padding=(dw_kernel_size - 1) // 2,
                      groups=channels),
            _dcn_norm(channels, norm_layer),
            _DCN_ACTIVATIONS[act_layer](),
        )
        self.offset = nn.Linear(channels, points * 2)
        self.mask = nn.Linear(channels, points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()
        self._add_centre_scale()

    def _reset_parameters(self) -> None:
        """InternImage's: offsets and mask logits start at zero (the plain kernel, a uniform mask), the
        projections xavier with zero bias."""
        for layer in (self.offset, self.mask):
            init.constant_(layer.weight, 0.0)
            init.constant_(layer.bias, 0.0)
        for layer in (self.input_proj, self.output_proj):
            init.xavier_uniform_(layer.weight)
            init.constant_(layer.bias, 0.0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(x1)
        mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1).type(x.dtype)
        x = functional.dcnv3(x, offset, mask, self.kernel_size, self.kernel_size, self.stride, self.stride, self.pad,
                             self.pad, self.dilation, self.dilation, self.group, self.group_channels,
                             self.offset_scale, bool(self.remove_center))
        if self.center_feature_scale:
            x = self._scale_by_centre(x, x_proj, x1)
        return self.output_proj(x)


class DCNv4(_DcnModule):
    """FlashInternImage's ``DCNv4`` module (DCNv4_op/DCNv4/modules/dcnv4.py) on ``stn_triton.dcnv4``:
    same constructor, parameter names, shapes and initialisation (a FlashInternImage checkpoint's
    state_dict loads unchanged) and the same forward: ``value_proj``, one linear layer
    (``offset_mask``, optionally after the depthwise ``offset_mask_dw``) making the packed offsets
    and mask (its width ``ceil(3 K / 8) * 8``), the aggregation, optionally the center feature
    scale, ``output_proj``.

    ``forward(input [N, L, C], shape=None)`` -> ``[N, L, C]``; ``shape`` (H, W) with H * W = L
    (None: a square, H = W = sqrt(L)). Unlike the CUDA module, any group width works (DCNv4's
    asserts a multiple of 16), on any GPU, on the CPU and in bfloat16.
    """

    center_feature_scale: torch.jit.Final[bool]
    without_pointwise: torch.jit.Final[bool]
    has_dw: torch.jit.Final[bool]

    def __init__(self, channels: int = 64, kernel_size: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
                 group: int = 4, offset_scale: float = 1.0, dw_kernel_size: Optional[int] = None,
                 center_feature_scale: bool = False, remove_center: bool = False, output_bias: bool = True,
                 without_pointwise: bool = False, **kwargs):
        super().__init__()
        self._options(channels, kernel_size, stride, pad, dilation, group, offset_scale, center_feature_scale,
                      remove_center)
        self.dw_kernel_size = dw_kernel_size
        self.has_dw = dw_kernel_size is not None
        self.without_pointwise = bool(without_pointwise)
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, stride=1,
                                            padding=(dw_kernel_size - 1) // 2, groups=channels)
        self.offset_mask = nn.Linear(channels, int(math.ceil(self.K * 3 / 8) * 8))
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        self._reset_parameters()
        self._add_centre_scale()

    def _reset_parameters(self) -> None:
        """DCNv4's: offset_mask starts at zero, the projections xavier with zero bias."""
        init.constant_(self.offset_mask.weight, 0.0)
        init.constant_(self.offset_mask.bias, 0.0)
        if not self.without_pointwise:
            init.xavier_uniform_(self.value_proj.weight)
            init.constant_(self.value_proj.bias, 0.0)
            init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                init.constant_(self.output_proj.bias, 0.0)

    def forward(self, input: torch.Tensor, shape: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        n, length, c = input.shape
        if shape is not None:
            h, w = shape[0], shape[1]
        else:
            h = w = int(length ** 0.5)
        x = input
        if not self.without_pointwise:
            x = self.value_proj(x)
        x = x.reshape(n, h, w, -1)
        offset_mask_input = input
        if self.has_dw:
            offset_mask_input = self.offset_mask_dw(input.view(n, h, w, c).permute(0, 3, 1, 2))
            offset_mask_input = offset_mask_input.permute(0, 2, 3, 1).reshape(n, length, c)
        offset_mask = self.offset_mask(offset_mask_input).reshape(n, h, w, -1)
        x_proj = x
        x = functional.dcnv4(x, offset_mask, self.kernel_size, self.kernel_size, self.stride, self.stride, self.pad,
                             self.pad, self.dilation, self.dilation, self.group, self.group_channels,
                             self.offset_scale, bool(self.remove_center))
        if self.center_feature_scale:
            x = self._scale_by_centre(x, x_proj, x)
        x = x.reshape(n, length, -1)
        if not self.without_pointwise:
            x = self.output_proj(x)
        return x
