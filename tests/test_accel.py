"""Precision per stage and out-of-memory messages (no GPU needed)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from diffatlas.accel import amp_dtype, describe_precision, out_of_memory_hint, resolve_dtype
from diffatlas.errors import UserError


def test_auto_dtype_per_stage_and_device():
    assert resolve_dtype("auto", "cpu", "geometry") == "float32"
    assert resolve_dtype("auto", torch.device("cuda"), "geometry") == "float16"
    assert resolve_dtype("auto", "cuda:0", "extract") == "float16"
    assert resolve_dtype("auto", "cuda", "daam") == "float32"  # stages without autocast stay float32
    assert resolve_dtype("bfloat16", "cpu", "geometry") == "bfloat16"
    assert amp_dtype("auto", "cpu", "extract") is None and amp_dtype("float16", "cpu", "x") is torch.float16
    assert describe_precision(torch.float32, denoise=torch.bfloat16, jacobian="float32", other=None) == {
        "weights": "float32", "denoise": "bfloat16", "jacobian": "float32", "other": "float32"}
    with pytest.raises(UserError, match="geometry.dtype = 'half'.*auto, float32, float16, bfloat16"):
        resolve_dtype("half", "cpu", "geometry")


def test_geometry_config_checks_dtype():
    from diffatlas.geometry.config import GeometryConfig

    assert GeometryConfig().dtype == "auto"
    with pytest.raises(UserError, match="geometry.dtype"):
        GeometryConfig(dtype="fp8")


def test_out_of_memory_names_stage_size_and_setting():
    with pytest.raises(UserError) as info:
        with out_of_memory_hint("geometry basis (t=999)", "3 samples x 6 directions", "geometry.chunk_size"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    msg = str(info.value)
    assert "geometry basis (t=999)" in msg and "3 samples x 6 directions" in msg and "geometry.chunk_size" in msg
    assert "Tried to allocate 20.00 GiB" in msg


def test_geometry_out_of_memory_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import diffatlas.geometry.run as run
    from diffatlas.cli import main as cli
    from diffatlas.models.tiny import make_tiny_model

    model = make_tiny_model("pixel", tmp_path / "model")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 31.00 GiB")

    monkeypatch.setattr(run, "top_singular", oom)
    cfg = json.dumps({"n_samples": 2, "n_directions": 2, "oversample": 1, "ddim_steps": 2, "edit_directions": 1})
    rc = cli(["geometry", "--model", str(model), "--timestep", "999", "--out", str(tmp_path / "t999"),
              "--config-json", cfg, "--device", "cpu", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "geometry basis (t999)" in err and "2 samples x 3 directions" in err and "geometry.attention_chunk" in err
    assert not (tmp_path / "t999").exists()
    assert not list(tmp_path.glob("*t999*"))  # no temporary left behind either


def test_cuda_without_gpu_is_a_clear_error():
    from diffatlas.io import pick_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="device 'cuda' requested.*config key device.*set device: auto or cpu"):
        pick_device("cuda")


def test_cpu_allocator_failure_is_a_clear_error(monkeypatch, capsys):
    """torch's CPU allocator raises a plain RuntimeError, not OutOfMemoryError: the CLI still names it."""
    import types

    import diffatlas.cli as cli_mod

    def allocate(argv):  # a real allocation far past any machine's memory (2**62 bytes)
        return torch.empty(2**59, dtype=torch.float64, device="cpu").sum()

    monkeypatch.setattr(cli_mod, "available_commands", lambda: ["huge"])
    monkeypatch.setitem(sys.modules, "diffatlas.commands.huge", types.SimpleNamespace(main=allocate))
    rc = cli_mod.main(["huge"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "out of memory" in err and "batch_size" in err
