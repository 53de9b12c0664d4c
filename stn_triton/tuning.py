"""Launch configurations: each kernel's config space, per-GPU tuned tables, and the launch.

A kernel launches with the config that the current GPU's table holds for its shape key
(bucketed sizes, dtype, layout); a shape the table lacks takes the config the kernel's
heuristic picks from the shape, so no call ever stalls on autotuning. Autotuning is opt-in:
``STN_TRITON_AUTOTUNE=1`` in the environment or ``stn_triton.tuning.set_autotune(True)``
makes a shape the table lacks time the kernel's whole config space once, and the winner is
added to the user's table, so later processes start from it. ``python -m stn_triton.tune``
tunes the perf suite's shapes and writes the table in one go.

Tables are JSON files named after the GPU (``nvidia-h100-80gb-hbm3.json``): shipped ones in
``stn_triton/configs/``, the user's in ``$STN_TRITON_CONFIG_DIR`` (default
``~/.cache/stn_triton``), which take precedence. A table carries a schema version
(``TABLE_SCHEMA``): one written for another schema is ignored with a warning, and an entry is taken
only if it is one of its kernel's configs (a config outside the space could break what the
launcher derives from the space, such as the largest block a buffer is laid out for). Under
``torch.use_deterministic_algorithms(True)`` launches read the shipped table alone: block sizes fix
summation orders, and the user's table depends on what that machine happened to tune. Under
Triton's interpreter every kernel runs one fixed config (timing there would only time numpy).
"""

import contextlib
import functools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from torch.library import wrap_triton

from stn_triton.backend import TRITON, forced, interpreting
from stn_triton.numerics import next_power_of_2

SHIPPED_TABLES = Path(__file__).parent / "configs"
# The tables' format: bumped when keys or config spaces change meaning, so old tables are not misread.
TABLE_SCHEMA = 2

_autotune = os.environ.get("STN_TRITON_AUTOTUNE", "0") == "1"
# While stn_triton.tune runs: {kernel name: {shape key: config json}} of every autotuned launch,
# the table entries ignored so that every kernel is timed again, deterministic mode included.
_recording: dict | None = None
# While captured_launches() runs: the launches recorded instead of run.
_capture: list | None = None


def set_autotune(enabled: bool) -> None:
    """Autotune shapes that the tuned table lacks (True), or take the heuristic's config (False, the default)."""
    global _autotune
    _autotune = bool(enabled)


def autotune_enabled() -> bool:
    return _autotune


@contextlib.contextmanager
def captured_launches():
    """Record every launch in the block instead of running it: a list of (Launch, kernel arguments).

    CPU tensors take the Triton path (not the plain PyTorch fallback) and every launch takes the
    config it would take on a GPU without a table (the heuristic's), so the list is what a GPU would
    run at those shapes; perf/resources.py and the compile tests read the kernels' real arguments
    from it rather than a copy kept by hand.
    """
    global _capture
    previous, _capture = _capture, []
    try:
        with forced(TRITON):
            yield _capture
    finally:
        _capture = previous


@contextlib.contextmanager
def recording():
    """Autotune every launch in the block, table or not, and collect the winners: what ``stn_triton.tune`` does."""
    global _recording
    previous, _recording = _recording, {}
    try:
        yield _recording
    finally:
        _recording = previous


def pixel_block_configs(block_sizes=(64, 128, 256), warps=(2, 4, 8), name="BLOCK_P") -> list[triton.Config]:
    """Configs for kernels whose programs own one block of ``name`` (output pixels, by default)."""
    return [triton.Config({name: b}, num_warps=w) for b in block_sizes for w in warps]


# Interpreter programs run one after another in numpy: one large block is the fastest there.
INTERPRETER_PIXEL_BLOCK = triton.Config({"BLOCK_P": 128}, num_warps=4)


@functools.cache
def _device_name(index: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(index).lower()).strip("-")


def gpu_name(device: torch.device | int | None = None) -> str:
    """The CUDA device's name, lower case, runs of other characters as '-' (``nvidia-h100-80gb-hbm3``)."""
    if isinstance(device, torch.device):
        device = device.index
    return _device_name(torch.cuda.current_device() if device is None else device)


def user_table_dir() -> Path:
    return Path(os.environ.get("STN_TRITON_CONFIG_DIR", Path.home() / ".cache" / "stn_triton"))


def bucket(size: int) -> int:
    """The power of two at or above ``size``: nearby shapes share one tuned config."""
    return next_power_of_2(int(size))


def _options_key(options: dict) -> tuple:
    return tuple(sorted(options.items()))


def _read_table(path: Path) -> dict:
    """{kernel: {shape key: launch options}} of one table file: its entries that are configs of their
    kernel's space (unknown kernels and foreign configs dropped); nothing for another schema."""
    data = json.loads(path.read_text())
    if data.get("schema") != TABLE_SCHEMA:
        warnings.warn(f"stn_triton: ignoring the tuned table {path}: it has table schema {data.get('schema')}, this "
                      f"version reads schema {TABLE_SCHEMA}; python -m stn_triton.tune writes a new one", stacklevel=3)
        return {}
    spaces = {kernel.name: kernel.space for kernel in REGISTRY}
    table: dict = {}
    for kernel, entries in data["kernels"].items():
        for key, entry in entries.items():
            options = {**entry["kwargs"], "num_warps": entry["num_warps"], "num_stages": entry["num_stages"]}
            if _options_key(options) in spaces.get(kernel, ()):
                table.setdefault(kernel, {})[key] = options
    return table


@functools.cache
def load_table(gpu: str, shipped_only: bool = False) -> dict:
    """{kernel: {shape key: launch options}} for ``gpu``: the shipped table, overridden by the user's
    unless ``shipped_only``."""
    table: dict = {}
    for folder in (SHIPPED_TABLES,) if shipped_only else (SHIPPED_TABLES, user_table_dir()):
        path = folder / f"{gpu}.json"
        if path.is_file():
            for kernel, entries in _read_table(path).items():
                table.setdefault(kernel, {}).update(entries)
    return table


def config_to_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def launch_options(config: triton.Config) -> dict:
    """A config as launch keywords: its meta-parameters, num_warps and num_stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def lookup(kernel: str, key: str, gpu: str, shipped_only: bool = False) -> dict | None:
    """The launch keywords of ``kernel``'s tuned config for shape ``key`` on ``gpu``, or None."""
    return load_table(gpu, shipped_only).get(kernel, {}).get(key)


def merge_into_table(path: Path, gpu: str, entries: dict) -> int:
    """Add {kernel: {shape key: config json}} to the table file at ``path`` (written atomically); returns its size."""
    existing = json.loads(path.read_text()) if path.is_file() else {}
    kernels = existing["kernels"] if existing.get("schema") == TABLE_SCHEMA else {}
    for kernel, configs in entries.items():
        kernels.setdefault(kernel, {}).update(configs)
    header = {"schema": TABLE_SCHEMA, "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
        file.write(json.dumps({**header, "kernels": kernels}, indent=1, sort_keys=True) + "\n")
    os.replace(file.name, path)
    load_table.cache_clear()
    return sum(len(configs) for configs in kernels.values())


def _tracing() -> bool:
    """Whether the ops run on fake tensors (torch.compile tracing): nothing launches, nothing can be timed."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


REGISTRY: list["TunedKernel"] = []  # every TunedKernel, in the order the ops modules create them


class TunedKernel:
    """A kernel with a config space, a heuristic for shapes no table holds, and the pointers it writes.

    ``launch = tuned.choose(key, shape, device)``, then ``launch(grid, **kernel_arguments)``.

    ``heuristic(**shape)`` returns the config for a shape the table lacks. It is a pure function
    of the shape, so the config (and with it the summation order the block sizes fix) is the
    same in every process: deterministic algorithms never autotune, except while
    ``stn_triton.tune`` times the deterministic kernels on purpose.

    ``writes`` names every pointer argument the kernel may write; a CPU test checks that
    torch.compile's analysis of the kernel finds no other (a falsely written input is copied
    under torch.compile, or raises when it is a leaf that requires grad). ``reset_to_zero``
    names those the kernel accumulates into with atomics: the autotuner zeroes them before every
    timed trial and again after the last one.
    """

    def __init__(self, name: str, kernel, configs: list[triton.Config], heuristic: Callable[..., triton.Config],
                 autotune_key: list[str], writes: tuple[str, ...], reset_to_zero: list[str] | None = None,
                 interpreter_config: triton.Config = INTERPRETER_PIXEL_BLOCK):
        self.name = name
        self.kernel = kernel
        self.configs = configs
        self.heuristic = heuristic
        self.writes = writes
        self.interpreter_options = launch_options(interpreter_config)
        self.space = {_options_key(launch_options(config)) for config in configs}
        self.autotuned = triton.autotune(configs=configs, key=autotune_key, reset_to_zero=reset_to_zero)(kernel)
        self.timed_key = None  # the table key the autotuner's cached winners were timed for
        REGISTRY.append(self)

    def choose(self, key: str, shape: dict, device: torch.device) -> "Launch":
        """How ``kernel`` launches at ``shape`` (its table key ``key``) on ``device``."""
        if interpreting() and _capture is None:
            return Launch(self, key, device, self.interpreter_options)
        deterministic = torch.are_deterministic_algorithms_enabled()
        tuned = None
        if device.type == "cuda" and _recording is None:
            tuned = lookup(self.name, key, gpu_name(device), shipped_only=deterministic)
        if tuned is not None:
            return Launch(self, key, device, tuned)
        timed = _capture is None and (_recording is not None or (_autotune and not deterministic))
        if timed and not _tracing():
            return Launch(self, key, device, None)
        return Launch(self, key, device, launch_options(self.heuristic(**shape)))


class Launch:
    """One launch of a TunedKernel: a fixed config (``options``), or autotuning when ``options`` is None."""

    def __init__(self, tuned: TunedKernel, key: str, device: torch.device, options: dict | None):
        self.tuned = tuned
        self.key = key
        self.device = device
        self.options = options

    def least(self, name: str) -> int:
        """The least value of meta-parameter ``name`` this launch may run with."""
        if self.options is not None:
            return self.options[name]
        return min(config.kwargs[name] for config in self.tuned.configs)

    def most(self, name: str) -> int:
        """The greatest value of meta-parameter ``name`` this launch may run with."""
        if self.options is not None:
            return self.options[name]
        return max(config.kwargs[name] for config in self.tuned.configs)

    def __call__(self, grid, **arguments) -> None:
        """Launch on the tensors' device (not merely the current one), kernel arguments by name."""
        if _capture is not None:
            _capture.append((self, arguments))
            return
        kernel = self.tuned.kernel if self.options is not None else self.tuned.autotuned
        if self.options is None and self.tuned.timed_key != self.key:
            # Triton's autotuner caches a winner per its own key, which lacks parts of the table key
            # (memory layout, pixel bucket): time again for each table key instead of keeping another's.
            self.tuned.autotuned.cache.clear()
            self.tuned.timed_key = self.key
        options = self.options or {}
        if self.device.type == "cuda" and self.device.index not in (None, torch.cuda.current_device()):
            with torch.cuda.device(self.device):
                wrap_triton(kernel)[grid](**arguments, **options)
        else:
            wrap_triton(kernel)[grid](**arguments, **options)
        if self.options is None:
            self._keep(self.tuned.autotuned.best_config)

    def _keep(self, best: triton.Config) -> None:
        """Keep an autotuned winner: for stn_triton.tune's table, else in the user's table for later processes."""
        entry = {self.tuned.name: {self.key: config_to_json(best)}}
        if _recording is not None:
            _recording.setdefault(self.tuned.name, {}).update(entry[self.tuned.name])
        else:
            gpu = gpu_name(self.device)
            merge_into_table(user_table_dir() / f"{gpu}.json", gpu, entry)
