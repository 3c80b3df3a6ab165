"""The background writer and the per-time stores read as one.

Oracles: the synchronous writer (same bytes), and a joint multi-timestep extraction (the
per-time stores must hold exactly its values: noise is seeded per sample and timestep).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from diffatlas.activations import store as store_mod
from diffatlas.activations.config import ExtractConfig
from diffatlas.activations.extract import extract_activations
from diffatlas.activations.store import ActivationStore, open_dataset
from diffatlas.errors import UserError
from diffatlas.models.loader import load_model
from diffatlas.models.tiny import make_tiny_model

torch.set_num_threads(1)

N = 7
LABELS = ["red circle", "blue square", "red circle", "green triangle", "blue square", "red circle", "green triangle"]
IDS = [40, 3, 17, 8, 21, 5, 99]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("pixel", tmp_path_factory.mktemp("models") / "pixel")


@pytest.fixture(scope="module")
def pixel(model_dir):
    return load_model(model_dir)


def run(handle, images, out, background=True, **cfg):
    cfg.setdefault("layers", ["mid", "up_ft0"])
    cfg.setdefault("timesteps", [400, 20])
    cfg.setdefault("batch_size", 3)
    return extract_activations(
        handle, images=images, sample_ids=IDS, labels=LABELS, coarse_labels=None, captions=None,
        cfg=ExtractConfig(**cfg), out=out, background=background,
    )


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "activation-writer"]


def test_background_write_equals_synchronous_write(pixel, images, tmp_path):
    a = zarr.open_group(str(run(pixel, images, tmp_path / "bg.zarr")), mode="r")
    b = zarr.open_group(str(run(pixel, images, tmp_path / "sync.zarr", background=False)), mode="r")
    names = sorted(name for name, _ in a.arrays())
    assert names == sorted(name for name, _ in b.arrays())
    assert {"pooled__mid", "spatial__mid", "pooled__up_ft0", "spatial__up_ft0"} <= set(names)
    for name in names:
        x, y = a[name], b[name]
        assert (x.shape, x.chunks, x.dtype, x.metadata.dimension_names) == (y.shape, y.chunks, y.dtype, y.metadata.dimension_names)
        assert np.array_equal(x[...], y[...]), name  # bit for bit
    assert dict(a.attrs) == dict(b.attrs)
    assert not writer_threads()


@pytest.mark.parametrize("fail_at", [1, 5])
def test_writer_failure_surfaces_and_leaves_no_store(pixel, images, tmp_path, monkeypatch, fail_at):
    """An error on the writer thread is raised in the caller; no store, temp or scratch dir is left."""
    real = store_mod.ActivationWriter.write
    calls = {"n": 0, "thread": None}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        calls["thread"] = threading.current_thread().name
        if calls["n"] == fail_at:
            raise OSError("disk full (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store_mod.ActivationWriter, "write", failing)
    out = tmp_path / "store" / "m.zarr"
    out.parent.mkdir()
    with pytest.raises(OSError, match="injected"):
        run(pixel, images, out)
    assert calls["thread"] == "activation-writer"  # the write really ran on the worker
    assert calls["n"] == fail_at  # nothing was written after the failure
    assert list(out.parent.iterdir()) == []
    assert not writer_threads()
    assert all(not m._forward_hooks for m in pixel.denoiser.modules())


def test_compute_failure_stops_the_writer(model_dir, images, tmp_path):
    handle = load_model(model_dir)
    real, calls = handle.predict_noise, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    handle.predict_noise = flaky
    with pytest.raises(RuntimeError, match="killed"):
        run(handle, images, tmp_path / "m.zarr")
    assert list(tmp_path.iterdir()) == [] and not writer_threads()


def test_writer_refuses_an_incomplete_store(tmp_path):
    spec = store_mod.LayerSpec(name="mid", module_path="mid_block", channels=2, height=0, width=0, spatial=False)
    with pytest.raises(RuntimeError, match=r"layer mid: 3 \(timestep, sample\) rows were never written.*row 2"):
        with store_mod.open_writer(tmp_path / "s.zarr", timesteps=[5], alpha_bar=[0.5], sample_ids=[1, 2, 3, 4, 5],
                                   labels=list("abcde"), coarse_labels=None, layers=[spec], attrs={}, batch_size=2) as w:
            w.submit(0, 0, {"mid": (np.ones((2, 2), np.float32), None)})
    assert list(tmp_path.iterdir()) == []


def test_per_time_stores_read_as_one(pixel, images, tmp_path):
    kw = dict(layers=["mid", "up_ft0"], spatial_max_size=4)
    joint = ActivationStore(run(pixel, images, tmp_path / "joint.zarr", timesteps=[400, 20], **kw))
    times = tmp_path / "act" / "tiny" / "data"
    for t in (400, 20, 700):
        run(pixel, images, times / f"t{t}.zarr", timesteps=[t], **kw)
    store = ActivationStore(times)
    assert list(store.timesteps) == [20, 400, 700] and list(store.sample_ids) == IDS
    assert list(store.labels()) == LABELS and store.layers == ["mid", "up_ft0"]
    np.testing.assert_allclose(store.alpha_bar, pixel.alphas_cumprod[[20, 400, 700]].double().numpy(), rtol=1e-7)
    for t in (20, 400):
        for layer in ("mid", "up_ft0"):
            assert np.array_equal(store.pooled(layer, t), joint.pooled(layer, t))  # same noise per sample and time
            assert np.array_equal(store.spatial(layer, t), joint.spatial(layer, t))
            assert np.array_equal(store.spatial(layer, t, np.array([4, 1])), joint.spatial(layer, t)[[4, 1]])
    assert not np.allclose(store.pooled("mid", 700), store.pooled("mid", 400))
    with pytest.raises(UserError, match=r"timestep 250 is not in .*stored timesteps: 20, 400, 700"):
        store.pooled("mid", 250)

    # xarray: one Dataset over the times; sample-level variables once, not per timestep.
    ds = open_dataset(times)
    assert list(ds["timestep"].values) == [20, 400, 700] and list(ds["sample"].values) == IDS
    assert ds["pooled__mid"].dims == ("timestep", "sample", "channel__mid")
    assert ds["label_code"].dims == ("sample",)
    np.testing.assert_array_equal(ds["spatial__up_ft0"].sel(timestep=400).values, joint.spatial("up_ft0", 400))
    np.testing.assert_array_equal(ds["alpha_bar"].values, store.alpha_bar)
    assert ds.attrs["layers"] == {"mid": "mid_block", "up_ft0": "up_blocks.0"}


def test_parts_of_other_extractions_are_refused(pixel, images, tmp_path):
    run(pixel, images, tmp_path / "a" / "t20.zarr", timesteps=[20], layers=["mid"])
    run(pixel, images, tmp_path / "a" / "t40.zarr", timesteps=[40], layers=["mid"], pooling="sum")
    with pytest.raises(UserError, match=r"t40.zarr and .*t20.zarr differ in 'extract_config'|differ in 'pooling'"):
        ActivationStore(tmp_path / "a")
    run(pixel, images, tmp_path / "b" / "t20.zarr", timesteps=[20], layers=["mid"])
    run(pixel, images, tmp_path / "b" / "u20.zarr", timesteps=[20], layers=["mid"])
    with pytest.raises(UserError, match="timestep 20 is stored twice"):
        ActivationStore(tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is not an activation store.*run the extract rule"):
        ActivationStore(tmp_path / "empty")


def test_cli_extracts_one_timestep(model_dir, images, tmp_path):
    from diffatlas.cli import main
    from diffatlas.data.dataset import write_dataset

    meta = pd.DataFrame({"sample_id": IDS, "label": LABELS, "coarse_label": LABELS, "caption": [""] * N})
    write_dataset(tmp_path / "data", images, meta)
    out = tmp_path / "act" / "tiny" / "data" / "t30.zarr"
    cfg = {"layers": ["mid"], "timesteps": [10, 20], "batch_size": 4}
    rc = main(["extract", "--model", str(model_dir), "--dataset", str(tmp_path / "data"), "--out", str(out),
               "--timestep", "30", "--config-json", json.dumps(cfg), "--threads", "1"])
    assert rc == 0
    store = ActivationStore(out.parent)
    assert list(store.timesteps) == [30] and store.attrs["extract_config"]["timesteps"] == [30]
