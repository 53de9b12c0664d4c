"""The benchmark cases, one per entry of ``stn_triton.shapes.SHAPES``, read by ``perf/run.py``.

A case names the public ``stn_triton`` function it measures (``op``), its shapes, dtypes,
layouts and passes, how to build its inputs, the call to time for ours (both from
``stn_triton.workloads``, which ``stn_triton.tune`` runs too), the PyTorch reference ours must
equal, and its baselines. An entry whose op is not (yet) in ``stn_triton`` is skipped
with a note. The shapes live in ``stn_triton/shapes.py``, which ``stn_triton.tune`` reads too:
adding a case means adding its shape there (and, for a new op, a builder to ``BUILDERS`` here).

Case ids, shapes and baselines follow issue 5; all sampling is bilinear (trilinear in 3-D),
zero padding and ``align_corners=False`` unless the id says otherwise.

The training-step cases (pass ``step``, ops ``SpatialTransformer`` and ``DeformConv2d``, models
in ``perf/training.py``) time one step of a model as a user's loop runs it. Their callables
build a Trainer from the inputs (the batch and the model's initial state_dict, which every
variant loads) rather than computing an output, and each baseline is timed against ours run
the same way: the ``eager`` row compares both models eager, the ``compile`` row both under
``torch.compile``, so every row's speedup compares like with like.
"""

import functools
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

import stn_triton
import training
from stn_triton import fallback
from stn_triton.geometry import tps_radial
from stn_triton.kernels import codes
from stn_triton.ops.dcnv3 import DcnSpec
from stn_triton.shapes import SHAPES, BenchShape
from stn_triton.workloads import (
    affine_inputs,
    blur_inputs,
    dcn_geometry,
    dcn_inputs,
    dcnv3_inputs,
    dcnv4_inputs,
    grid_inputs,
    homography_inputs,
    mask_target_inputs,
    msda_inputs,
    ours_affine_grid_sample,
    ours_affine_grid_then_sample,
    ours_blur_pool2d,
    ours_dcnv3,
    ours_dcnv4,
    ours_deform_conv2d,
    ours_grid_sample,
    ours_max_blur_pool2d,
    ours_ms_deform_attn,
    ours_multi_scale_roi_align,
    ours_perspective_grid_sample,
    ours_roi_align,
    ours_tps_grid_sample,
    randn,
    roi_inputs,
    roi_scales,
    to_layout,
    tps_inputs,
)

Inputs = dict[str, torch.Tensor]
Shape = BenchShape

FWD, BWD, FWD_BWD = "fwd", "bwd", "fwd+bwd"
STEP = "step"  # one training step of a model: forward, loss, backward, optimizer step
NCHW, NHWC = "nchw", "nhwc"
DEFAULT_DTYPES = (torch.float32, torch.bfloat16)
DCN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cast(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """``inputs`` with every floating-point tensor in ``dtype`` (class labels and counters keep theirs)."""
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in inputs.items()}


def minimal_bytes(inputs: Inputs, output: torch.Tensor, grad_inputs: tuple[str, ...], pass_: str) -> int:
    """The fewest bytes a pass must move: each input read once, each output written once.

    fwd reads every input and writes the output; bwd reads every input and grad_output and
    writes a gradient per ``grad_inputs``; fwd+bwd is both, reading the inputs once.
    """
    read_inputs = sum(t.nbytes for t in inputs.values())
    backward_traffic = output.nbytes + sum(inputs[name].nbytes for name in grad_inputs)
    if pass_ == FWD:
        return read_inputs + output.nbytes
    if pass_ == BWD:
        return read_inputs + backward_traffic
    return read_inputs + output.nbytes + backward_traffic


@dataclass(frozen=True)
class Baseline:
    """A callable on the same keyword inputs as ours, and how the suite runs it."""

    fn: Callable[..., torch.Tensor]
    dtypes: tuple[torch.dtype, ...] | None = None  # None: every dtype; else others run on float32 copies, noted
    compiled: bool = False  # wrap in torch.compile (static shapes), compiled and warmed before timing
    ours: Callable | None = None  # what this baseline is timed against, when not the case's ours
    deterministic: bool = False  # timed under torch.use_deterministic_algorithms(True), as ours is then


@dataclass(frozen=True)
class Case:
    """One benchmark case: an op at one shape (``at`` gives it another), over dtypes x layouts x passes."""

    op: str  # the stn_triton function or module measured (the CSV `op` column); skipped until it exists
    case: str  # the CSV `case` column
    shape: Shape  # the measured shape, SHAPES[case], read by make_inputs
    smoke_shape: Shape  # the tiny shape of the CPU interpreter smoke
    make_inputs: Callable[[Shape, torch.dtype, torch.device, str, torch.Generator], Inputs]
    ours: Callable[..., torch.Tensor]  # ours(**inputs) -> output; for a training step -> a training.Trainer
    reference: Baseline  # the PyTorch composition ours must equal, checked against in float64
    baselines: Mapping[str, Baseline]  # the CSV `baseline` column -> its callable
    grad_inputs: tuple[str, ...]  # inputs whose gradients bwd computes
    dtypes: tuple[torch.dtype, ...] = DEFAULT_DTYPES
    layouts: tuple[str, ...] = (NCHW, NHWC)
    passes: tuple[str, ...] = (FWD, BWD, FWD_BWD)  # or (STEP,) alone
    requires: tuple[str, ...] = ()  # modules besides stn_triton the case needs, e.g. torchvision
    shape_kwargs: tuple[str, ...] = ()  # shape attributes every callable takes as keywords, e.g. "out_size"
    bytes_moved: Callable[[Inputs, torch.Tensor, tuple[str, ...], str], int] = field(default=minimal_bytes)

    @property
    def deterministic(self) -> bool:
        """Time ours under torch.use_deterministic_algorithms(True)."""
        return self.shape.deterministic

    @property
    def sweep_axis(self) -> str | None:
        """"side" or "batch" for scaling-sweep cases, id sweep_<axis>_<value>."""
        return self.shape.sweep

    @property
    def training_step(self) -> bool:
        """A training-step case: its callables build a training.Trainer from the inputs."""
        return STEP in self.passes

    def missing(self) -> str | None:
        """Why this case cannot run here, or None when it can."""
        if not hasattr(stn_triton, self.op):
            return f"stn_triton has no {self.op} yet"
        absent = [name for name in self.requires if importlib.util.find_spec(name) is None]
        return f"{', '.join(absent)} not installed" if absent else None

    def at(self, shape: Shape) -> "Case":
        """This case at ``shape`` (``self.shape`` to measure, ``self.smoke_shape`` for the smoke),
        with ``shape_kwargs`` bound into ours, the reference and every baseline."""
        bound = {key: getattr(shape, key) for key in self.shape_kwargs}

        def bind(baseline: Baseline) -> Baseline:
            ours = None if baseline.ours is None else functools.partial(baseline.ours, **bound)
            return replace(baseline, fn=functools.partial(baseline.fn, **bound), ours=ours)

        return replace(
            self,
            shape=shape,
            ours=functools.partial(self.ours, **bound),
            reference=bind(self.reference),
            baselines={name: bind(baseline) for name, baseline in self.baselines.items()},
        )


# ---- ours and the PyTorch compositions --------------------------------------------------------



def eager_grid_sample(input, grid, *, mode):
    return F.grid_sample(input, grid, mode=mode, padding_mode="zeros", align_corners=False)




def eager_affine_grid_sample(input, theta, *, out_size):
    grid = F.affine_grid(theta, [*input.shape[:2], *out_size], align_corners=False)
    return F.grid_sample(input, grid, align_corners=False)



def eager_perspective_grid_sample(input, homography, *, out_size):
    """Source = H [x, y, 1]^T dehomogenised, over the normalized output pixel centres."""
    batch = input.shape[0]
    identity = torch.eye(2, 3, dtype=input.dtype, device=input.device).expand(batch, 2, 3)
    target = F.affine_grid(identity, [batch, 1, *out_size], align_corners=False)  # [N, H, W, 2]
    homogeneous = torch.cat([target, torch.ones_like(target[..., :1])], dim=-1)
    source = torch.einsum("nhwj,nij->nhwi", homogeneous, homography)
    return F.grid_sample(input, source[..., :2] / source[..., 2:], align_corners=False)



def _tps_radial(points: torch.Tensor, control_points: torch.Tensor) -> torch.Tensor:
    """U(|p - c_k|) = r^2 log r^2 (0 at r = 0): [..., P, 2] x [K, 2] -> [..., P, K]."""
    return tps_radial((points.unsqueeze(-2) - control_points).pow(2).sum(-1))


def eager_tps_grid_sample(input, source_points, control_points, *, out_size):
    """Solve the TPS system for f(control_points[k]) = source_points[n, k], evaluate f on the
    output pixel centres and sample: the usual PyTorch composition (as in ASTER), in float32
    for half-precision inputs because torch.linalg.solve has no half-precision kernels."""
    math_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    source_points, control_points = source_points.to(math_dtype), control_points.to(math_dtype)
    batch, count = source_points.shape[:2]
    affine_part = torch.cat([torch.ones_like(control_points[:, :1]), control_points], dim=1)  # [K, 3]
    system = torch.zeros(count + 3, count + 3, dtype=math_dtype, device=input.device)
    system[:count, :count] = _tps_radial(control_points, control_points)
    system[:count, count:] = affine_part
    system[count:, :count] = affine_part.T
    rhs = torch.cat([source_points, source_points.new_zeros(batch, 3, 2)], dim=1)  # [N, K+3, 2]
    coefficients = torch.linalg.solve(system, rhs)  # [N, K+3, 2]
    identity = torch.eye(2, 3, dtype=math_dtype, device=input.device).unsqueeze(0)
    target = F.affine_grid(identity, [1, 1, *out_size], align_corners=False).reshape(-1, 2)  # [P, 2]
    design = torch.cat([_tps_radial(target, control_points), torch.ones_like(target[:, :1]), target], dim=1)
    grid = (design @ coefficients).reshape(batch, *out_size, 2)
    return F.grid_sample(input, grid.to(input.dtype), align_corners=False)



def torchvision_deform_conv2d(input, offset, mask, weight, bias, *, padding):
    import torchvision

    return torchvision.ops.deform_conv2d(input, offset, weight, bias, padding=(padding, padding), mask=mask)


def dense_conv2d(input, offset, mask, weight, bias, *, padding):
    """cuDNN's dense convolution of the same shape: the floor for a deformable one (offset and
    mask unused)."""
    return F.conv2d(input, weight, bias, padding=padding)


# ---- case builders: one per op, from the case id and its entry of SHAPES ------------------------


def _eager_and_compile(eager: Callable) -> tuple[Baseline, dict[str, Baseline]]:
    """The reference composition and the baselines that run it: eager and torch.compile."""
    reference = Baseline(eager)
    return reference, {"eager": reference, "compile": Baseline(eager, compiled=True)}


def grid_sample_case(case_id: str, shape: Shape) -> Case:
    """grid_sample [N, C, *size] with a grid [N, *out_size, nd] near the identity."""
    reference, baselines = _eager_and_compile(functools.partial(eager_grid_sample, mode=shape.mode))
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=min(shape.C, 3), size=(8, 8), out=(6, 7)),
        make_inputs=grid_inputs,
        ours=functools.partial(ours_grid_sample, mode=shape.mode),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input", "grid"),
    )


def affine_case(case_id: str, shape: Shape) -> Case:
    """affine_grid_sample [N, C, *size] -> [N, C, *out_size] with theta near the identity; for op
    ``affine_grid``, stn_triton.affine_grid then stn_triton.grid_sample."""
    reference, baselines = _eager_and_compile(eager_affine_grid_sample)
    ours = ours_affine_grid_sample if shape.op == "affine_grid_sample" else ours_affine_grid_then_sample
    smoke_in, smoke_out = ((8, 9), (6, 7)) if len(shape.size) == 2 else ((4, 5, 6), (3, 4, 5))
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=min(shape.C, 3), size=smoke_in, out=smoke_out),
        make_inputs=affine_inputs,
        ours=ours,
        shape_kwargs=("out_size",),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input", "theta"),
    )


def perspective_case(case_id: str, shape: Shape) -> Case:
    """perspective_grid_sample [N, C, *size] -> [N, C, *out_size] with a homography near the identity."""
    reference, baselines = _eager_and_compile(eager_perspective_grid_sample)
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=min(shape.C, 3), size=(8, 8), out=(6, 7)),
        make_inputs=homography_inputs,
        ours=ours_perspective_grid_sample,
        shape_kwargs=("out_size",),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input", "homography"),
    )


def tps_case(case_id: str, shape: Shape) -> Case:
    """tps_grid_sample [N, C, *size] -> [N, C, *out_size] with K control points."""
    reference, baselines = _eager_and_compile(eager_tps_grid_sample)
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=min(shape.C, 3), K=6, size=(8, 12), out=(5, 7)),
        make_inputs=tps_inputs,
        ours=ours_tps_grid_sample,
        shape_kwargs=("out_size",),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input", "source_points"),
    )


def reference_deform_conv2d(input, offset, mask, weight, bias, *, padding):
    """The plain PyTorch deformable convolution (column buffer + matmul): the float64 reference."""
    return fallback.deform_conv2d(input, offset, weight, bias, (1, 1), (padding, padding), (1, 1), mask)


def torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def dcn_case(case_id: str, shape: Shape) -> Case:
    """deform_conv2d with mask, C -> C_out channels, kernel x kernel, stride 1, same padding,
    against torchvision where it is installed (float32 time for bfloat16, which it lacks) and a
    dense cuDNN conv; checked against the plain PyTorch implementation in float64."""
    padding = shape.kernel // 2
    baselines = {"cudnn_conv": Baseline(functools.partial(dense_conv2d, padding=padding))}
    if torchvision_installed():
        baselines["torchvision"] = Baseline(
            functools.partial(torchvision_deform_conv2d, padding=padding),
            dtypes=(torch.float32, torch.float64, torch.float16),
        )
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=3, C_out=4, size=(6, 7)),
        make_inputs=dcn_inputs,
        ours=functools.partial(ours_deform_conv2d, padding=padding),
        reference=Baseline(functools.partial(reference_deform_conv2d, padding=padding)),
        baselines=baselines,
        grad_inputs=("input", "offset", "mask", "weight", "bias"),
        dtypes=DCN_DTYPES,
        passes=(FWD, FWD_BWD),
    )


def eager_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *, levels):
    """The composition every model ships (Deformable DETR's, Hugging Face's, mmcv's pure-PyTorch path):
    one grid_sample per level on ``2 * loc - 1``, stacked, weighted, summed. Run under autocast for a
    half-precision value, as a model runs it (its locations and weights are float32 there)."""
    half = value.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(value.device.type, dtype=value.dtype, enabled=half):
        n, _, heads, channels = value.shape
        _, queries, _, count, points, _ = sampling_locations.shape
        grids = 2 * sampling_locations - 1
        samples = []
        for level, ((h, w), rows) in enumerate(zip(levels, value.split([h * w for h, w in levels], dim=1))):
            rows = rows.flatten(2).transpose(1, 2).reshape(n * heads, channels, h, w)
            grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
            samples.append(F.grid_sample(rows, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, queries, count * points)
        out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, heads * channels, queries)
        return out.transpose(1, 2).contiguous()


def transformers_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *,
                                levels):
    """Hugging Face transformers' MultiScaleDeformableAttention as shipped (its pure-PyTorch core)."""
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    half = value.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(value.device.type, dtype=value.dtype, enabled=half):
        return MultiScaleDeformableAttention()(value, spatial_shapes, list(levels), level_start_index,
                                               sampling_locations, attention_weights, 64)


def msda_case(case_id: str, shape: Shape) -> Case:
    """ms_deform_attn at a detector's shape against the composition eager and compiled and, where it
    is installed, Hugging Face's layer; checked against the composition in float64."""
    reference, baselines = _eager_and_compile(eager_ms_deform_attn)
    if importlib.util.find_spec("transformers") is not None:
        baselines["transformers"] = Baseline(transformers_ms_deform_attn)
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=4, levels=((3, 4), (2, 2)), heads=2, points=2,
                            queries=16 if shape.queries == sum(h * w for h, w in shape.levels) else 5),
        make_inputs=msda_inputs,
        ours=ours_ms_deform_attn,
        shape_kwargs=("levels",),
        reference=reference,
        baselines=baselines,
        grad_inputs=("value", "sampling_locations", "attention_weights"),
        layouts=("nsmd",),
        passes=(FWD, FWD_BWD),
    )


def reference_multi_scale_roi_align(boxes, *, out_size, levels, **features):
    """Each box pooled by the plain-PyTorch RoI align (stn_triton.fallback: explicit samples) from
    the level torchvision's mapper gives it: the float64 reference."""
    maps, scales = list(features.values()), roi_scales(levels)
    box_list = list(boxes.unbind(0))
    rois = stn_triton.functional.boxes_to_rois(box_list)
    chosen = stn_triton.functional.fpn_levels(box_list, 2, 1 + len(maps))
    out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *out_size))
    for level, (x, scale) in enumerate(zip(maps, scales)):
        pooled = fallback.roi_pool(x, rois, None, None, codes.ROI_ALIGN, out_size, scale, 2, False, 0.0)
        out = torch.where((chosen == level)[:, None, None, None], pooled, out)
    return out


def torchvision_multi_scale_roi_align(boxes, *, out_size, levels, **features):
    """torchvision's MultiScaleRoIAlign as Mask R-CNN builds it (scales from the maps' sizes)."""
    from torchvision.ops import MultiScaleRoIAlign

    pooler = MultiScaleRoIAlign(list(features), out_size, 2)
    image = [(levels[0][0] * 4, levels[0][1] * 4)] * boxes.shape[0]
    return pooler(features, list(boxes.unbind(0)), image)


def _torchvision_baseline(fn, shape: Shape) -> dict[str, Baseline]:
    """``fn`` as the ``torchvision`` baseline where torchvision is installed, timed deterministically
    in a deterministic case (torchvision's own deterministic path)."""
    return {"torchvision": Baseline(fn, deterministic=shape.deterministic)} if torchvision_installed() else {}


def roi_case(case_id: str, shape: Shape) -> Case:
    """Mask R-CNN's FPN pooler (multi_scale_roi_align, sampling_ratio 2) against torchvision's
    MultiScaleRoIAlign (its CUDA kernel, per level; float32 and float16, what its kernel takes);
    deterministic, also against torchvision's deterministic path (the dense H x W sampling it falls
    back to under torch.use_deterministic_algorithms(True)), with peak memory. No GB/s: the bytes a
    gather must read depend on how the boxes overlap."""
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=3, size=(64, 96), out=(2, 3), rois=3,
                            levels=((16, 24), (8, 12), (4, 6), (2, 3))),
        make_inputs=roi_inputs,
        ours=ours_multi_scale_roi_align,
        shape_kwargs=("out_size", "levels"),
        reference=Baseline(reference_multi_scale_roi_align),
        baselines=_torchvision_baseline(torchvision_multi_scale_roi_align, shape),
        grad_inputs=tuple(f"p{level}" for level in range(len(shape.levels))),
        dtypes=(torch.float32, torch.float16),
        passes=(FWD, FWD_BWD),
        bytes_moved=lambda inputs, output, grad_inputs, pass_: None,
    )


def reference_roi_align(masks, rois, *, out_size):
    """The plain-PyTorch RoI align (stn_triton.fallback), adaptive sampling: the float64 reference."""
    return fallback.roi_pool(masks, rois, None, None, codes.ROI_ALIGN, out_size, 1.0, -1, False, 0.0)


def torchvision_roi_align(masks, rois, *, out_size):
    from torchvision.ops import roi_align

    return roi_align(masks, rois, out_size, 1.0, -1, False)


def mask_target_case(case_id: str, shape: Shape) -> Case:
    """Mask R-CNN's mask targets (forward only: ground truth takes no gradient) against torchvision's
    roi_align: its CUDA kernel and, in the ``_det`` case, the deterministic path it takes then, whose
    dense adaptive sampling is the memory of torchvision #8168."""
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, size=(24, 32), out=(3, 4), rois=3),
        make_inputs=mask_target_inputs,
        ours=ours_roi_align,
        shape_kwargs=("out_size",),
        reference=Baseline(reference_roi_align),
        baselines=_torchvision_baseline(torchvision_roi_align, shape),
        grad_inputs=(),
        dtypes=(torch.float32,),
        layouts=(NCHW,),
        passes=(FWD,),
        bytes_moved=lambda inputs, output, grad_inputs, pass_: None,
    )


def eager_blur_pool2d(input, *, kernel, max_pool_size=1):
    """kornia's composition (filters/blur_pool.py), written here for a GPU machine without kornia:
    F.max_pool2d at stride 1 (the max variant), then the depthwise F.conv2d of the normalized
    binomial kernel, zero padding (k - 1) // 2 (odd k), stride 2: two full-resolution passes."""
    x = F.max_pool2d(input, max_pool_size, stride=1) if max_pool_size > 1 else input
    taps = fallback.binomial_kernel(kernel, input.dtype, input.device)
    weight = (taps[:, None] * taps[None, :]).expand(input.shape[1], 1, kernel, kernel)
    return F.conv2d(x, weight, stride=2, padding=(kernel - 1) // 2, groups=input.shape[1])


def kornia_blur_pool2d(input, *, kernel, max_pool_size=1):
    from kornia.filters import blur_pool2d, max_blur_pool2d

    return max_blur_pool2d(input, kernel, 2, max_pool_size) if max_pool_size > 1 else blur_pool2d(input, kernel, 2)


def blur_case(case_id: str, shape: Shape) -> Case:
    """Anti-aliased downsampling (kornia's blur_pool2d / max_blur_pool2d) at an antialiased ResNet-50
    layer, against the composition eager and under torch.compile, and kornia's own where installed.
    The composition writes the max map and reads it back (about 3.25 units of traffic where the one
    pass needs 1.25: the input and a quarter of it written); GB/s counts the latter."""
    pool = 2 if shape.op == "max_blur_pool2d" else 1
    eager = functools.partial(eager_blur_pool2d, max_pool_size=pool)
    reference, baselines = _eager_and_compile(eager)
    if importlib.util.find_spec("kornia") is not None:
        baselines = {**baselines, "kornia": Baseline(functools.partial(kornia_blur_pool2d, max_pool_size=pool))}
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=3, size=(9, 10)),
        make_inputs=blur_inputs,
        ours=ours_max_blur_pool2d if pool > 1 else ours_blur_pool2d,
        shape_kwargs=("kernel",),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input",),
        passes=(FWD, FWD_BWD),
    )


# ---- training steps ------------------------------------------------------------------------------


def _dcn_spec(input, groups, kernel, packed) -> DcnSpec:
    """The DcnSpec of the cases' window (stride 1, "same" padding, offset_scale 1, no softmax)."""
    return DcnSpec(*dcn_geometry(kernel), groups, 1.0, False, packed, False, input.dtype)


def eager_dcnv3(input, offset, mask, weight, *, groups, kernel):
    """InternImage's pure-PyTorch core (``dcnv3_core_pytorch``: the points of every output pixel,
    one F.grid_sample of each group, the mask-weighted sum), stn_triton.fallback's: the sampled
    points [N * G, Ho * Wo, K, D] written and read back. Half inputs run in float32, as InternImage's
    core does under autocast (grid_sample is on autocast's float32 list)."""
    return fallback.dcn_aggregate(input, offset, mask, _dcn_spec(input, groups, kernel, False))


def eager_dcnv4(input, offset_mask, weight, *, groups, kernel):
    """``eager_dcnv3`` reading DCNv4's packed offset_mask."""
    return fallback.dcn_aggregate(input, offset_mask, None, _dcn_spec(input, groups, kernel, True))


def depthwise_conv(input, weight, *, groups, kernel, **offsets):
    """A depthwise k x k convolution of the same map (cuDNN, channels_last): the speed a fixed k x k
    aggregation of every channel has, the bound a deformable one approaches."""
    return F.conv2d(input.permute(0, 3, 1, 2), weight, padding=kernel // 2, groups=input.shape[-1]).permute(0, 2, 3, 1)


def dcn_aggregate_case(case_id: str, shape: Shape) -> Case:
    """DCNv3 / DCNv4 at an InternImage / FlashInternImage stage against the composition eager and
    compiled, checked against it in float64, and against a depthwise convolution of the same map."""
    packed = shape.op == "dcnv4"
    reference, baselines = _eager_and_compile(eager_dcnv4 if packed else eager_dcnv3)
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=replace(shape, N=2, C=8, groups=2, size=(5, 6)),
        make_inputs=dcnv4_inputs if packed else dcnv3_inputs,
        ours=ours_dcnv4 if packed else ours_dcnv3,
        shape_kwargs=("groups", "kernel"),
        reference=reference,
        baselines={**baselines, "depthwise_conv": Baseline(depthwise_conv)},
        grad_inputs=("input", "offset_mask") if packed else ("input", "offset", "mask"),
        layouts=(NHWC,),
        passes=(FWD, FWD_BWD),
    )


def stn_step_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, H, W] images in [0, 1), target [N] class labels, and the classifier's initial
    state_dict (its own initialisation, the transformer's head moved off the identity)."""
    image = to_layout(torch.rand((shape.N, shape.C, *shape.size), device=device, generator=gen).to(dtype), layout)
    target = torch.randint(training.CLASSES, (shape.N,), device=device, generator=gen)
    state = training.seeded_state(lambda: training.trained_stn_classifier(image), gen, dtype, device)
    return {"input": image, "target": target, **state}


def dcn_block_step_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input and target [N, 4 C, H, W], and the bottleneck's initial state_dict (its own initialisation)."""
    block_shape = (shape.N, 4 * shape.C, *shape.size)
    image = to_layout(randn(block_shape, dtype, device, gen), layout)
    target = to_layout(randn(block_shape, dtype, device, gen), layout)
    state = training.seeded_state(lambda: training.deform_bottleneck(image), gen, dtype, device)
    return {"input": image, "target": target, **state}


def step_case(case_id: str, shape: Shape, smoke_shape: Shape, make_inputs, loss, ours, reference, theirs=None,
              **overrides) -> Case:
    """One training step (perf/training.py) of the model ``ours`` builds, checked against the
    model ``reference`` builds in float64; with ``theirs`` (the same model on PyTorch's ops), rows
    ``eager`` (both eager) and ``compile`` (both under torch.compile). float32 only: a model is
    trained in half precision under autocast, not by casting its parameters."""
    ours = functools.partial(training.start_training, ours, loss)
    baselines = {}
    if theirs is not None:
        theirs = functools.partial(training.start_training, theirs, loss)
        baselines = {
            "eager": Baseline(theirs),
            "compile": Baseline(
                functools.partial(theirs, compiled=True), ours=functools.partial(ours, compiled=True)
            ),
        }
    return Case(
        op=shape.op,
        case=case_id,
        shape=shape,
        smoke_shape=smoke_shape,
        make_inputs=make_inputs,
        ours=ours,
        reference=Baseline(functools.partial(training.start_training, reference, loss)),
        baselines=baselines,
        grad_inputs=(),
        dtypes=(torch.float32,),
        passes=(STEP,),
        **overrides,
    )


def stn_step_case(case_id: str, shape: Shape) -> Case:
    """A step of the notebook's classifier behind stn_triton.SpatialTransformer, against the same
    model sampling with F.affine_grid + F.grid_sample (also the reference). nchw only: a
    one-channel image has no other layout."""
    return step_case(
        case_id,
        shape,
        replace(shape, N=4, size=(12, 12)),
        stn_step_inputs,
        F.cross_entropy,
        ours=training.stn_classifier,
        reference=training.torch_stn_classifier,
        theirs=training.torch_stn_classifier,
        layouts=(NCHW,),
    )


def dcn_block_step_case(case_id: str, shape: Shape) -> Case:
    """A step of the DCNv2 bottleneck with stn_triton.DeformConv2d, against the same block with
    torchvision's DeformConv2d where torchvision is installed (without it those rows are
    skipped) and, eager, with a dense 3x3 conv (``cudnn_conv``, the floor); checked against the
    block on the plain PyTorch deformable convolution in float64."""
    # 30 pixels: the interpreter spends about a second per DCN kernel and pixel block.
    smoke_shape = replace(shape, N=2, C=4, size=(3, 5))
    case = step_case(
        case_id,
        shape,
        smoke_shape,
        dcn_block_step_inputs,
        F.mse_loss,
        ours=training.deform_bottleneck,
        reference=training.reference_bottleneck,
        theirs=training.torchvision_bottleneck if torchvision_installed() else None,
    )
    dense = functools.partial(training.start_training, training.dense_bottleneck, F.mse_loss)
    return replace(case, baselines={**case.baselines, "cudnn_conv": Baseline(dense)})


# ---- variants and the table ------------------------------------------------------------------------


def deterministic_case(case: Case) -> Case:
    """``case``'s fwd+bwd (a forward-only case's forward) under torch.use_deterministic_algorithms(True),
    against our default (atomic) backward as the ``nondeterministic`` baseline, and against the
    baselines the case times deterministically (a library's own deterministic path)."""
    kept = {name: baseline for name, baseline in case.baselines.items() if baseline.deterministic}
    passes = case.passes if FWD_BWD not in case.passes else (FWD_BWD,)  # a forward-only case stays one
    return replace(case, passes=passes, baselines={"nondeterministic": Baseline(case.ours), **kept})


def sweep_case(case: Case) -> Case:
    """``case``'s fwd+bwd, float32, nchw, against eager only: one point of a scaling sweep, to
    show how time and GB/s grow with work."""
    return replace(
        case, dtypes=(torch.float32,), layouts=(NCHW,), passes=(FWD_BWD,), baselines={"eager": case.reference}
    )


BUILDERS: dict[str, Callable[[str, Shape], Case]] = {
    "grid_sample": grid_sample_case,
    "affine_grid_sample": affine_case,
    "affine_grid": affine_case,
    "perspective_grid_sample": perspective_case,
    "tps_grid_sample": tps_case,
    "deform_conv2d": dcn_case,
    "ms_deform_attn": msda_case,
    "multi_scale_roi_align": roi_case,
    "roi_align": mask_target_case,
    "blur_pool2d": blur_case,
    "dcnv3": dcn_aggregate_case,
    "dcnv4": dcn_aggregate_case,
    "max_blur_pool2d": blur_case,
    "SpatialTransformer": stn_step_case,
    "DeformConv2d": dcn_block_step_case,
}


def build_case(case_id: str, shape: Shape) -> Case:
    case = BUILDERS[shape.op](case_id, shape)
    if shape.deterministic:
        case = deterministic_case(case)
    if shape.sweep is not None:
        case = sweep_case(case)
    return case


CASES: list[Case] = [build_case(case_id, shape) for case_id, shape in SHAPES.items()]
