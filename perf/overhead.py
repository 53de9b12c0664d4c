"""What a call costs beyond its kernels: host time per call, and the first call at a new shape.

Usage::

    python perf/overhead.py               # on a GPU: perf/results/overhead/<gpu>.csv; on a CPU: host path only
    python perf/overhead.py --out $OUT    # the CSV to OUT/overhead-<gpu>.csv

Host time: a tiny call (N=1, C=1, 4x4) is timed back to back, 2000 times, synchronizing only at
the end, so the GPU waits on the host and the time per call is the host's: validation, the
table lookup, the launch arguments, Triton's launcher, and the same for ``F.grid_sample`` side by
side in the same process. First call: each op runs at one shape (kernels compile, as any first
use compiles them), then at a second shape with the same kernel variants (another batch size and
image size, so another table key); its first call there, against the median of the calls that
follow, shows what a new shape costs beyond compilation (autotuning used to cost seconds).

Without a GPU the launches are replaced by a stub and only the host path of ours is timed
(through the interpreter's backend on CPU tensors): a check of the Python path, not a GPU number.
"""

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton and stn_triton read it

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import stn_triton  # noqa: E402
from stn_triton import tuning  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CALLS = 2000
# first_call_new_shape rows: ours_us is the first call at the new shape, baseline_us the median of
# the calls after it, ratio the first over that median.
COLUMNS = ["measure", "op", "ours_us", "baseline_us", "ratio", "gpu", "torch", "triton"]


def _inputs(n: int, c: int, side: int, device) -> dict:
    x = torch.randn(n, c, side, side, device=device)
    theta = torch.eye(2, 3, device=device).repeat(n, 1, 1) + 0.05 * torch.randn(n, 2, 3, device=device)
    grid = F.affine_grid(theta, [n, c, side, side], align_corners=False)
    return dict(x=x, theta=theta, grid=grid)


OPS = {
    "grid_sample": (lambda t: stn_triton.grid_sample(t["x"], t["grid"]),
                    lambda t: F.grid_sample(t["x"], t["grid"], align_corners=False)),
    "affine_grid_sample": (lambda t: stn_triton.affine_grid_sample(t["x"], t["theta"]),
                           lambda t: F.grid_sample(t["x"], F.affine_grid(t["theta"], list(t["x"].shape),
                                                                         align_corners=False), align_corners=False)),
}


def _per_call_us(fn, tensors, sync) -> float:
    for _ in range(100):
        fn(tensors)
    sync()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn(tensors)
    sync()
    return (time.perf_counter() - start) / CALLS * 1e6


def _first_call(fn, sync) -> tuple[float, float]:
    """(first call, median later call) in microseconds at a shape new to the tables, kernels compiled."""
    fn(_inputs(2, 8, 32, DEVICE))
    sync()
    tensors = _inputs(3, 8, 48, DEVICE)
    sync()
    times = []
    for _ in range(21):
        start = time.perf_counter()
        fn(tensors)
        sync()
        times.append((time.perf_counter() - start) * 1e6)
    return times[0], statistics.median(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the CSV into this folder")
    args = parser.parse_args(argv)
    on_gpu = DEVICE == "cuda"
    if on_gpu:
        gpu = tuning.gpu_name()
        sync = torch.cuda.synchronize
    else:
        gpu = "cpu-stubbed-launch"
        sync = lambda: None  # noqa: E731
        tuning.Launch.__call__ = lambda launch, grid, **arguments: None
    versions = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__)
    rows = []
    tiny = _inputs(1, 1, 4, DEVICE)
    for name, (ours, theirs) in OPS.items():
        ours_us = _per_call_us(ours, tiny, sync)
        theirs_us = _per_call_us(theirs, tiny, sync) if on_gpu else None
        rows.append(dict(measure="host_per_call", op=name, ours_us=f"{ours_us:.1f}",
                         baseline_us="" if theirs_us is None else f"{theirs_us:.1f}",
                         ratio="" if theirs_us is None else f"{ours_us / theirs_us:.2f}", **versions))
        if on_gpu:
            first, later = _first_call(ours, sync)
            rows.append(dict(measure="first_call_new_shape", op=name, ours_us=f"{first:.1f}",
                             baseline_us=f"{later:.1f}", ratio=f"{first / later:.2f}", **versions))
    for row in rows:
        print(" ".join(f"{key}={row[key]}" for key in COLUMNS), flush=True)
    folder = args.out or Path(__file__).resolve().parent / "results" / "overhead"
    if on_gpu or args.out:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (f"overhead-{gpu}.csv" if args.out else f"{gpu}.csv")
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
