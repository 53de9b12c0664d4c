"""The sampling kernel's config spaces, the heuristic for shapes no tuned table holds, and its launches.

``_sample_kernel`` (kernels/sample.py) runs three ways, each a TunedKernel of its own so that the
tables tune them apart: the forward, the backward (atomic grad_input and the points' gradient) and
the tap list of the deterministic backward. Every config is (BLOCK_P output pixels, BLOCK_C
channels per step of the channel loop, num_warps).
"""

import triton

from stn_triton.kernels.sample import _sample_kernel
from stn_triton.numerics import next_power_of_2
from stn_triton.tuning import TunedKernel

# Under the interpreter: programs run one after another in numpy, so large pixel blocks; a channel
# block of 4 so that the CPU tests with more channels also take the split-channel path.
INTERPRETER_CONFIG = triton.Config({"BLOCK_P": 128, "BLOCK_C": 4}, num_warps=4)


def _configs(blocks) -> list[triton.Config]:
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in blocks]


# NCHW runs a warp's threads along pixels (four each): at 512 pixels the warps split the pixels
# too, at 128 they split the channels. channels_last runs them along channels (vectors of four):
# wide channel blocks, fewer pixels.
SAMPLE_CONFIGS = _configs([
    (512, 4, 4), (512, 2, 4), (512, 1, 4), (256, 4, 2), (128, 4, 4), (128, 2, 4), (128, 1, 4), (256, 8, 8),
    (1024, 2, 8),
    (32, 64, 4), (16, 64, 4), (8, 64, 4), (64, 32, 4), (32, 32, 4), (16, 32, 4), (128, 16, 4), (64, 16, 4),
    (32, 16, 4),
])
TAPS_CONFIGS = _configs([(128, 1, 4), (256, 1, 4), (256, 1, 8), (512, 1, 8)])


def sample_heuristic(channels: int, nhwc: bool, taps: int, backward: bool) -> triton.Config:
    """The config for a shape no tuned table holds: spill-free on sm_90 in the static compile
    (triton 3.9's ptxas), with many loads in flight per thread.

    NCHW: the forward at 512 pixels x 4 channels per step on 4 warps (bilinear 2-D 141-191
    registers by dtype and transform, trilinear 142); the backward, which holds three more tiles
    and scatters, and bicubic's 16 taps at 128 pixels (92-168 and 128 registers). channels_last: a
    warp along up to 64 contiguous channels, 2048 tile elements per step (1024 in the backward,
    512 for bicubic). perf/results/static/sm90.csv has every config.
    """
    if nhwc and channels >= 16:
        block_c = min(next_power_of_2(channels), 64)
        elements = 512 if taps > 8 else 1024 if backward else 2048
        return triton.Config({"BLOCK_P": max(elements // block_c, 8), "BLOCK_C": block_c}, num_warps=4)
    if taps > 8:
        block_p, block_c = 128, 2
    elif backward:
        block_p, block_c = 128, 4
    else:
        block_p, block_c = 512, 4
    return triton.Config({"BLOCK_P": block_p, "BLOCK_C": min(next_power_of_2(channels), block_c)}, num_warps=4)


def taps_heuristic(**shape) -> triton.Config:
    """The tap list is a few stores per pixel and tap: 256 pixels on 4 warps."""
    return triton.Config({"BLOCK_P": 256, "BLOCK_C": 1}, num_warps=4)


AUTOTUNE_KEY = ["C", "PASS", "TRANSFORM", "MODE", "NDIM", "F64", "INPUT_GRAD", "COORD_GRAD"]
fwd_kernel = TunedKernel(
    "sample_fwd", _sample_kernel, SAMPLE_CONFIGS, sample_heuristic, AUTOTUNE_KEY, writes=("y_ptr",),
    interpreter_config=INTERPRETER_CONFIG,
)
# The partial sums of a transform's gradient are zeroed between autotuning trials too: a trial with
# smaller pixel blocks writes rows that the winner's launch would not overwrite.
bwd_kernel = TunedKernel(
    "sample_bwd", _sample_kernel, SAMPLE_CONFIGS, sample_heuristic, AUTOTUNE_KEY,
    writes=("gx_ptr", "gcoords_ptr"), reset_to_zero=["gx_ptr", "gcoords_ptr"],
    interpreter_config=INTERPRETER_CONFIG,
)
taps_kernel = TunedKernel(
    "sample_taps", _sample_kernel, TAPS_CONFIGS, taps_heuristic, AUTOTUNE_KEY,
    writes=("key_ptr", "weight_ptr", "source_ptr"),
    interpreter_config=triton.Config({"BLOCK_P": 128, "BLOCK_C": 1}, num_warps=4),
)
