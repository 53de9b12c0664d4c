"""``stn_triton.nn.SpatialTransformer``: identity at init, gradients against the unfused reference,
learning a known warp, and argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE, generator, rand, randn
from stn_triton import fallback, geometry
from stn_triton.nn import SpatialTransformer

TRANSFORMS = ("affine", "projective", "tps")


def identity_params(module: SpatialTransformer, batch: int) -> torch.Tensor:
    """The parameters of the identity transform, shaped as the functional ops take them.

    For TPS they are the module's control points (source = control points), which must be the
    regular grid (up to the float32 rounding of a module built in float32, then cast).
    """
    if module.transform == "tps":
        k = module.control_points.shape[0]
        grid = geometry.regular_control_points(k, torch.float64, module.control_points.device)
        torch.testing.assert_close(module.control_points, grid, atol=1e-7, rtol=0)
        identity = module.control_points
    else:
        identity = torch.eye(module.params_shape[0], module.params_shape[1], dtype=torch.float64, device=DEVICE)
    return identity.expand(batch, -1, -1)


def reference_warp(transform, x, params, spatial, module):
    """The unfused warp (grid in memory, PyTorch's grid_sample) the module's op must equal."""
    options = (module.mode, module.padding_mode, module.align_corners)
    if transform == "affine":
        return fallback.affine_grid_sample(x, params, spatial, *options)
    if transform == "projective":
        return fallback.perspective_grid_sample(x, params, spatial, *options)
    return fallback.tps_grid_sample(x, params, module.control_points, spatial, *options)


# (transform, input size): the affine case also on a volume, theta [N, 3, 4].
IDENTITY_CASES = [
    ("affine", (1, 1, 8, 8)),
    ("projective", (1, 1, 8, 8)),
    ("tps", (1, 1, 8, 8)),
    ("affine", (1, 1, 4, 5, 6)),
]


@pytest.mark.parametrize("align_corners", [False, True], ids=["corners-off", "corners-on"])
@pytest.mark.parametrize(
    "transform, size", IDENTITY_CASES, ids=[f"{t}-{len(s) - 2}d" for t, s in IDENTITY_CASES]
)
def test_starts_as_identity(transform, size, align_corners):
    torch.manual_seed(0)
    module = SpatialTransformer(size[1], size[2:], transform, align_corners=align_corners).double().to(DEVICE)
    x = rand(size, generator(1))
    warped, params = module(x, return_params=True)
    # Identity sampling lands on pixel centres with either align_corners; only rounding remains.
    torch.testing.assert_close(warped, x, atol=1e-12, rtol=0)
    expected = identity_params(module, size[0])
    torch.testing.assert_close(params, expected, atol=0, rtol=0)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_return_params_shapes_and_values(transform):
    torch.manual_seed(0)
    module = SpatialTransformer(2, (6, 7), transform, num_control_points=9).double().to(DEVICE)
    x = rand((3, 2, 6, 7), generator(2))
    warped, params = module(x, return_params=True)
    expected = identity_params(module, 3)
    assert params.shape == {"affine": (3, 2, 3), "projective": (3, 3, 3), "tps": (3, 9, 2)}[transform]
    torch.testing.assert_close(params, expected, atol=0, rtol=0)
    torch.testing.assert_close(module(x), warped, atol=0, rtol=0)


def test_output_size_samples_the_identity_on_the_new_grid():
    torch.manual_seed(0)
    module = SpatialTransformer(2, (6, 7), output_size=(5, 9)).double().to(DEVICE)
    x = rand((2, 2, 6, 7), generator(3))
    theta = identity_params(module, 2)
    expected = fallback.affine_grid_sample(x, theta, (5, 9), "bilinear", "zeros", False)
    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gradients_reach_every_parameter_as_the_reference_computes_them(transform):
    torch.manual_seed(0)
    module = SpatialTransformer(1, (7, 6), transform, num_control_points=9, padding_mode="border").double()
    with torch.no_grad():
        # Away from the identity start (weight 0), where the localisation net would get no gradient.
        module.head.weight.normal_(std=0.05)
    module = module.to(DEVICE)
    x = rand((2, 1, 7, 6), generator(4))
    weights = randn((2, 1, 7, 6), generator(5))

    def grads_of(loss):
        module.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in module.named_parameters()}

    ours = grads_of((module(x) * weights).sum())
    params = module.head(module.localization(x).flatten(1)).view(2, *module.params_shape)
    expected = grads_of((reference_warp(transform, x, params, (7, 6), module) * weights).sum())
    for name, grad in expected.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
    for name, grad in ours.items():
        if name.startswith("localization.") and name.endswith("weight"):
            assert grad.abs().max() > 0, f"no gradient reached {name}"


def rotation_scale_shift(angle: float, scale: float, shift: tuple[float, float]) -> torch.Tensor:
    """theta ``[1, 2, 3]`` rotating by ``angle`` (radians), scaling by ``scale``, then shifting."""
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return torch.tensor([[[c, -s, shift[0]], [s, c, shift[1]]]], dtype=torch.float64)


def test_learns_to_produce_a_known_affine():
    """A smooth pattern warped by a known rotation/scale/shift is the target; training finds the warp.

    The loss falls by ~1000x in 60 Adam steps for any seed tried, so the 100x asked is a safe margin.
    """
    torch.manual_seed(0)
    side = 12
    coarse = randn((1, 1, 4, 4), generator(6), device="cpu")
    pattern = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True).to(DEVICE)
    theta = rotation_scale_shift(0.3, 0.9, (0.12, -0.08)).to(DEVICE)
    target = fallback.affine_grid_sample(pattern, theta, (side, side), "bilinear", "zeros", False)
    localization = nn.Sequential(nn.Flatten(), nn.Linear(side * side, 4), nn.Tanh())
    module = SpatialTransformer(1, (side, side), localization=localization).double().to(DEVICE)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = F.mse_loss(module(pattern), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        warped, learnt = module(pattern, return_params=True)
    final = F.mse_loss(warped, target).item()
    assert final < losses[0] / 100, f"loss went from {losses[0]:.4g} to {final:.4g}, not down by 100x"
    torch.testing.assert_close(learnt, theta, atol=0.05, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(in_channels=0), ValueError, "in_channels must be a positive int, got 0"),
        (dict(input_size=(8,)), ValueError, r"input_size must be \(H, W\) or \(D, H, W\)"),
        (dict(input_size=(8, 0)), ValueError, "input_size must be"),
        (dict(input_size=(4, 8, 8), transform="tps"), ValueError, r"input_size must be \(H, W\), positive ints"),
        (dict(transform="similarity"), ValueError, "transform must be one of"),
        (dict(output_size=(4, 4, 4)), ValueError, r"output_size must be \(H, W\)"),
        (dict(transform="tps", num_control_points=10), ValueError, "num_control_points must be a square"),
        (dict(transform="tps", num_control_points=1), ValueError, "num_control_points must be a square"),
        (dict(mode="area"), ValueError, "mode must be one of"),
        (dict(input_size=(4, 8, 8), mode="bicubic"), ValueError, "bicubic"),
        (dict(padding_mode="fill"), ValueError, "padding_mode must be one of"),
        (dict(align_corners=1), TypeError, "align_corners must be a bool"),
        (dict(localization=lambda x: x), TypeError, "localization must be an nn.Module"),
        (dict(localization=nn.Linear(3, 3)), ValueError, r"localization failed on an input of shape \[1, 1, 8, 8\]"),
        (dict(localization=nn.Flatten(0)), ValueError, r"features \[N, F\]"),
    ],
    ids=lambda v: "-".join(f"{k}={type(v[k]).__name__ if callable(v[k]) else repr(v[k])}" for k in v)
    if isinstance(v, dict)
    else "",
)
def test_bad_arguments_name_what_they_got(kwargs, error, match):
    arguments = dict(in_channels=1, input_size=(8, 8)) | kwargs
    with pytest.raises(error, match=match):
        SpatialTransformer(**arguments)


def test_forward_checks_the_input_shape():
    module = SpatialTransformer(2, (6, 7))
    with pytest.raises(ValueError, match=r"x must have shape \[N, 2, 6, 7\] .* got \(1, 2, 7, 6\)"):
        module(torch.zeros(1, 2, 7, 6))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        module([[0.0]])


def test_user_localization_gets_a_head_sized_from_its_features():
    localization = nn.Sequential(nn.LazyConv2d(3, 3), nn.BatchNorm2d(3), nn.ReLU())
    module = SpatialTransformer(2, (6, 7), transform="projective", localization=localization)
    assert module.localization is localization and localization.training
    assert (module.head.in_features, module.head.out_features) == (3 * 4 * 5, 9)
    assert module.head.weight.abs().max() == 0
