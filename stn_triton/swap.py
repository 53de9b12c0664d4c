"""Route a whole program's ``grid_sample``, ``affine_grid``, ``deform_conv2d`` and deformable attention to stn_triton.

``apply()`` replaces ``torch.nn.functional.grid_sample`` and ``torch.nn.functional.affine_grid``,
and, when torchvision is installed, ``torchvision.ops.deform_conv2d`` (the same function as
``torchvision.ops.deform_conv.deform_conv2d``), with wrappers; ``revert()`` puts the original
objects back; ``swapped()`` does both around a block. Code that looks these functions up when it
calls them (``F.grid_sample(...)``, as kornia and detection libraries do, and torchvision's own
``DeformConv2d.forward``) then runs on the Triton kernels; a name bound earlier
(``from torch.nn.functional import grid_sample``) keeps the original.

A wrapper calls stn_triton only when it promises the original's result for those arguments: the
call passes stn_triton's own validation (``stn_triton.validation``, the same function the direct
API raises from), its tensors are on a backend stn_triton runs its kernels on (``backend(t) !=
"torch"``), and nothing else makes the original behave otherwise. Anything else (PyTorch's
``align_corners=None`` default and its warning, dtype or device mismatches, integer or non-Tensor
arguments, ``__torch_function__`` subclasses, 5-D bicubic, extra arguments, shapes the original
rejects, ``torch.func`` transforms, forward-mode AD, ``torch.jit.trace``, autocast where the
original's autocast policy differs, such as torchvision's, which casts on CUDA only) goes to the
original with the same arguments, so its errors, warnings and results are the original's.
``torch.jit.script`` compiles the original in place of a wrapper, so code scripted during the swap
scripts as before (and runs PyTorch's ops).

What cannot be decided from the arguments differs: the gradient of a routed call's input gradient
(a gradient penalty) works, but differentiating the gradient of the grid (or of deform_conv2d's
offsets) a second time raises, where PyTorch computes it; under
``torch.use_deterministic_algorithms(True)`` a routed CUDA backward is deterministic where PyTorch's
raises. On a CPU through Triton's interpreter, NaN grid values follow PyTorch's CUDA rules, not its
CPU ones (see the README).
"""

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.overrides import has_torch_function, has_torch_function_unary, has_torch_function_variadic

from stn_triton import functional, validation
from stn_triton.backend import TORCH, backend

# torchvision's deform_conv2d kernels dispatch float, double and half only: bfloat16 raises there.
_DEFORM_CONV_DTYPES = (torch.float32, torch.float64, torch.float16)

# (module, attribute) -> the object found there by apply(), put back by revert().
_originals: dict[tuple[object, str], Callable] = {}


def _untransformed() -> bool:
    """No ``torch.func`` transform and no forward-mode AD level is active.

    stn_triton's ops have vmap rules and (affine_grid) forward AD of their own, but under a transform
    PyTorch's ops run their own batching and forward-AD rules, whose behaviour the swap promises:
    such calls keep them.
    """
    return not torch._C._are_functorch_transforms_active() and forward_ad._current_level < 0


def _routes_grid_sample(input, grid, mode, padding_mode, align_corners) -> bool:
    """stn_triton.grid_sample returns what F.grid_sample would for these arguments."""
    return (
        # A trace records what runs; PyTorch's ops keep it portable (legacy ONNX export included).
        not torch.jit.is_tracing()
        and isinstance(input, torch.Tensor)
        and isinstance(grid, torch.Tensor)
        and not has_torch_function_variadic(input, grid)
        # Inside autocast stn_triton takes mixed floating dtypes and returns autocast's dtype, as PyTorch does.
        and validation.grid_sample_problem(input, grid, mode, padding_mode, align_corners) is None
        and backend(input) != TORCH
        and _untransformed()
    )


def _routes_affine_grid(theta, size, align_corners) -> bool:
    """stn_triton.affine_grid returns what F.affine_grid would for these arguments (its warning included)."""
    return (
        not torch.jit.is_tracing()
        and isinstance(theta, torch.Tensor)
        and not has_torch_function_unary(theta)
        # F.affine_grid takes a list or tuple of ints (a torch.Size is a tuple)
        and isinstance(size, (list, tuple))
        and all(type(s) is int for s in size)
        and validation.affine_grid_problem(theta, size, align_corners) is None
        and backend(theta) != TORCH
        and _untransformed()
    )


def _routes_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask) -> bool:
    """stn_triton.deform_conv2d returns what torchvision's deform_conv2d would for these arguments."""
    tensors = (input, offset, weight, *(t for t in (bias, mask) if t is not None))
    if not (
        not torch.jit.is_tracing()
        and all(isinstance(t, torch.Tensor) for t in tensors)
        and not has_torch_function(tensors)
        # torchvision reads stride, padding and dilation with _pair: ints only (a bool is not one).
        and all(_int_pair(value) is not None for value in (stride, padding, dilation))
        and validation.deform_conv2d_problem(input, offset, weight, bias, stride, padding, dilation, mask) is None
        and backend(input) != TORCH
        and _untransformed()
    ):
        return False
    # torchvision's autocast kernel is registered for CUDA only: inside CUDA autocast it casts every
    # tensor (a bfloat16 input included) to float32 and its result to the input's dtype, as stn_triton
    # does. Elsewhere (CPU autocast included) its kernels dispatch float, double and half of one dtype.
    if input.is_cuda and torch.is_autocast_enabled("cuda"):
        return True
    return input.dtype in _DEFORM_CONV_DTYPES and all(t.dtype == input.dtype for t in tensors)


def _torchvision_roi_dtypes(input, boxes) -> bool:
    """The dtypes for which torchvision's RoI ops return what stn_triton's do. Inside autocast for
    input's device (torchvision registers CPU, CUDA and XPU autocast kernels) it casts input and boxes
    to float32 unless they are float64 and returns input's dtype, as stn_triton computes; a float64
    on one side only then fails there. Elsewhere its kernels take float, double and half of one dtype."""
    dtypes = {b.dtype for b in (boxes if isinstance(boxes, (list, tuple)) else [boxes])}
    if torch.is_autocast_enabled(input.device.type):
        return all((d == torch.float64) == (input.dtype == torch.float64) for d in dtypes)
    return input.dtype in _DEFORM_CONV_DTYPES and dtypes <= {input.dtype}


def _routes_roi(input, boxes, problem) -> bool:
    """stn_triton's RoI op returns what torchvision's would: ``problem`` is stn_triton's validation of
    the call (None: valid), computed only when the rest holds."""
    box_list = boxes if isinstance(boxes, (list, tuple)) else [boxes]
    return (
        not torch.jit.is_tracing()
        and isinstance(input, torch.Tensor)
        and all(isinstance(b, torch.Tensor) for b in box_list)
        and not has_torch_function((input, *box_list))
        and not input.is_quantized
        and problem() is None
        and backend(input) != TORCH
        and _untransformed()
        and _torchvision_roi_dtypes(input, boxes)
    )


def _int_pair(value) -> tuple[int, int] | None:
    """``value`` as torchvision's ``_pair`` reads it (an int, or two), or None for anything else."""
    if type(value) is int:
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int for v in value):
        return tuple(value)
    return None


def _scripts_as(original: Callable, wrapper: Callable) -> Callable:
    """``wrapper`` with ``original``'s metadata, compiled as ``original`` by ``torch.jit.script``.

    TorchScript calls a function's ``__prepare_scriptable__`` and compiles what it returns, both
    when scripting it directly and when a scripted function calls it.
    """
    functools.update_wrapper(wrapper, original)
    wrapper.__prepare_scriptable__ = lambda: original
    return wrapper


def _grid_sample_route(original: Callable) -> Callable:
    # The signature is the original's (same defaults), so a call binds as it would there; extra
    # arguments are passed on for the original to reject.
    def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None, *args, **kwargs):
        if not args and not kwargs and _routes_grid_sample(input, grid, mode, padding_mode, align_corners):
            return functional.grid_sample(input, grid, mode, padding_mode, align_corners)
        return original(input, grid, mode, padding_mode, align_corners, *args, **kwargs)

    return _scripts_as(original, grid_sample)


def _affine_grid_route(original: Callable) -> Callable:
    def affine_grid(theta, size, align_corners=None, *args, **kwargs):
        if not args and not kwargs and _routes_affine_grid(theta, size, align_corners):
            return functional.affine_grid(theta, size, align_corners)
        return original(theta, size, align_corners, *args, **kwargs)

    return _scripts_as(original, affine_grid)


def _deform_conv2d_route(original: Callable) -> Callable:
    def deform_conv2d(
        input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None, *args, **kwargs
    ):
        if not args and not kwargs and _routes_deform_conv2d(
            input, offset, weight, bias, stride, padding, dilation, mask
        ):
            return functional.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
        return original(input, offset, weight, bias, stride, padding, dilation, mask, *args, **kwargs)

    return _scripts_as(original, deform_conv2d)


def _roi_align_route(original: Callable) -> Callable:
    """torchvision's ``roi_align`` (and so ``RoIAlign``, the poolers and the mask targets of its
    detection models); under deterministic algorithms a routed CUDA call runs stn_triton's
    deterministic backward where torchvision samples every RoI densely."""

    def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *args, **kwargs):
        if not args and not kwargs and _routes_roi(input, boxes, lambda: validation.roi_align_problem(
                input, boxes, output_size, spatial_scale, sampling_ratio, aligned)):
            return functional.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
        return original(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, *args, **kwargs)

    return _scripts_as(original, roi_align)


def _ps_roi_align_route(original: Callable) -> Callable:
    def ps_roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, *args, **kwargs):
        if not args and not kwargs and _routes_roi(input, boxes, lambda: validation.ps_roi_align_problem(
                input, boxes, output_size, spatial_scale, sampling_ratio)):
            return functional.ps_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio)
        return original(input, boxes, output_size, spatial_scale, sampling_ratio, *args, **kwargs)

    return _scripts_as(original, ps_roi_align)


def _multiscale_roi_align_route(original: Callable) -> Callable:
    """torchvision's ``poolers._multiscale_roi_align`` (``MultiScaleRoIAlign.forward``): the boxes'
    levels from torchvision's own mapper, then every level pooled into one output by one launch
    each, with no index of a level's boxes (torchvision's ``torch.where`` waits for the device)."""

    def multiscale_roi_align(x_filtered, boxes, output_size, sampling_ratio, scales, mapper, *args, **kwargs):
        if (not args and not kwargs and scales is not None and mapper is not None and len(x_filtered) > 0
                and not _tracing_for_onnx()
                and all(isinstance(f, torch.Tensor) and f.dtype == x_filtered[0].dtype for f in x_filtered)
                and _routes_roi(x_filtered[0], boxes, lambda: validation.multi_scale_roi_align_problem(
                    x_filtered, boxes, output_size, sampling_ratio, scales))):
            if len(x_filtered) == 1:
                return functional.roi_align(x_filtered[0], boxes, output_size, scales[0], sampling_ratio)
            return functional._multi_scale(list(x_filtered), functional.boxes_to_rois(boxes), mapper(boxes),
                                           validation.int_pair("output_size", output_size), list(scales),
                                           sampling_ratio, False)
        return original(x_filtered, boxes, output_size, sampling_ratio, scales, mapper, *args, **kwargs)

    return _scripts_as(original, multiscale_roi_align)


def _tracing_for_onnx() -> bool:
    """torchvision's ``_is_tracing``: its pooler then merges levels for ONNX export."""
    return torch._C._get_tracing_state() is not None


def _routes_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, points_per_level,
                           same_dtypes: bool) -> bool:
    """stn_triton.ms_deform_attn returns what the composition (or kernel) it replaces would for these
    arguments. ``same_dtypes``: outside autocast the original needs one dtype (its grid_sample does)."""
    tensors = (value, sampling_locations, attention_weights)
    return (
        not torch.jit.is_tracing()
        and all(isinstance(t, torch.Tensor) for t in tensors)
        and not has_torch_function(tensors)
        and validation.ms_deform_attn_problem(value, spatial_shapes, None, sampling_locations, attention_weights, 64,
                                              points_per_level, False) is None
        and (not same_dtypes or torch.is_autocast_enabled(value.device.type)
             or value.dtype == sampling_locations.dtype == attention_weights.dtype)
        and backend(value) != TORCH
        and _untransformed()
    )


def _transformers_forward_route(original: Callable) -> Callable:
    """Hugging Face's ``MultiScaleDeformableAttention.forward``: its list of shapes, its composition's dtypes."""

    def forward(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index, sampling_locations,
                attention_weights, im2col_step, *args, **kwargs):
        if not args and not kwargs and _routes_ms_deform_attn(value, value_spatial_shapes_list, sampling_locations,
                                                              attention_weights, None, True):
            return functional.ms_deform_attn(value, value_spatial_shapes_list, None, sampling_locations,
                                             attention_weights)
        return original(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                        sampling_locations, attention_weights, im2col_step, *args, **kwargs)

    return functools.update_wrapper(forward, original)


def _composition_route(original: Callable) -> Callable:
    """mmcv's ``multi_scale_deformable_attn_pytorch`` and Hugging Face's Mask2Former / OneFormer
    ``multi_scale_deformable_attention``: (value, shapes, locations, weights)."""

    def composition(value, value_spatial_shapes, sampling_locations, attention_weights, *args, **kwargs):
        if not args and not kwargs and _routes_ms_deform_attn(value, value_spatial_shapes, sampling_locations,
                                                              attention_weights, None, True):
            return functional.ms_deform_attn(value, value_spatial_shapes, None, sampling_locations, attention_weights)
        return original(value, value_spatial_shapes, sampling_locations, attention_weights, *args, **kwargs)

    return functools.update_wrapper(composition, original)


def _per_level_route(original: Callable) -> Callable:
    """RT-DETRv2's core (Hugging Face's rt_detr_v2, D-FINE, DEIMv2): per-level point counts; its
    'discrete' method (a nearest read) runs the original."""

    def composition(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list,
                    method="default", *args, **kwargs):
        if (not args and not kwargs and method == "default" and isinstance(num_points_list, (list, tuple))
                and _routes_ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights,
                                           list(num_points_list), True)):
            return functional.ms_deform_attn(value, value_spatial_shapes, None, sampling_locations, attention_weights,
                                             points_per_level=list(num_points_list))
        return original(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method,
                        *args, **kwargs)

    return functools.update_wrapper(composition, original)


def _mmcv_function_route(original: Callable) -> Callable:
    """mmcv's ``MultiScaleDeformableAttnFunction.apply``: its CUDA kernel casts the locations and
    weights to value's dtype and returns value's dtype."""

    def apply(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
              im2col_step, *args, **kwargs):
        if not args and not kwargs and _routes_ms_deform_attn(value, value_spatial_shapes, sampling_locations,
                                                              attention_weights, None, False):
            out = functional.ms_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                                            attention_weights, im2col_step)
            return out.to(value.dtype)
        return original(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
                        im2col_step, *args, **kwargs)

    return functools.update_wrapper(apply, original)


# Hugging Face transformers' models with multi-scale deformable attention, each with its own copy:
# the class MultiScaleDeformableAttention, or a module-level composition looked up at call time.
_TRANSFORMERS_CLASSES = ("deformable_detr", "grounding_dino", "mm_grounding_dino", "omdet_turbo", "rt_detr", "lw_detr",
                         "rf_detr", "pp_doclayout_v2", "pp_doclayout_v3", "pp_doclayout_v4")
_TRANSFORMERS_FUNCTIONS = (("mask2former", "multi_scale_deformable_attention"),
                           ("oneformer", "multi_scale_deformable_attention"),
                           ("rt_detr_v2", "multi_scale_deformable_attention_v2"),
                           ("d_fine", "multi_scale_deformable_attention_v2"),
                           ("deimv2", "multi_scale_deformable_attention_v2"))


def _optional_module(name: str):
    """The module ``name``, or None when its package is not installed (installed but broken: raise)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and name.startswith(error.name):
            return None
        raise


def _library_targets() -> list[tuple[object, str, Callable[[Callable], Callable]]]:
    """torchvision's, Hugging Face transformers' and mmcv's functions, for the libraries installed."""
    targets = []
    deform_conv = _optional_module("torchvision.ops.deform_conv")
    if deform_conv is not None:
        ops = importlib.import_module("torchvision.ops")
        # DeformConv2d.forward calls its module's deform_conv2d when it runs: swapping that name routes it.
        targets += [(ops, "deform_conv2d", _deform_conv2d_route), (deform_conv, "deform_conv2d", _deform_conv2d_route)]
    if _optional_module("torchvision.ops.roi_align") is not None:
        # Every name the RoI ops are called through: the package's, their modules' (the modules' own
        # classes call those), the poolers' and the detection heads' imports.
        owners = [importlib.import_module(name) for name in (
            "torchvision.ops", "torchvision.ops.roi_align", "torchvision.ops.ps_roi_align", "torchvision.ops.poolers",
            "torchvision.models.detection.roi_heads")]
        for name, route in (("roi_align", _roi_align_route), ("ps_roi_align", _ps_roi_align_route),
                            ("_multiscale_roi_align", _multiscale_roi_align_route)):
            targets += [(owner, name, route) for owner in owners if callable(getattr(owner, name, None))]
    if importlib.util.find_spec("transformers") is not None:
        for model in _TRANSFORMERS_CLASSES:
            module = _optional_module(f"transformers.models.{model}.modeling_{model}")
            if module is not None and hasattr(module, "MultiScaleDeformableAttention"):
                targets.append((module.MultiScaleDeformableAttention, "forward", _transformers_forward_route))
        for model, name in _TRANSFORMERS_FUNCTIONS:
            module = _optional_module(f"transformers.models.{model}.modeling_{model}")
            if module is not None and hasattr(module, name):
                route = _per_level_route if name.endswith("_v2") else _composition_route
                targets.append((module, name, route))
    try:  # mmcv-lite, without its compiled ops, has no multi-scale deformable attention to swap
        mmcv = importlib.import_module("mmcv.ops.multi_scale_deform_attn")
    except ImportError:
        mmcv = None
    if mmcv is not None:
        targets += [(mmcv, "multi_scale_deformable_attn_pytorch", _composition_route),
                    (mmcv.MultiScaleDeformableAttnFunction, "apply", _mmcv_function_route)]
    return targets


def _targets() -> list[tuple[object, str, Callable[[Callable], Callable]]]:
    """(owner, attribute, wrapper factory) of every function apply() swaps."""
    return [(F, "grid_sample", _grid_sample_route), (F, "affine_grid", _affine_grid_route), *_library_targets()]


# An attribute apply() set on a class that had it only by inheritance: revert() deletes it again.
_INHERITED = object()


def _apply() -> list[tuple[object, str]]:
    """Swap every target not swapped yet; returns the (owner, attribute) pairs it swapped."""
    wrappers: dict[Callable, Callable] = {}
    swapped_now = []
    for owner, name, route in _targets():
        if (owner, name) in _originals:
            continue
        original = getattr(owner, name)
        # One wrapper per original, so names that were one function stay one function.
        if original not in wrappers:
            wrappers[original] = route(original)
        _originals[(owner, name)] = vars(owner).get(name, _INHERITED)
        setattr(owner, name, wrappers[original])
        swapped_now.append((owner, name))
    return swapped_now


def _revert(keys) -> None:
    """Put back the originals at these (owner, attribute) pairs, skipping any already put back."""
    for owner, name in keys:
        if (owner, name) in _originals:
            original = _originals.pop((owner, name))
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def apply() -> None:
    """Route ``F.grid_sample``, ``F.affine_grid``, torchvision's ``deform_conv2d`` and the multi-scale
    deformable attention of Hugging Face transformers and mmcv to stn_triton.

    Each is replaced, where it is looked up, by a wrapper that calls stn_triton's function where that
    returns what the original would, and the original (with the same arguments) everywhere else.
    ``torchvision.ops.deform_conv2d`` and ``torchvision.ops.deform_conv.deform_conv2d`` (which
    ``torchvision.ops.DeformConv2d`` calls) are swapped when torchvision is installed; the
    ``forward`` of every transformers model's ``MultiScaleDeformableAttention`` class (Deformable
    DETR, Grounding DINO, RT-DETR, ...: existing instances too) and the module-level compositions
    of Mask2Former, OneFormer, RT-DETRv2, D-FINE and DEIMv2 (D-FINE and DEIMv2 bind theirs when a
    layer is built: apply() first) when transformers is installed (importing those modules takes a
    few seconds once); ``multi_scale_deformable_attn_pytorch`` and
    ``MultiScaleDeformableAttnFunction.apply`` when mmcv is. Applying again is harmless: a
    function already swapped stays as it is, and one not swapped before (a library installed
    meanwhile) is swapped now.
    """
    _apply()


def revert() -> None:
    """Put back the exact objects ``apply()`` replaced; harmless when nothing is swapped."""
    _revert(list(_originals))


@contextlib.contextmanager
def swapped() -> Iterator[None]:
    """Swap for the duration of a ``with`` block, and put back on leaving it, even on an exception.

    It puts back only what it swapped: inside an earlier ``apply()`` or ``swapped()`` block,
    the swap stays on after the block.
    """
    keys = _apply()
    try:
        yield
    finally:
        _revert(keys)
