"""Tune the kernels on this GPU and write its table: ``python -m stn_triton.tune`` (or ``stn-triton-tune``).

Runs every op at the perf suite's shapes (float32 and bfloat16, plus float16 for deform_conv2d;
nchw and nhwc) three times: forward, forward + backward, and forward + backward under
``torch.use_deterministic_algorithms(True)``, so that every kernel (``stn_triton.tuning.REGISTRY``)
is launched at the shapes the suite measures. ``triton.autotune`` times each kernel's config
space there; the winners, keyed as the ops look them up (``stn_triton.tuning``), go to
``$STN_TRITON_CONFIG_DIR/<gpu>.json`` (default ``~/.cache/stn_triton``), or with ``--ship`` to
``stn_triton/configs/<gpu>.json`` inside the package, to commit. Needs a CUDA GPU.
"""

import argparse
import json
import math
import sys

import torch
import triton

import stn_triton
from stn_triton import tuning
from stn_triton.tuning import REGISTRY, SHIPPED_TABLES, config_to_json, gpu_name, load_table, user_table_dir

PASSES = ("fwd", "fwd+bwd", "fwd+bwd deterministic")


def _image(n, c, size, dtype, layout):
    x = torch.randn(n, c, *size, device="cuda", dtype=dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last if len(size) == 2 else torch.channels_last_3d)
    return x


def _near_identity(n, rows, cols, dtype):
    return (torch.eye(rows, cols, device="cuda") + 0.05 * torch.randn(n, rows, cols, device="cuda")).to(dtype)


def _runner(op, *tensors):
    """run(backward): op(*tensors), and with backward=True also its backward into every tensor."""
    def run(backward: bool):
        leaves = [t.detach().requires_grad_(backward) for t in tensors]
        out = op(*leaves)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def _workloads(dtype, layout):
    """(name, run) pairs at the perf suite's shapes; ``run(backward)`` launches one pass."""
    def grid_sample(n, c, side, mode="bilinear"):
        # The grid comes from affine_grid inside the pass, so that its kernels are tuned too.
        x = _image(n, c, (side, side), dtype, layout)
        size = (n, c, side, side)
        return _runner(lambda x, t: stn_triton.grid_sample(x, stn_triton.affine_grid(t, size), mode=mode),
                       x, _near_identity(n, 2, 3, dtype))

    def affine(n, c, size):
        x = _image(n, c, size, dtype, layout)
        return _runner(stn_triton.affine_grid_sample, x, _near_identity(n, len(size), len(size) + 1, dtype))

    def perspective(n, c, side):
        x = _image(n, c, (side, side), dtype, layout)
        return _runner(stn_triton.perspective_grid_sample, x, _near_identity(n, 3, 3, dtype))

    def tps(n, c, size_in, size_out, k):
        x = _image(n, c, size_in, dtype, layout)
        control = torch.rand(k, 2, device="cuda", dtype=dtype) * 2 - 1
        source = control + 0.05 * torch.randn(n, k, 2, device="cuda", dtype=dtype)
        return _runner(lambda x, s: stn_triton.tps_grid_sample(x, s, control, size=(n, c, *size_out)), x, source)

    def dcn(n, c, side):
        x = _image(n, c, (side, side), dtype, layout)
        weight = torch.randn(c, c, 3, 3, device="cuda", dtype=dtype) / math.sqrt(9 * c)
        offset = torch.randn(n, 18, side, side, device="cuda", dtype=dtype)
        mask = torch.rand(n, 9, side, side, device="cuda", dtype=dtype)
        return _runner(lambda x, o, w, m: stn_triton.deform_conv2d(x, o, w, padding=1, mask=m), x, offset, weight, mask)

    return [
        ("grid2d_c3", grid_sample(64, 3, 224)), ("grid2d_c64", grid_sample(32, 64, 128)),
        ("grid2d_c256_small", grid_sample(4, 256, 16)), ("grid2d_c3_bicubic", grid_sample(64, 3, 224, "bicubic")),
        ("affine2d_c3", affine(64, 3, (224, 224))), ("affine2d_c64", affine(32, 64, (128, 128))),
        ("affine3d_c4", affine(4, 4, (64, 64, 64))), ("persp2d_c3", perspective(64, 3, 224)),
        ("tps_text", tps(256, 3, (64, 200), (32, 100), 20)), ("dcn_r50", dcn(8, 256, 56)), ("dcn_wide", dcn(16, 64, 112)),
    ]


def _run_pass(run, pass_: str) -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(pass_.endswith("deterministic"))
    try:
        run(backward=pass_ != "fwd")
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(previous)


def tune(dtypes, layouts) -> dict:
    """{kernel: {shape key: config}} chosen by autotuning every workload's passes once."""
    tuning.TUNING = True
    try:
        return _tune(dtypes, layouts)
    finally:
        tuning.TUNING = False


def _tune(dtypes, layouts) -> dict:
    table: dict = {}
    for dtype in dtypes:
        for layout in layouts:
            for name, run in _workloads(dtype, layout):
                if dtype == torch.float16 and not name.startswith("dcn"):
                    continue  # float16 is tuned for deform_conv2d only, as the suite measures it
                for pass_ in PASSES:
                    for kernel in REGISTRY:
                        kernel.last_autotuned_key = None
                    _run_pass(run, pass_)
                    for kernel in REGISTRY:
                        if kernel.last_autotuned_key is not None:
                            best = config_to_json(kernel.autotuned.best_config)
                            table.setdefault(kernel.name, {})[kernel.last_autotuned_key] = best
                            print(f"{name} {dtype} {layout} {pass_}: {kernel.name} [{kernel.last_autotuned_key}]"
                                  f" -> {best}", flush=True)
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
    folder = SHIPPED_TABLES if args.ship else user_table_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{gpu}.json"
    kernels = json.loads(path.read_text())["kernels"] if path.is_file() else {}
    for kernel, entries in tune(dtypes, layouts).items():
        kernels.setdefault(kernel, {}).update(entries)
    header = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__}
    path.write_text(json.dumps({**header, "kernels": kernels}, indent=1, sort_keys=True) + "\n")
    load_table.cache_clear()
    print(f"wrote {sum(len(v) for v in kernels.values())} configs to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
