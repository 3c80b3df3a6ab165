"""End-to-end extraction into zarr: every family, round trip, determinism, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from diffatlas.activations.config import ExtractConfig
from diffatlas.activations.extract import extract_activations, images_to_tensor
from diffatlas.activations.hooks import ActivationCapture
from diffatlas.activations.layers import resolve_layers
from diffatlas.activations.noise import add_noise, sample_noise
from diffatlas.activations.store import ActivationStore
from diffatlas.errors import UserError
from diffatlas.models.loader import load_model
from diffatlas.models.tiny import make_tiny_model

torch.set_num_threads(1)

N = 7
LABELS = ["red circle", "blue square", "red circle", "green triangle", "blue square", "red circle", "green triangle"]
COARSE = [lab.split()[1] for lab in LABELS]
IDS = [40, 3, 17, 8, 21, 5, 99]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {fam: make_tiny_model(fam, root / fam) for fam in ("pixel", "sd", "sdxl", "dit")}


@pytest.fixture(scope="module")
def pixel(models):
    return load_model(models["pixel"])


def run(handle, images, out, **cfg):
    cfg.setdefault("layers", ["mid", "up_ft0"])
    cfg.setdefault("timesteps", [400, 20])
    cfg.setdefault("batch_size", 3)
    return ActivationStore(
        extract_activations(
            handle, images=images, sample_ids=IDS, labels=LABELS, coarse_labels=COARSE,
            captions=[f"a {lab}" for lab in LABELS], cfg=ExtractConfig(**cfg), out=out,
        )
    )


def reference(handle, images, layer, t, seed=0, draw=0, prompts=None):
    """Unbatched reference: each sample on its own, noise rebuilt from its id, no stop-early."""
    layers = resolve_layers(handle.denoiser, [layer])
    pooled, maps = [], []
    with torch.no_grad(), ActivationCapture(handle.denoiser, layers, spatial_layers=[layer], spatial_max_size=None,
                                            spatial_dtype=torch.float32, stop_early=False) as cap:
        for i in range(N):
            x0 = handle.encode_images(images_to_tensor(images[i : i + 1], handle.image_size, torch.device("cpu")))
            x_t = add_noise(x0, sample_noise([IDS[i]], t, x0.shape[1:], seed, draw), float(handle.alphas_cumprod[t]))
            cond = handle.conditioning([""] if prompts is None else [prompts[i]])
            res = cap.run(handle.predict_noise, x_t, torch.tensor([t]), cond)[layers[0].name]
            pooled.append(res.pooled[0])
            maps.append(res.spatial[0])
    return torch.stack(pooled).numpy(), torch.stack(maps).numpy()


def test_round_trip_coordinates_attributes_and_values(pixel, images, tmp_path):
    store = run(pixel, images, tmp_path / "a.zarr", spatial_max_size=4)
    assert list(store.timesteps) == [400, 20]
    np.testing.assert_allclose(store.alpha_bar, pixel.alphas_cumprod[[400, 20]].double().numpy(), rtol=1e-7)
    assert list(store.sample_ids) == IDS
    assert list(store.labels("fine")) == LABELS and list(store.labels("coarse")) == COARSE
    a = store.attrs
    assert a["model_id"] == str(pixel.model_id) and a["revision"] == pixel.revision and a["family"] == "pixel"
    assert a["scheduler_config"]["num_train_timesteps"] == 1000 and a["scheduler_class"] == "DDIMScheduler"
    assert a["layers"] == {"mid": "mid_block", "up_ft0": "up_blocks.0"}
    assert (a["prompt"], a["conditioning"], a["pooling"], a["noise"], a["seed"]) == ("", "empty", "mean", "forward", 0)
    assert a["image_size"] == 32 and a["guidance_scale"] == 1.0 and a["noise_ensemble"] == 1

    # Values: the batched, stop-early extraction equals an unbatched reference per sample.
    for layer in ("mid", "up_ft0"):
        want_pooled, want_maps = reference(pixel, images, layer, 20)
        np.testing.assert_allclose(store.pooled(layer, 20), want_pooled, rtol=1e-4, atol=1e-5)
        h = store.spatial_shape(layer)[1]
        size = want_maps.shape[-1]
        pooled_maps = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(want_maps), (min(size, 4),) * 2).numpy()
        assert h == min(size, 4)
        np.testing.assert_allclose(store.spatial(layer, 20).astype(np.float32), pooled_maps, rtol=1e-2, atol=1e-2)

    # xarray opens the whole store with named dimensions and the attributes.
    ds = xr.open_zarr(tmp_path / "a.zarr")
    assert ds["pooled__mid"].dims == ("timestep", "sample", "channel__mid")
    assert ds["spatial__up_ft0"].dims[:2] == ("timestep", "sample")
    assert list(ds["timestep"].values) == [400, 20] and list(ds["sample"].values) == IDS
    np.testing.assert_array_equal(ds["pooled__mid"].sel(timestep=20).values, store.pooled("mid", 20))
    assert ds.attrs["layers"]["up_ft0"] == "up_blocks.0"


def test_deterministic_and_batch_size_independent(pixel, images, tmp_path):
    a = run(pixel, images, tmp_path / "a.zarr", batch_size=3)
    b = run(pixel, images, tmp_path / "b.zarr", batch_size=3)
    c = run(pixel, images, tmp_path / "c.zarr", batch_size=5)
    for layer in ("mid", "up_ft0"):
        for t in (20, 400):
            assert np.array_equal(a.pooled(layer, t), b.pooled(layer, t))  # bitwise
            assert np.array_equal(a.spatial(layer, t), b.spatial(layer, t))
            # Another batch size: same noise per sample, so only float summation order differs.
            np.testing.assert_allclose(a.pooled(layer, t), c.pooled(layer, t), rtol=1e-5, atol=1e-6)


def test_ensemble_is_mean_over_draws_and_sum_pooling(pixel, images, tmp_path):
    store = run(pixel, images, tmp_path / "e.zarr", layers=["mid"], timesteps=[300], noise_ensemble=2, pooling="sum",
                spatial=False)
    assert not store.has_spatial("mid")
    p0, m0 = reference(pixel, images, "mid", 300, draw=0)
    p1, m1 = reference(pixel, images, "mid", 300, draw=1)
    np.testing.assert_allclose(store.pooled("mid", 300), (m0.sum((2, 3)) + m1.sum((2, 3))) / 2, rtol=1e-4, atol=1e-4)
    assert not np.allclose(p0, p1)  # the draws really differ


def test_bfloat16_autocast_close_to_float32(pixel, images, tmp_path):
    """The autocast path (used with float16 on GPU) runs and agrees with float32 to bf16 precision."""
    f32 = run(pixel, images, tmp_path / "f.zarr", layers=["up_ft1"], timesteps=[200], spatial=False)
    b16 = run(pixel, images, tmp_path / "b.zarr", layers=["up_ft1"], timesteps=[200], spatial=False, dtype="bfloat16")
    a, b = f32.pooled("up_ft1", 200), b16.pooled("up_ft1", 200)
    assert b.dtype == np.float32 and b16.attrs["dtype"] == "bfloat16"
    assert not np.array_equal(a, b)  # bf16 really was used
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_class_template_conditioning(pixel, images, tmp_path):
    store = run(pixel, images, tmp_path / "c.zarr", layers=["mid"], timesteps=[100], conditioning="class_template",
                prompt_template="a small {label}", spatial=False)
    want, _ = reference(pixel, images, "mid", 100, prompts=[f"a small {lab}" for lab in LABELS])
    np.testing.assert_allclose(store.pooled("mid", 100), want, rtol=1e-4, atol=1e-5)
    assert store.attrs["prompt"] == "a small {label}"
    empty, _ = reference(pixel, images, "mid", 100)
    assert not np.allclose(want, empty)  # the prompt reached the model


def test_inversion_mode(pixel, images, tmp_path):
    store = run(pixel, images, tmp_path / "i.zarr", layers=["mid"], timesteps=[300, 100, 500], noise="inversion",
                inversion_steps=5, spatial=False)
    # Reference: invert the first sample alone along its own path, then capture.
    from diffatlas.activations.noise import ddim_invert, inversion_path

    layers = resolve_layers(pixel.denoiser, ["mid"])
    cond = pixel.conditioning([""])
    eps = lambda x, t: pixel.predict_noise(x, torch.tensor([t]), cond)  # noqa: E731
    with torch.no_grad(), ActivationCapture(pixel.denoiser, layers, stop_early=False) as cap:
        x0 = pixel.encode_images(images_to_tensor(images[:1], 32, torch.device("cpu")))
        for t in (100, 300, 500):  # paths [100], [200, 300], [200, 400, 500]
            x_t = ddim_invert(eps, x0, inversion_path(t, 5, 1000), pixel.alphas_cumprod)
            got = cap.run(pixel.predict_noise, x_t, torch.tensor([t]), cond)["mid"].pooled[0].numpy()
            np.testing.assert_allclose(store.pooled("mid", t)[0], got, rtol=1e-4, atol=1e-5)
    assert store.attrs["noise"] == "inversion" and store.attrs["inversion_steps"] == 5

    # Extracting t=300 alone gives what it gave next to t=100 (each target has its own path).
    # Guidance: with the empty prompt the two branches agree, so any scale gives the same path;
    # with a class prompt the guided inversion goes elsewhere.
    kw = dict(layers=["mid"], timesteps=[300], noise="inversion", inversion_steps=5, spatial=False)
    same = run(pixel, images, tmp_path / "g.zarr", guidance_scale=4.0, **kw)
    np.testing.assert_allclose(same.pooled("mid", 300), store.pooled("mid", 300), rtol=1e-4, atol=1e-5)
    cls1 = run(pixel, images, tmp_path / "c1.zarr", conditioning="class_template", **kw)
    cls4 = run(pixel, images, tmp_path / "c4.zarr", conditioning="class_template", guidance_scale=4.0, **kw)
    assert not np.allclose(cls1.pooled("mid", 300), cls4.pooled("mid", 300), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "family,layers,expect",
    [
        ("sd", ["down_ft1", "mid", "up_ft3"], {"down_ft1": (16, 4, 4), "mid": (32, 2, 2), "up_ft3": (16, 8, 8)}),
        ("sdxl", ["mid", "up_ft1"], {"mid": (32, 4, 4), "up_ft1": (32, 8, 8)}),
        ("dit", ["block0", "block1"], {"block0": (16, 8, 8), "block1": (16, 8, 8)}),
        ("pixel", ["down_ft0", "mid", "up_ft2"], {"down_ft0": (16, 8, 8), "mid": (32, 8, 8), "up_ft2": (16, 8, 8)}),
    ],
)
def test_every_family(models, images, tmp_path, family, layers, expect):
    handle = load_model(models[family])
    store = run(handle, images, tmp_path / f"{family}.zarr", layers=layers, timesteps=[999, 0], spatial_max_size=8)
    assert store.attrs["family"] == family
    for layer, shape in expect.items():
        assert store.spatial_shape(layer) == shape
        for t in (0, 999):
            pooled = store.pooled(layer, t)
            assert pooled.shape == (N, shape[0]) and np.isfinite(pooled).all()
            # The stored map averages back to the pooled mean (alignment of the two arrays).
            maps = store.spatial(layer, t).astype(np.float32)
            np.testing.assert_allclose(maps.mean((2, 3)), pooled, rtol=2e-2, atol=2e-2)
        assert not np.allclose(store.pooled(layer, 0), store.pooled(layer, 999))


def test_dit_class_template_uses_labels_as_classes(models, images, tmp_path):
    dit = load_model(models["dit"])
    store = run(dit, images, tmp_path / "d.zarr", layers=["block1"], timesteps=[500], conditioning="class_template",
                spatial=False)
    null = run(dit, images, tmp_path / "n.zarr", layers=["block1"], timesteps=[500], spatial=False)
    assert not np.allclose(store.pooled("block1", 500), null.pooled("block1", 500))
    with pytest.raises(UserError, match="caption"):
        run(dit, images, tmp_path / "x.zarr", layers=["block1"], conditioning="caption")


# -- bad input ------------------------------------------------------------------------------------
def test_bad_layers_list_what_exists(models, pixel, images, tmp_path):
    with pytest.raises(UserError, match=r"'nope'.*available aliases: down_ft0.*mid.*up_ft2"):
        run(pixel, images, tmp_path / "x.zarr", layers=["nope"])
    with pytest.raises(UserError, match=r"'up_ft3'.*no such block.*up_ft2"):
        run(pixel, images, tmp_path / "x.zarr", layers=["up_ft3"])
    with pytest.raises(UserError, match=r"'zzz\.\*' matches no module"):
        run(pixel, images, tmp_path / "x.zarr", layers=["zzz.*"])
    dit = load_model(models["dit"])
    with pytest.raises(UserError, match=r"'mid'.*DiTTransformer2DModel.*block0, block1"):
        run(dit, images, tmp_path / "x.zarr", layers=["mid"])
    assert not any(tmp_path.iterdir())


def test_bad_timestep_empty_dataset_unwritable(pixel, images, tmp_path):
    with pytest.raises(UserError, match=r"\[1000\].*num_train_timesteps = 1000.*0\.\.999"):
        run(pixel, images, tmp_path / "x.zarr", timesteps=[10, 1000])
    with pytest.raises(UserError, match="empty"):
        extract_activations(pixel, images=images[:0], sample_ids=[], labels=[], coarse_labels=[], captions=[],
                            cfg=ExtractConfig(), out=tmp_path / "x.zarr")
    with pytest.raises(UserError, match=r"unique.*\[3\]"):
        extract_activations(pixel, images=images[:2], sample_ids=[3, 3], labels=["a", "b"], coarse_labels=None,
                            captions=None, cfg=ExtractConfig(), out=tmp_path / "x.zarr")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match=r"file/sub/x\.zarr"):
        run(pixel, images, blocker / "sub" / "x.zarr")
    with pytest.raises(UserError, match="extract.noise = 'sideways'"):
        ExtractConfig(noise="sideways")
    with pytest.raises(UserError, match="unknown config key.*layerz"):
        ExtractConfig.from_dict({"layerz": ["mid"]})


def test_failure_mid_extraction_leaves_no_store(models, images, tmp_path):
    handle = load_model(models["pixel"])
    calls = {"n": 0}
    real = handle.predict_noise

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    handle.predict_noise = flaky
    out = tmp_path / "store" / "m.zarr"
    out.parent.mkdir()
    with pytest.raises(RuntimeError, match="killed"):
        run(handle, images, out)
    assert calls["n"] == 4
    assert not out.exists() and list(out.parent.iterdir()) == []  # no store, no temp or scratch dir
    assert all(not m._forward_hooks for m in handle.denoiser.modules())
    # A stale store from an earlier run is replaced only on success.
    handle.predict_noise = real
    good = run(handle, images, out)
    assert len(good) == N


def test_cli_end_to_end(models, images, tmp_path):
    from diffatlas.cli import main
    from diffatlas.data.dataset import write_dataset

    meta = pd.DataFrame({"sample_id": IDS, "label": LABELS, "coarse_label": COARSE, "caption": [f"a {x}" for x in LABELS]})
    write_dataset(tmp_path / "data", images, meta)
    out = tmp_path / "act" / "tiny" / "data.zarr"
    cfg = {"layers": ["mid"], "timesteps": [10], "batch_size": 4, "conditioning": "caption"}
    rc = main(["extract", "--model", str(models["pixel"]), "--dataset", str(tmp_path / "data"), "--out", str(out),
               "--config-json", json.dumps(cfg), "--threads", "1", "--model-name", "tiny"])
    assert rc == 0
    store = ActivationStore(out)
    assert list(store.sample_ids) == IDS and list(store.labels()) == LABELS
    assert store.attrs["model_name"] == "tiny" and store.attrs["dataset_name"] == "data"
    assert store.attrs["conditioning"] == "caption"
    rc = main(["extract", "--model", str(models["pixel"]), "--dataset", str(tmp_path / "data"), "--out", str(out),
               "--config-json", json.dumps({"timesteps": [5000]})])
    assert rc == 2


def test_read_rows_from_memory_map(tmp_path):
    from diffatlas.activations.extract import read_rows

    arr = np.random.default_rng(1).integers(0, 256, (9, 4, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert np.array_equal(read_rows(mm, 2, 7), arr[2:7])
    assert np.array_equal(read_rows(mm[3:], 1, 4), arr[4:7])  # a view falls back to slicing
    assert np.array_equal(read_rows(arr, 0, 9), arr)

