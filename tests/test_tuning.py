"""Tuned tables: bucketing, loading and merging, lookup, and the kernel choice they drive."""

import json

import pytest
import torch
import triton

from stn_triton import tuning


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """A shipped and a user table folder, both empty, in place of the real ones."""
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    user.mkdir()
    monkeypatch.setattr(tuning, "SHIPPED_TABLES", shipped)
    monkeypatch.setenv("STN_TRITON_CONFIG_DIR", str(user))
    tuning.load_table.cache_clear()
    yield shipped, user
    tuning.load_table.cache_clear()


def _write(folder, gpu, kernels):
    (folder / f"{gpu}.json").write_text(json.dumps({"gpu": gpu, "kernels": kernels}))


def _entry(block, warps, stages=3):
    return {"kwargs": {"BLOCK_P": block}, "num_warps": warps, "num_stages": stages}


@pytest.mark.parametrize("size, expected", [(0, 1), (1, 1), (3, 4), (64, 64), (65, 128), (50176, 65536)])
def test_bucket_is_the_next_power_of_two(size, expected):
    assert tuning.bucket(size) == expected


def test_user_table_overrides_the_shipped_one_entry_by_entry(tables):
    shipped, user = tables
    _write(shipped, "gpu-x", {"sample_fwd": {"a": _entry(64, 2), "b": _entry(128, 4)}})
    _write(user, "gpu-x", {"sample_fwd": {"b": _entry(256, 8)}, "affine_grid": {"c": _entry(64, 4)}})
    a = tuning.lookup("sample_fwd", "a", "gpu-x")
    b = tuning.lookup("sample_fwd", "b", "gpu-x")
    c = tuning.lookup("affine_grid", "c", "gpu-x")
    assert (a.kwargs, a.num_warps, a.num_stages) == ({"BLOCK_P": 64}, 2, 3)
    assert (b.kwargs, b.num_warps) == ({"BLOCK_P": 256}, 8)
    assert c.kwargs == {"BLOCK_P": 64}
    assert tuning.lookup("sample_fwd", "missing", "gpu-x") is None
    assert tuning.lookup("sample_fwd", "a", "other-gpu") is None


def test_config_round_trips_through_json():
    config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    assert json.loads(json.dumps(tuning.config_to_json(config))) == {
        "kwargs": {"BLOCK_M": 64, "BLOCK_N": 32}, "num_warps": 8, "num_stages": 2,
    }


def test_tuned_kernel_takes_the_table_config_on_its_gpu_and_autotunes_otherwise(tables, monkeypatch):
    shipped, _ = tables
    _write(shipped, "gpu-x", {"toy": {"hit": _entry(128, 4, 2)}})
    monkeypatch.setattr(tuning, "gpu_name", lambda device=None: "gpu-x")
    monkeypatch.setattr(tuning, "REGISTRY", [])  # the toy kernel is not one of the library's

    @triton.jit
    def toy_kernel(BLOCK_P: triton.language.constexpr):
        pass

    tuned = tuning.TunedKernel("toy", toy_kernel, tuning.pixel_block_configs(), tuning.INTERPRETER_PIXEL_BLOCK, [])
    kernel, launch = tuned("hit", torch.device("cuda"))
    assert kernel is toy_kernel
    assert launch == {"BLOCK_P": 128, "num_warps": 4, "num_stages": 2}
    assert tuned.last_autotuned_key is None
    kernel, launch = tuned("miss", torch.device("cuda"))
    assert kernel is tuned.autotuned and launch == {} and tuned.last_autotuned_key == "miss"
    kernel, launch = tuned("hit", torch.device("cpu"))
    assert kernel is tuned.autotuned and launch == {}


def test_every_kernel_launch_goes_through_a_tuned_kernel():
    """Each Triton kernel the ops launch has a config space (and so a table entry after tuning)."""
    import stn_triton.kernels.deform_conv as dcn_kernels
    import stn_triton.kernels.grid_sample as sample_kernels
    import stn_triton.kernels.warp as warp_kernels

    launched = {
        getattr(module, name)
        for module in (dcn_kernels, sample_kernels, warp_kernels)
        for name in dir(module)
        if name.startswith("_") and name.endswith("_kernel")
    }
    tuned = [kernel.kernel for kernel in tuning.REGISTRY]
    assert set(tuned) == launched
    assert len({kernel.name for kernel in tuning.REGISTRY}) == len(tuning.REGISTRY), "table names are unique"
    for kernel in tuning.REGISTRY:
        assert kernel.autotuned.configs, kernel.name


def test_deterministic_algorithms_take_a_fixed_config_instead_of_autotuning(tables, monkeypatch):
    shipped, _ = tables
    _write(shipped, "gpu-x", {"toy": {"hit": _entry(128, 4, 2)}})
    monkeypatch.setattr(tuning, "gpu_name", lambda device=None: "gpu-x")
    monkeypatch.setattr(tuning, "REGISTRY", [])
    monkeypatch.setattr(tuning, "interpreting", lambda: False)  # the GPU's config space, here too

    @triton.jit
    def toy_kernel(BLOCK_P: triton.language.constexpr):
        pass

    configs = tuning.pixel_block_configs((256, 64))
    tuned = tuning.TunedKernel("toy", toy_kernel, configs, tuning.INTERPRETER_PIXEL_BLOCK, [])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        expected = {"BLOCK_P": 256, "num_warps": 2, "num_stages": configs[0].num_stages}
        assert tuned("miss", torch.device("cuda")) == (toy_kernel, expected)
        assert tuned.last_autotuned_key is None
        assert tuned("hit", torch.device("cuda"))[1] == {"BLOCK_P": 128, "num_warps": 4, "num_stages": 2}
        monkeypatch.setattr(tuning, "TUNING", True)
        assert tuned("miss", torch.device("cuda")) == (tuned.autotuned, {})
    finally:
        torch.use_deterministic_algorithms(previous)


def test_gpu_name_normalises_like_the_perf_csv(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert tuning.gpu_name() == "nvidia-h100-80gb-hbm3"


@pytest.mark.gpu
def test_tune_writes_a_table_that_the_ops_then_use(tables):
    import stn_triton
    from stn_triton import tune
    from stn_triton.ops import grid_sample as ops

    _, user = tables
    assert tune.main(["--quick"]) == 0
    table = json.loads((user / f"{tuning.gpu_name()}.json").read_text())["kernels"]
    assert set(table) == {kernel.name for kernel in tuning.REGISTRY}, "every kernel is tuned"
    assert all(table.values())
    x = torch.randn(32, 64, 128, 128, device="cuda")
    theta = torch.eye(2, 3, device="cuda").expand(32, 2, 3)
    ops._fwd_kernel.last_autotuned_key = None
    out = stn_triton.affine_grid_sample(x, theta)
    assert ops._fwd_kernel.last_autotuned_key is None, "a tuned shape must not autotune again"
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)
