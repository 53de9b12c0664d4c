"""Launch configurations: each kernel's config space, per-GPU tuned tables, and their lookup.

A tuned kernel launches with the config that the table of the current GPU holds for its shape
key (bucketed sizes and dtype); with no entry, ``triton.autotune`` picks among the kernel's
space on first use of each autotune key. Under Triton's interpreter a kernel gets a single
config (autotuning there would only time numpy). Tables are JSON files named after the GPU
(``nvidia-h100-80gb-hbm3.json``): shipped ones in ``stn_triton/configs/``, the user's in
``$STN_TRITON_CONFIG_DIR`` (default ``~/.cache/stn_triton``), which take precedence.
``python -m stn_triton.tune`` writes them.
"""

import functools
import json
import os
import re
from pathlib import Path

import torch
import triton

from stn_triton.backend import interpreting

SHIPPED_TABLES = Path(__file__).parent / "configs"


def autotune(configs: list[triton.Config], interpreter_config: triton.Config, key: list[str], reset_to_zero=None):
    """``triton.autotune`` over ``configs`` on a GPU, or over ``interpreter_config`` alone.

    ``reset_to_zero`` names the outputs a kernel accumulates into with atomics: the autotuner
    zeroes them before every timed trial and again after the last one, so that the launch which
    follows the tuning adds into zeros as the caller left them.
    """
    return triton.autotune(
        configs=[interpreter_config] if interpreting() else configs, key=key, reset_to_zero=reset_to_zero
    )


def pixel_block_configs(block_sizes=(64, 128, 256), warps=(2, 4, 8), name="BLOCK_P") -> list[triton.Config]:
    """Configs for kernels whose programs own one block of ``name`` (output pixels, by default)."""
    return [triton.Config({name: b}, num_warps=w) for b in block_sizes for w in warps]


# Interpreter programs run one after another in numpy: one large block is the fastest there.
INTERPRETER_PIXEL_BLOCK = triton.Config({"BLOCK_P": 128}, num_warps=4)


def gpu_name(device: torch.device | int | None = None) -> str:
    """The CUDA device's name, lower case, runs of other characters as '-' (``nvidia-h100-80gb-hbm3``)."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def user_table_dir() -> Path:
    return Path(os.environ.get("STN_TRITON_CONFIG_DIR", Path.home() / ".cache" / "stn_triton"))


def bucket(size: int) -> int:
    """The power of two at or above ``size``: nearby shapes share one tuned config."""
    return triton.next_power_of_2(max(int(size), 1))


@functools.cache
def load_table(gpu: str) -> dict:
    """{kernel: {shape key: config}} for ``gpu``: the shipped table, overridden by the user's."""
    table: dict = {}
    for folder in (SHIPPED_TABLES, user_table_dir()):
        path = folder / f"{gpu}.json"
        if path.is_file():
            for kernel, entries in json.loads(path.read_text())["kernels"].items():
                table.setdefault(kernel, {}).update(entries)
    return table


def config_to_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def lookup(kernel: str, key: str, gpu: str) -> triton.Config | None:
    """The tuned config of ``kernel`` for shape ``key`` on ``gpu``, or None."""
    entry = load_table(gpu).get(kernel, {}).get(key)
    if entry is None:
        return None
    return triton.Config(entry["kwargs"], num_warps=entry["num_warps"], num_stages=entry["num_stages"])


TUNING = False  # set by stn_triton.tune: autotune even under deterministic algorithms
REGISTRY: list["TunedKernel"] = []  # every TunedKernel, in the order the ops modules create them


class TunedKernel:
    """A kernel with a config space: the tuned table's config for a shape, else autotuning.

    ``kernel, launch_kwargs = tuned(key, device)``, then ``wrap_triton(kernel)[grid](..., **launch_kwargs)``.

    Under ``torch.use_deterministic_algorithms(True)`` a shape the table lacks runs the space's
    first config instead of autotuning: block sizes fix the order of some sums, and a choice made
    by timing could differ from one process to the next (``stn_triton.tune`` lifts this, since it
    must time the deterministic kernels too).
    """

    def __init__(self, name: str, kernel, configs, interpreter_config: triton.Config, autotune_key: list[str],
                 reset_to_zero: list[str] | None = None):
        self.name = name
        self.kernel = kernel
        self.autotuned = autotune(configs, interpreter_config, autotune_key, reset_to_zero)(kernel)
        self.last_autotuned_key: str | None = None  # read by stn_triton.tune after a launch
        REGISTRY.append(self)

    def smallest(self, name: str, launch_kwargs: dict) -> int:
        """The least value of meta-parameter ``name`` that a launch with ``launch_kwargs`` may use."""
        if name in launch_kwargs:
            return launch_kwargs[name]
        return min(config.kwargs[name] for config in self.autotuned.configs)

    def __call__(self, key: str, device: torch.device):
        config = lookup(self.name, key, gpu_name(device)) if device.type == "cuda" else None
        if config is None and device.type == "cuda" and torch.are_deterministic_algorithms_enabled() and not TUNING:
            config = self.autotuned.configs[0]
        if config is None:
            self.last_autotuned_key = key
            return self.autotuned, {}
        return self.kernel, {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
