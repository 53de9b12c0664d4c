"""Host-side helpers shared by the op launchers: strides by name, memory formats, index widths, SMs.

Everything here runs on every call, so it stays plain Python on sizes and strides.
"""

import functools

import torch

from stn_triton.numerics import INT32_LIMIT

# Under the interpreter, work splits as on an H100 (132 SMs), so the CPU tests take the GPU's paths.
INTERPRETER_MULTIPROCESSORS = 132


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H100's count for the interpreter on a CPU)."""
    if device.type != "cuda":
        return INTERPRETER_MULTIPROCESSORS
    return _multiprocessors(torch.cuda.current_device() if device.index is None else device.index)


def spatial_strides(t: torch.Tensor) -> tuple[int, ...]:
    """(n, c, d, h, w) strides of a 4-D or 5-D [N, C, (D,) H, W] tensor; d is 0 for 4-D."""
    s = t.stride()
    return s if t.dim() == 5 else (s[0], s[1], 0, s[2], s[3])


def named_strides(prefix: str, t: torch.Tensor) -> dict[str, int]:
    """``{prefix_n: .., prefix_c: .., prefix_d: .., prefix_h: .., prefix_w: ..}`` of a [N, C, (D,) H, W] tensor."""
    return dict(zip((f"{prefix}_n", f"{prefix}_c", f"{prefix}_d", f"{prefix}_h", f"{prefix}_w"), spatial_strides(t)))


def grid_strides(grid: torch.Tensor) -> tuple[int, ...]:
    """(n, d, h, w, k) strides of a [N, (D,) H, W, K] grid; d is 0 for 4-D."""
    s = grid.stride()
    return s if grid.dim() == 5 else (s[0], 0, s[1], s[2], s[3])


def spatial_size(t: torch.Tensor) -> tuple[int, int, int]:
    """(D, H, W) of a [N, C, (D,) H, W] tensor, D = 1 for 4-D."""
    return tuple(t.shape[2:]) if t.dim() == 5 else (1, *t.shape[2:])


def channels_last(t: torch.Tensor) -> bool:
    """Whether channels are t's innermost dimension (channels_last or channels_last_3d)."""
    if t.is_contiguous():
        return False
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    if t.is_contiguous(memory_format=fmt):
        return True
    spatial = [st for size, st in zip(t.shape[2:], t.stride()[2:]) if size > 1]
    return t.shape[1] > 1 and all(t.stride(1) < st for st in spatial)


def empty_like_layout(t: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An empty [N, C, ...] tensor of ``shape`` with t's channel layout (channels_last kept)."""
    fmt = torch.contiguous_format
    if channels_last(t):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return torch.empty(shape, dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element of the tensors lies at an offset that int32 cannot hold."""
    for t in tensors:
        if t.untyped_storage().nbytes() // t.element_size() <= INT32_LIMIT:
            continue  # every view into a smaller storage is addressed in int32
        extent = sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride()) if size > 0)
        if t.numel() > INT32_LIMIT or extent >= INT32_LIMIT:
            return True
    return False
