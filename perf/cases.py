"""The benchmark cases: one declarative entry per case id, read by ``perf/run.py``.

A case names the public ``stn_triton`` function it measures (``op``), its shapes, dtypes,
layouts and passes, how to build its inputs, the call to time for ours, the PyTorch reference
ours must equal, and its baselines. An entry whose op is not (yet) in ``stn_triton`` is skipped
with a note, so adding an op to the suite means adding entries to ``CASES`` and nothing else.

Case ids, shapes and baselines follow issue 5; all sampling is bilinear (trilinear in 3-D),
zero padding and ``align_corners=False`` unless the id says otherwise.
"""

import functools
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

import stn_triton
from stn_triton import reference as stn_reference

Inputs = dict[str, torch.Tensor]
Shape = Mapping[str, object]

FWD, BWD, FWD_BWD = "fwd", "bwd", "fwd+bwd"
NCHW, NHWC = "nchw", "nhwc"
DEFAULT_DTYPES = (torch.float32, torch.bfloat16)
DCN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


@dataclass(frozen=True)
class Case:
    """One benchmark case: an op at one shape (``at`` gives it another), over dtypes x layouts x passes."""

    op: str  # the stn_triton function measured (the CSV `op` column); the case is skipped until it exists
    case: str  # the CSV `case` column
    shape: Shape  # the measured shape, read by make_inputs
    smoke_shape: Shape  # the tiny shape of the CPU interpreter smoke
    make_inputs: Callable[[Shape, torch.dtype, torch.device, str, torch.Generator], Inputs]
    ours: Callable[..., torch.Tensor]  # ours(**inputs) -> output
    reference: Baseline  # the PyTorch composition ours must equal, checked against in float64
    baselines: Mapping[str, Baseline]  # the CSV `baseline` column -> its callable
    grad_inputs: tuple[str, ...]  # inputs whose gradients bwd computes
    dtypes: tuple[torch.dtype, ...] = DEFAULT_DTYPES
    layouts: tuple[str, ...] = (NCHW, NHWC)
    passes: tuple[str, ...] = (FWD, BWD, FWD_BWD)
    deterministic: bool = False  # time ours under torch.use_deterministic_algorithms(True)
    requires: tuple[str, ...] = ()  # modules besides stn_triton the case needs, e.g. torchvision
    sweep_axis: str | None = None  # "side" or "batch" for scaling-sweep cases, id sweep_<axis>_<value>
    shape_kwargs: tuple[str, ...] = ()  # shape entries every callable takes as keywords, e.g. "out"
    bytes_moved: Callable[[Inputs, torch.Tensor, tuple[str, ...], str], int] = field(default=minimal_bytes)

    def missing(self) -> str | None:
        """Why this case cannot run here, or None when it can."""
        if not hasattr(stn_triton, self.op):
            return f"stn_triton has no {self.op} yet"
        absent = [name for name in self.requires if importlib.util.find_spec(name) is None]
        return f"{', '.join(absent)} not installed" if absent else None

    def at(self, shape: Shape) -> "Case":
        """This case at ``shape`` (``self.shape`` to measure, ``self.smoke_shape`` for the smoke),
        with ``shape_kwargs`` bound into ours, the reference and every baseline."""
        bound = {key: shape[key] for key in self.shape_kwargs}

        def bind(baseline: Baseline) -> Baseline:
            return replace(baseline, fn=functools.partial(baseline.fn, **bound))

        return replace(
            self,
            shape=shape,
            ours=functools.partial(self.ours, **bound),
            reference=bind(self.reference),
            baselines={name: bind(baseline) for name, baseline in self.baselines.items()},
        )


# ---- inputs ---------------------------------------------------------------------------------


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` [N, C, *spatial] in channels-last memory for ``nhwc`` (channels_last_3d on 5-D)."""
    if layout == NCHW:
        return t.contiguous()
    memory_format = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=memory_format)


def _randn(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, device=device, generator=gen).to(dtype)


def _image(shape: Shape, dtype, device, layout, gen) -> torch.Tensor:
    """A random image [N, C, *shape["in"]] in ``layout``."""
    return to_layout(_randn((shape["N"], shape["C"], *shape["in"]), dtype, device, gen), layout)


def _near_identity_theta(batch: int, nd: int, device, gen) -> torch.Tensor:
    """Affine maps [batch, nd, nd+1] (float32) within about 10% of the identity."""
    identity = torch.eye(nd, nd + 1, device=device).expand(batch, nd, nd + 1)
    return identity + 0.1 * torch.randn((batch, nd, nd + 1), device=device, generator=gen)


def _near_identity_grid(shape: Shape, dtype, device, gen) -> torch.Tensor:
    """A grid [N, *shape["out"], nd] = the identity jittered by up to 2 input pixels per axis."""
    batch, out, nd = shape["N"], shape["out"], len(shape["out"])
    identity = torch.eye(nd, nd + 1, device=device).expand(batch, nd, nd + 1)
    grid = F.affine_grid(identity, [batch, 1, *out], align_corners=False)
    pixel = torch.tensor([2.0 / s for s in reversed(shape["in"])], device=device)  # grid is (x, y[, z])
    jitter = (2 * torch.rand(grid.shape, device=device, generator=gen) - 1) * 2 * pixel
    return (grid + jitter).to(dtype)


def grid_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, *in], grid [N, *out, nd]."""
    return {"input": _image(shape, dtype, device, layout, gen), "grid": _near_identity_grid(shape, dtype, device, gen)}


def affine_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, *in], theta [N, nd, nd+1]."""
    nd = len(shape["in"])
    theta = _near_identity_theta(shape["N"], nd, device, gen).to(dtype)
    return {"input": _image(shape, dtype, device, layout, gen), "theta": theta}


def homography_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, H, W], homography [N, 3, 3] near the identity with a mild perspective row."""
    batch = shape["N"]
    homography = torch.eye(3, device=device).expand(batch, 3, 3).clone()
    homography[:, :2] += 0.1 * torch.randn((batch, 2, 3), device=device, generator=gen)
    homography[:, 2, :2] += 0.05 * torch.randn((batch, 2), device=device, generator=gen)
    return {"input": _image(shape, dtype, device, layout, gen), "homography": homography.to(dtype)}


def text_control_points(count: int, device) -> torch.Tensor:
    """[count, 2] control points in two rows along the top and bottom edges (ASTER's layout)."""
    xs = torch.linspace(-1, 1, count // 2, device=device)
    top = torch.stack([xs, torch.full_like(xs, -1)], dim=1)
    bottom = torch.stack([xs, torch.full_like(xs, 1)], dim=1)
    return torch.cat([top, bottom])


def tps_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C, H, W], source_points [N, K, 2] = control_points [K, 2] moved by up to 10%."""
    control = text_control_points(shape["K"], device)
    moved = control + 0.1 * (2 * torch.rand((shape["N"], *control.shape), device=device, generator=gen) - 1)
    return {
        "input": _image(shape, dtype, device, layout, gen),
        "source_points": moved.to(dtype),
        "control_points": control.to(dtype),
    }


def dcn_inputs(shape: Shape, dtype, device, layout, gen) -> Inputs:
    """input [N, C_in, H, W], offset [N, 2*k*k, H, W] (about a pixel), mask [N, k*k, H, W] in (0, 1),
    weight [C_out, C_in, k, k], bias [C_out]; stride 1 and "same" padding keep H x W."""
    batch, c_in, c_out, k = shape["N"], shape["C"], shape["C_out"], shape["kernel"]
    height, width = shape["in"]
    image = _image(shape, dtype, device, layout, gen)
    offset = _randn((batch, 2 * k * k, height, width), dtype, device, gen)
    mask = torch.sigmoid(_randn((batch, k * k, height, width), torch.float32, device, gen)).to(dtype)
    weight = _randn((c_out, c_in, k, k), torch.float32, device, gen) / (c_in * k * k) ** 0.5
    return {
        "input": image,
        "offset": to_layout(offset, layout),
        "mask": to_layout(mask, layout),
        "weight": weight.to(dtype),
        "bias": _randn((c_out,), dtype, device, gen),
    }


# ---- ours and the PyTorch compositions --------------------------------------------------------


def ours_grid_sample(input, grid, *, mode):
    return stn_triton.grid_sample(input, grid, mode=mode, padding_mode="zeros", align_corners=False)


def eager_grid_sample(input, grid, *, mode):
    return F.grid_sample(input, grid, mode=mode, padding_mode="zeros", align_corners=False)


def ours_affine_grid_then_sample(input, theta, *, out):
    grid = stn_triton.affine_grid(theta, (*input.shape[:2], *out), align_corners=False)
    return stn_triton.grid_sample(input, grid, align_corners=False)


def ours_affine_grid_sample(input, theta, *, out):
    return stn_triton.affine_grid_sample(input, theta, size=(*input.shape[:2], *out), align_corners=False)


def eager_affine_grid_sample(input, theta, *, out):
    grid = F.affine_grid(theta, [*input.shape[:2], *out], align_corners=False)
    return F.grid_sample(input, grid, align_corners=False)


def ours_perspective_grid_sample(input, homography, *, out):
    return stn_triton.perspective_grid_sample(input, homography, size=(*input.shape[:2], *out), align_corners=False)


def eager_perspective_grid_sample(input, homography, *, out):
    """Source = H [x, y, 1]^T dehomogenised, over the normalized output pixel centres."""
    batch = input.shape[0]
    identity = torch.eye(2, 3, dtype=input.dtype, device=input.device).expand(batch, 2, 3)
    target = F.affine_grid(identity, [batch, 1, *out], align_corners=False)  # [N, H, W, 2]
    homogeneous = torch.cat([target, torch.ones_like(target[..., :1])], dim=-1)
    source = torch.einsum("nhwj,nij->nhwi", homogeneous, homography)
    return F.grid_sample(input, source[..., :2] / source[..., 2:], align_corners=False)


def ours_tps_grid_sample(input, source_points, control_points, *, out):
    size = (*input.shape[:2], *out)
    return stn_triton.tps_grid_sample(input, source_points, control_points, size=size, align_corners=False)


def _tps_radial(points: torch.Tensor, control_points: torch.Tensor) -> torch.Tensor:
    """U(|p - c_k|) = r^2 log r^2 (0 at r = 0): [..., P, 2] x [K, 2] -> [..., P, K]."""
    squared = (points.unsqueeze(-2) - control_points).pow(2).sum(-1)
    return torch.where(squared > 0, squared * torch.log(squared.clamp_min(1e-30)), torch.zeros_like(squared))


def eager_tps_grid_sample(input, source_points, control_points, *, out):
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
    target = F.affine_grid(identity, [1, 1, *out], align_corners=False).reshape(-1, 2)  # [P, 2]
    design = torch.cat([_tps_radial(target, control_points), torch.ones_like(target[:, :1]), target], dim=1)
    grid = (design @ coefficients).reshape(batch, *out, 2)
    return F.grid_sample(input, grid.to(input.dtype), align_corners=False)


def ours_deform_conv2d(input, offset, mask, weight, bias, *, padding):
    return stn_triton.deform_conv2d(input, offset, weight, bias, padding=padding, mask=mask)


def torchvision_deform_conv2d(input, offset, mask, weight, bias, *, padding):
    import torchvision

    return torchvision.ops.deform_conv2d(input, offset, weight, bias, padding=(padding, padding), mask=mask)


def dense_conv2d(input, offset, mask, weight, bias, *, padding):
    """cuDNN's dense convolution of the same shape: the floor for a deformable one (offset and
    mask unused)."""
    return F.conv2d(input, weight, bias, padding=padding)


# ---- case builders --------------------------------------------------------------------------


def _eager_and_compile(eager: Callable) -> tuple[Baseline, dict[str, Baseline]]:
    """The reference composition and the baselines that run it: eager and torch.compile."""
    reference = Baseline(eager)
    return reference, {"eager": reference, "compile": Baseline(eager, compiled=True)}


def grid_sample_case(case_id: str, batch: int, channels: int, size: tuple[int, ...], mode="bilinear") -> Case:
    """grid_sample [N, C, *size] with a grid [N, *size, nd] near the identity."""
    reference, baselines = _eager_and_compile(functools.partial(eager_grid_sample, mode=mode))
    return Case(
        op="grid_sample",
        case=case_id,
        shape={"N": batch, "C": channels, "in": size, "out": size},
        smoke_shape={"N": 2, "C": min(channels, 3), "in": (8, 8), "out": (6, 7)},
        make_inputs=grid_inputs,
        ours=functools.partial(ours_grid_sample, mode=mode),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input", "grid"),
    )


def deterministic_case(case: Case) -> Case:
    """``case``'s fwd+bwd under torch.use_deterministic_algorithms(True), against our default
    (atomic) backward as the ``nondeterministic`` baseline."""
    return replace(
        case,
        case=f"{case.case}_det",
        passes=(FWD_BWD,),
        deterministic=True,
        baselines={"nondeterministic": Baseline(case.ours)},
    )


def affine_case(case_id: str, batch: int, channels: int, size: tuple[int, ...], *, fused=True, **overrides) -> Case:
    """affine_grid_sample [N, C, *size] -> [N, C, *size] with theta near the identity; with
    ``fused=False``, stn_triton.affine_grid then stn_triton.grid_sample (op ``affine_grid``)."""
    reference, baselines = _eager_and_compile(eager_affine_grid_sample)
    ours = ours_affine_grid_sample if fused else ours_affine_grid_then_sample
    smoke_in, smoke_out = ((8, 9), (6, 7)) if len(size) == 2 else ((4, 5, 6), (3, 4, 5))
    return Case(
        op="affine_grid_sample" if fused else "affine_grid",
        case=case_id,
        shape={"N": batch, "C": channels, "in": size, "out": size},
        smoke_shape={"N": 2, "C": min(channels, 3), "in": smoke_in, "out": smoke_out},
        make_inputs=affine_inputs,
        ours=ours,
        shape_kwargs=("out",),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input", "theta"),
        **overrides,
    )


def perspective_case(case_id: str, batch: int, channels: int, size: tuple[int, int]) -> Case:
    """perspective_grid_sample [N, C, *size] -> [N, C, *size] with a homography near the identity."""
    reference, baselines = _eager_and_compile(eager_perspective_grid_sample)
    return Case(
        op="perspective_grid_sample",
        case=case_id,
        shape={"N": batch, "C": channels, "in": size, "out": size},
        smoke_shape={"N": 2, "C": min(channels, 3), "in": (8, 8), "out": (6, 7)},
        make_inputs=homography_inputs,
        ours=ours_perspective_grid_sample,
        shape_kwargs=("out",),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input", "homography"),
    )


def tps_case(case_id: str, batch: int, channels: int, points: int, size_in, size_out) -> Case:
    """tps_grid_sample [N, C, *size_in] -> [N, C, *size_out] with ``points`` control points."""
    reference, baselines = _eager_and_compile(eager_tps_grid_sample)
    return Case(
        op="tps_grid_sample",
        case=case_id,
        shape={"N": batch, "C": channels, "K": points, "in": size_in, "out": size_out},
        smoke_shape={"N": 2, "C": min(channels, 3), "K": 6, "in": (8, 12), "out": (5, 7)},
        make_inputs=tps_inputs,
        ours=ours_tps_grid_sample,
        shape_kwargs=("out",),
        reference=reference,
        baselines=baselines,
        grad_inputs=("input", "source_points"),
    )


def reference_deform_conv2d(input, offset, mask, weight, bias, *, padding):
    """The plain PyTorch deformable convolution (column buffer + matmul): the float64 reference."""
    return stn_reference.deform_conv2d(input, offset, weight, bias, (1, 1), (padding, padding), (1, 1), mask)


def dcn_case(case_id: str, batch: int, channels: int, size: tuple[int, int], kernel=3) -> Case:
    """deform_conv2d with mask, C -> C channels, ``kernel`` x ``kernel``, stride 1, same padding,
    against torchvision where it is installed (float32 time for bfloat16, which it lacks) and a
    dense cuDNN conv; checked against the plain PyTorch implementation in float64."""
    padding = kernel // 2
    baselines = {"cudnn_conv": Baseline(functools.partial(dense_conv2d, padding=padding))}
    if importlib.util.find_spec("torchvision") is not None:
        baselines["torchvision"] = Baseline(
            functools.partial(torchvision_deform_conv2d, padding=padding),
            dtypes=(torch.float32, torch.float64, torch.float16),
        )
    return Case(
        op="deform_conv2d",
        case=case_id,
        shape={"N": batch, "C": channels, "C_out": channels, "kernel": kernel, "in": size},
        smoke_shape={"N": 2, "C": 3, "C_out": 4, "kernel": kernel, "in": (6, 7)},
        make_inputs=dcn_inputs,
        ours=functools.partial(ours_deform_conv2d, padding=padding),
        reference=Baseline(functools.partial(reference_deform_conv2d, padding=padding)),
        baselines=baselines,
        grad_inputs=("input", "offset", "mask", "weight", "bias"),
        dtypes=DCN_DTYPES,
        passes=(FWD, FWD_BWD),
    )


def sweep_cases() -> list[Case]:
    """Fused affine fwd+bwd, float32, nchw, at C=16: image side 64..2048 (N=8) and batch
    1..256 (128x128), against eager, to show how time and GB/s grow with work."""
    common = {"dtypes": (torch.float32,), "layouts": (NCHW,), "passes": (FWD_BWD,)}

    def sweep(axis: str, value: int, batch: int, side: int) -> Case:
        case = affine_case(f"sweep_{axis}_{value}", batch, 16, (side, side), sweep_axis=axis, **common)
        return replace(case, baselines={"eager": case.reference})

    sides = [sweep("side", side, 8, side) for side in (64, 128, 256, 512, 1024, 2048)]
    batches = [sweep("batch", batch, batch, 128) for batch in (1, 4, 16, 64, 256)]
    return sides + batches


GRID2D_C64 = grid_sample_case("grid2d_c64", 32, 64, (128, 128))
AFFINE2D_C64 = affine_case("affine2d_c64", 32, 64, (128, 128))

CASES: list[Case] = [
    affine_case("affine2d_c3", 64, 3, (224, 224)),
    AFFINE2D_C64,
    affine_case("affine_grid_c3", 64, 3, (224, 224), fused=False),
    grid_sample_case("grid2d_c3", 64, 3, (224, 224)),
    GRID2D_C64,
    grid_sample_case("grid2d_c256_small", 4, 256, (16, 16)),
    grid_sample_case("grid2d_c3_bicubic", 64, 3, (224, 224), mode="bicubic"),
    affine_case("affine3d_c4", 4, 4, (64, 64, 64)),
    perspective_case("persp2d_c3", 64, 3, (224, 224)),
    tps_case("tps_text", 256, 3, 20, (64, 200), (32, 100)),
    dcn_case("dcn_r50", 8, 256, (56, 56)),
    dcn_case("dcn_wide", 16, 64, (112, 112)),
    deterministic_case(AFFINE2D_C64),
    deterministic_case(GRID2D_C64),
    *sweep_cases(),
]
