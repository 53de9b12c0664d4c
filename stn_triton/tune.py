"""Tune the kernels on this GPU and write its table: ``python -m stn_triton.tune`` (or ``stn-triton-tune``).

Runs every op at the perf suite's shapes (float32 and bfloat16, plus float16 for deform_conv2d;
nchw and nhwc) three times: forward, forward + backward, and forward + backward under
``torch.use_deterministic_algorithms(True)``, so that every kernel (``stn_triton.tuning.REGISTRY``)
is launched at the shapes the suite measures. ``triton.autotune`` times each kernel's config
space there (``stn_triton.tuning.recording``: table entries ignored, deterministic passes timed
too); the winners, keyed as the ops look them up (``stn_triton.tuning``), go to
``$STN_TRITON_CONFIG_DIR/<gpu>.json`` (default ``~/.cache/stn_triton``), or with ``--ship`` to
``stn_triton/configs/<gpu>.json`` inside the package, to commit. Needs a CUDA GPU.
"""

import argparse
import math
import sys

import torch

import stn_triton
from stn_triton import tuning
from stn_triton.shapes import SHAPES, BenchShape
from stn_triton.tuning import SHIPPED_TABLES, gpu_name, merge_into_table, user_table_dir

PASSES = ("fwd", "fwd+bwd", "fwd+bwd deterministic")


def _image(n, c, size, dtype, layout):
    x = torch.randn(n, c, *size, device="cuda", dtype=dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last if len(size) == 2 else torch.channels_last_3d)
    return x


def _near_identity(n, rows, cols, dtype):
    return (torch.eye(rows, cols, device="cuda") + 0.05 * torch.randn(n, rows, cols, device="cuda")).to(dtype)


def _runner(op, make_tensors, data=()):
    """run(backward): op(*make_tensors()), and with backward=True also its backward into every
    tensor but those whose indices ``data`` lists (a model's input image takes no gradient). The
    tensors are made when the pass runs, so that one workload's inputs at a time hold GPU memory."""
    def run(backward: bool):
        leaves = [t.detach().requires_grad_(backward and i not in data) for i, t in enumerate(make_tensors())]
        out = op(*leaves)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def _workloads(dtype, layout):
    """(case id, run) for every shape of ``stn_triton.shapes.SHAPES`` but the scaling sweep's and the
    deterministic twins' (the deterministic pass of the twin's base covers it); ``run(backward)``
    makes its inputs on the GPU and launches one pass of the op the shape names."""
    return [(case_id, _workload(shape, dtype, layout)) for case_id, shape in SHAPES.items()
            if shape.sweep is None and not shape.deterministic]


def _workload(shape: BenchShape, dtype, layout):
    """run(backward) for one shape: its op on inputs like the suite's (sampling near the identity)."""
    n, c, k, nd = shape.N, shape.C, shape.kernel, len(shape.size)
    size = (n, c, *shape.out_size)

    def image():
        return _image(n, c, shape.size, dtype, layout)

    if shape.op in ("grid_sample", "affine_grid"):
        # The grid comes from affine_grid inside the pass, so that its kernels are tuned too.
        def sample(x, t):
            return stn_triton.grid_sample(x, stn_triton.affine_grid(t, size), mode=shape.mode)
        return _runner(sample, lambda: (image(), _near_identity(n, nd, nd + 1, dtype)))
    if shape.op in ("affine_grid_sample", "SpatialTransformer"):
        # In the spatial transformer's training step the image is data: no gradient flows into it.
        data = (0,) if shape.op == "SpatialTransformer" else ()
        return _runner(lambda x, t: stn_triton.affine_grid_sample(x, t, size=size),
                       lambda: (image(), _near_identity(n, nd, nd + 1, dtype)), data)
    if shape.op == "perspective_grid_sample":
        return _runner(lambda x, h: stn_triton.perspective_grid_sample(x, h, size=size),
                       lambda: (image(), _near_identity(n, 3, 3, dtype)))
    if shape.op == "tps_grid_sample":
        def tensors():
            control = torch.rand(shape.K, 2, device="cuda", dtype=dtype) * 2 - 1
            return image(), control + 0.05 * torch.randn(n, shape.K, 2, device="cuda", dtype=dtype), control
        # Control points are constants of the spline: no gradient.
        return _runner(lambda x, s, cp: stn_triton.tps_grid_sample(x, s, cp, size=size), tensors, data=(2,))
    if shape.op in ("deform_conv2d", "DeformConv2d"):
        height, width = shape.size

        def tensors():
            weight = torch.randn(shape.out_channels, c, k, k, device="cuda", dtype=dtype) / math.sqrt(k * k * c)
            offset = torch.randn(n, 2 * k * k, height, width, device="cuda", dtype=dtype)
            mask = torch.rand(n, k * k, height, width, device="cuda", dtype=dtype)
            return image(), offset, weight, mask
        return _runner(lambda x, o, w, m: stn_triton.deform_conv2d(x, o, w, padding=k // 2, mask=m), tensors)
    raise ValueError(f"no tuning workload for op {shape.op!r}")


def _run_pass(run, pass_: str) -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(pass_.endswith("deterministic"))
    try:
        run(backward=pass_ != "fwd")
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(previous)


def tune(dtypes, layouts) -> dict:
    """{kernel: {shape key: config json}} chosen by autotuning every workload's passes once."""
    table: dict = {}
    for dtype in dtypes:
        for layout in layouts:
            for name, run in _workloads(dtype, layout):
                if dtype == torch.float16 and not name.startswith("dcn"):
                    continue  # float16 is tuned for deform_conv2d only, as the suite measures it
                for pass_ in PASSES:
                    with tuning.recording() as winners:
                        _run_pass(run, pass_)
                    for kernel, entries in winners.items():
                        for key, best in entries.items():
                            table.setdefault(kernel, {})[key] = best
                            print(f"{name} {dtype} {layout} {pass_}: {kernel} [{key}] -> {best}", flush=True)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ship", action="store_true", help="write into stn_triton/configs/ (to commit)")
    parser.add_argument("--quick", action="store_true", help="float32 and nchw only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("stn_triton.tune needs a CUDA GPU: tuning times the kernels", file=sys.stderr)
        return 2
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16, torch.float16)
    layouts = ("nchw",) if args.quick else ("nchw", "nhwc")
    gpu = gpu_name()
    path = (SHIPPED_TABLES if args.ship else user_table_dir()) / f"{gpu}.json"
    size = merge_into_table(path, gpu, tune(dtypes, layouts))
    print(f"wrote {size} configs to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
