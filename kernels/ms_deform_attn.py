"""Multi-scale deformable attention (Deformable DETR): forward, backward and the tap list of the
deterministic backward, in one kernel.

For each query q, head m, level l and point p, a bilinear read of level l's value map at the
point's location, weighted by its attention weight, summed over levels and points:
``out[n, q, m, :] = sum_{l, p} a[n, q, m, l, p] * bilinear(V_l[n, :, m, :], loc[n, q, m, l, p])``.
The read is grid_sample's (zero padding, align_corners=False on the grid ``2 * loc - 1``), through
sampling.py's arithmetic, which is what every model's pure-PyTorch composition computes.

A program owns BLOCK_Q queries of one image and one head, and walks the head's D channels BLOCK_D
at a time. Tiles are ``[BLOCK_Q, BLOCK_D]``: the head's channels are contiguous in ``value``
``[N, S, M, D]`` (and in the output ``[N, Lq, M * D]``), so Triton sees them contiguous, puts a
warp's threads along them and loads each (query, corner) row with vector loads. The program owns
every point of its queries and head, so the gradients of the locations and weights are reductions
it makes alone (no atomics), the softmax of logits (SOFTMAX: DCNv4 / RT-DETRv2's flash variant)
is taken over all of a head's points in registers, and so is its backward.

Levels are read on the device: ``shapes_ptr`` ([L, 2] heights and widths), ``starts_ptr`` (each
level's first row of ``value``) and ``points_ptr`` ([L, 3]: each level's point count, its first
point in the locations' layout and its first among the head's TP points, the order of the gradient
buffers and the tap list), so no shape ever travels to the host. A location index
``l * sl_l + (first + p) * sl_p`` serves both layouts: ``[.., L, P, 2]`` (sl_l the level stride,
first 0) and RT-DETRv2's per-level counts ``[.., sum P_l, 2]`` (sl_l = 0, first the running sum).

With GRID the queries are the output pixels of a deformable convolution (DCNv3 / DCNv4: one level,
``value`` the input ``[N, H * W, G, D]``, a query per output pixel ``(q // WO, q % WO)``) and the
locations are its learnt offsets in pixels: point j reads ``origin + pixel * stride + tap_j + s *
offset_j`` (``taps_ptr`` holds each point's kernel tap ``s * (i * dilation - half)``, and ``s``, the
offset scale), as InternImage's and DCNv4's kernels compute it, in pixels with integer centres,
which is grid_sample's read at ``(x + 0.5) / W`` (zero padding, align_corners=False).

The loads that decide grad_value's atomic addresses (levels, locations, taps) stay in the kernel body:
torch.compile's mutation analysis counts a pointer passed to a helper as written when the
helper's result addresses a store (see transforms.py).
"""

import triton
import triton.language as tl

from stn_triton.kernels import codes
from stn_triton.kernels.sampling import BILINEAR, ZEROS, as_index, keep_indexable, source_coordinate, tap, to_compute

FORWARD = tl.constexpr(codes.FORWARD)
BACKWARD = tl.constexpr(codes.BACKWARD)
LIST_TAPS = tl.constexpr(codes.LIST_TAPS)

# Sizes that change between layers and never matter to the compiled code. D (a head's channels) is
# left to Triton's specialization: its divisibility by 16 is what makes the channel rows aligned.
SIZES = ["S", "LQ", "M", "L", "TP", "WO"]


@triton.jit
def softmax_weight(logit, row_max, row_sum, SOFTMAX: tl.constexpr):
    """An attention weight from its input: itself, or with SOFTMAX its share of the head's softmax."""
    if SOFTMAX:
        return tl.exp(logit - row_max) / row_sum
    else:
        return logit


@triton.jit
def pixel_point(loc_x, loc_y, W, H):
    """A location in [0, 1]^2 (x with the width) -> its pixel coordinates and d pixel / d location,
    as grid_sample reads the grid ``2 * loc - 1`` with zero padding and align_corners=False."""
    x, dx = source_coordinate(loc_x * 2 - 1, W, ZEROS, False)
    y, dy = source_coordinate(loc_y * 2 - 1, H, ZEROS, False)
    return x, y, dx * 2, dy * 2


@triton.jit
def point_pixels(loc_x, loc_y, tap_x, tap_y, scale, base_x, base_y, W, H, GRID: tl.constexpr):
    """A point's pixel coordinates and d pixel / d location: of a location in [0, 1]^2
    (``pixel_point``), or with GRID of an offset in pixels from the query's kernel tap."""
    if GRID:
        x = keep_indexable(base_x + tap_x + scale * loc_x)
        y = keep_indexable(base_y + tap_y + scale * loc_y)
        return x, y, scale, scale
    else:
        return pixel_point(loc_x, loc_y, W, H)


@triton.jit(do_not_specialize=SIZES)
def _ms_deform_attn_kernel(
    value_ptr,  # [N, S, M, D] values of every level, rows of level l from its start
    shapes_ptr,  # [L, 2] integer (H_l, W_l)
    starts_ptr,  # [L] integer: level l's first row of value
    points_ptr,  # [L, 3] int32: level l's point count, its first point in loc's layout, its first of the head's TP
    loc_ptr,  # locations (x, y) in [0, 1], [N, Lq, M, L, P, 2] or [N, Lq, M, TP, 2] (see the module)
    attn_ptr,  # attention weights (SOFTMAX: logits), [N, Lq, M, L, P] or [N, Lq, M, TP]
    y_ptr,  # FORWARD: [N, Lq, M * D] out
    gy_ptr,  # BACKWARD, LIST_TAPS: gradient of the output, any strides (0 included)
    gvalue_ptr,  # BACKWARD, VALUE_GRAD: zero-filled [N, S, M, D] contiguous, compute dtype, added atomically
    gloc_ptr,  # BACKWARD, LOC_GRAD: [N, Lq, M, TP, 2] out (strides below), compute dtype
    gattn_ptr,  # BACKWARD, ATTN_GRAD: [N, Lq, M, TP] contiguous out, compute dtype (SOFTMAX: of the logits)
    key_ptr,  # LIST_TAPS: [N, Lq, M, TP, 4] int32 or int64 out: offset in grad_value of each corner's row, -1 if it misses
    weight_ptr,  # LIST_TAPS: [N, Lq, M, TP, 4] out: the corner's weight (attention times bilinear)
    source_ptr,  # LIST_TAPS: [N, Lq, M, TP] int64 out: offset in gy of the query's head
    taps_ptr,  # GRID: [TP, 3] compute dtype: each point's kernel tap (x, y) times the offset scale, and the scale
    S, LQ, M, D, L, TP,  # value rows per image, queries, heads, channels per head, levels, points per head
    WO, grid_sh, grid_sw, grid_oy, grid_ox,  # GRID: output width, the convolution's strides and origin (half - pad)
    sv_n, sv_s, sv_m, sv_d,  # value strides
    ss_l, ss_c, sst_l,  # shapes and starts strides
    sl_n, sl_q, sl_m, sl_l, sl_p, sl_c,  # location strides (sl_l = 0 for per-level point counts)
    sa_n, sa_q, sa_m, sa_l, sa_p,  # attention weight strides (likewise)
    sy_n, sy_q, sy_c,  # output strides
    sgy_n, sgy_q, sgy_c,  # grad_output strides
    sgl_q, sgl_m,  # gloc_ptr's (image * LQ + query) and head strides (points contiguous)
    PASS: tl.constexpr,  # FORWARD, BACKWARD or LIST_TAPS
    SOFTMAX: tl.constexpr,  # attn_ptr holds logits: softmax over the head's TP points first
    GRID: tl.constexpr,  # a deformable convolution: locations are offsets from the output pixels' kernel taps
    PACKED: tl.constexpr,  # DCNv4's offset_mask: a head's TP weights follow its 2 * TP offsets, in gloc_ptr too
    VALUE_GRAD: tl.constexpr,  # BACKWARD: scatter into gvalue_ptr
    LOC_GRAD: tl.constexpr,  # BACKWARD: write gloc_ptr
    ATTN_GRAD: tl.constexpr,  # BACKWARD: write gattn_ptr
    F64: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # queries per program
    BLOCK_D: tl.constexpr,  # channels per step of the channel loop
    EVEN_D: tl.constexpr,  # D is whole BLOCK_D steps: no channel mask (vector access along D)
):
    blocks = tl.cdiv(LQ, BLOCK_Q)
    n = as_index(tl.program_id(0) // blocks, INDEX_64)
    q = as_index(tl.program_id(0) % blocks, INDEX_64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < LQ
    m = as_index(tl.program_id(1), INDEX_64)
    loc_rows = loc_ptr + n * sl_n + q * sl_q + m * sl_m
    attn_rows = attn_ptr + n * sa_n + q * sa_q + m * sa_m
    value_head = value_ptr + n * sv_n + m * sv_m
    heads = (n * LQ + q) * M + m  # the (image, query, head) row of the tap list
    loc_grads = gloc_ptr + (n * LQ + q) * sgl_q + m * sgl_m
    if PACKED:
        attn_grads = loc_grads + 2 * TP
    else:
        attn_grads = gattn_ptr + heads * TP
    base_x = to_compute(tl.zeros([BLOCK_Q], dtype=tl.float32), F64)  # GRID: the output pixel's first tap
    base_y = base_x
    if GRID:
        base_x += grid_ox + (q % WO) * grid_sw
        base_y += grid_oy + (q // WO) * grid_sh

    row_max = to_compute(tl.zeros([BLOCK_Q], dtype=tl.float32), F64)
    row_sum = row_max + 1
    if SOFTMAX:
        # The softmax over all of the head's points (every level), max-subtracted, in one online pass.
        row_sum = row_max
        row_max = row_max - float("inf")
        for level in range(0, L):
            for p in range(0, tl.load(points_ptr + 3 * level)):
                point = tl.load(points_ptr + 3 * level + 1) + p
                logit = to_compute(tl.load(attn_rows + level * sa_l + point * sa_p, mask=q_mask, other=0.0), F64)
                new_max = tl.maximum(row_max, logit)
                row_sum = row_sum * tl.exp(row_max - new_max) + tl.exp(logit - new_max)
                row_max = new_max

    if PASS == FORWARD:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = (d < D) | EVEN_D
            acc = to_compute(tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32), F64)
            for level in range(0, L):
                H = tl.load(shapes_ptr + level * ss_l)
                W = tl.load(shapes_ptr + level * ss_l + ss_c)
                start = tl.load(starts_ptr + level * sst_l)
                for p in range(0, tl.load(points_ptr + 3 * level)):
                    point = tl.load(points_ptr + 3 * level + 1) + p
                    j = tl.load(points_ptr + 3 * level + 2) + p
                    loc = loc_rows + level * sl_l + point * sl_p
                    tap_x, tap_y, scale = 0.0, 0.0, 1.0
                    if GRID:
                        tap_x, tap_y, scale = tl.load(taps_ptr + 3 * j), tl.load(taps_ptr + 3 * j + 1), tl.load(taps_ptr + 3 * j + 2)
                    x, y, _, _ = point_pixels(to_compute(tl.load(loc, mask=q_mask, other=0.0), F64),
                                              to_compute(tl.load(loc + sl_c, mask=q_mask, other=0.0), F64),
                                              tap_x, tap_y, scale, base_x, base_y, W, H, GRID)
                    a = softmax_weight(to_compute(tl.load(attn_rows + level * sa_l + point * sa_p, mask=q_mask,
                                                          other=0.0), F64), row_max, row_sum, SOFTMAX)
                    for t in tl.static_range(4):
                        xi, yi, _, inside, weight, _, _, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
                        row = as_index(start + yi * W + xi, INDEX_64)
                        mask = (q_mask & inside)[:, None] & d_mask[None, :]
                        v = tl.load(value_head + row[:, None] * sv_s + d[None, :] * sv_d, mask=mask, other=0.0)
                        acc += (a * weight)[:, None] * to_compute(v, F64)
            out = y_ptr + (n * sy_n + q * sy_q)[:, None] + ((m * D + d) * sy_c)[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])
    elif PASS == LIST_TAPS:
        heads64 = heads.to(tl.int64)
        source = n.to(tl.int64) * sgy_n + q.to(tl.int64) * sgy_q + m * D * sgy_c
        for level in range(0, L):
            H = tl.load(shapes_ptr + level * ss_l)
            W = tl.load(shapes_ptr + level * ss_l + ss_c)
            start = tl.load(starts_ptr + level * sst_l)
            for p in range(0, tl.load(points_ptr + 3 * level)):
                point = tl.load(points_ptr + 3 * level + 1) + p
                j = tl.load(points_ptr + 3 * level + 2) + p
                loc = loc_rows + level * sl_l + point * sl_p
                tap_x, tap_y, scale = 0.0, 0.0, 1.0
                if GRID:
                    tap_x, tap_y, scale = tl.load(taps_ptr + 3 * j), tl.load(taps_ptr + 3 * j + 1), tl.load(taps_ptr + 3 * j + 2)
                x, y, _, _ = point_pixels(to_compute(tl.load(loc, mask=q_mask, other=0.0), F64),
                                          to_compute(tl.load(loc + sl_c, mask=q_mask, other=0.0), F64),
                                          tap_x, tap_y, scale, base_x, base_y, W, H, GRID)
                a = softmax_weight(to_compute(tl.load(attn_rows + level * sa_l + point * sa_p, mask=q_mask,
                                                      other=0.0), F64), row_max, row_sum, SOFTMAX)
                read = heads64 * TP + j
                tl.store(source_ptr + read, source, mask=q_mask)
                for t in tl.static_range(4):
                    xi, yi, _, inside, weight, _, _, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
                    key = ((n.to(tl.int64) * S + (start + yi * W + xi)) * M + m) * D
                    tl.store(key_ptr + read * 4 + t, tl.where(inside, key, -1).to(key_ptr.dtype.element_ty), mask=q_mask)
                    tl.store(weight_ptr + read * 4 + t, (a * weight).to(weight_ptr.dtype.element_ty), mask=q_mask)
    else:
        gy_rows = gy_ptr + n * sgy_n + q * sgy_q
        gvalue_head = gvalue_ptr + (n * S * M + m) * D
        dot = to_compute(tl.zeros([BLOCK_Q], dtype=tl.float32), F64)  # sum over points of weight * its gradient
        for level in range(0, L):
            H = tl.load(shapes_ptr + level * ss_l)
            W = tl.load(shapes_ptr + level * ss_l + ss_c)
            start = tl.load(starts_ptr + level * sst_l)
            for p in range(0, tl.load(points_ptr + 3 * level)):
                point = tl.load(points_ptr + 3 * level + 1) + p
                j = tl.load(points_ptr + 3 * level + 2) + p
                loc = loc_rows + level * sl_l + point * sl_p
                tap_x, tap_y, scale = 0.0, 0.0, 1.0
                if GRID:
                    tap_x, tap_y, scale = tl.load(taps_ptr + 3 * j), tl.load(taps_ptr + 3 * j + 1), tl.load(taps_ptr + 3 * j + 2)
                x, y, dx_dloc, dy_dloc = point_pixels(to_compute(tl.load(loc, mask=q_mask, other=0.0), F64),
                                                      to_compute(tl.load(loc + sl_c, mask=q_mask, other=0.0), F64),
                                                      tap_x, tap_y, scale, base_x, base_y, W, H, GRID)
                a = softmax_weight(to_compute(tl.load(attn_rows + level * sa_l + point * sa_p, mask=q_mask,
                                                      other=0.0), F64), row_max, row_sum, SOFTMAX)
                # d loss / d (sample, x, y) of this point, per element first and reduced once per point.
                g_sample = to_compute(tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32), F64)
                g_x = g_sample
                g_y = g_sample
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_mask = (d < D) | EVEN_D
                    tile_mask = q_mask[:, None] & d_mask[None, :]
                    grad_y = to_compute(tl.load(gy_rows[:, None] + ((m * D + d) * sgy_c)[None, :], mask=tile_mask,
                                                other=0.0), F64)
                    for t in tl.static_range(4):
                        xi, yi, _, inside, weight, dwx, dwy, _ = tap(t, x, y, x, W, H, 1, BILINEAR, ZEROS, False, 2)
                        row = as_index(start + yi * W + xi, INDEX_64)
                        mask = tile_mask & inside[:, None]
                        if VALUE_GRAD:
                            tl.atomic_add(gvalue_head + (row * M * D)[:, None] + d[None, :],
                                          ((a * weight)[:, None] * grad_y).to(gvalue_ptr.dtype.element_ty),
                                          mask=mask, sem="relaxed")
                        if LOC_GRAD or ATTN_GRAD:
                            v = tl.load(value_head + row[:, None] * sv_s + d[None, :] * sv_d, mask=mask, other=0.0)
                            v_grad = to_compute(v, F64) * grad_y
                            g_sample += weight[:, None] * v_grad
                            g_x += dwx[:, None] * v_grad
                            g_y += dwy[:, None] * v_grad
                if LOC_GRAD:
                    tl.store(loc_grads + j * 2, a * dx_dloc * tl.sum(g_x, axis=1), mask=q_mask)
                    tl.store(loc_grads + j * 2 + 1, a * dy_dloc * tl.sum(g_y, axis=1), mask=q_mask)
                if ATTN_GRAD:
                    g_a = tl.sum(g_sample, axis=1)
                    tl.store(attn_grads + j, g_a, mask=q_mask)
                    dot += a * g_a
        if ATTN_GRAD and SOFTMAX:
            # Through the softmax: d/d logit_j = a_j (g_j - sum_k a_k g_k), from the weights' gradients
            # stored above (by other threads of this program: the barrier orders them).
            tl.debug_barrier()
            for level in range(0, L):
                for p in range(0, tl.load(points_ptr + 3 * level)):
                    point = tl.load(points_ptr + 3 * level + 1) + p
                    j = tl.load(points_ptr + 3 * level + 2) + p
                    a = softmax_weight(to_compute(tl.load(attn_rows + level * sa_l + point * sa_p, mask=q_mask,
                                                          other=0.0), F64), row_max, row_sum, SOFTMAX)
                    g_a = tl.load(attn_grads + j, mask=q_mask, other=0.0)
                    tl.store(attn_grads + j, a * (g_a - dot), mask=q_mask)
