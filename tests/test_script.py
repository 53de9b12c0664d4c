"""TorchScript: every public function and module scripts (deployment code scripts whole models) and
computes what it computes eagerly, through the registered ``torch.ops.stn_triton`` ops."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import DEVICE, generator, rand, randn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def script(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(fn)


def test_functions_script_and_equal_their_eager_calls():
    gen = generator(1)
    x = randn((2, 3, 6, 7), gen, torch.float32)
    grid = rand((2, 4, 5, 2), gen, -1.1, 1.1, torch.float32)
    theta = (torch.eye(2, 3) + 0.1 * torch.randn(2, 2, 3, generator=gen)).to(DEVICE)
    homography = (torch.eye(3) + 0.05 * torch.randn(2, 3, 3, generator=gen)).to(DEVICE)
    source = (stn_triton.geometry.regular_control_points(9, torch.float32, "cpu")
              + 0.05 * torch.randn(2, 9, 2, generator=gen)).to(DEVICE)
    M = torch.tensor([[1.0, 0.1, 0.5], [0.05, 0.9, -0.3]], device=DEVICE).repeat(2, 1, 1)
    calls = [
        (stn_triton.grid_sample, (x, grid, "bicubic", "border", True)),
        (stn_triton.affine_grid, (theta, [2, 3, 4, 5], True)),
        (stn_triton.affine_grid_sample, (x, theta, [2, 3, 4, 5])),
        (stn_triton.perspective_grid_sample, (x, homography)),
        (stn_triton.tps_grid_sample, (x, source)),
        (stn_triton.warp_affine, (x, M, [5, 6], "bilinear", "fill", True, torch.full((3,), 0.5, device=DEVICE))),
        (stn_triton.warp_perspective, (x, torch.cat([M, M[:, :1] * 0 + torch.tensor([0.0, 0.0, 1.0], device=DEVICE)], 1),
                                       [5, 6])),
        (stn_triton.blur_pool2d, (x, 4, 1, "reflect")),
        (stn_triton.dcnv3, (x.permute(0, 2, 3, 1), rand((2, 6, 7, 54), gen, -2.0, 2.0, torch.float32),
                            rand((2, 6, 7, 27), gen, 0.0, 1.0, torch.float32), 3, 3, 1, 1, 1, 1, 1, 1, 3, 1, 1.0)),
        (stn_triton.dcnv4, (x.permute(0, 2, 3, 1), rand((2, 6, 7, 24), gen, -2.0, 2.0, torch.float32), 3, 3, 1, 1,
                            1, 1, 1, 1, 1, 3, 0.5, True, True)),
        (stn_triton.max_blur_pool2d, (x, [3, 2], [2, 1], [2, 3], False, "replicate")),
    ]
    for fn, args in calls:
        torch.testing.assert_close(script(fn)(*args), fn(*args), msg=fn.__name__)
    torch.testing.assert_close(script(stn_triton.grid_sample)(x, grid), F.grid_sample(x, grid, align_corners=False))
    torch.testing.assert_close(script(stn_triton.max_blur_pool2d)(x),
                               stn_triton.fallback.blur_pool(x, (3, 3), (2, 2), (2, 2), "zeros", x.dtype))


def test_deform_conv2d_scripts_as_torchvisions_does():
    gen = generator(2)
    x = randn((2, 4, 5, 5), gen, torch.float32)
    offset = randn((2, 18, 5, 5), gen, torch.float32)
    weight = randn((6, 4, 3, 3), gen, torch.float32)
    mask = rand((2, 9, 5, 5), gen, 0.0, 1.0, torch.float32)
    scripted = script(stn_triton.deform_conv2d)
    torch.testing.assert_close(scripted(x, offset, weight, None, (1, 1), (1, 1), (1, 1), mask),
                               stn_triton.deform_conv2d(x, offset, weight, padding=1, mask=mask))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: stn_triton.DeformConv2d(4, 6, 3, padding=1), id="DeformConv2d"),
    pytest.param(lambda: stn_triton.SelfDeformConv2d(4, 6, 3, padding=1), id="SelfDeformConv2d"),
    pytest.param(lambda: stn_triton.SpatialTransformer(4, (5, 5)), id="SpatialTransformer-affine"),
    pytest.param(lambda: stn_triton.SpatialTransformer(4, (5, 5), transform="projective"), id="projective"),
    pytest.param(lambda: stn_triton.SpatialTransformer(4, (5, 5), transform="tps", num_control_points=9), id="tps"),
    pytest.param(lambda: stn_triton.BlurPool2d(4, 2, "reflect"), id="BlurPool2d"),
    pytest.param(lambda: stn_triton.MaxBlurPool2d((3, 2), 1, 2, padding_mode="replicate"), id="MaxBlurPool2d"),
])
def test_modules_script_and_train_as_their_eager_selves(make):
    torch.manual_seed(0)
    module = make().to(DEVICE)
    if isinstance(module, stn_triton.SpatialTransformer):
        with torch.no_grad():  # off the identity, so that the warp does something
            module.head.bias.add_(0.05 * torch.randn(module.head.bias.shape, device=DEVICE))
    scripted = script(module)
    gen = generator(3)
    x = randn((2, 4, 5, 5), gen, torch.float32)
    args = (x, randn((2, 18, 5, 5), gen, torch.float32)) if type(module) is stn_triton.DeformConv2d else (x,)
    outputs = []
    for m in (module, scripted):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out = m(*leaves)
        out.square().sum().backward()
        outputs.append((out.detach(), *(a.grad for a in leaves)))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b)


def test_ms_deform_attn_and_its_module_script():
    gen = generator(4)
    shapes = torch.tensor([[3, 4], [2, 2]], device=DEVICE)
    value = randn((2, 16, 2, 4), gen, torch.float32)
    locations = rand((2, 5, 2, 2, 2, 2), gen, 0.0, 1.0, torch.float32)
    weights = rand((2, 5, 2, 2, 2), gen, 0.0, 1.0, torch.float32)
    torch.testing.assert_close(script(stn_triton.ms_deform_attn)(value, shapes, None, locations, weights),
                               stn_triton.ms_deform_attn(value, shapes, None, locations, weights))
    module = stn_triton.MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).to(DEVICE)
    query, flat = randn((2, 5, 8), gen, torch.float32), randn((2, 16, 8), gen, torch.float32)
    reference_points = rand((2, 5, 2, 2), gen, 0.0, 1.0, torch.float32)
    starts = torch.tensor([0, 12], device=DEVICE)
    torch.testing.assert_close(script(module)(query, reference_points, flat, shapes, starts),
                               module(query, reference_points, flat, shapes, starts))


def test_roi_ops_and_their_modules_script():
    gen = generator(5)
    x = randn((2, 8, 7, 9), gen, torch.float32)
    rois = torch.tensor([[0, 1.0, 2.0, 8.0, 6.0], [1, -1.0, 0.5, 4.0, 9.0], [1, 3.0, 3.0, 3.5, 3.2]], device=DEVICE)
    boxes = [rois[:1, 1:], rois[1:, 1:]]
    offset = randn((3, 2, 2, 2), gen, torch.float32)
    mask = rand((3, 1, 2, 2), gen, 0.0, 1.0, torch.float32)
    calls = [
        (stn_triton.roi_align, (x, rois, 2, 0.5, 2, True)),
        (stn_triton.roi_align, (x, boxes, [3, 2])),
        (stn_triton.ps_roi_align, (x, boxes, [2, 2], 1.0, -1)),
        (stn_triton.deform_roi_pool, (x, rois, offset, [2, 2], 1.0, 2, 0.1, mask)),
        (stn_triton.multi_scale_roi_align, ([x, x[:, :, ::2, ::2]], [b * 8 for b in boxes], [2, 2], 2, [0.25, 0.125])),
    ]
    for fn, args in calls:
        torch.testing.assert_close(script(fn)(*args), fn(*args))
    features = {"0": x, "1": x[:, :, ::2, ::2]}
    image_shapes = [(28, 36), (28, 36)]
    modules = [
        (stn_triton.RoIAlign((2, 2), 0.5, 2), (x, boxes)),
        (stn_triton.PSRoIAlign(2, 0.5, 2), (x, rois)),
        (stn_triton.MultiScaleRoIAlign(["0", "1"], 2, 2), (features, [b * 4 for b in boxes], image_shapes)),
        (stn_triton.DeformRoIPool((2, 2), 1.0, 2), (x, rois, offset)),
        (stn_triton.DeformRoIPoolPack((2, 2), 8, deform_fc_channels=4).to(DEVICE), (x, rois)),
        (stn_triton.ModulatedDeformRoIPoolPack((2, 2), 8, deform_fc_channels=4).to(DEVICE), (x, rois)),
    ]
    for module, args in modules:
        torch.testing.assert_close(script(module)(*args), module(*args))


def test_dcn_modules_script():
    gen = generator(9)
    for module, input, args in ((stn_triton.DCNv3(channels=8, group=2, center_feature_scale=True),
                                 randn((2, 4, 5, 8), gen, torch.float32), ()),
                                (stn_triton.DCNv4(channels=8, group=2, dw_kernel_size=3), randn((2, 20, 8), gen,
                                                                                               torch.float32), ((4, 5),))):
        module = module.to(DEVICE)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.2 * torch.randn_like(parameter))
        torch.testing.assert_close(torch.jit.script(module)(input, *args), module(input, *args))
