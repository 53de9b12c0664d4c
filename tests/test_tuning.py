"""Tuned tables and the launch choice: bucketing, table lookup, the heuristic, opt-in autotuning
and its persistence, deterministic mode, and the launch itself."""

import json

import pytest
import torch
import triton
import triton.language as tl

from stn_triton import tuning


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """A shipped and a user table folder, both empty, in place of the real ones; autotuning off."""
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    user.mkdir()
    monkeypatch.setattr(tuning, "SHIPPED_TABLES", shipped)
    monkeypatch.setenv("STN_TRITON_CONFIG_DIR", str(user))
    monkeypatch.setattr(tuning, "_autotune", False)
    tuning.load_table.cache_clear()
    yield shipped, user
    tuning.load_table.cache_clear()


def _write(folder, gpu, kernels, schema=tuning.TABLE_SCHEMA):
    (folder / f"{gpu}.json").write_text(json.dumps({"schema": schema, "gpu": gpu, "kernels": kernels}))


def _entry(block, warps, stages=3):
    return {"kwargs": {"BLOCK_P": block}, "num_warps": warps, "num_stages": stages}


@pytest.mark.parametrize("size, expected", [(0, 1), (1, 1), (3, 4), (64, 64), (65, 128), (50176, 65536)])
def test_bucket_is_the_next_power_of_two(size, expected):
    assert tuning.bucket(size) == expected


# Block sizes x warps x stages: a space holding every entry the table tests write.
WIDE_SPACE = [triton.Config({"BLOCK_P": b}, num_warps=w, num_stages=s)
              for b in (32, 64, 128, 256) for w in (1, 2, 4, 8) for s in (2, 3)]


def _toys(monkeypatch, *names):
    """Toy kernels named ``names`` with WIDE_SPACE, as the only registered kernels."""
    monkeypatch.setattr(tuning, "REGISTRY", [])
    return [tuning.TunedKernel(name, _toy_kernel, WIDE_SPACE, lambda **_: WIDE_SPACE[0], [], writes=("out_ptr",))
            for name in names]


def test_user_table_overrides_the_shipped_one_entry_by_entry(tables, monkeypatch):
    shipped, user = tables
    _toys(monkeypatch, "toy", "toy2")
    _write(shipped, "gpu-x", {"toy": {"a": _entry(64, 2), "b": _entry(128, 4)}})
    _write(user, "gpu-x", {"toy": {"b": _entry(256, 8)}, "toy2": {"c": _entry(64, 4)}})
    assert tuning.lookup("toy", "a", "gpu-x") == {"BLOCK_P": 64, "num_warps": 2, "num_stages": 3}
    assert tuning.lookup("toy", "b", "gpu-x") == {"BLOCK_P": 256, "num_warps": 8, "num_stages": 3}
    assert tuning.lookup("toy2", "c", "gpu-x") == {"BLOCK_P": 64, "num_warps": 4, "num_stages": 3}
    assert tuning.lookup("toy", "missing", "gpu-x") is None
    assert tuning.lookup("toy", "a", "other-gpu") is None


def test_deterministic_lookups_read_the_shipped_table_alone(tables, monkeypatch):
    """Block sizes fix summation orders: under deterministic algorithms, what this machine's user table
    happens to hold must not change the bits."""
    shipped, user = tables
    _toys(monkeypatch, "toy")
    _write(shipped, "gpu-x", {"toy": {"a": _entry(64, 2)}})
    _write(user, "gpu-x", {"toy": {"a": _entry(256, 8), "b": _entry(128, 4)}})
    assert tuning.lookup("toy", "a", "gpu-x", shipped_only=True)["BLOCK_P"] == 64
    assert tuning.lookup("toy", "b", "gpu-x", shipped_only=True) is None
    assert tuning.lookup("toy", "a", "gpu-x")["BLOCK_P"] == 256


def test_a_table_entry_outside_the_kernels_space_is_ignored(tables, monkeypatch):
    """An entry the space does not hold (a hand edit, an older version's space) could break what the
    launcher derives from the space, such as grad_weight's row alignment."""
    shipped, _ = tables
    _toys(monkeypatch, "toy")
    _write(shipped, "gpu-x", {"toy": {"in": _entry(128, 4), "out": _entry(512, 4), "odd": _entry(128, 3)},
                              "unknown": {"a": _entry(64, 2)}})
    assert tuning.lookup("toy", "in", "gpu-x") is not None
    assert tuning.lookup("toy", "out", "gpu-x") is None
    assert tuning.lookup("toy", "odd", "gpu-x") is None
    assert tuning.lookup("unknown", "a", "gpu-x") is None


def test_a_table_of_another_schema_is_ignored_with_a_warning(tables, monkeypatch):
    shipped, user = tables
    _toys(monkeypatch, "toy")
    _write(shipped, "gpu-x", {"toy": {"a": _entry(64, 2)}}, schema=tuning.TABLE_SCHEMA - 1)
    with pytest.warns(UserWarning, match="table schema"):
        assert tuning.lookup("toy", "a", "gpu-x") is None
    path = user / "gpu-x.json"
    _write(user, "gpu-x", {"toy": {"old": _entry(64, 2)}}, schema=None)
    tuning.merge_into_table(path, "gpu-x", {"toy": {"new": _entry(128, 4)}})
    written = json.loads(path.read_text())
    assert written["schema"] == tuning.TABLE_SCHEMA and written["kernels"] == {"toy": {"new": _entry(128, 4)}}


def test_config_round_trips_through_json():
    config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    assert json.loads(json.dumps(tuning.config_to_json(config))) == {
        "kwargs": {"BLOCK_M": 64, "BLOCK_N": 32}, "num_warps": 8, "num_stages": 2,
    }


def test_merge_into_table_keeps_other_entries_and_refreshes_lookups(tables, monkeypatch):
    _, user = tables
    _toys(monkeypatch, "toy", "other")
    path = user / "gpu-x.json"
    _write(user, "gpu-x", {"toy": {"a": _entry(64, 2)}})
    assert tuning.lookup("toy", "a", "gpu-x")["BLOCK_P"] == 64
    size = tuning.merge_into_table(path, "gpu-x", {"toy": {"b": _entry(128, 4)}, "other": {"c": _entry(32, 1)}})
    assert size == 3
    written = json.loads(path.read_text())
    assert written["gpu"] == "gpu-x" and written["torch"] == torch.__version__
    assert tuning.lookup("toy", "a", "gpu-x")["BLOCK_P"] == 64
    assert tuning.lookup("toy", "b", "gpu-x")["BLOCK_P"] == 128
    assert not list(user.glob("*.tmp")), "the atomic write leaves no temporary file"


@triton.jit
def _toy_kernel(out_ptr, BLOCK_P: tl.constexpr):
    offsets = tl.arange(0, BLOCK_P)
    tl.store(out_ptr + offsets, offsets.to(tl.float32))


def _toy(monkeypatch, configs=None):
    """A TunedKernel on a GPU named gpu-x (the GPU logic, here on the CPU too), kept out of the registry."""
    monkeypatch.setattr(tuning, "gpu_name", lambda device=None: "gpu-x")
    monkeypatch.setattr(tuning, "REGISTRY", [])
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    configs = configs or WIDE_SPACE
    heuristic = lambda channels: triton.Config({"BLOCK_P": 32 if channels > 8 else 16}, num_warps=1)  # noqa: E731
    return tuning.TunedKernel("toy", _toy_kernel, configs, heuristic, [], writes=("out_ptr",))


CUDA = torch.device("cuda", 0)


def test_table_config_then_heuristic_never_autotuning_by_default(tables, monkeypatch):
    shipped, _ = tables
    _write(shipped, "gpu-x", {"toy": {"hit": _entry(128, 4, 2)}})
    tuned = _toy(monkeypatch)
    assert tuned.choose("hit", {"channels": 3}, CUDA).options == {"BLOCK_P": 128, "num_warps": 4, "num_stages": 2}
    miss = tuned.choose("miss", {"channels": 64}, CUDA)
    assert miss.options == {"BLOCK_P": 32, "num_warps": 1, "num_stages": 3}
    assert tuned.choose("miss", {"channels": 3}, CUDA).options["BLOCK_P"] == 16
    assert miss.least("BLOCK_P") == miss.most("BLOCK_P") == 32


def test_opt_in_autotuning_covers_misses_only_and_never_deterministic_mode(tables, monkeypatch):
    shipped, _ = tables
    _write(shipped, "gpu-x", {"toy": {"hit": _entry(128, 4, 2)}})
    tuned = _toy(monkeypatch)
    tuning.set_autotune(True)
    try:
        assert tuning.autotune_enabled()
        assert tuned.choose("hit", {"channels": 3}, CUDA).options["BLOCK_P"] == 128
        miss = tuned.choose("miss", {"channels": 3}, CUDA)
        assert miss.options is None, "a miss is timed over the space"
        assert (miss.least("BLOCK_P"), miss.most("BLOCK_P")) == (32, 256)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert tuned.choose("miss", {"channels": 3}, CUDA).options["BLOCK_P"] == 16, "no timing-picked order"
            with tuning.recording():
                assert tuned.choose("hit", {"channels": 3}, CUDA).options is None, "recording ignores the table"
        finally:
            torch.use_deterministic_algorithms(previous)
    finally:
        tuning.set_autotune(False)


def test_an_autotuned_winner_persists_in_the_user_table(tables, monkeypatch):
    _, user = tables
    tuned = _toy(monkeypatch)
    tuning.set_autotune(True)
    try:
        launch = tuned.choose("miss", {"channels": 3}, CUDA)
        launch._keep(triton.Config({"BLOCK_P": 256}, num_warps=8, num_stages=2))
    finally:
        tuning.set_autotune(False)
    table = json.loads((user / "gpu-x.json").read_text())["kernels"]
    assert table == {"toy": {"miss": {"kwargs": {"BLOCK_P": 256}, "num_warps": 8, "num_stages": 2}}}
    assert tuned.choose("miss", {"channels": 3}, CUDA).options == {"BLOCK_P": 256, "num_warps": 8, "num_stages": 2}


def test_autotuning_times_again_for_each_table_key(tables, monkeypatch):
    """Triton's autotuner caches winners by its own key, which lacks the layout and pixel bucket of the
    table key: a winner timed for one table key must not be kept for another."""
    tuned = _toy(monkeypatch)
    launching = []

    def autotuner_launch(kernel):  # as Triton's autotuner: time (here: note the table key) on a cache miss
        return {(1,): lambda **arguments: kernel.cache.setdefault("triton's key", launching[-1])}

    monkeypatch.setattr(tuning, "wrap_triton", autotuner_launch)
    monkeypatch.setattr(tuning.Launch, "_keep", lambda self, best: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tuned.autotuned, "best_config", None, raising=False)
    winners = []
    for key in ("nchw", "nchw", "nhwc"):
        launching.append(key)
        tuning.Launch(tuned, key, CUDA, None)((1,))
        winners.append(tuned.autotuned.cache["triton's key"])
    assert winners == ["nchw", "nchw", "nhwc"]


def test_recording_collects_winners_instead_of_writing(tables, monkeypatch):
    _, user = tables
    tuned = _toy(monkeypatch)
    with tuning.recording() as winners:
        tuned.choose("key", {"channels": 3}, CUDA)._keep(triton.Config({"BLOCK_P": 64}, num_warps=2))
    assert winners == {"toy": {"key": {"kwargs": {"BLOCK_P": 64}, "num_warps": 2, "num_stages": 3}}}
    assert not (user / "gpu-x.json").exists()


def test_the_interpreter_runs_one_fixed_config(monkeypatch):
    monkeypatch.setattr(tuning, "REGISTRY", [])
    monkeypatch.setattr(tuning, "interpreting", lambda: True)
    tuned = tuning.TunedKernel("toy", _toy_kernel, tuning.pixel_block_configs(), lambda **_: None, [],
                               writes=("out_ptr",))
    assert tuned.choose("any", {}, torch.device("cpu")).options == tuning.launch_options(tuning.INTERPRETER_PIXEL_BLOCK)


@pytest.mark.skipif(not tuning.interpreting(), reason="launches the toy kernel through the interpreter")
def test_a_launch_binds_arguments_by_name_with_its_config(monkeypatch):
    monkeypatch.setattr(tuning, "REGISTRY", [])
    tuned = tuning.TunedKernel("toy", _toy_kernel, tuning.pixel_block_configs(), lambda **_: None, [],
                               writes=("out_ptr",), interpreter_config=triton.Config({"BLOCK_P": 8}, num_warps=1))
    out = torch.full((16,), -1.0)
    tuned.choose("any", {}, out.device)((1,), out_ptr=out)
    assert out.tolist() == [float(i) for i in range(8)] + [-1.0] * 8


def test_every_kernel_launch_goes_through_a_tuned_kernel():
    """Each Triton kernel the ops launch has a config space, a heuristic and declared writes."""
    import stn_triton.kernels.affine_grid as affine_grid_kernels
    import stn_triton.kernels.blur_pool as blur_kernels
    import stn_triton.kernels.deform_conv as dcn_kernels
    import stn_triton.kernels.ms_deform_attn as attention_kernels
    import stn_triton.kernels.roi as roi_kernels
    import stn_triton.kernels.sample as sample_kernels
    import stn_triton.kernels.sorted_scatter as sorted_kernels

    launched = {
        getattr(module, name)
        for module in (dcn_kernels, sample_kernels, affine_grid_kernels, sorted_kernels, attention_kernels, roi_kernels,
                       blur_kernels)
        for name in dir(module)
        if name.startswith("_") and name.endswith("_kernel")
    }
    assert {kernel.kernel for kernel in tuning.REGISTRY} == launched
    assert len({kernel.name for kernel in tuning.REGISTRY}) == len(tuning.REGISTRY), "table names are unique"
    for kernel in tuning.REGISTRY:
        assert kernel.configs and callable(kernel.heuristic), kernel.name
        assert kernel.writes and set(kernel.writes) <= set(kernel.kernel.arg_names), kernel.name


def test_gpu_name_normalises_like_the_perf_csv(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    tuning._device_name.cache_clear()
    try:
        assert tuning.gpu_name(0) == "nvidia-h100-80gb-hbm3"
    finally:
        tuning._device_name.cache_clear()


@pytest.mark.gpu
def test_tune_writes_a_table_that_the_ops_then_use(tables):
    import stn_triton
    from stn_triton import tune
    from stn_triton.ops import sample as ops
    from stn_triton.ops.sample_configs import fwd_kernel

    _, user = tables
    assert tune.main(["--quick"]) == 0
    table = json.loads((user / f"{tuning.gpu_name()}.json").read_text())["kernels"]
    assert set(table) == {kernel.name for kernel in tuning.REGISTRY}, "every kernel is tuned"
    x = torch.randn(32, 64, 128, 128, device="cuda")
    theta = torch.eye(2, 3, device="cuda").expand(32, 2, 3)
    spec = ops.SampleSpec((128, 128), 1, 0, 0, False, x.dtype)
    key = ops.shape_key("fwd", x, spec)
    assert key in table["sample_fwd"]
    assert fwd_kernel.choose(key, ops.heuristic_shape(x, spec, False), x.device).options == tuning.lookup(
        "sample_fwd", key, tuning.gpu_name())
    torch.testing.assert_close(stn_triton.affine_grid_sample(x, theta), x, atol=1e-5, rtol=1e-5)


CUDA_LIKE = torch.device("cpu")  # the heuristics count SMs: an H100's for a non-CUDA device


def _in_space(config: triton.Config, tuned: tuning.TunedKernel) -> bool:
    return tuning._options_key(tuning.launch_options(config)) in tuned.space


def test_every_heuristic_picks_a_config_of_its_space():
    """A heuristic's config is one the space times too, so the tuned table (which accepts only configs
    of the space) can only improve on it."""
    from stn_triton.ops import (
        affine_grid,
        blur_pool,
        deform_conv_configs,
        ms_deform_attn,
        roi,
        sample_configs,
        sorted_scatter,
    )

    checked = set()
    for channels in (1, 3, 4, 5, 16, 32, 64, 256):
        for nhwc in (False, True):
            for taps in (1, 4, 8, 16):
                for backward in (False, True):
                    shape = dict(channels=channels, nhwc=nhwc, taps=taps, backward=backward)
                    for tuned in (sample_configs.fwd_kernel, sample_configs.bwd_kernel, sample_configs.taps_kernel):
                        assert _in_space(tuned.heuristic(**shape), tuned), (tuned.name, shape)
                        checked.add(tuned.name)
            for tuned in (sorted_scatter._segments_kernel, sorted_scatter._runs_kernel):
                assert _in_space(tuned.heuristic(channels=channels, contiguous=nhwc), tuned), (tuned.name, channels)
                checked.add(tuned.name)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for group_channels, group_out_channels, offset_group_channels in ((1, 1, 1), (3, 4, 3), (16, 16, 8),
                                                                          (64, 64, 64), (256, 256, 256), (8, 512, 2)):
            shape = dict(rows=4096, group_channels=group_channels, group_out_channels=group_out_channels,
                         offset_group_channels=offset_group_channels, dtype=dtype, channels_fastest=True)
            for tuned in (deform_conv_configs.fwd_kernel, deform_conv_configs.bwd_data_kernel,
                          deform_conv_configs.bwd_weight_kernel, deform_conv_configs.taps_kernel):
                assert _in_space(tuned.heuristic(**shape), tuned), (tuned.name, shape)
                checked.add(tuned.name)
    for tuned in (affine_grid._grid_kernel, affine_grid._bwd_kernel):
        assert _in_space(tuned.heuristic(), tuned), tuned.name
        checked.add(tuned.name)
    for channels in (1, 3, 8, 16, 32, 33, 64, 128, 256):
        for rows in (1, 300, 2 * 300 * 8, 2 * 22223 * 8):
            for backward in (False, True):
                for tuned in (ms_deform_attn.fwd_kernel, ms_deform_attn.bwd_kernel, ms_deform_attn.taps_kernel):
                    config = tuned.heuristic(channels=channels, rows=rows, backward=backward, device=CUDA_LIKE)
                    assert _in_space(config, tuned), (tuned.name, channels, rows, backward)
                    checked.add(tuned.name)
    for channels in (1, 3, 8, 16, 33, 64, 256, 1024):
        for nhwc in (False, True):
            for tuned in (roi.fwd_kernel, roi.bwd_kernel, roi.pixels_kernel):
                assert _in_space(tuned.heuristic(channels=channels, nhwc=nhwc), tuned), (tuned.name, channels, nhwc)
                checked.add(tuned.name)
            assert _in_space(blur_pool.fwd_kernel.heuristic(channels=channels, nhwc=nhwc), blur_pool.fwd_kernel)
            for windows in (1, 4, 9):
                config = blur_pool.bwd_kernel.heuristic(channels=channels, nhwc=nhwc, windows=windows)
                assert _in_space(config, blur_pool.bwd_kernel), (channels, nhwc, windows)
            checked.update((blur_pool.fwd_kernel.name, blur_pool.bwd_kernel.name))
    assert checked == {kernel.name for kernel in tuning.REGISTRY}, "every tuned kernel's heuristic is checked"


def test_row_align_covers_every_weight_gradient_block():
    """grad_weight pads each image to ROW_ALIGN rows so that no block of rows straddles two images:
    every BLOCK_M the weight kernel can launch with must divide it."""
    from stn_triton.ops import deform_conv_configs as configs

    blocks = {config.kwargs["BLOCK_M"] for config in configs.bwd_weight_kernel.configs}
    blocks.add(configs.bwd_weight_kernel.interpreter_options["BLOCK_M"])
    assert all(configs.ROW_ALIGN % block == 0 for block in blocks), (configs.ROW_ALIGN, blocks)
    assert configs.ROW_ALIGN == max(blocks)


def test_a_launch_on_another_gpu_runs_under_that_gpus_guard(monkeypatch):
    """Triton launches on the current device; a tensor on cuda:1 while cuda:0 is current must not."""
    events = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    class Wrapped:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **arguments: events.append(("launch", grid, arguments["out_ptr"]))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(tuning, "wrap_triton", Wrapped)
    tuned = _toy(monkeypatch)
    for index in (1, 0):
        tuning.Launch(tuned, "key", torch.device("cuda", index), {"BLOCK_P": 8})((1,), out_ptr=index)
    assert events == [("enter", torch.device("cuda", 1)), ("launch", (1,), 1), ("exit", torch.device("cuda", 1)),
                      ("launch", (1,), 0)]
