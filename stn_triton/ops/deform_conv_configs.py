"""deform_conv2d's config spaces, the heuristics for shapes no tuned table holds, and its launches.

Every GEMM config is (BLOCK_M output pixels: the GEMM rows, BLOCK_N output channels, BLOCK_K input
channels of one tap, num_warps, num_stages); each heuristic picks a config of its space, so a tuned
table (which accepts only configs of the space, stn_triton.tuning) can only improve on it.
"""

import torch
import triton

from stn_triton.kernels.deform_conv import (
    _deform_conv_bwd_data_kernel,
    _deform_conv_bwd_weight_kernel,
    _deform_conv_fwd_kernel,
    _deform_conv_taps_kernel,
)
from stn_triton.numerics import cdiv, next_power_of_2
from stn_triton.tuning import TunedKernel

# Under the interpreter programs run one after another in numpy: few, large ones.
INTERPRETER_BLOCKS = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)
GEMM_KEY = ["CG", "COG", "CPG", "K", "HAS_MASK", "F64", "LOW_PRECISION", "INPUT_PRECISION", "CHANNELS_FASTEST"]


def _block_configs(blocks) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in blocks]


def _channel_block(group_channels: int, offset_group_channels: int, widest: int) -> int:
    """Input channels per GEMM step: a power of two from 16 (tl.dot's least) to ``widest``, no wider than a run."""
    return max(16, min(widest, next_power_of_2(min(group_channels, offset_group_channels))))


# Every config below compiles spill-free for sm_90 in float32 (tf32x3 and tf32), float16 and bfloat16
# at dcn_r50's shape (an NCHW input gathered channels-last; perf/results/static/); the heuristics'
# picks list their registers per thread as (tf32x3 / tf32 / bfloat16), triton 3.9.
# float64 multiplies on FMA units (no tensor cores): small tiles, 134-188 registers in every kernel.
FLOAT64_BLOCKS = (32, 32, 16, 4, 2)
FWD_CONFIGS = _block_configs([(64, 128, 32, 8, 2), (64, 128, 16, 8, 2), (64, 64, 32, 8, 2), (64, 64, 16, 8, 2),
                              (128, 64, 32, 8, 2), (64, 64, 32, 4, 2), (64, 64, 16, 4, 2), (128, 64, 16, 8, 3),
                              FLOAT64_BLOCKS])
DATA_CONFIGS = _block_configs([(64, 32, 32, 8, 2), (64, 32, 16, 8, 2), (64, 32, 16, 4, 2), (128, 32, 16, 8, 2),
                               FLOAT64_BLOCKS])
WEIGHT_CONFIGS = _block_configs([(64, 64, 64, 8, 2), (64, 64, 32, 8, 2), (64, 64, 16, 8, 2), (64, 128, 32, 8, 2),
                                 FLOAT64_BLOCKS])


def _config(blocks) -> triton.Config:
    return _block_configs([blocks])[0]


def _fwd_heuristic(rows, group_channels, group_out_channels, offset_group_channels, dtype, channels_fastest):
    """64 pixels x 128 output channels on 8 warps (226 / 164 / 127 registers): each gathered A tile then
    serves twice the output channels that 64 would, at the same one program of 8 warps per SM in float32
    (two in half precision). Groups of fewer than 128 output channels: 64 (158 / 144 / 100)."""
    if dtype == torch.float64:
        return _config(FLOAT64_BLOCKS)
    block_n = 128 if group_out_channels >= 128 else 64
    return _config((64, block_n, _channel_block(group_channels, offset_group_channels, 32), 8, 2))


def _data_heuristic(rows, group_channels, group_out_channels, offset_group_channels, dtype, channels_fastest):
    """64 pixels x 32 input channels on 8 warps, the column gradient summed over 32 output channels at a
    time (248 / 217 / 205 registers): the column gradient, one gathered corner and the MMA operands are
    live at once; 4 warps, 64-channel tiles or 32-pixel tiles spill in float32."""
    if dtype == torch.float64:
        return _config(FLOAT64_BLOCKS)
    return _config((64, 32, _channel_block(group_channels, offset_group_channels, 32), 8, 2))


def _weight_heuristic(rows, group_channels, group_out_channels, offset_group_channels, dtype, channels_fastest):
    """64 output channels x 64 input channels, reduced over 64 pixels at a time on 8 warps
    (246 / 186 / 164 registers): a 64-row tile is the least the Hopper tensor-core MMA takes."""
    if dtype == torch.float64:
        return _config(FLOAT64_BLOCKS)
    return _config((64, 64, _channel_block(group_channels, offset_group_channels, 64), 8, 2))


fwd_kernel = TunedKernel(
    "deform_conv_fwd", _deform_conv_fwd_kernel, FWD_CONFIGS, _fwd_heuristic, GEMM_KEY,
    writes=("y_ptr",), interpreter_config=INTERPRETER_BLOCKS,
)
bwd_data_kernel = TunedKernel(
    "deform_conv_bwd_data", _deform_conv_bwd_data_kernel, DATA_CONFIGS, _data_heuristic,
    GEMM_KEY + ["INPUT_GRAD", "COLUMNS", "OFFSET_GRAD", "MASK_GRAD"],
    writes=("gx_ptr", "col_ptr", "goff_ptr", "gmask_ptr"), reset_to_zero=["gx_ptr"], interpreter_config=INTERPRETER_BLOCKS,
)
bwd_weight_kernel = TunedKernel(
    "deform_conv_bwd_weight", _deform_conv_bwd_weight_kernel, WEIGHT_CONFIGS, _weight_heuristic,
    GEMM_KEY + ["BIAS_GRAD"], writes=("gw_ptr", "gb_ptr"), interpreter_config=INTERPRETER_BLOCKS,
)
# The taps kernel is integer arithmetic and three stores per corner: 32-48 registers in every config.
taps_kernel = TunedKernel(
    "deform_conv_taps", _deform_conv_taps_kernel,
    [triton.Config({"BLOCK_M": m}, num_warps=w) for m in (64, 128, 256) for w in (2, 4, 8)],
    lambda **shape: triton.Config({"BLOCK_M": 128}, num_warps=4), ["K", "G", "F64"],
    writes=("key_ptr", "weight_ptr", "source_ptr"), interpreter_config=triton.Config({"BLOCK_M": 128}, num_warps=4),
)

# Images are padded to ROW_ALIGN rows in grad_weight's row space, so that no block of BLOCK_M rows
# straddles two images: the largest BLOCK_M any launch of the weight kernel can take (the tables
# accept only configs of the space), every BLOCK_M a power of two dividing it.
ROW_ALIGN = max(config.kwargs["BLOCK_M"] for config in [*WEIGHT_CONFIGS, INTERPRETER_BLOCKS])
# The weight gradient's pixel reduction is split until there are this many programs per SM (at
# 64 x 64 tiles), each split summing at least MIN_SPLIT_ROWS pixels.
PROGRAMS_PER_SM = 4
MIN_SPLIT_ROWS = 256


def padded_pixels(pixels: int) -> int:
    """An image's rows in grad_weight's row space: its pixels rounded up to a multiple of ROW_ALIGN."""
    return cdiv(pixels, ROW_ALIGN) * ROW_ALIGN


def weight_grad_splits(rows: int, tiles: int, sms: int) -> tuple[int, int]:
    """(splits, rows per split) of grad_weight's reduction over ``rows`` rows for ``tiles`` output tiles."""
    splits = max(1, min(cdiv(PROGRAMS_PER_SM * sms, tiles), rows // MIN_SPLIT_ROWS))
    rows_per_split = cdiv(cdiv(rows, splits), ROW_ALIGN) * ROW_ALIGN
    return cdiv(rows, rows_per_split), rows_per_split
