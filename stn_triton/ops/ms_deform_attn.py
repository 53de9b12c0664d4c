"""Multi-scale deformable attention: the launches, the autograd formulas and the dispatch.

One kernel (kernels/ms_deform_attn.py) runs the forward, the backward (grad_value by atomics into
a float32 buffer, the locations' and weights' gradients reduced by the program that owns them) and
the tap list of the deterministic backward, whose grad_value ops/sorted_scatter.py sums in a fixed
order. The whole batch runs in one launch (``im2col_step`` has no effect).

The levels travel as small device tensors (``Levels``): the shapes and starts the caller passes,
used as they are (no ``.tolist()``, no sync), or made once per distinct Python list of shapes, and
a table of each level's point count and first point.

Double backward. grad_value is linear in grad_output (``A^T(grad_output)``), so its gradient is the
forward again with the direction as the value, and the locations' and weights' gradients with the
direction as the value: a gradient penalty on the value differentiates through it. The gradients
of the locations and weights cannot be differentiated again and raise.
"""

import functools
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
import triton
from torch.library import triton_op

from stn_triton.kernels import codes
from stn_triton.kernels.ms_deform_attn import _ms_deform_attn_kernel
from stn_triton.numerics import cdiv, compute_dtype, next_power_of_2
from stn_triton.ops._dispatch import OpRules, call, constant, fold, no_forward_ad, per_sample, unfold
from stn_triton.ops._launch import multiprocessors, needs_int64
from stn_triton.ops.sorted_scatter import key_dtype, scatter_sorted
from stn_triton.tuning import TunedKernel, bucket


@dataclass(frozen=True)
class AttnSpec:
    """What an attention call computes besides its tensors."""

    softmax: bool  # attention_weights are logits: softmax over each head's points inside the kernel
    out_dtype: torch.dtype

    def op_args(self) -> tuple:
        return self.softmax, self.out_dtype

    @classmethod
    def from_op_args(cls, args) -> "AttnSpec":
        return cls(*args)


@dataclass(frozen=True)
class AttnBackwardSpec:
    attn: AttnSpec
    value_grad: bool
    loc_grad: bool
    attn_grad: bool
    deterministic: bool

    def op_args(self) -> tuple:
        return *self.attn.op_args(), self.value_grad, self.loc_grad, self.attn_grad, self.deterministic

    @classmethod
    def from_op_args(cls, args) -> "AttnBackwardSpec":
        return cls(AttnSpec.from_op_args(args[:2]), *args[2:])


class Grid(NamedTuple):
    """A deformable convolution's queries: its output pixels, each point an offset from a kernel tap
    (kernels/ms_deform_attn.py, GRID)."""

    taps: torch.Tensor  # [TP, 3] compute dtype: each point's kernel tap (x, y) times the offset scale, the scale
    width: int  # output width
    stride_h: int
    stride_w: int
    origin_y: int  # the first output pixel's centre: half the dilated kernel minus the padding
    origin_x: int
    packed: bool  # DCNv4's offset_mask: each head's weights after its offsets, one gradient buffer for both


class Levels(NamedTuple):
    """The levels as the kernel reads them, on the value's device."""

    shapes: torch.Tensor  # [L, 2] integer (H_l, W_l)
    starts: torch.Tensor  # [L] integer: each level's first row of value
    points: torch.Tensor  # [L, 3] int32: each level's point count and first point (kernels/ms_deform_attn.py)


@functools.lru_cache(maxsize=256)
def _list_levels(shapes: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device tensors of a Python list of shapes and of its starts, copied once per list and device."""
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return constant(shapes, torch.int64, device), constant(starts, torch.int64, device)


@functools.lru_cache(maxsize=256)
def _point_table(points: tuple, per_level: bool, device: torch.device) -> torch.Tensor:
    """[L, 3] int32 of each level's point count, first point in the locations' layout (the running
    sum with per-level counts, 0 with a level dimension) and first of the head's points, copied to
    the device once per counts and device."""
    firsts = [0]
    for count in points[:-1]:
        firsts.append(firsts[-1] + count)
    rows = [(count, first if per_level else 0, first) for count, first in zip(points, firsts)]
    return constant(rows, torch.int32, device)


def levels(value: torch.Tensor, spatial_shapes, level_start_index, points: tuple, per_level: bool) -> Levels:
    """The Levels of a validated call. A shapes tensor is used as it is (read on the device, never
    copied to the host); its starts, when not given, are computed there."""
    device = value.device
    table = _point_table(points, per_level, device)
    if isinstance(spatial_shapes, torch.Tensor) and spatial_shapes.device == device:
        if level_start_index is None or level_start_index.device != device:
            areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
            level_start_index = torch.cumsum(areas, 0) - areas
        return Levels(spatial_shapes, level_start_index, table)
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    return Levels(*_list_levels(tuple((int(h), int(w)) for h, w in shapes), device), table)


# --- configs ------------------------------------------------------------------------------------

INTERPRETER_CONFIG = triton.Config({"BLOCK_Q": 16, "BLOCK_D": 16}, num_warps=4)
# (BLOCK_Q, BLOCK_D, num_warps): every pick of the heuristic on 4 warps, and 2- and 8-warp neighbours of the
# DETR shapes' (D = 32) for the tables.
CONFIGS = [triton.Config({"BLOCK_Q": q, "BLOCK_D": d}, num_warps=w)
           for q, d, w in [(128, 8, 4), (64, 8, 4), (32, 8, 4), (16, 8, 4), (64, 16, 4), (32, 16, 4), (16, 16, 4),
                           (32, 32, 4), (16, 32, 4), (16, 64, 4), (8, 64, 4), (8, 128, 4),
                           (16, 32, 2), (32, 32, 2), (64, 32, 4), (64, 32, 8), (32, 32, 8)]]


def heuristic(channels: int, rows: int, backward: bool, device: torch.device) -> triton.Config:
    """A head's channels along a warp (vectors along D, up to 128 at a time), 1024 tile elements per
    step in the forward and 512 in the backward (which holds four tiles), on 4 warps, at most 32
    queries (a narrower head gets fewer elements: more queries per thread cost registers for no more
    loads in flight per SM; the forward at 64 x 16 in float32 takes 85, and spills with triton 3.6,
    where 32 x 16 takes 56 / 48); fewer queries per program (down to 16) while that leaves fewer
    than four programs per SM."""
    block_d = max(8, min(next_power_of_2(channels), 128))
    block_q = max(min((512 if backward else 1024) // block_d, 32), 8)
    while block_q > 16 and cdiv(rows, block_q) < 4 * multiprocessors(device):
        block_q //= 2
    return triton.Config({"BLOCK_Q": block_q, "BLOCK_D": block_d}, num_warps=4)


AUTOTUNE_KEY = ["D", "PASS", "SOFTMAX", "GRID", "PACKED", "VALUE_GRAD", "LOC_GRAD", "ATTN_GRAD", "F64"]
fwd_kernel = TunedKernel("ms_deform_attn_fwd", _ms_deform_attn_kernel, CONFIGS, heuristic, AUTOTUNE_KEY,
                         writes=("y_ptr",), interpreter_config=INTERPRETER_CONFIG)
bwd_kernel = TunedKernel("ms_deform_attn_bwd", _ms_deform_attn_kernel, CONFIGS, heuristic, AUTOTUNE_KEY,
                         writes=("gvalue_ptr", "gloc_ptr", "gattn_ptr"), reset_to_zero=["gvalue_ptr"],
                         interpreter_config=INTERPRETER_CONFIG)
taps_kernel = TunedKernel("ms_deform_attn_taps", _ms_deform_attn_kernel, CONFIGS, heuristic, AUTOTUNE_KEY,
                          writes=("key_ptr", "weight_ptr", "source_ptr"), interpreter_config=INTERPRETER_CONFIG)


# --- launches -----------------------------------------------------------------------------------


def _point_strides(prefix: str, t: torch.Tensor, per_level: bool) -> dict[str, int]:
    """{prefix_n, _q, _m, _l, _p[, _c]} of locations or weights: [N, Lq, M, L, P(, 2)], or with per-level
    point counts [N, Lq, M, TP(, 2)] (no level stride)."""
    strides = list(t.stride())
    if per_level:
        strides.insert(3, 0)
    return dict(zip((f"{prefix}_n", f"{prefix}_q", f"{prefix}_m", f"{prefix}_l", f"{prefix}_p", f"{prefix}_c"), strides))


def _arguments(value, levels: Levels, loc, attn, spec: AttnSpec, grid: Optional[Grid]) -> dict:
    """The arguments every pass shares; a pointer a pass does not use gets ``loc`` as a stand-in."""
    n, s, m, d = value.shape
    per_level = loc.dim() == 5
    tp = loc.shape[3] if per_level else loc.shape[3] * loc.shape[4]
    stand_in = loc
    geometry = dict(taps_ptr=stand_in, WO=1, grid_sh=0, grid_sw=0, grid_oy=0, grid_ox=0)
    if grid is not None:
        geometry = dict(taps_ptr=grid.taps, WO=grid.width, grid_sh=grid.stride_h, grid_sw=grid.stride_w,
                        grid_oy=grid.origin_y, grid_ox=grid.origin_x)
    return dict(
        value_ptr=value, shapes_ptr=levels.shapes, starts_ptr=levels.starts, points_ptr=levels.points, loc_ptr=loc,
        attn_ptr=attn, y_ptr=stand_in, gy_ptr=stand_in, gvalue_ptr=stand_in, gloc_ptr=stand_in, gattn_ptr=stand_in,
        key_ptr=stand_in, weight_ptr=stand_in, source_ptr=stand_in, **geometry,
        S=s, LQ=loc.shape[1], M=m, D=d, L=levels.points.shape[0], TP=tp,
        **dict(zip(("sv_n", "sv_s", "sv_m", "sv_d"), value.stride())),
        ss_l=levels.shapes.stride(0), ss_c=levels.shapes.stride(1), sst_l=levels.starts.stride(0),
        **_point_strides("sl", loc, per_level), **_point_strides("sa", attn, per_level),
        sy_n=0, sy_q=0, sy_c=0, sgy_n=0, sgy_q=0, sgy_c=0, sgl_q=0, sgl_m=0,
        PASS=codes.FORWARD, SOFTMAX=spec.softmax, GRID=grid is not None, PACKED=grid is not None and grid.packed,
        VALUE_GRAD=False, LOC_GRAD=False, ATTN_GRAD=False,
        F64=torch.float64 in (value.dtype, loc.dtype, attn.dtype), INDEX_64=False, EVEN_D=False,
    )


def _key(pass_: str, value, loc, spec: AttnSpec, grid: Optional[Grid]) -> str:
    return f"{pass_}|{value.dtype}|{loc.dtype}|d{bucket(value.shape[3])}|q{bucket(value.shape[0] * loc.shape[1])}" \
           f"|softmax{spec.softmax}" + ("" if grid is None else f"|grid{grid.taps.shape[0]}|packed{grid.packed}")


def _grid(value, loc):
    n, queries, heads = value.shape[0], loc.shape[1], value.shape[2]
    return lambda meta: (n * cdiv(queries, meta["BLOCK_Q"]), heads)


def _shape(value, loc, backward: bool) -> dict:
    return dict(channels=value.shape[3], rows=value.shape[0] * loc.shape[1] * value.shape[2], backward=backward,
                device=value.device)


def attention_forward(value, shapes, starts, points, loc, attn, spec: AttnSpec, grid: Optional[Grid] = None):
    """value [N, S, M, D] -> [N, Lq, M * D] (see ``stn_triton.ms_deform_attn``; with ``grid`` a
    deformable convolution's aggregation, ops/dcnv3.py)."""
    n, _, m, d = value.shape
    out = value.new_empty((n, loc.shape[1], m * d), dtype=spec.out_dtype)
    if out.numel() == 0:
        return out
    launch = fwd_kernel.choose(_key("fwd", value, loc, spec, grid), _shape(value, loc, False), value.device)
    args = _arguments(value, Levels(shapes, starts, points), loc, attn, spec, grid)
    args.update(y_ptr=out, sy_n=out.stride(0), sy_q=out.stride(1), sy_c=out.stride(2),
                EVEN_D=d % launch.most("BLOCK_D") == 0, INDEX_64=needs_int64(value, loc, attn, out))
    launch(_grid(value, loc), **args)
    return out


def attention_backward(grad_output, value, shapes, starts, points, loc, attn, spec: AttnBackwardSpec):
    """(grad_value, grad_locations, grad_weights); one not asked for is an empty tensor."""
    n, _, m, _ = value.shape
    levels_ = Levels(shapes, starts, points)
    tp = loc.shape[3] if loc.dim() == 5 else loc.shape[3] * loc.shape[4]
    queries = loc.shape[1]
    empty = value.new_empty
    grad_loc = torch.zeros((n, queries, m, tp, 2), dtype=compute_dtype(loc.dtype), device=loc.device) \
        if spec.loc_grad else empty(0)
    grad_attn = torch.zeros((n, queries, m, tp), dtype=compute_dtype(attn.dtype), device=attn.device) \
        if spec.attn_grad else empty(0)
    grad_value = points_backward(grad_output, value, levels_, loc, attn, spec, None, grad_loc, grad_attn,
                                 (m * tp * 2, tp * 2))
    return grad_value, grad_loc.to(loc.dtype), grad_attn.to(attn.dtype)


def points_backward(grad_output, value, levels_: Levels, loc, attn, spec: AttnBackwardSpec, grid: Optional[Grid],
                    grad_loc, grad_attn, loc_strides: tuple[int, int]) -> torch.Tensor:
    """The backward kernel: the points' gradients into ``grad_loc`` (its (image * Lq + query) and
    head strides ``loc_strides``; with ``grid.packed`` the weights' too) and ``grad_attn``, each
    written when the spec asks for it; returns grad_value (value's dtype; empty when not asked for)."""
    n, s, m, d = value.shape
    args = _arguments(value, levels_, loc, attn, spec.attn, grid)
    atomic = spec.value_grad and not spec.deterministic
    empty = value.new_empty
    grad_value = torch.zeros((n, s, m, d), dtype=compute_dtype(value.dtype), device=value.device) if atomic else empty(0)
    work = n * loc.shape[1] * m * args["TP"] > 0 and d > 0
    args.update(gy_ptr=grad_output, sgy_n=grad_output.stride(0), sgy_q=grad_output.stride(1),
                sgy_c=grad_output.stride(2))
    if work and (atomic or spec.loc_grad or spec.attn_grad):
        launch = bwd_kernel.choose(_key("bwd" if atomic else "bwd-points", value, loc, spec.attn, grid),
                                   _shape(value, loc, True), value.device)
        # Never written unless asked for; one-element stand-ins, since the autotuner zeroes gvalue_ptr.
        packed = grid is not None and grid.packed
        args.update(PASS=codes.BACKWARD, VALUE_GRAD=atomic, LOC_GRAD=spec.loc_grad, ATTN_GRAD=spec.attn_grad,
                    gvalue_ptr=grad_value if atomic else empty(1), gloc_ptr=grad_loc if spec.loc_grad else empty(1),
                    gattn_ptr=grad_attn if spec.attn_grad and not packed else empty(1),
                    sgl_q=loc_strides[0], sgl_m=loc_strides[1], EVEN_D=d % launch.most("BLOCK_D") == 0,
                    INDEX_64=needs_int64(grad_output, value, loc, attn, grad_value, grad_loc, grad_attn))
        launch(_grid(value, loc), **args)
    if atomic:
        return grad_value.to(value.dtype)
    if spec.value_grad:
        return _deterministic_grad_value(grad_output, value, loc, spec.attn, grid, args)
    return grad_value


def _deterministic_grad_value(grad_output, value, loc, spec: AttnSpec, grid: Optional[Grid], args: dict):
    """grad_value without atomics: every (query, head, point, corner) read listed with its row of
    grad_value, then each row's reads summed in a fixed order (ops/sorted_scatter.py)."""
    n, s, m, d = value.shape
    grad_value = torch.zeros((n, s, m, d), dtype=value.dtype, device=value.device)
    reads = n * loc.shape[1] * m * args["TP"]
    if reads == 0 or d == 0:
        return grad_value
    keys = torch.empty(reads * 4, dtype=key_dtype(grad_value.numel()), device=value.device)
    weights = torch.empty(reads * 4, dtype=compute_dtype(value.dtype), device=value.device)
    sources = torch.empty(reads, dtype=torch.int64, device=value.device)
    key = _key("taps", value, loc, spec, grid)
    launch = taps_kernel.choose(key, _shape(value, loc, True), value.device)
    args.update(PASS=codes.LIST_TAPS, VALUE_GRAD=False, LOC_GRAD=False, ATTN_GRAD=False, key_ptr=keys,
                weight_ptr=weights, source_ptr=sources, INDEX_64=needs_int64(value, loc, args["attn_ptr"]))
    launch(_grid(value, loc), **args)
    scatter_sorted(grad_value.view(-1), 1, d, keys, weights, sources, grad_output, grad_output.stride(2),
                   destinations=n * s * m, key=key)
    return grad_value


# --- ops, autograd, vmap --------------------------------------------------------------------------


@triton_op("stn_triton::ms_deform_attn_fwd", mutates_args=())
def attention_op(value: torch.Tensor, shapes: torch.Tensor, starts: torch.Tensor, points: torch.Tensor,
                 loc: torch.Tensor, attn: torch.Tensor, softmax: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """value [N, S, M, D], levels (shapes [L, 2], starts [L], points [L, 3] int32), locations and
    weights -> [N, Lq, M * D] in ``out_dtype``."""
    return attention_forward(value, shapes, starts, points, loc, attn, AttnSpec(softmax, out_dtype))


@triton_op("stn_triton::ms_deform_attn_bwd", mutates_args=())
def attention_backward_op(grad_output: torch.Tensor, value: torch.Tensor, shapes: torch.Tensor, starts: torch.Tensor,
                          points: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor, softmax: bool,
                          out_dtype: torch.dtype, value_grad: bool, loc_grad: bool, attn_grad: bool,
                          deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_value, grad_locations, grad_weights); one not asked for is an empty tensor."""
    spec = AttnBackwardSpec(AttnSpec(softmax, out_dtype), value_grad, loc_grad, attn_grad, deterministic)
    return attention_backward(grad_output, value, shapes, starts, points, loc, attn, spec)


def attend(value, levels_: Levels, loc, attn, spec: AttnSpec) -> torch.Tensor:
    return call(attention_op, _Attention, attention_forward, (value, *levels_, loc, attn), spec, (value, loc, attn))


def attend_grads(grad_output, value, levels_: Levels, loc, attn, spec: AttnBackwardSpec):
    return call(attention_backward_op, _AttentionBackward, attention_backward,
                (grad_output, value, *levels_, loc, attn), spec, (grad_output, value, loc, attn))


def _save(ctx, tensors, spec: AttnSpec, output) -> None:
    ctx.save_for_backward(*tensors)
    ctx.spec = spec


def _gradients(ctx, grad_output):
    value, shapes, starts, points, loc, attn = ctx.saved_tensors
    needs = ctx.needs_input_grad
    spec = AttnBackwardSpec(ctx.spec, needs[0], needs[4], needs[5], torch.are_deterministic_algorithms_enabled())
    if not (spec.value_grad or spec.loc_grad or spec.attn_grad):
        return (None,) * 6
    grad_value, grad_loc, grad_attn = attend_grads(grad_output, value, Levels(shapes, starts, points), loc, attn, spec)
    return (grad_value if spec.value_grad else None, None, None, None,
            grad_loc.view(loc.shape) if spec.loc_grad else None, grad_attn.view(attn.shape) if spec.attn_grad else None)


def _foldable(value_dim, level_dims) -> bool:
    """The levels carry no vmapped dimension (they are the same for every sample)."""
    return all(dim is None for dim in level_dims)


def _vmap(info, in_dims, tensors, spec: AttnSpec):
    if not _foldable(in_dims[0], in_dims[1:4]):
        return per_sample(info, in_dims, tensors, lambda *args: attend(args[0], Levels(*args[1:4]), *args[4:], spec))
    size = info.batch_size
    value, shapes, starts, points, loc, attn = tensors
    out = attend(fold(value, in_dims[0], size), Levels(shapes, starts, points), fold(loc, in_dims[4], size),
                 fold(attn, in_dims[5], size), spec)
    return unfold(out, size)


def _save_backward(ctx, tensors, spec: AttnBackwardSpec, output) -> None:
    grad_output, value, shapes, starts, points, loc, attn = tensors
    ctx.save_for_backward(grad_output, shapes, starts, points, loc, attn)
    ctx.spec = spec
    ctx.set_materialize_grads(False)


def _double_gradients(ctx, grad_grad_value, grad_grad_loc, grad_grad_attn):
    """grad_value = A^T(grad_output) is linear in grad_output: its gradient is the forward and the
    points' gradients with the direction as the value."""
    spec = ctx.spec
    if (grad_grad_loc is not None and spec.loc_grad) or (grad_grad_attn is not None and spec.attn_grad):
        raise NotImplementedError(
            "stn_triton: the gradients of ms_deform_attn's sampling locations and attention weights cannot be "
            "differentiated again; the value's gradient can (a gradient penalty on the value differentiates through it)"
        )
    if grad_grad_value is None:
        return (None,) * 7
    grad_output, shapes, starts, points, loc, attn = ctx.saved_tensors
    needs = ctx.needs_input_grad
    levels_ = Levels(shapes, starts, points)
    grad_grad_output = grad_loc = grad_attn = None
    if needs[0]:
        grad_grad_output = attend(grad_grad_value, levels_, loc, attn, replace(spec.attn, out_dtype=grad_output.dtype))
    if needs[5] or needs[6]:
        points_spec = AttnBackwardSpec(spec.attn, False, needs[5], needs[6], spec.deterministic)
        _, grad_loc, grad_attn = attend_grads(grad_output, grad_grad_value, levels_, loc, attn, points_spec)
        grad_loc = grad_loc.view(loc.shape) if needs[5] else None
        grad_attn = grad_attn.view(attn.shape) if needs[6] else None
    return grad_grad_output, None, None, None, None, grad_loc, grad_attn


def _vmap_backward(info, in_dims, tensors, spec: AttnBackwardSpec):
    if not _foldable(in_dims[1], in_dims[2:5]):
        return per_sample(info, in_dims, tensors,
                          lambda *args: attend_grads(args[0], args[1], Levels(*args[2:5]), *args[5:], spec))
    size = info.batch_size
    grad_output, value, shapes, starts, points, loc, attn = tensors
    grads = attend_grads(fold(grad_output, in_dims[0], size), fold(value, in_dims[1], size),
                         Levels(shapes, starts, points), fold(loc, in_dims[5], size), fold(attn, in_dims[6], size), spec)
    outputs, dims = zip(*(unfold(grad, size) for grad in grads))
    return tuple(outputs), tuple(dims)


_Attention = OpRules("MSDeformAttn", 6, attention_forward, _save, _gradients, _vmap,
                     no_forward_ad("stn_triton's ms_deform_attn")).register(attention_op, AttnSpec)
_AttentionBackward = OpRules("MSDeformAttnBackward", 7, attention_backward, _save_backward, _double_gradients,
                             _vmap_backward, no_forward_ad("stn_triton's ms_deform_attn backward")).register(
    attention_backward_op, AttnBackwardSpec)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   points: tuple[int, ...], softmax: bool, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The Triton op on validated arguments (``points``: each level's point count)."""
    spec = AttnSpec(softmax, out_dtype or value.dtype)
    per_level = sampling_locations.dim() == 5
    return attend(value, levels(value, spatial_shapes, level_start_index, points, per_level), sampling_locations,
                  attention_weights, spec)
