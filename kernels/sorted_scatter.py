"""The atomic-free scatter of the deterministic backwards: a sorted list of contributions summed in a
fixed order, in two passes.

A backward whose gradient is a scatter (many outputs read one input element: grid_sample's
grad_input, deformable convolution's, multi-scale deformable attention's grad_value) lists every
contribution as an entry: the destination it adds to (``key``: the offset of the destination's
first channel, -1 for a read that touched nothing), a weight, and where its values come from
(``source``: the offset of the first channel in ``src``, shared by ``2**SHIFT`` consecutive
entries). A stable sort of the keys groups each destination's entries into one run, in an order
fixed by the list; the kernels below then add each run in that order, so the result has the same
bits on every run (no atomics).

A run can be long (with border padding or a zoom, one input pixel collects thousands of taps), so
it is summed in fixed chunks: the sorted list is cut every CHUNK positions, each piece of a run
between cuts is a segment, ``_sum_segments_kernel`` lets the segment's first entry add its at most
CHUNK entries into a row of partial sums (``segment`` numbers them, a cumulative sum on the host),
and ``_sum_runs_kernel`` lets a run's first entry add its segments' rows, in order, and store the
destination once. Tiles are ``[BLOCK_C, BLOCK_E]`` (channels, entries), addressed with
sampling.py's gather and scatter, so a warp runs along the entries when the channels are strided
(NCHW) and along the channels when they are contiguous.
"""

import triton
import triton.language as tl

from stn_triton.kernels.sampling import gather, scatter, to_compute


@triton.jit
def run_starts(key, previous, e):
    """Which sorted positions ``e`` start a run of equal keys (``previous``: the key at e - 1, -1 at 0);
    -1 marks entries that touch nothing and masked positions, which start none."""
    return (key >= 0) & ((key != previous) | (e == 0))


@triton.jit(do_not_specialize=["E", "C"])
def _sum_segments_kernel(
    src_ptr,  # values the entries read: element source[entry >> SHIFT] + c * s_src_c
    source_ptr,  # [E >> SHIFT] int64: offset in src of each group of 2**SHIFT consecutive entries
    weight_ptr,  # [E] weight of each entry (unsorted order)
    sorted_key_ptr,  # [E] int32 or int64 keys sorted ascending (stable), -1 first
    order_ptr,  # [E] int64: position of each sorted key in the unsorted list
    run_end_ptr,  # [E] int64: one past the last sorted position holding the same key
    segment_ptr,  # [E] int64: the row of partial sums of the segment each sorted position belongs to
    partial_ptr,  # [segments, C] out (strides sp_s, sp_c): each segment's sum, compute dtype
    E, C,  # entries, channels per destination
    s_src_c,  # channel stride of src
    sp_s, sp_c,  # partial strides (segment, channel)
    SHIFT: tl.constexpr,  # log2 of the entries that share one source
    CHUNK: tl.constexpr,  # the sorted list is cut every CHUNK positions (a power of two)
    F64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
    EVEN_C: tl.constexpr,  # C is whole BLOCK_C steps: no channel mask
):
    """Each segment's first position sums the segment's at most CHUNK entries, in sorted order."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    key = tl.load(sorted_key_ptr + e, mask=e_mask, other=-1)
    previous = tl.load(sorted_key_ptr + e - 1, mask=e_mask & (e > 0), other=-1)
    starts = run_starts(key, previous, e) | ((key >= 0) & (e % CHUNK == 0))
    run_end = tl.load(run_end_ptr + e, mask=starts, other=0)
    end = tl.minimum(run_end, (e // CHUNK + 1) * CHUNK)
    longest = tl.max(tl.where(starts, end - e, 0), axis=0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = (c < C) | EVEN_C
    acc = to_compute(tl.zeros([BLOCK_C, BLOCK_E], dtype=tl.float32), F64)
    for j in range(0, longest):
        entry_mask = starts & (e + j < end)
        entry = tl.load(order_ptr + e + j, mask=entry_mask, other=0)
        weight = to_compute(tl.load(weight_ptr + entry, mask=entry_mask, other=0.0), F64)
        source = tl.load(source_ptr + (entry >> SHIFT), mask=entry_mask, other=0)
        values = gather(c * s_src_c, src_ptr + source, c_mask[:, None] & entry_mask[None, :])
        acc += to_compute(values, F64) * weight[None, :]
    segment = tl.load(segment_ptr + e, mask=starts, other=0)
    scatter(c * sp_c, partial_ptr + segment * sp_s, acc, c_mask[:, None] & starts[None, :])


@triton.jit(do_not_specialize=["E", "C"])
def _sum_runs_kernel(
    partial_ptr,  # [segments, C] each segment's sum (strides sp_s, sp_c)
    dst_ptr,  # destination: element key + c * s_dst_c, each written once (zero-filled beforehand)
    sorted_key_ptr, run_end_ptr, segment_ptr,  # as in _sum_segments_kernel
    E, C,
    sp_s, sp_c,
    s_dst_c,  # channel stride of dst
    F64: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Each run's first position adds its segments' sums in order and stores its destination."""
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    key = tl.load(sorted_key_ptr + e, mask=e_mask, other=-1)
    first = run_starts(key, tl.load(sorted_key_ptr + e - 1, mask=e_mask & (e > 0), other=-1), e)
    run_end = tl.load(run_end_ptr + e, mask=first, other=1)
    first_segment = tl.load(segment_ptr + e, mask=first, other=0)
    last_segment = tl.load(segment_ptr + run_end - 1, mask=first, other=0)
    longest = tl.max(tl.where(first, last_segment - first_segment + 1, 0), axis=0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = (c < C) | EVEN_C
    acc = to_compute(tl.zeros([BLOCK_C, BLOCK_E], dtype=tl.float32), F64)
    for j in range(0, longest):
        segment_mask = first & (first_segment + j <= last_segment)
        acc += to_compute(gather(c * sp_c, partial_ptr + (first_segment + j) * sp_s,
                                 c_mask[:, None] & segment_mask[None, :]), F64)
    scatter(c * s_dst_c, dst_ptr + tl.where(first, key, 0), acc.to(dst_ptr.dtype.element_ty),
            c_mask[:, None] & first[None, :])
