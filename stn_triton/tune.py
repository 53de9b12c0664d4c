"""Tune the kernels on this GPU and write its table: ``python -m stn_triton.tune`` (or ``stn-triton-tune``).

Runs the forward of every op at the perf suite's shapes (float32 and bfloat16, plus float16
for deform_conv2d; nchw and nhwc), lets ``triton.autotune`` time each kernel's config space
there, and writes the winners, keyed as the ops look them up (``stn_triton.tuning``), to
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
from stn_triton.ops import affine_grid as affine_grid_ops
from stn_triton.ops import deform_conv as deform_conv_ops
from stn_triton.ops import grid_sample as grid_sample_ops
from stn_triton.tuning import SHIPPED_TABLES, config_to_json, gpu_name, load_table, user_table_dir

TUNED_KERNELS = (grid_sample_ops._fwd_kernel, affine_grid_ops._grid_kernel, deform_conv_ops._fwd_kernel)


def _image(n, c, size, dtype, layout):
    x = torch.randn(n, c, *size, device="cuda", dtype=dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last if len(size) == 2 else torch.channels_last_3d)
    return x


def _near_identity(n, rows, cols, dtype):
    return (torch.eye(rows, cols, device="cuda") + 0.05 * torch.randn(n, rows, cols, device="cuda")).to(dtype)


def _workloads(dtype, layout):
    """(name, thunk) pairs: the perf suite's shapes, forward only."""
    def grid_sample(n, c, side, mode="bilinear"):
        x = _image(n, c, (side, side), dtype, layout)
        grid = stn_triton.affine_grid(_near_identity(n, 2, 3, dtype), (n, c, side, side))
        return lambda: stn_triton.grid_sample(x, grid, mode=mode)

    def affine(n, c, size):
        x = _image(n, c, size, dtype, layout)
        theta = _near_identity(n, len(size), len(size) + 1, dtype)
        return lambda: stn_triton.affine_grid_sample(x, theta)

    def perspective(n, c, side):
        x = _image(n, c, (side, side), dtype, layout)
        return lambda: stn_triton.perspective_grid_sample(x, _near_identity(n, 3, 3, dtype))

    def tps(n, c, size_in, size_out, k):
        x = _image(n, c, size_in, dtype, layout)
        control = torch.rand(k, 2, device="cuda", dtype=dtype) * 2 - 1
        source = control + 0.05 * torch.randn(n, k, 2, device="cuda", dtype=dtype)
        return lambda: stn_triton.tps_grid_sample(x, source, control, size=(n, c, *size_out))

    def dcn(n, c, side):
        x = _image(n, c, (side, side), dtype, layout)
        weight = torch.randn(c, c, 3, 3, device="cuda", dtype=dtype) / math.sqrt(9 * c)
        offset = torch.randn(n, 18, side, side, device="cuda", dtype=dtype)
        mask = torch.rand(n, 9, side, side, device="cuda", dtype=dtype)
        return lambda: stn_triton.deform_conv2d(x, offset, weight, padding=1, mask=mask)

    return [
        ("grid2d_c3", grid_sample(64, 3, 224)), ("grid2d_c64", grid_sample(32, 64, 128)),
        ("grid2d_c256_small", grid_sample(4, 256, 16)), ("grid2d_c3_bicubic", grid_sample(64, 3, 224, "bicubic")),
        ("affine2d_c3", affine(64, 3, (224, 224))), ("affine2d_c64", affine(32, 64, (128, 128))),
        ("affine3d_c4", affine(4, 4, (64, 64, 64))), ("persp2d_c3", perspective(64, 3, 224)),
        ("tps_text", tps(256, 3, (64, 200), (32, 100), 20)), ("dcn_r50", dcn(8, 256, 56)), ("dcn_wide", dcn(16, 64, 112)),
    ]


def tune(dtypes, layouts) -> dict:
    """{kernel: {shape key: config}} chosen by autotuning every workload once."""
    table: dict = {}
    for dtype in dtypes:
        for layout in layouts:
            for name, run in _workloads(dtype, layout):
                if dtype == torch.float16 and not name.startswith("dcn"):
                    continue  # float16 is tuned for deform_conv2d only, as the suite measures it
                for kernel in TUNED_KERNELS:
                    kernel.last_autotuned_key = None
                run()
                torch.cuda.synchronize()
                for kernel in TUNED_KERNELS:
                    if kernel.last_autotuned_key is not None:
                        best = config_to_json(kernel.autotuned.best_config)
                        table.setdefault(kernel.name, {})[kernel.last_autotuned_key] = best
                        print(f"{name} {dtype} {layout}: {kernel.name} [{kernel.last_autotuned_key}] -> {best}", flush=True)
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
