"""The deterministic backwards' scatter: sort a list of contributions by destination, sum each run in order.

Every op whose gradient is a scatter (grid_sample's and the warps' grad_input, deform_conv2d's,
multi-scale deformable attention's grad_value) lists its contributions in a taps pass of its own
(destination ``keys``, ``weights``, ``sources``; see kernels/sorted_scatter.py) and hands them to
``scatter_sorted``: a stable sort groups them by destination in a fixed order, and two kernels add
each destination's run in that order, in chunks of at most ``CHUNK`` entries whose sums are added
in a second ordered pass. Same inputs, same order, same bits, on every run, and no lane sums
more than ``CHUNK`` entries of a long run.
"""

from typing import NamedTuple

import torch
import triton

from stn_triton.kernels.sorted_scatter import _sum_runs_kernel, _sum_segments_kernel
from stn_triton.numerics import INT32_LIMIT, cdiv, next_power_of_2
from stn_triton.tuning import TunedKernel

# Entries one lane sums at most before handing its sum to the run pass (a power of two).
CHUNK = 32


def key_dtype(destination_elements: int) -> torch.dtype:
    """The dtype of the keys of a scatter into ``destination_elements`` elements: int32 whenever the
    offsets fit (a radix sort of 32-bit keys takes half the passes of 64-bit ones), else int64."""
    return torch.int32 if destination_elements <= INT32_LIMIT else torch.int64


class SortedRuns(NamedTuple):
    """A list of destination keys sorted stably, and where its runs and segments lie."""

    keys: torch.Tensor  # [E] int32 or int64, ascending, -1 (no destination) first
    order: torch.Tensor  # [E] int64: position of each sorted key in the unsorted list
    run_end: torch.Tensor  # [E] int64: one past the last position holding the same key
    segment: torch.Tensor  # [E] int64: the segment (run piece between cuts every CHUNK positions) of each position
    segments: int  # an upper bound on the number of segments (known without a device sync)


def sorted_runs(keys: torch.Tensor, destinations: int) -> SortedRuns:
    """Sort ``keys`` [E] (``destinations``: how many distinct non-negative keys there can be at most).

    Every step is a sort or a scan, each a fixed order on the device: a run's end is the least
    "one past a run's last position" at or after each position (a reversed cumulative minimum, where
    a binary search per position would read the list at random 25 times over)."""
    entries = keys.numel()
    sorted_keys, order = torch.sort(keys, stable=True)
    position = torch.arange(entries, device=keys.device)
    changes = sorted_keys[1:] != sorted_keys[:-1]
    last = torch.cat([changes, changes.new_ones(1)])  # the last position of each run
    run_end = torch.where(last, position + 1, entries).flip(0).cummin(0).values.flip(0)
    first = torch.cat([changes.new_ones(1), changes])
    starts = (sorted_keys >= 0) & (first | (position % CHUNK == 0))
    segment = torch.cumsum(starts, dim=0) - 1
    return SortedRuns(sorted_keys, order, run_end, segment, min(entries, destinations + cdiv(entries, CHUNK)))


def _configs(blocks) -> list[triton.Config]:
    return [triton.Config({"BLOCK_E": e, "BLOCK_C": c}, num_warps=w) for e, c, w in blocks]


# (BLOCK_E, BLOCK_C, num_warps): strided channels run a warp along entries (NCHW sampling), contiguous
# ones along channels (channels_last, and the column gradients and value rows of DCN and MSDA).
CONFIGS = _configs([(128, 4, 4), (128, 2, 4), (128, 1, 4), (256, 4, 8), (32, 64, 4), (16, 64, 4), (8, 64, 4),
                    (32, 32, 4), (64, 32, 4), (64, 16, 4), (128, 16, 4)])
INTERPRETER_CONFIG = triton.Config({"BLOCK_E": 64, "BLOCK_C": 4}, num_warps=4)


def heuristic(channels: int, contiguous: bool) -> triton.Config:
    """Up to 64 contiguous channels on a warp (1024 tile elements), else 128 entries x 4 channels."""
    if contiguous and channels >= 16:
        block_c = min(next_power_of_2(channels), 64)
        return triton.Config({"BLOCK_E": 1024 // block_c, "BLOCK_C": block_c}, num_warps=4)
    return triton.Config({"BLOCK_E": 128, "BLOCK_C": min(next_power_of_2(channels), 4)}, num_warps=4)


_segments_kernel = TunedKernel(
    "sorted_segments", _sum_segments_kernel, CONFIGS, heuristic, ["C", "SHIFT", "F64"], writes=("partial_ptr",),
    interpreter_config=INTERPRETER_CONFIG,
)
_runs_kernel = TunedKernel(
    "sorted_runs", _sum_runs_kernel, CONFIGS, heuristic, ["C", "F64"], writes=("dst_ptr",),
    interpreter_config=INTERPRETER_CONFIG,
)


def scatter_sorted(dst: torch.Tensor, s_dst_c: int, channels: int, keys: torch.Tensor, weights: torch.Tensor,
                   sources: torch.Tensor, src: torch.Tensor, s_src_c: int, destinations: int, key: str) -> None:
    """``dst[keys[i] + c * s_dst_c] = sum over entries i in sorted order of weights[i] * src[sources[i >> s] +
    c * s_src_c]`` for c < ``channels``, without atomics; ``dst`` zero-filled, each destination written once.

    ``keys`` [E] (``key_dtype``; -1: no destination), ``weights`` [E], ``sources`` [E >> s] int64 with E >> s
    dividing E into groups of 2**s consecutive entries; ``destinations`` bounds the distinct keys;
    ``key`` is the tuned-table key of the caller's shape.
    """
    entries = keys.numel()
    if entries == 0 or channels == 0:
        return
    shift = (entries // sources.numel()).bit_length() - 1
    runs = sorted_runs(keys, destinations)
    contiguous = s_dst_c == 1
    f64 = torch.float64 in (dst.dtype, src.dtype, weights.dtype)
    # Partial sums in the compute dtype, laid out as the destination's channels (rows of channels when
    # those are contiguous), so that both passes address them the way they address the destination.
    partial = torch.empty((runs.segments, channels) if contiguous else (channels, runs.segments),
                          dtype=torch.float64 if f64 else torch.float32, device=dst.device)
    sp_s, sp_c = (partial.stride(0), partial.stride(1)) if contiguous else (partial.stride(1), partial.stride(0))
    shape = dict(channels=channels, contiguous=contiguous)
    launch = _segments_kernel.choose("segments|" + key, shape, dst.device)
    even_c = channels % launch.most("BLOCK_C") == 0
    launch(
        lambda meta: (cdiv(entries, meta["BLOCK_E"]), cdiv(channels, meta["BLOCK_C"])),
        src_ptr=src, source_ptr=sources, weight_ptr=weights, sorted_key_ptr=runs.keys, order_ptr=runs.order,
        run_end_ptr=runs.run_end, segment_ptr=runs.segment, partial_ptr=partial, E=entries, C=channels,
        s_src_c=s_src_c, sp_s=sp_s, sp_c=sp_c, SHIFT=shift, CHUNK=CHUNK, F64=f64, EVEN_C=even_c,
    )
    launch = _runs_kernel.choose("runs|" + key, shape, dst.device)
    launch(
        lambda meta: (cdiv(entries, meta["BLOCK_E"]), cdiv(channels, meta["BLOCK_C"])),
        partial_ptr=partial, dst_ptr=dst, sorted_key_ptr=runs.keys, run_end_ptr=runs.run_end,
        segment_ptr=runs.segment, E=entries, C=channels, sp_s=sp_s, sp_c=sp_c, s_dst_c=s_dst_c,
        F64=f64, EVEN_C=channels % launch.most("BLOCK_C") == 0,
    )
