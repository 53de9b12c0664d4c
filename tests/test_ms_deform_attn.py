"""Multi-scale deformable attention against the pure-PyTorch composition every model ships (one
grid_sample per level on ``2 * loc - 1``, bilinear, zeros, align_corners=False, then the weighted
sum), written here from that description, in float64; the module against Deformable DETR's
definition; and Hugging Face's Deformable DETR with the swap on against it off."""

import importlib.util
import math
import re
import zlib

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import (
    DEVICE,
    LOW_PRECISION,
    assert_close_scaled,
    assert_within_low_precision_rule,
    deterministic_algorithms,
    generator,
    rand,
    randn,
    sizes,
)
from stn_triton import swap


def reference(value, shapes, locations, weights, points=None, softmax=False):
    """The composition: value [N, S, M, D], shapes [(H, W)], locations [N, Lq, M, L, P, 2] (or
    [N, Lq, M, sum(points), 2] with per-level counts) -> [N, Lq, M * D]."""
    n, _, m, d = value.shape
    queries = locations.shape[1]
    points = points or [locations.shape[4]] * len(shapes)
    locations = locations.reshape(n, queries, m, sum(points), 2)
    weights = weights.reshape(n, queries, m, sum(points))
    if softmax:
        weights = weights.softmax(-1)
    grids = 2 * locations - 1
    samples, first = [], 0
    for (h, w), level, count in zip(shapes, value.split([h * w for h, w in shapes], dim=1), points):
        level = level.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid = grids[:, :, :, first:first + count].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(level, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        first += count
    weights = weights.transpose(1, 2).reshape(n * m, 1, queries, sum(points))
    return (torch.cat(samples, -1) * weights).sum(-1).view(n, m * d, queries).transpose(1, 2)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_case(shapes, n=2, m=2, d=3, queries=5, points=2, per_level=None, seed=0, dtype=torch.float64):
    """value, locations in [-0.2, 1.2) (some reads fall outside), weights in [0, 1)."""
    gen = generator(seed)
    rows = sum(h * w for h, w in shapes)
    total = sum(per_level) if per_level else len(shapes) * points
    loc_shape = (n, queries, m, total, 2) if per_level else (n, queries, m, len(shapes), points, 2)
    value = randn((n, rows, m, d), gen, dtype)
    locations = rand(loc_shape, gen, -0.2, 1.2, dtype)
    weights = rand(loc_shape[:-1], gen, 0.0, 1.0, dtype)
    return value, locations, weights


def with_grads(fn, tensors, grad_output=None):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, out.detach().clone().normal_() if grad_output is None else grad_output)
    return (out.detach(), *grads)


LEVELS = sizes(
    cpu=[[(1, 1)], [(3, 5), (2, 2), (1, 3)], [(4, 1), (1, 4)]],
    gpu=[[(1, 1)], [(13, 17), (7, 9), (4, 5), (2, 3)], [(32, 1), (1, 32)]],
)
CASES = [
    pytest.param(shapes, n, m, d, queries, points, id=f"L{len(shapes)}-N{n}-M{m}-D{d}-Q{queries}-P{points}")
    for shapes, n, m, d, queries, points in [
        (LEVELS[0], 1, 1, 1, 1, 1), (LEVELS[1], 2, 3, 5, 7, 2), (LEVELS[2], 1, 2, 8, 3, 3), (LEVELS[1], 3, 1, 33, 2, 1),
    ]
]


@pytest.mark.parametrize("shapes, n, m, d, queries, points", CASES)
@pytest.mark.parametrize("levels_as", ["tensor", "list"])
def test_equals_the_composition_forward_and_backward(shapes, n, m, d, queries, points, levels_as):
    value, locations, weights = make_case(shapes, n, m, d, queries, points, seed=seed_of(shapes, n, m, d, levels_as))
    spatial = torch.tensor(shapes, device=DEVICE) if levels_as == "tensor" else shapes
    starts = torch.tensor([0] + [h * w for h, w in shapes][:-1], device=DEVICE).cumsum(0) if levels_as == "tensor" else None
    grad_output = randn((n, queries, m * d), generator(1))
    ours = with_grads(lambda v, loc, a: stn_triton.ms_deform_attn(v, spatial, starts, loc, a),
                      (value, locations, weights), grad_output)
    theirs = with_grads(lambda v, loc, a: reference(v, shapes, loc, a), (value, locations, weights), grad_output)
    for what, a, b in zip(("output", "grad value", "grad locations", "grad weights"), ours, theirs):
        assert_close_scaled(a, b, 1e-11, what)


@pytest.mark.parametrize("per_level", [[3, 1, 2], [1, 1, 1]], ids=["3-1-2", "1-1-1"])
@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "logits"])
def test_per_level_points_and_the_fused_softmax(per_level, softmax):
    """RT-DETRv2's per-level point counts, and logits softmaxed over each head's points in the kernel."""
    shapes = LEVELS[1]
    value, locations, weights = make_case(shapes, per_level=per_level, seed=seed_of("per-level", per_level, softmax))
    weights = weights * 6 - 3  # logits of either sign
    ours = with_grads(lambda v, loc, a: stn_triton.ms_deform_attn(v, shapes, None, loc, a, points_per_level=per_level,
                                                                   softmax=softmax), (value, locations, weights))
    torch.manual_seed(0)
    theirs = with_grads(lambda v, loc, a: reference(v, shapes, loc, a, per_level, softmax), (value, locations, weights),
                        torch.randn_like(ours[0]))
    torch.manual_seed(0)
    ours = with_grads(lambda v, loc, a: stn_triton.ms_deform_attn(v, shapes, None, loc, a, points_per_level=per_level,
                                                                   softmax=softmax), (value, locations, weights),
                      torch.randn_like(ours[0]))
    for what, a, b in zip(("output", "grad value", "grad locations", "grad weights"), ours, theirs):
        assert_close_scaled(a, b, 1e-11, what)


def test_a_point_on_a_pixel_centre_reads_that_pixel():
    """Hand-made: level 1 of 3 x 4, one point at the centre of pixel (row 1, column 2): (x, y) =
    ((2 + 0.5) / 4, (1 + 0.5) / 3), weight 0.5; and one point outside (reads zero)."""
    shapes = [(2, 2), (3, 4)]
    value = torch.arange(16 * 2, dtype=torch.float64, device=DEVICE).view(1, 16, 1, 2)
    locations = torch.tensor([[(0.5, 0.5), (-0.6, 0.5)], [(2.5 / 4, 1.5 / 3), (1.7, 0.2)]], dtype=torch.float64,
                             device=DEVICE).view(1, 1, 1, 2, 2, 2)
    weights = torch.tensor([[0.0, 1.0], [0.5, 1.0]], dtype=torch.float64, device=DEVICE).view(1, 1, 1, 2, 2)
    out = stn_triton.ms_deform_attn(value, shapes, None, locations, weights)
    pixel = value[0, 4 + 1 * 4 + 2, 0]
    torch.testing.assert_close(out.view(2), 0.5 * pixel)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_half_precision_within_twice_pytorchs_own_error(dtype):
    shapes = LEVELS[1]
    value, locations, weights = (t.to(dtype) for t in make_case(shapes, d=8, seed=seed_of("half", dtype)))
    grad_output = randn((2, 5, 16), generator(2), dtype)
    ours = with_grads(lambda v, loc, a: stn_triton.ms_deform_attn(v, shapes, None, loc, a), (value, locations, weights),
                      grad_output)
    torch_own = with_grads(lambda v, loc, a: reference(v, shapes, loc, a), (value, locations, weights), grad_output)
    exact = with_grads(lambda v, loc, a: reference(v, shapes, loc, a), (value.double(), locations.double(),
                                                                          weights.double()), grad_output.double())
    for what, a, t, r in zip(("output", "grad value", "grad locations", "grad weights"), ours, torch_own, exact):
        assert_within_low_precision_rule(a, t, r, dtype, what)


def test_mixed_dtypes_are_read_as_they_are():
    """A bfloat16 value with float32 locations and weights (what autocast produces): no cast copies,
    float32 arithmetic, value's dtype out; against the float64 composition on the same values."""
    shapes = LEVELS[1]
    value, locations, weights = make_case(shapes, d=4, seed=seed_of("mixed"))
    value = value.bfloat16()
    out = stn_triton.ms_deform_attn(value, shapes, None, locations.float(), weights.float())
    assert out.dtype == torch.bfloat16
    expected = reference(value.double(), shapes, locations.float().double(), weights.float().double())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=1e-2)


def test_autocast_returns_the_compositions_dtype():
    """Inside autocast the models' composition returns grid_sample's autocast dtype promoted with the
    weights' (CUDA: the promotion; CPU: float32); so does stn_triton, reading the tensors as they are."""
    shapes = LEVELS[1]
    value, locations, weights = make_case(shapes, d=4, seed=seed_of("autocast"))
    value = value.bfloat16()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        ours = stn_triton.ms_deform_attn(value, shapes, None, locations.float(), weights.float())
        theirs = reference(value, shapes, locations.float(), weights.float())
    assert ours.dtype == theirs.dtype
    expected = reference(value.double(), shapes, locations.float().double(), weights.float().double())
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_any_strides_and_an_expanded_grad_output():
    """A value that is a channel slice of a wider tensor, locations with levels and points transposed
    in memory, weights that are a view, and the stride-0 gradient that .sum() hands the backward."""
    shapes = LEVELS[1]
    value, locations, weights = make_case(shapes, m=3, d=4, seed=seed_of("strides"))
    wide = torch.cat([torch.zeros_like(value[..., :1]), value], dim=-1)[..., 1:]
    transposed = locations.transpose(3, 4).contiguous().transpose(3, 4)
    weights_view = weights.transpose(3, 4).contiguous().transpose(3, 4)
    assert not wide.is_contiguous() and not transposed.is_contiguous()
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    expected = torch.autograd.grad(reference(leaves[0], shapes, leaves[1], leaves[2]).sum(), leaves)
    odd = [wide.detach().requires_grad_(), transposed.detach().requires_grad_(), weights_view.detach().requires_grad_()]
    out = stn_triton.ms_deform_attn(odd[0], shapes, None, odd[1], odd[2])
    assert_close_scaled(out, reference(value, shapes, locations, weights), 1e-12, "output")
    for what, a, b in zip(("value", "locations", "weights"), torch.autograd.grad(out.sum(), odd), expected):
        assert_close_scaled(a, b, 1e-11, f"grad {what}")


def test_gradcheck():
    shapes = [(2, 3), (1, 2)]
    value, locations, weights = make_case(shapes, n=1, m=1, d=2, queries=2, points=1, seed=seed_of("gradcheck"))
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, a: stn_triton.ms_deform_attn(v, shapes, None, loc, a, softmax=True),
                                    leaves)


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "logits"])
def test_deterministic_backward_is_bitwise_reproducible(softmax):
    """Many points on one corner (every location at 0): long runs that the sorted scatter sums in chunks."""
    shapes = LEVELS[1]
    value, locations, weights = (t.float() for t in make_case(shapes, d=8, queries=9, points=3,
                                                               seed=seed_of("det", softmax)))
    locations = torch.where(torch.rand(locations.shape, generator=generator(3)).to(DEVICE) < 0.5, locations,
                            torch.zeros_like(locations))
    grad_output = randn((2, 9, 16), generator(4), torch.float32)
    expected = with_grads(lambda v, loc, a: reference(v, shapes, loc, a, softmax=softmax),
                          (value.double(), locations.double(), weights.double()), grad_output.double())
    with deterministic_algorithms():
        runs = [with_grads(lambda v, loc, a: stn_triton.ms_deform_attn(v, shapes, None, loc, a, softmax=softmax),
                           (value, locations, weights), grad_output) for _ in range(2)]
    for what, a, b, e in zip(("output", "grad value", "grad locations", "grad weights"), *runs, expected):
        assert torch.equal(a, b), f"{what} differs between two deterministic runs"
        assert_close_scaled(a.double(), e, 1e-5, what)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0 in numpy
def test_non_finite_locations_read_nothing():
    shapes = LEVELS[1]
    value, locations, weights = make_case(shapes, seed=seed_of("non-finite"))
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30], dtype=torch.float64)
    flat = locations.view(-1, 2)
    flat[: len(specials), 0] = specials.to(DEVICE)
    flat[len(specials): 2 * len(specials), 1] = specials.to(DEVICE)
    bad = torch.zeros(flat.shape[0], dtype=torch.bool, device=DEVICE)
    bad[: 2 * len(specials)] = True
    clean = torch.where(bad[:, None], torch.full_like(flat, -5.0), flat).view(locations.shape)
    out = stn_triton.ms_deform_attn(value, shapes, None, locations, weights)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(value, shapes, clean, weights))


def _bad(**changes):
    shapes = [(2, 3), (1, 2)]
    value, locations, weights = make_case(shapes, seed=7)
    arguments = dict(value=value, spatial_shapes=shapes, level_start_index=None, sampling_locations=locations,
                     attention_weights=weights)
    return {**arguments, **changes}


BAD = [
    pytest.param(_bad(value=torch.zeros(2, 8, 2, dtype=torch.float64)), "value", id="value-3d"),
    pytest.param(_bad(value=torch.zeros(2, 8, 2, 3, dtype=torch.int64)), "value", id="integer-value"),
    pytest.param(_bad(spatial_shapes=[(2, 3), (1, 3)]), "sum(H * W)", id="shapes-disagree-with-value"),
    pytest.param(_bad(spatial_shapes=[(2, 3)]), "sampling_locations", id="levels-disagree-with-locations"),
    pytest.param(_bad(spatial_shapes=torch.tensor([[2.0, 3.0], [1.0, 2.0]])), "spatial_shapes", id="float-shapes"),
    pytest.param(_bad(spatial_shapes=[(2, 3), (1, 0)]), "positive", id="empty-level"),
    pytest.param(_bad(spatial_shapes=torch.tensor([[2, 3], [1, 2]]), level_start_index=torch.tensor([0, 5])),
                 "level_start_index", id="starts-disagree"),
    pytest.param(_bad(level_start_index=torch.tensor([0, 6, 8])), "level_start_index", id="starts-length"),
    pytest.param(_bad(sampling_locations=torch.zeros(2, 5, 2, 2, 2, 3, dtype=torch.float64)), "sampling_locations",
                 id="locations-last-dim-3"),
    pytest.param(_bad(attention_weights=torch.zeros(2, 5, 2, 2, 3, dtype=torch.float64)), "attention_weights",
                 id="weights-points-disagree"),
    pytest.param(_bad(im2col_step=0), "im2col_step", id="im2col-step-0"),
    pytest.param(_bad(points_per_level=[2, 2]), "sampling_locations", id="per-level-with-6d-locations"),
    pytest.param(_bad(points_per_level=[2]), "points_per_level", id="per-level-length"),
]


@pytest.mark.parametrize("arguments, named", BAD)
def test_malformed_arguments_fail_before_any_launch_naming_the_argument(arguments, named, monkeypatch):
    from stn_triton import functional

    monkeypatch.setattr(functional._attention_op, "ms_deform_attn", lambda *args: pytest.fail("launched"))
    arguments = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) and name != "level_start_index" else t
                 for name, t in arguments.items()}
    with pytest.raises((ValueError, TypeError), match=re.escape(named)):
        stn_triton.ms_deform_attn(**arguments)


def test_device_levels_are_never_read_on_the_host(monkeypatch):
    """Shapes and starts given as tensors on value's device are read by the kernel: no .tolist() or
    .item() (on a GPU each would wait for the device)."""
    shapes = LEVELS[1]
    value, locations, weights = make_case(shapes, seed=seed_of("no-sync"))
    spatial = torch.tensor(shapes, device=DEVICE)
    starts = torch.tensor([0] + [h * w for h, w in shapes][:-1], device=DEVICE).cumsum(0)
    expected = reference(value, shapes, locations, weights)
    if DEVICE == "cpu":  # a CPU tensor is free to read: validation reads it; a device tensor is not read
        monkeypatch.setattr(stn_triton.validation, "_level_list", lambda spatial_shapes: None)
    for method in ("tolist", "item", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a: pytest.fail(f"{method} on the host path"))
    out = stn_triton.ms_deform_attn(value, spatial, starts, locations, weights)
    monkeypatch.undo()
    torch.testing.assert_close(out, expected)


def test_double_backward_through_the_value_gradient():
    """A penalty on the value's gradient differentiated by the locations and weights (and grad_output)."""
    shapes = [(3, 4), (2, 1)]
    value, locations, weights = make_case(shapes, seed=seed_of("double"))
    go = randn((2, 5, 6), generator(5))
    v = randn(value.shape, generator(6))
    results = []
    for fn in (lambda a, b, c: stn_triton.ms_deform_attn(a, shapes, None, b, c), lambda a, b, c: reference(a, shapes, b, c)):
        leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights, go)]
        (g_value,) = torch.autograd.grad((fn(*leaves[:3]) * leaves[3]).sum(), leaves[0], create_graph=True)
        results.append(torch.autograd.grad((g_value * v).sum(), leaves[1:]))
    for what, a, b in zip(("locations", "weights", "grad_output"), *results):
        assert_close_scaled(a, b, 1e-11, what)


def test_batched_and_per_sample_gradients():
    shapes = [(3, 2), (1, 2)]
    value, locations, weights = make_case(shapes, n=3, seed=seed_of("vmap"))

    def loss(fn):
        return lambda v, loc, a: fn(v[None], loc[None], a[None]).pow(2).sum()

    ours = torch.func.vmap(torch.func.grad(loss(lambda v, loc, a: stn_triton.ms_deform_attn(v, shapes, None, loc, a)),
                                           argnums=(0, 1, 2)))(value, locations, weights)
    theirs = torch.func.vmap(torch.func.grad(loss(lambda v, loc, a: reference(v, shapes, loc, a)),
                                             argnums=(0, 1, 2)))(value, locations, weights)
    for what, a, b in zip(("value", "locations", "weights"), ours, theirs):
        assert_close_scaled(a, b, 1e-11, what)
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = stn_triton.ms_deform_attn(leaves[0], shapes, None, leaves[1], leaves[2])
    directions = randn((2, *out.shape), generator(8))
    batched = torch.autograd.grad(out, leaves, directions, is_grads_batched=True, retain_graph=True)
    for b in range(2):
        for many, one in zip(batched, torch.autograd.grad(out, leaves, directions[b], retain_graph=True)):
            assert_close_scaled(many[b], one, 1e-12, "batched grad")


# --- the module -----------------------------------------------------------------------------------


def deformable_detr_offsets_bias(heads, levels, points):
    """Deformable DETR's initial sampling_offsets bias, from its definition."""
    bias = torch.empty(heads, levels, points, 2)
    for head in range(heads):
        angle = head * 2 * math.pi / heads
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for point in range(points):
            bias[head, :, point] = direction * (point + 1)
    return bias.view(-1)


def reference_module(module, query, reference_points, input_flatten, shapes, padding_mask):
    """MSDeformAttn.forward from Deformable DETR's definition, on the composition."""
    n, queries, _ = query.shape
    value = module.value_proj(input_flatten)
    if padding_mask is not None:
        value = value.masked_fill(padding_mask[..., None], 0.0)
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    value = value.view(n, -1, heads, module.d_model // heads)
    offsets = module.sampling_offsets(query).view(n, queries, heads, levels, points, 2)
    weights = module.attention_weights(query).view(n, queries, heads, levels * points).softmax(-1)
    weights = weights.view(n, queries, heads, levels, points)
    if reference_points.shape[-1] == 2:
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        locations = reference_points[:, :, None, :, None, :2] + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
    return module.output_proj(reference(value, shapes, locations, weights))


def test_module_parameters_and_initialisation_are_deformable_detrs():
    torch.manual_seed(0)
    module = stn_triton.MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=2)
    expected = {"sampling_offsets.weight": (4 * 3 * 2 * 2, 64), "sampling_offsets.bias": (48,),
                "attention_weights.weight": (24, 64), "attention_weights.bias": (24,), "value_proj.weight": (64, 64),
                "value_proj.bias": (64,), "output_proj.weight": (64, 64), "output_proj.bias": (64,)}
    assert {name: tuple(t.shape) for name, t in module.state_dict().items()} == expected
    torch.testing.assert_close(module.sampling_offsets.bias.detach(), deformable_detr_offsets_bias(4, 3, 2))
    assert not module.sampling_offsets.weight.any() and not module.attention_weights.weight.any()
    assert not module.attention_weights.bias.any() and not module.value_proj.bias.any()
    with pytest.warns(UserWarning, match="power of 2"):
        stn_triton.MSDeformAttn(d_model=48, n_heads=8)
    with pytest.raises(ValueError, match="divisible"):
        stn_triton.MSDeformAttn(d_model=30, n_heads=8)


@pytest.mark.parametrize("coordinates", [2, 4])
def test_module_forward_is_deformable_detrs(coordinates):
    torch.manual_seed(1)
    module = stn_triton.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).double().to(DEVICE)
    with torch.no_grad():  # away from the initialisation, so that the offsets and weights matter
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    shapes = [(3, 4), (2, 2)]
    gen = generator(seed_of("module", coordinates))
    query = randn((2, 5, 16), gen)
    input_flatten = randn((2, 16, 16), gen)
    reference_points = rand((2, 5, 2, coordinates), gen, 0.1, 0.9)
    mask = torch.zeros(2, 16, dtype=torch.bool, device=DEVICE)
    mask[1, -4:] = True
    out = module(query, reference_points, input_flatten, torch.tensor(shapes, device=DEVICE),
                 torch.tensor([0, 12], device=DEVICE), mask)
    torch.testing.assert_close(out, reference_module(module, query, reference_points, input_flatten, shapes, mask))


# --- Hugging Face transformers ----------------------------------------------------------------------


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")


@needs_transformers
def test_hugging_face_deformable_detr_is_unchanged_by_the_swap():
    """A tiny randomly initialised DeformableDetrModel (no weights downloaded): outputs and gradients
    with the swap on equal those with it off."""
    from transformers import DeformableDetrConfig, DeformableDetrModel, ResNetConfig
    from transformers.models.deformable_detr import modeling_deformable_detr as detr

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, num_queries=5, num_feature_levels=4, encoder_n_points=2,
                                  decoder_n_points=2)
    model = DeformableDetrModel(config).double().to(DEVICE).eval()
    gen = generator(9)
    pixels = randn((2, 3, 32, 32), gen)
    mask = torch.ones(2, 32, 32, dtype=torch.long, device=DEVICE)
    mask[1, :, 24:] = 0
    calls = []
    original = detr.MultiScaleDeformableAttention.forward

    def run():
        model.zero_grad()
        out = model(pixel_values=pixels, pixel_mask=mask)
        (out.last_hidden_state.sum() + out.encoder_last_hidden_state.pow(2).sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.last_hidden_state.detach(), out.encoder_last_hidden_state.detach(), grads

    expected = run()
    with swap.swapped():
        routed = detr.MultiScaleDeformableAttention.forward
        assert routed is not original
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(stn_triton.functional, "ms_deform_attn", lambda *a, **k: _recorded(calls, *a, **k))
            actual = run()
    assert detr.MultiScaleDeformableAttention.forward is original, "revert restores the class's forward"
    assert len(calls) == 2, "the encoder's and the decoder's attention took stn_triton's kernel"
    assert_close_scaled(actual[0], expected[0], 1e-10, "decoder output")
    assert_close_scaled(actual[1], expected[1], 1e-10, "encoder output")
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        assert_close_scaled(actual[2][name], expected[2][name], 1e-9, f"grad {name}")


_ms_deform_attn = stn_triton.functional.ms_deform_attn


def _recorded(calls, *args, **kwargs):
    calls.append(1)
    return _ms_deform_attn(*args, **kwargs)


def test_the_swap_routes_mmcv_and_per_level_compositions(monkeypatch):
    """mmcv's composition and autograd Function, and RT-DETRv2's per-level core (its 'discrete'
    method to the original), against fakes laid out as the libraries are."""
    import sys
    import types

    calls = []
    mmcv = types.ModuleType("mmcv")
    ops = types.ModuleType("mmcv.ops")
    attn = types.ModuleType("mmcv.ops.multi_scale_deform_attn")

    def pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
        calls.append("original")
        return reference(value, value_spatial_shapes, sampling_locations, attention_weights)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, locations, weights, step):
            calls.append("original")
            return reference(value, shapes.tolist(), locations, weights)

    attn.multi_scale_deformable_attn_pytorch, attn.MultiScaleDeformableAttnFunction = pytorch, Function
    mmcv.ops, ops.multi_scale_deform_attn = ops, attn
    for module in (mmcv, ops, attn):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(stn_triton.functional, "ms_deform_attn", lambda *a, **k: _recorded(calls, *a, **k))
    shapes = [(2, 3), (1, 2)]
    value, locations, weights = make_case(shapes, seed=seed_of("fake-mmcv"))
    expected = reference(value, shapes, locations, weights)
    with swap.swapped():
        out = attn.multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
        out_function = attn.MultiScaleDeformableAttnFunction.apply(value, torch.tensor(shapes), None, locations,
                                                                   weights, 64)
        assert calls == [1, 1], calls
        with pytest.raises(RuntimeError):  # the original's error for dtypes that differ outside autocast
            attn.multi_scale_deformable_attn_pytorch(value.float(), shapes, locations, weights)
        assert calls[-1] == "original"
    assert "apply" not in vars(Function), "revert removes the inherited attribute it set"
    assert attn.multi_scale_deformable_attn_pytorch is pytorch
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_function, expected)


@needs_transformers
def test_the_swap_routes_rt_detr_v2s_per_level_core(monkeypatch):
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2 as rt_detr_v2

    calls = []
    monkeypatch.setattr(stn_triton.functional, "ms_deform_attn", lambda *a, **k: _recorded(calls, *a, **k))
    shapes, per_level = [(3, 4), (2, 2)], [3, 1]
    value, locations, weights = make_case(shapes, per_level=per_level, seed=seed_of("rt-detr-v2"))
    expected = rt_detr_v2.multi_scale_deformable_attention_v2(value, shapes, locations, weights, per_level)
    with swap.swapped():
        out = rt_detr_v2.multi_scale_deformable_attention_v2(value, shapes, locations, weights, per_level)
        assert len(calls) == 1
        rt_detr_v2.multi_scale_deformable_attention_v2(value, shapes, locations, weights, per_level, "discrete")
        assert len(calls) == 1, "the 'discrete' method runs the original"
    torch.testing.assert_close(out, expected)
