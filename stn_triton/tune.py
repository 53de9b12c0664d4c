"""Tune the kernels on this GPU and write its table: ``python -m stn_triton.tune`` (or ``stn-triton-tune``).

Runs every op at the perf suite's shapes on the suite's own inputs (``stn_triton.workloads``;
float32 and bfloat16, plus float16 for deform_conv2d; nchw and nhwc) three times: forward, forward + backward, and forward + backward under
``torch.use_deterministic_algorithms(True)``, so that every kernel (``stn_triton.tuning.REGISTRY``)
is launched at the shapes the suite measures. ``triton.autotune`` times each kernel's config
space there (``stn_triton.tuning.recording``: table entries ignored, deterministic passes timed
too); the winners, keyed as the ops look them up (``stn_triton.tuning``), go to
``$STN_TRITON_CONFIG_DIR/<gpu>.json`` (default ``~/.cache/stn_triton``), or with ``--ship`` to
``stn_triton/configs/<gpu>.json`` inside the package, to commit. Needs a CUDA GPU.
"""

import argparse
import sys

import torch

from stn_triton import tuning
from stn_triton.shapes import SHAPES, BenchShape
from stn_triton.tuning import SHIPPED_TABLES, gpu_name, merge_into_table, user_table_dir
from stn_triton.workloads import SINGLE_LAYOUT, workload

PASSES = ("fwd", "fwd+bwd", "fwd+bwd deterministic")


def _runner(shape: BenchShape, dtype, layout):
    """run(backward): the op ``shape`` names on the perf suite's inputs for it (stn_triton.workloads), and
    with backward=True its backward into the inputs the suite takes gradients of. The inputs are made
    when the pass runs, so that one workload's inputs at a time hold GPU memory."""
    make_inputs, call, grad_inputs = workload(shape)

    def run(backward: bool):
        inputs = make_inputs(shape, dtype, torch.device("cuda"), layout, torch.Generator("cuda").manual_seed(0))
        leaves = {name: t.requires_grad_(backward and name in grad_inputs) if t.is_floating_point() else t
                  for name, t in inputs.items()}
        out = call(**leaves)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def _workloads(dtype, layout):
    """(case id, run) for every shape of ``stn_triton.shapes.SHAPES`` but the scaling sweep's and the
    deterministic twins' (the deterministic pass of the twin's base covers it)."""
    return [(case_id, _runner(shape, dtype, layout)) for case_id, shape in SHAPES.items()
            if shape.sweep is None and not shape.deterministic]


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
                op = SHAPES[name].op
                if dtype == torch.float16 and op not in ("deform_conv2d", "DeformConv2d"):
                    continue  # float16 is tuned for deform_conv2d only, as the suite measures it
                if op in SINGLE_LAYOUT and layout != layouts[0]:
                    continue  # its inputs have one layout: tuned once
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
