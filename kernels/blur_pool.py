"""Anti-aliased downsampling (Zhang, ICML 2019): an optional max over a window at stride 1, a binomial
blur, then the stride, forward and backward, one kernel each.

The max map ``m[r, c] = max(x[r:r + MH, c:c + MW])`` (``MH = MW = 1``: the input itself, which is
blur_pool2d) has ``HM = H - MH + 1`` rows and ``WM = W - MW + 1`` columns; output pixel (oh, ow)
is ``sum_i sum_j a_i b_j m[pad(oh * SH + i - PT), pad(ow * SW + j - PL)]`` over the ``KH x KW``
taps, with the binomial weights ``a_i = C(KH - 1, i) / 2^(KH - 1)`` (likewise b_j), ``PT = (KH -
1) // 2`` rows of padding before and ``KH // 2`` after (kornia's and antialiased-cnns' amounts),
and ``pad`` the padding mode: zeros (a tap outside reads 0), reflect (PyTorch's reflection pad:
index -1 reads 1) or replicate (the edge row). Max windows follow F.max_pool2d: a NaN wins, and
of equal values the first in row-major order does (the gradient goes there).

``_blur_pool_kernel`` owns a ``[BLOCK_C, BLOCK_P]`` tile of one image's output (BLOCK_P output
pixels in row-major order, BLOCK_C channels) and computes it in registers: the max windows, the
taps and the stride, with only the strided output written; no padded or max-pooled copy exists.
An output's taps read max-map rows (columns) that lie, after the padding folds them, in K
consecutive ones (``footprint``), so its windows read a ``(KH + MH - 1) x (KW + MW - 1)`` block of
the input: each element of that block is loaded once and the windows' maxima are taken from the
registers (16 loads for a 3-tap blur over 2 x 2 maxima, not 9 x 4), and each of the K x K map
elements is weighted by the taps that read it (``tap_weights``, as the backward does).
Tiles are gathered as sampling.py gathers, so a warp runs along the pixels on NCHW memory and
along the channels on channels_last memory. With ROUTE it returns, in place of each window's
maximum, the value of a second tensor at the window's argmax: the blur of ``d`` routed through
x's argmaxes, which is the forward-mode tangent and the backward's own gradient.

``_blur_pool_bwd_kernel`` is the gather form of the backward: a program owns a tile of input
pixels and each pixel sums, in a fixed order, the gradient of every max window holding it whose
argmax (recomputed from x) it is; a window's gradient is in turn gathered from the output
pixels whose taps read it, with the weights summed over every tap that the padding maps onto it.
The windows share their reads: a pixel loads the ``(2 MH - 1) x (2 MW - 1)`` input block of its
windows and the grad_output block of all their outputs once each (9 + 9 loads for a 3-tap blur
over 2 x 2 maxima, where each window read its own 4 + 4).
Every element of grad_input is written once: no atomics, bitwise the same on every run.
"""

import triton
import triton.language as tl

from stn_triton.kernels import codes
from stn_triton.kernels.sampling import as_index, gather, scatter, to_compute

ZEROS = tl.constexpr(codes.ZEROS)
REPLICATE = tl.constexpr(codes.BORDER)
REFLECT = tl.constexpr(codes.REFLECTION)

SIZES = ["N", "C", "H", "W", "OH", "OW"]


@triton.jit
def padded(q, size, PADDING: tl.constexpr):
    """Index q of the padded axis -> (index into [0, size) it reads, whether it reads at all).

    Zeros padding leaves q as it is (the caller masks the reads); reflect and replicate fold it in
    (valid for q within one size of the axis, which the host's checks of the padding guarantee)."""
    if PADDING == REFLECT:
        q = tl.where(q < 0, -q, q)
        q = tl.where(q >= size, 2 * (size - 1) - q, q)
    elif PADDING == REPLICATE:
        q = tl.minimum(tl.maximum(q, 0), size - 1)
    return q, (q >= 0) & (q < size)


@triton.jit
def tap_weights(o, r, size, S: tl.constexpr, K: tl.constexpr, PADDING: tl.constexpr):
    """The summed unnormalized weight of the taps of output index ``o`` that read index ``r`` of an
    axis of ``size`` (every tap the padding maps onto r)."""
    weight = r * 0.0
    a = 1.0
    for i in tl.static_range(K):
        q, _ = padded(o * S + (i - (K - 1) // 2), size, PADDING)
        weight += tl.where(q == r, a, 0.0)
        a = a * (K - 1 - i) / (i + 1)
    return weight


@triton.jit
def program_tile(ROWS, COLS, C, INDEX_64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's image n, BLOCK_P pixels (row, column) of a ROWS x COLS map in row-major order
    with their mask, and BLOCK_C channels with theirs: program_id(0) walks the images' pixel tiles,
    program_id(1) the channel blocks."""
    tiles = tl.cdiv(ROWS * COLS, BLOCK_P)
    n = as_index(tl.program_id(0) // tiles, INDEX_64)
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = as_index(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), INDEX_64)
    return n, p // COLS, p % COLS, p < ROWS * COLS, c, c < C


@triton.jit
def footprint(o, size, S: tl.constexpr, K: tl.constexpr, PADDING: tl.constexpr):
    """The first of K consecutive max-map indices [P] that hold every tap of output index o [P] on
    an axis of ``size``. The taps start at ``o * S - (K - 1) // 2``, and with zeros padding tap i is
    that start + i (the compiler then sees which tap each index is). Reflection can fold a tap near
    the far edge back below the start (one index below for an even K), so there the block ends at
    ``size - 1``; it still holds every tap, as a folded index lies in [0, size) and no later than
    start + K - 1."""
    start = o * S - (K - 1) // 2
    if PADDING != ZEROS:
        start = tl.minimum(start, size - K)
    return start


@triton.jit
def window_max(xs, ds, e: tl.constexpr, f: tl.constexpr, FW: tl.constexpr,
               MH: tl.constexpr, MW: tl.constexpr, ROUTE: tl.constexpr):
    """The max of the ``MH x MW`` window whose top-left is element (e, f) of the input block ``xs``
    (a tuple of [C, P] values in row-major order, FW a row); with ROUTE, ``ds``'s value at the
    argmax instead. F.max_pool2d's rules: NaN wins, the first of equal values in row-major order."""
    best = xs[e * FW + f]
    picked = best
    if ROUTE:
        picked = ds[e * FW + f]
    for u in tl.static_range(MH):
        for v in tl.static_range(MW):
            if u + v > 0:
                value = xs[(e + u) * FW + f + v]
                take = (value > best) | (value != value)
                best = tl.where(take, value, best)
                if ROUTE:
                    picked = tl.where(take, ds[(e + u) * FW + f + v], picked)
    if ROUTE:
        return picked
    else:
        return best


@triton.jit(do_not_specialize=SIZES)
def _blur_pool_kernel(
    x_ptr,  # [N, C, H, W] input (any strides)
    d_ptr,  # [N, C, H, W] ROUTE: the values routed through x's argmaxes (any strides); else unused
    y_ptr,  # [N, C, OH, OW] out (any strides)
    N, C, H, W,  # input size
    OH, OW,  # output size: floor((H - MH) / SH) + 1 by floor((W - MW) / SW) + 1
    sx_n, sx_c, sx_h, sx_w,  # input strides
    sd_n, sd_c, sd_h, sd_w,  # routed tensor's strides
    sy_n, sy_c, sy_h, sy_w,  # output strides
    KH: tl.constexpr, KW: tl.constexpr,  # blur taps a column, a row
    SH: tl.constexpr, SW: tl.constexpr,  # the stride
    MH: tl.constexpr, MW: tl.constexpr,  # the max window (1 x 1: no max)
    PADDING: tl.constexpr,  # codes.ZEROS, codes.REFLECTION (reflect) or codes.BORDER (replicate)
    ROUTE: tl.constexpr,  # read d at x's argmaxes instead of x's maxima
    F64: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n, oh, ow, p_mask, c, c_mask = program_tile(OH, OW, C, INDEX_64, BLOCK_C, BLOCK_P)
    HM = H - MH + 1
    WM = W - MW + 1
    x_c = x_ptr + n * sx_n + c * sx_c
    d_c = d_ptr + n * sd_n + c * sd_c
    top = footprint(oh, HM, SH, KH, PADDING)
    left = footprint(ow, WM, SW, KW, PADDING)
    # The input block the windows read, each element once (x's, and with ROUTE d's).
    FW: tl.constexpr = KW + MW - 1
    xs = ()
    ds = ()
    for r in tl.static_range(KH + MH - 1):
        row = top + r
        for q in tl.static_range(FW):
            col = left + q
            reads = c_mask[:, None] & (p_mask & (row >= 0) & (row < H) & (col >= 0) & (col < W))[None, :]
            xs = xs + (to_compute(gather(x_c, row * sx_h + col * sx_w, reads), F64),)
            if ROUTE:
                ds = ds + (to_compute(gather(d_c, row * sd_h + col * sd_w, reads), F64),)
    acc = to_compute(tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32), F64)
    for e in tl.static_range(KH):
        # Map element (top + e, left + f), weighted by the summed unnormalized weights of the taps
        # that read it (integers, exact).
        rows = top + e
        wy = tl.where((rows >= 0) & (rows < HM), tap_weights(oh, rows, HM, SH, KH, PADDING), 0.0)
        for f in tl.static_range(KW):
            cols = left + f
            wx = tl.where((cols >= 0) & (cols < WM), tap_weights(ow, cols, WM, SW, KW, PADDING), 0.0)
            w = to_compute(wy, F64) * to_compute(wx, F64)
            # A map element no tap reads adds nothing (not 0 x its value, which is NaN for a NaN).
            mask = c_mask[:, None] & (p_mask & (w != 0))[None, :]
            acc += tl.where(mask, window_max(xs, ds, e, f, FW, MH, MW, ROUTE), 0.0) * w[None, :]
    # The binomial rows sum to 2^(K - 1): one exact power-of-two scale normalizes the weights.
    acc = acc * (1.0 / (2 ** (KH - 1) * 2 ** (KW - 1)))
    y_c = y_ptr + n * sy_n + c * sy_c
    out_mask = c_mask[:, None] & p_mask[None, :]
    scatter(y_c, oh * sy_h + ow * sy_w, acc.to(y_ptr.dtype.element_ty), out_mask)


@triton.jit(do_not_specialize=SIZES)
def _blur_pool_bwd_kernel(
    x_ptr,  # [N, C, H, W] input (any strides): the max windows' argmaxes are recomputed from it
    gy_ptr,  # [N, C, OH, OW] grad_output (any strides, stride 0 too)
    gx_ptr,  # [N, C, H, W] out: grad_input (any strides)
    N, C, H, W,  # input size
    OH, OW,  # output size
    sx_n, sx_c, sx_h, sx_w,  # input strides
    sg_n, sg_c, sg_h, sg_w,  # grad_output strides
    sgx_n, sgx_c, sgx_h, sgx_w,  # grad_input strides
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, MH: tl.constexpr, MW: tl.constexpr,
    PADDING: tl.constexpr,  # as the forward's
    TH: tl.constexpr, TW: tl.constexpr,  # output rows (columns) whose taps can read one max-map row (column)
    LIFT_H: tl.constexpr, LIFT_W: tl.constexpr,  # 1 where reflection folds a row onto the next output row up
    F64: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n, r, col, p_mask, c, c_mask = program_tile(H, W, C, INDEX_64, BLOCK_C, BLOCK_P)
    HM = H - MH + 1
    WM = W - MW + 1
    x_c = x_ptr + n * sx_n + c * sx_c
    gy_c = gy_ptr + n * sg_n + c * sg_c
    # The input block of every max window holding this pixel, each element loaded once, with each
    # element's index in it (the windows' argmaxes are taken from the registers as the forward's).
    FW: tl.constexpr = 2 * MW - 1
    xs = ()
    ids = ()
    if MH * MW > 1:
        for u in tl.static_range(2 * MH - 1):
            row = r - (MH - 1) + u
            for v in tl.static_range(FW):
                cl = col - (MW - 1) + v
                reads = c_mask[:, None] & (p_mask & (row >= 0) & (row < H) & (cl >= 0) & (cl < W))[None, :]
                xs = xs + (to_compute(gather(x_c, row * sx_h + cl * sx_w, reads), F64),)
                ids = ids + (tl.full([BLOCK_C, BLOCK_P], u * FW + v, tl.int32),)
    # grad_output of every output pixel whose taps can read one of those windows' map elements, each
    # loaded once: the TH x TW outputs of the window at (r, col) and, as windows further up (left)
    # reach ceil((M - 1) / S) output rows (columns) higher, those above (left of) them.
    UH: tl.constexpr = TH + (MH + SH - 2) // SH
    UW: tl.constexpr = TW + (MW + SW - 2) // SW
    top = (r + (KH - 1) // 2) // SH + LIFT_H
    left = (col + (KW - 1) // 2) // SW + LIFT_W
    gys = ()
    for t in tl.static_range(UH):
        oh = top - t
        for s in tl.static_range(UW):
            ow = left - s
            reads = c_mask[:, None] & (p_mask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW))[None, :]
            gys = gys + (to_compute(gather(gy_c, oh * sg_h + ow * sg_w, reads), F64),)
    acc = to_compute(tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32), F64)
    for a in tl.static_range(MH):
        # The window with top-left (r - a, col - b) holds this pixel at (a, b).
        wr = r - a
        valid_r = (wr >= 0) & (wr < HM)
        for b in tl.static_range(MW):
            wc = col - b
            valid_c = (wc >= 0) & (wc < WM)
            hit = c_mask[:, None] & (p_mask & valid_r & valid_c)[None, :]
            if MH * MW > 1:
                arg = window_max(xs, ids, MH - 1 - a, MW - 1 - b, FW, MH, MW, True)
                hit = hit & (arg == (MH - 1) * FW + MW - 1)
            # The window's map element's gradient: grad_output weighted by the summed unnormalized
            # weights of the taps that read it (0 for the outputs none of whose taps does).
            total = to_compute(tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32), F64)
            for t in tl.static_range(UH):
                oh = top - t
                wy = tl.where(valid_r & (oh >= 0) & (oh < OH), tap_weights(oh, wr, HM, SH, KH, PADDING), 0.0)
                for s in tl.static_range(UW):
                    ow = left - s
                    wx = tl.where(valid_c & (ow >= 0) & (ow < OW), tap_weights(ow, wc, WM, SW, KW, PADDING), 0.0)
                    w = to_compute(wy * wx, F64)
                    # An output no tap of which reads the element adds nothing (not 0 x a NaN).
                    total += tl.where((w != 0)[None, :], gys[t * UW + s] * w[None, :], 0.0)
            acc += tl.where(hit, total, 0.0)
    acc = acc * (1.0 / (2 ** (KH - 1) * 2 ** (KW - 1)))
    gx_c = gx_ptr + n * sgx_n + c * sgx_c
    scatter(gx_c, r * sgx_h + col * sgx_w, acc.to(gx_ptr.dtype.element_ty), c_mask[:, None] & p_mask[None, :])
