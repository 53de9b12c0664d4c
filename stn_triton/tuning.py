"""Launch configurations: the config space of each kernel, kept in one place.

Under Triton's interpreter a kernel gets a single config (autotuning there would only time
numpy); on a GPU ``triton.autotune`` picks among the space, keyed by the arguments named.
"""

import triton

from stn_triton.backend import interpreting


def autotune(configs: list[triton.Config], interpreter_config: triton.Config, key: list[str]):
    """``triton.autotune`` over ``configs`` on a GPU, or over ``interpreter_config`` alone."""
    return triton.autotune(configs=[interpreter_config] if interpreting() else configs, key=key)


def pixel_block_configs(block_sizes=(64, 128, 256), warps=(2, 4, 8)) -> list[triton.Config]:
    """Configs for kernels whose programs own a block of BLOCK_P output pixels."""
    return [triton.Config({"BLOCK_P": b}, num_warps=w) for b in block_sizes for w in warps]


# Interpreter programs run one after another in numpy: one large block is the fastest there.
INTERPRETER_PIXEL_BLOCK = triton.Config({"BLOCK_P": 128}, num_warps=4)
