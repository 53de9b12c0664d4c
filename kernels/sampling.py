"""Shared sampling arithmetic: every op maps coordinates and weighs taps through these helpers.

The rules are PyTorch's (ATen's GridSampler.cuh): a normalized coordinate in [-1, 1] is
unnormalized to pixel units, folded by the padding mode, and then pushed out of the image when it
is non-finite or too large to index, so that no caller ever builds an out-of-bounds address.
Each helper also returns the derivative of its result with respect to its input, which the
backward kernels chain; the forward kernels simply never use it.
"""

import triton
import triton.language as tl

from stn_triton.kernels import codes

BILINEAR = tl.constexpr(codes.BILINEAR)
NEAREST = tl.constexpr(codes.NEAREST)
BICUBIC = tl.constexpr(codes.BICUBIC)

ZEROS = tl.constexpr(codes.ZEROS)
BORDER = tl.constexpr(codes.BORDER)
REFLECTION = tl.constexpr(codes.REFLECTION)

# |coordinate| beyond this is replaced by OUTSIDE: it cannot be a valid pixel of any side that
# indexes in int32, and 2^31 - 128 is exact in float32 so floor() + 1 still fits in an int32.
COORD_LIMIT = tl.constexpr(2147483520.0)
# A coordinate far enough outside every image that all its taps, bicubic included, miss.
OUTSIDE = tl.constexpr(-100.0)
# The cubic convolution constant of PyTorch (and of Keys' kernel as used by OpenCV).
CUBIC_A = tl.constexpr(-0.75)

# Which way Triton runs a warp over a gather: a 2-D access whose addresses it can prove contiguous
# along no dimension. Its coalescing pass then breaks the tie by dimension: the first up to 3.6,
# the last from 3.7 (compiled for sm_90 with 3.6, 3.7, 3.8 and 3.9: perf/resources.py's
# warp_layout column). A gather from NCHW memory wants its warps along the pixels (neighbouring
# output pixels read neighbouring input pixels), so the helpers below address the tile with the
# pixels in whichever dimension wins the tie, and hand back [channels, pixels] either way.
TIES_GO_FIRST = tl.constexpr(tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 7))


@triton.jit
def to_compute(x, F64: tl.constexpr):
    """Cast to the arithmetic dtype: float64 for float64 tensors, float32 for everything else."""
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def as_index(x, INDEX_64: tl.constexpr):
    """Widen an integer index to int64 when the tensors need 64-bit offsets."""
    if INDEX_64:
        return x.to(tl.int64)
    else:
        return x


@triton.jit
def program_channels(C, SPLITS, BLOCK_C: tl.constexpr):
    """This program's channel range [begin, end): split program_id(1) of SPLITS, whole BLOCK_C chunks."""
    per_split = tl.cdiv(tl.cdiv(C, SPLITS), BLOCK_C) * BLOCK_C
    begin = tl.program_id(1) * per_split
    return begin, tl.minimum(begin + per_split, C)


@triton.jit
def unravel_pixel(p, OD, OH, OW):
    """Flat output pixel index -> (n, d, h, w) for an output of spatial size OD x OH x OW."""
    w = p % OW
    rest = p // OW
    h = rest % OH
    rest = rest // OH
    return rest // OD, rest % OD, h, w


@triton.jit
def unnormalize(coord, size, ALIGN_CORNERS: tl.constexpr):
    """[-1, 1] -> pixel units; returns (pixel coordinate, d pixel / d coord).

    align_corners=True puts -1 and 1 on the centres of the corner pixels, False on their outer edges.
    """
    size_f = size * 1.0
    if ALIGN_CORNERS:
        return ((coord + 1) / 2) * (size_f - 1), coord * 0 + (size_f - 1) / 2
    else:
        return ((coord + 1) * size_f - 1) / 2, coord * 0 + size_f / 2


@triton.jit
def clip(x, size):
    """Clamp to [0, size - 1]; returns (clamped, derivative). NaN maps to 0 as fmaxf does on CUDA."""
    hi = size * 1.0 - 1
    inside = (x > 0) & (x < hi)
    clamped = tl.where(x > 0, x, 0.0)
    clamped = tl.where(clamped < hi, clamped, hi)
    return clamped, tl.where(inside, 1.0, 0.0)


@triton.jit
def reflect(x, twice_low, twice_high):
    """Reflect x off the bounds twice_low / 2 and twice_high / 2; returns (reflected, derivative)."""
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    degenerate = span == 0
    safe_span = tl.where(degenerate, 1.0, span)
    shifted = x - low
    sign = tl.where(shifted < 0, -1.0, 1.0)
    dist = tl.abs(shifted)
    extra = dist % safe_span
    flips = tl.floor(dist / safe_span)
    even = (flips - 2 * tl.floor(flips / 2)) == 0
    out = tl.where(even, extra + low, safe_span - extra + low)
    grad = tl.where(even, sign, -sign)
    return tl.where(degenerate, 0.0, out), tl.where(degenerate, 0.0, grad)


@triton.jit
def keep_indexable(x):
    """Send non-finite or huge coordinates to OUTSIDE, where every tap misses the image."""
    bad = (x != x) | (x > COORD_LIMIT) | (x < -COORD_LIMIT)
    return tl.where(bad, OUTSIDE, x)


@triton.jit
def apply_padding(x, size, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    """Fold a pixel coordinate by the padding mode; returns (coordinate, derivative)."""
    grad = x * 0 + 1.0
    if PADDING == BORDER:
        x, grad = clip(x, size)
    elif PADDING == REFLECTION:
        if ALIGN_CORNERS:
            x, grad = reflect(x, 0.0, 2.0 * (size - 1))
        else:
            x, grad = reflect(x, -1.0, 2.0 * size - 1)
        x, grad_clip = clip(x, size)
        grad = grad * grad_clip
    return keep_indexable(x), grad


@triton.jit
def source_coordinate(coord, size, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    """Normalized coordinate -> padded pixel coordinate for bilinear and nearest sampling.

    Returns (pixel coordinate, d pixel / d coord).
    """
    x, grad = unnormalize(coord, size, ALIGN_CORNERS)
    x, grad_pad = apply_padding(x, size, PADDING, ALIGN_CORNERS)
    return x, grad * grad_pad


@triton.jit
def linear_taps(x):
    """The two taps of linear interpolation at pixel coordinate x.

    Returns (x0, w0, w1): tap x0 has weight w0, tap x0 + 1 weight w1 (PyTorch's arithmetic);
    dw0/dx = -1 and dw1/dx = 1.
    """
    x0 = tl.floor(x)
    return x0, (x0 + 1) - x, x - x0


@triton.jit
def nearest_tap(x):
    """The nearest pixel to x, ties to even (nearbyint), computed exactly from floor and fraction."""
    lo = tl.floor(x)
    frac = x - lo
    odd = (lo - 2 * tl.floor(lo / 2)) != 0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, lo + 1, lo)


@triton.jit
def cubic_weight(t, K: tl.constexpr):
    """Weight of tap K (at floor(x) - 1 + K) of the cubic convolution for fraction t in [0, 1)."""
    # Tensors stay on the left of constexpr operands: the interpreter keeps `constexpr * tensor`
    # wrapped as a constexpr.
    if K == 0:
        s = t + 1.0
        return ((s * CUBIC_A - 5 * CUBIC_A) * s + 8 * CUBIC_A) * s - 4 * CUBIC_A
    elif K == 1:
        return (t * (CUBIC_A + 2) - (CUBIC_A + 3)) * t * t + 1
    elif K == 2:
        s = 1.0 - t
        return (s * (CUBIC_A + 2) - (CUBIC_A + 3)) * s * s + 1
    else:
        s = (1.0 - t) + 1.0
        return ((s * CUBIC_A - 5 * CUBIC_A) * s + 8 * CUBIC_A) * s - 4 * CUBIC_A


@triton.jit
def cubic_weight_grad(t, K: tl.constexpr):
    """d cubic_weight(t, K) / dt."""
    if K == 0:
        s = t + 1.0
        return (s * (3 * CUBIC_A) - 10 * CUBIC_A) * s + 8 * CUBIC_A
    elif K == 1:
        return (t * (3 * (CUBIC_A + 2)) - 2 * (CUBIC_A + 3)) * t
    elif K == 2:
        s = 1.0 - t
        return -((s * (3 * (CUBIC_A + 2)) - 2 * (CUBIC_A + 3)) * s)
    else:
        s = 2.0 - t
        return -((s * (3 * CUBIC_A) - 10 * CUBIC_A) * s + 8 * CUBIC_A)


@triton.jit
def in_bounds(x, size):
    """Integer pixel index of a floor-ed coordinate and whether it lies in [0, size).

    The index is forced to 0 outside, so that pointer arithmetic never leaves the tensor.
    """
    inside = (x >= 0) & (x < size * 1.0)
    return tl.where(inside, x, 0.0).to(tl.int32), inside


@triton.jit
def sample_point(coord, size, MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    """Normalized coordinate along one axis -> the point its taps are laid around.

    Bilinear and nearest fold the point itself by the padding mode; bicubic folds each of its four
    taps instead (as PyTorch does), so its point stays unpadded, only made safe to floor.
    Returns (pixel coordinate, d pixel / d coord).
    """
    if MODE == BICUBIC:
        x, grad = unnormalize(coord, size, ALIGN_CORNERS)
        safe = keep_indexable(x)
        return safe, tl.where(safe == x, grad, 0.0)
    else:
        return source_coordinate(coord, size, PADDING, ALIGN_CORNERS)


@triton.jit
def axis_tap(x, K: tl.constexpr, size, MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    """Tap K along one axis around point x.

    Returns (index, inside, weight, d weight / dx); index is 0 where the tap misses the image,
    so it is always safe to address with, and inside says whether the tap reads anything.
    """
    if MODE == NEAREST:
        index, inside = in_bounds(nearest_tap(x), size)
        return index, inside, x * 0 + 1.0, x * 0
    elif MODE == BICUBIC:
        x0 = tl.floor(x)
        t = x - x0
        folded, _ = apply_padding(x0 + (K - 1), size, PADDING, ALIGN_CORNERS)
        index, inside = in_bounds(folded, size)
        return index, inside, cubic_weight(t, K), cubic_weight_grad(t, K)
    else:
        x0, w0, w1 = linear_taps(x)
        index, inside = in_bounds(x0 + K, size)
        if K == 0:
            return index, inside, w0, x * 0 - 1.0
        else:
            return index, inside, w1, x * 0 + 1.0


@triton.jit
def tap(
    T: tl.constexpr,
    x, y, z,  # pixel-unit sample point from sample_point (z ignored for NDIM == 2)
    W, H, D,  # input spatial size
    MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr, NDIM: tl.constexpr,
):
    """Tap T of a sample (T < the number of taps of MODE): the input pixel it reads and how it weighs it.

    Taps run x fastest, then y, then z, the order PyTorch accumulates them in.
    Returns (xi, yi, zi, inside, weight, d weight/dx, d weight/dy, d weight/dz).
    """
    if MODE == BICUBIC:
        xi, x_in, wx, dwx = axis_tap(x, T % 4, W, MODE, PADDING, ALIGN_CORNERS)
        yi, y_in, wy, dwy = axis_tap(y, T // 4, H, MODE, PADDING, ALIGN_CORNERS)
    else:
        xi, x_in, wx, dwx = axis_tap(x, T % 2, W, MODE, PADDING, ALIGN_CORNERS)
        yi, y_in, wy, dwy = axis_tap(y, (T // 2) % 2, H, MODE, PADDING, ALIGN_CORNERS)
    if NDIM == 3:
        zi, z_in, wz, dwz = axis_tap(z, T // 4, D, MODE, PADDING, ALIGN_CORNERS)
        return xi, yi, zi, x_in & y_in & z_in, wx * wy * wz, dwx * wy * wz, wx * dwy * wz, wx * wy * dwz
    else:
        return xi, yi, xi * 0, x_in & y_in, wx * wy, dwx * wy, wx * dwy, x * 0


@triton.jit
def gather(channels, pixels, mask):
    """Load ``[C, P]`` values at ``channels[:, None] + pixels[None, :]``, 0 where ``mask`` [C, P] is
    False, with a warp along the pixels when no address is known contiguous. One of ``channels`` [C]
    and ``pixels`` [P] holds pointers, the other offsets: which one is the caller's choice, and it
    changes the compiled code (the backward keeps fewer registers live with per-pixel pointers)."""
    if TIES_GO_FIRST:
        return tl.trans(tl.load(pixels[:, None] + channels[None, :], mask=tl.trans(mask), other=0.0))
    else:
        return tl.load(channels[:, None] + pixels[None, :], mask=mask, other=0.0)


@triton.jit
def scatter(channels, pixels, values, mask):
    """Store ``values`` [C, P] at ``channels[:, None] + pixels[None, :]``, oriented as ``gather``."""
    if TIES_GO_FIRST:
        tl.store(pixels[:, None] + channels[None, :], tl.trans(values), mask=tl.trans(mask))
    else:
        tl.store(channels[:, None] + pixels[None, :], values, mask=mask)


@triton.jit
def scatter_add(channels, pixels, values, mask):
    """Add ``values`` [C, P] at ``channels[:, None] + pixels[None, :]``, oriented as ``gather``.

    Relaxed: nothing reads the target before the kernel ends, so no ordering is needed and the add
    carries no fence (Triton 3.9 compiles it to a fire-and-forget red.global, 3.6 to an
    atom.global.relaxed whose result goes unused)."""
    if TIES_GO_FIRST:
        tl.atomic_add(pixels[:, None] + channels[None, :], tl.trans(values), mask=tl.trans(mask), sem="relaxed")
    else:
        tl.atomic_add(channels[:, None] + pixels[None, :], values, mask=mask, sem="relaxed")
