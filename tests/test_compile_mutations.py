"""torch.compile's mutation analysis finds every kernel writing only the pointers it declares.

Under torch.compile a ``triton_op``'s kernels are functionalized: PyTorch reads each kernel's
TTIR (``identify_accessed_tensors``) to learn which tensor arguments it writes, and copies those
(or, for a leaf that requires grad, raises "a leaf Variable that requires grad is being used in
an in-place operation"). The analysis counts a pointer as written when anything derived from it
reaches a store or atomic address, including through a helper's result. This test runs it on the
CPU for every kernel launch of every op, in every pass (forward, backward with atomics,
deterministic backward), and holds the analysed writes to the kernel's declared ``writes``.

It needs the compiled pipeline, not the interpreter, so it runs in a subprocess: the ops run on
CPU tensors with their launches captured instead of run, and Triton's driver reports an sm_90
target.
"""

import json
import os
import subprocess
import sys

import pytest
import torch


def _analyse() -> list[dict]:
    """Every launch of every op, with the writes the analysis finds and the ones declared."""
    import logging

    import triton
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
    from triton.backends.compiler import GPUTarget

    import stn_triton
    from stn_triton import tuning

    class Sm90Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def is_active(self):
            return True

    triton.runtime.driver.set_active(Sm90Driver())
    logging.disable(logging.WARNING)  # the analysis logs and carries on when it fails; failures show as results

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    x3 = torch.randn(2, 4, 4, 5, 6, generator=g, requires_grad=True)
    grid = (torch.rand(2, 6, 7, 2, generator=g) * 2 - 1).requires_grad_()
    theta = (torch.eye(2, 3) + 0.1 * torch.randn(2, 2, 3, generator=g)).requires_grad_()
    theta3 = (torch.eye(3, 4) + 0.1 * torch.randn(2, 3, 4, generator=g)).requires_grad_()
    homography = (torch.eye(3) + 0.1 * torch.randn(2, 3, 3, generator=g)).requires_grad_()
    source = (stn_triton.geometry.regular_control_points(9, torch.float32, "cpu") + 0.1 * torch.randn(2, 9, 2)).requires_grad_()
    M = torch.tensor([[1.0, 0.1, 0.5], [0.05, 0.9, -0.3]]).repeat(2, 1, 1).requires_grad_()
    offset = torch.randn(2, 18, 8, 8, generator=g, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3, generator=g, requires_grad=True)
    mask = torch.rand(2, 9, 8, 8, generator=g, requires_grad=True)
    bias = torch.randn(4, generator=g, requires_grad=True)
    shapes = torch.tensor([[4, 5], [2, 3]])
    value = torch.randn(2, 26, 2, 8, generator=g, requires_grad=True)
    locations = torch.rand(2, 7, 2, 2, 2, 2, generator=g, requires_grad=True)
    weights = torch.rand(2, 7, 2, 2, 2, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 12.0, 10.0], [1, -2.0, 0.5, 6.0, 14.0], [1, 3.0, 3.0, 3.5, 3.2]])
    roi_offset = torch.randn(3, 2, 2, 2, generator=g, requires_grad=True)
    roi_mask = torch.rand(3, 1, 2, 2, generator=g, requires_grad=True)
    dcn_offset = torch.randn(2, 4, 4, 32, generator=g, requires_grad=True)
    dcn_mask = torch.rand(2, 4, 4, 16, generator=g, requires_grad=True)
    dcn_offset_mask = torch.randn(2, 8, 8, 56, generator=g, requires_grad=True)
    calls = {
        "grid_sample": lambda: stn_triton.grid_sample(x, grid),
        "grid_sample bicubic": lambda: stn_triton.grid_sample(x, grid, mode="bicubic", padding_mode="border"),
        "grid_sample 3-D": lambda: stn_triton.grid_sample(x3, torch.rand(2, 3, 4, 5, 3, requires_grad=True)),
        "affine_grid": lambda: stn_triton.affine_grid(theta, (2, 4, 6, 7)),
        "affine_grid_sample": lambda: stn_triton.affine_grid_sample(x, theta),
        "affine_grid_sample 3-D": lambda: stn_triton.affine_grid_sample(x3, theta3),
        "perspective_grid_sample": lambda: stn_triton.perspective_grid_sample(x, homography),
        "tps_grid_sample": lambda: stn_triton.tps_grid_sample(x, source),
        "warp_affine fill": lambda: stn_triton.warp_affine(x, M, (6, 7), padding_mode="fill"),
        "deform_conv2d": lambda: stn_triton.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask),
        "ms_deform_attn": lambda: stn_triton.ms_deform_attn(value, shapes, None, locations, weights),
        "ms_deform_attn softmax per level": lambda: stn_triton.ms_deform_attn(
            value, shapes, None, locations.flatten(3, 4)[:, :, :, :3], weights.flatten(3, 4)[:, :, :, :3],
            points_per_level=[2, 1], softmax=True),
        "roi_align": lambda: stn_triton.roi_align(x, rois, (2, 3), 0.5, -1),
        "ps_roi_align": lambda: stn_triton.ps_roi_align(x, rois, (2, 2), 0.5, 2),
        "deform_roi_pool": lambda: stn_triton.deform_roi_pool(x, rois, roi_offset, (2, 2), 0.5, 2, 0.1, roi_mask),
        "multi_scale_roi_align": lambda: stn_triton.multi_scale_roi_align(
            [x, x[:, :, ::2, ::2]], [rois[:2, 1:] * 8, rois[2:, 1:] * 8], (2, 2), 2, [0.25, 0.125]),
        "dcnv3": lambda: stn_triton.dcnv3(x.permute(0, 2, 3, 1), dcn_offset, dcn_mask, 3, 3, 2, 2, 1, 1, 1, 1, 2, 2,
                                          1.0, True),
        "dcnv4": lambda: stn_triton.dcnv4(x.permute(0, 2, 3, 1), dcn_offset_mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0),
        "blur_pool2d": lambda: stn_triton.blur_pool2d(x, 3, 2),
        "max_blur_pool2d": lambda: stn_triton.max_blur_pool2d(x, 3, 2, 2),
    }
    results = []
    for label, call in calls.items():
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            with tuning.captured_launches() as launches:
                out = call()
                out.backward(torch.ones_like(out))
            for launch, arguments in launches:
                kernel = launch.tuned.kernel
                options = launch.options or tuning.launch_options(launch.tuned.configs[0])
                meta = {name: value for name, value in options.items() if name in kernel.arg_names}
                accesses = identify_accessed_tensors(kernel, {**arguments, **meta}, {})
                results.append(dict(
                    call=label, deterministic=deterministic, kernel=launch.tuned.name,
                    writes=sorted(dep.name for dep in accesses.read_writes.writes),
                    declared=list(launch.tuned.writes),
                ))
    torch.use_deterministic_algorithms(False)
    return results


@pytest.fixture(scope="module")
def launches() -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _can_compile_for_cuda() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU torch.compile itself runs in tests/test_gpu.py"),
    pytest.mark.skipif(not _can_compile_for_cuda(), reason="this triton has no CUDA backend to compile with"),
]


def test_every_kernel_writes_only_what_it_declares(launches):
    wrong = [launch for launch in launches if not launch["writes"] or not set(launch["writes"]) <= set(launch["declared"])]
    assert not wrong, "analysed writes outside the declared ones:\n" + "\n".join(map(str, wrong))


def test_every_tuned_kernel_is_analysed(launches):
    from stn_triton import tuning

    assert {launch["kernel"] for launch in launches} == {kernel.name for kernel in tuning.REGISTRY}


def test_an_atomic_backward_writes_grad_input_and_the_transform_gradient(launches):
    """The analysis must see the true outputs, or the test above could pass on an analysis that sees nothing."""
    backward = [launch for launch in launches if launch["call"] == "affine_grid_sample" and launch["kernel"] == "sample_bwd"
                and not launch["deterministic"]]
    assert backward and all(launch["writes"] == ["gcoords_ptr", "gx_ptr"] for launch in backward)


if __name__ == "__main__":
    print(json.dumps(_analyse()))
