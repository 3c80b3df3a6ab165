"""Sharded datasets and sharded extraction: shards gathered into one store equal one job's store.

The oracle of the gathered store is an unsharded extraction of the same dataset (every array's
values and coordinates; attributes but the shard list), or, for shards that are not
chunk-aligned, the shard stores' own values concatenated. The workflow tests check what
Snakemake plans: a deleted shard store re-runs alone, and a grown dataset adds shards without
touching the finished ones (mtimes unchanged).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
import zarr
from dryrun import planned_jobs

from diffatlas.activations.config import ExtractConfig
from diffatlas.activations.extract import extract
from diffatlas.activations.gather import gather_stores
from diffatlas.activations.store import ActivationStore, open_dataset
from diffatlas.data.build import make_dataset
from diffatlas.data.dataset import load_dataset
from diffatlas.data.shards import plan_shards, shard_section, write_index
from diffatlas.errors import UserError
from diffatlas.models.tiny import make_tiny_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
N, BATCH = 20, 4
SECTION = {"kind": "shapesworld", "n_samples": N, "seed": 3}
CFG = dict(layers=["mid", "up_ft0"], timesteps=[300], batch_size=BATCH, spatial_max_size=8)


def _sharded_dataset(root: Path, shard_size: int) -> list[str]:
    plans = plan_shards(SECTION, "sw", shard_size)
    for p in plans:
        make_dataset(shard_section(SECTION), root / "shards" / p.name, "sw", rows=(p.start, p.stop), digest=p.digest)
    write_index(root, [p.name for p in plans], SECTION, "sw", shard_size)
    return [p.name for p in plans]


def _extract(model: Path, data: Path, out: Path, **overrides) -> Path:
    return extract(ExtractConfig(**{**CFG, **overrides}), model=model, dataset=data, out=out,
                   model_name="tiny", dataset_name="sw")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    model = make_tiny_model("pixel", tmp / "model", seed=0)
    make_dataset(SECTION, tmp / "plain", "sw")
    aligned = _sharded_dataset(tmp / "aligned", 8)  # 8, 8, 4 samples: whole chunks of 4
    whole = _extract(model, tmp / "plain", tmp / "whole.zarr")
    parts = [_extract(model, tmp / "aligned" / "shards" / s, tmp / "parts" / f"{s}.zarr") for s in aligned]
    return dict(tmp=tmp, model=model, whole=whole, parts=parts, names=aligned)


def test_sharded_dataset_reads_as_the_plain_one(world, tmp_path):
    plain = load_dataset(world["tmp"] / "plain")
    for mmap in (False, True):
        ds = load_dataset(world["tmp"] / "aligned", mmap=mmap)
        assert len(ds) == N and ds.info["n_samples"] == N and [s["n"] for s in ds.info["shards"]] == [8, 8, 4]
        assert np.array_equal(np.asarray(ds.images), plain.images) and np.array_equal(np.asarray(ds.masks), plain.masks)
        assert ds.meta.equals(plain.meta)
        rows = np.array([19, 0, 8, 7, 15, 16])
        assert np.array_equal(ds.images[rows], plain.images[rows])
        assert np.array_equal(ds.images[3:18:5, :, :, 1], plain.images[3:18:5, :, :, 1])
        assert np.array_equal(ds.images[-1], plain.images[-1]) and np.array_equal(ds.images[6:10], plain.images[6:10])
    # the index file itself names the dataset too (what rules pass)
    assert len(load_dataset(world["tmp"] / "aligned" / "index.json")) == N


def test_gathered_store_equals_an_unsharded_extraction(world, tmp_path):
    out = gather_stores(world["parts"], tmp_path / "t300.zarr", names=world["names"], dataset_path=str(world["tmp"] / "plain"))
    whole, gathered = zarr.open_group(str(world["whole"]), mode="r"), zarr.open_group(str(out), mode="r")
    names = sorted(k for k, _ in whole.arrays())
    assert names == sorted(k for k, _ in gathered.arrays())
    for name in names:
        a, b = whole[name], gathered[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.array_equal(a[:], b[:]), name
        assert a.metadata.dimension_names == b.metadata.dimension_names, name
    drop = ("shards",)
    assert {k: v for k, v in gathered.attrs.items() if k not in drop} == dict(whole.attrs)
    assert gathered.attrs["shards"] == [{"name": s, "n": n} for s, n in zip(world["names"], [8, 8, 4])]
    # xarray and ActivationStore read it as one, in dataset order
    xr.testing.assert_identical(xr.open_zarr(str(out)).drop_attrs(), xr.open_zarr(str(world["whole"])).drop_attrs())
    store = ActivationStore(out)
    assert store.sample_ids.tolist() == list(range(N))
    assert list(store.labels("fine")) == list(load_dataset(world["tmp"] / "plain").labels("fine"))
    # the dataset's attributes, re-coded over the union of the shards' classes (a shard of 4
    # samples lacks some positions): decoded, they are the dataset's values
    plain = load_dataset(world["tmp"] / "plain")
    assert store.attribute_names == plain.attribute_names == ["colour", "shape", "size", "position"]
    for name, values in plain.attributes().items():
        codes, classes = store.attributes()[name]
        assert classes == sorted(set(values.tolist())) and [classes[c] for c in codes] == values.tolist()
    assert len(ActivationStore(world["parts"][2]).attributes()["position"][1]) < len(store.attributes()["position"][1])
    assert open_dataset(out).sizes["sample"] == N
    # the chunks are the shards' files (hard links), not copies
    src = world["parts"][1] / "pooled__mid" / "c" / "0" / "1" / "0"
    assert os.path.samefile(src, out / "pooled__mid" / "c" / "0" / "3" / "0")


def test_unaligned_shards_are_copied_and_equal_the_shards_concatenated(world, tmp_path):
    names = _sharded_dataset(tmp_path / "odd", 6)  # 6, 6, 6, 2 samples: not whole chunks of 4
    parts = [_extract(world["model"], tmp_path / "odd" / "shards" / s, tmp_path / f"{s}.zarr") for s in names]
    out = gather_stores(parts, tmp_path / "t300.zarr", names=names)
    gathered = ActivationStore(out)
    shards = [ActivationStore(p) for p in parts]
    assert gathered.sample_ids.tolist() == list(range(N))
    for layer in ("mid", "up_ft0"):
        assert np.array_equal(gathered.pooled(layer, 300), np.concatenate([s.pooled(layer, 300) for s in shards]))
        assert np.array_equal(gathered.spatial(layer, 300), np.concatenate([s.spatial(layer, 300) for s in shards]))
    assert not os.path.samefile(parts[0] / "pooled__mid" / "c" / "0" / "0" / "0", out / "pooled__mid" / "c" / "0" / "0" / "0")
    # close to the unsharded store (batches differ, so float sums may differ in the last bits)
    whole = ActivationStore(world["whole"])
    np.testing.assert_allclose(gathered.pooled("mid", 300), whole.pooled("mid", 300), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_shards_of_another_config_are_refused_naming_the_shard(world, tmp_path):
    other = _extract(world["model"], world["tmp"] / "aligned" / "shards" / world["names"][1], tmp_path / "other.zarr", seed=7)
    with pytest.raises(UserError, match=r"shard 00001 .*differs from shard 00000 in 'extract_config'") as err:
        gather_stores([world["parts"][0], other, world["parts"][2]], tmp_path / "t.zarr", names=world["names"])
    assert "seed" in str(err.value)
    assert not (tmp_path / "t.zarr").exists()


def test_a_shard_with_a_missing_chunk_is_refused_naming_it(world, tmp_path):
    broken = tmp_path / "00002.zarr"
    shutil.copytree(world["parts"][2], broken)
    (broken / "spatial__up_ft0" / "c" / "0" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(UserError, match=r"shard 00002 .*incomplete: chunk c/0/0/0/0/0 of spatial__up_ft0 is missing"):
        gather_stores([*world["parts"][:2], broken], tmp_path / "t.zarr", names=world["names"])
    assert not (tmp_path / "t.zarr").exists()


def test_the_same_shard_twice_is_refused(world, tmp_path):
    with pytest.raises(UserError, match=r"sample id 0 is in shard a and again in shard b"):
        gather_stores([world["parts"][0], world["parts"][0]], tmp_path / "t.zarr", names=["a", "b"])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_shard_size_zero_or_not_an_integer_is_refused(bad):
    with pytest.raises(UserError, match=r"extract.shard_size = .*allowed: null \(one shard\) or an integer >= 1"):
        ExtractConfig(shard_size=bad)
    with pytest.raises(UserError, match=r"extract.shard_size = .*allowed: null \(one shard\) or an integer >= 1"):
        plan_shards(SECTION, "sw", bad)


def test_schema_refuses_shard_size_zero():
    from diffatlas.config import validate_config

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["extract"]["shard_size"] = 0
    with pytest.raises(UserError, match="shard_size"):
        validate_config(cfg, ROOT / "config.schema.yaml")


def test_one_shard_keeps_the_plain_layout():
    assert plan_shards(SECTION, "sw", None) is None
    assert plan_shards(SECTION, "sw", N) is None
    assert [(p.start, p.stop) for p in plan_shards(SECTION, "sw", N - 1)] == [(0, N - 1), (N - 1, N)]


def test_a_changed_manifest_changes_only_the_digests_of_its_shards(tmp_path):
    from PIL import Image

    rows = []
    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,c{i % 3}")
    manifest = tmp_path / "m.csv"
    section = {"kind": "manifest", "path": str(manifest), "image_size": 8}
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    before = plan_shards(section, "m", 4)
    rows[5] = "5.png,other"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    after = plan_shards(section, "m", 4)
    assert [p.digest == q.digest for p, q in zip(before, after)] == [True, False, True]
    # a shard job planned before the edit refuses to write other images under the old name
    with pytest.raises(UserError, match="changed since the workflow was planned"):
        make_dataset(section, tmp_path / "s1", "m", rows=(4, 8), digest=before[1].digest)
    make_dataset(section, tmp_path / "s1", "m", rows=(4, 8), digest=after[1].digest)
    assert load_dataset(tmp_path / "s1").sample_ids.tolist() == [4, 5, 6, 7]


# ----------------------------------------------------------------------------- the workflow


def _snakemake(cwd: Path, *args: str) -> str:
    env = dict(os.environ, DIFFATLAS_NO_PROGRESS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args, "--cores", "2", "-s", str(ROOT / "Snakefile"), "-d", str(cwd),
                           "--configfile", str(cwd / "config.yaml")], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _config(cwd: Path, n: int) -> None:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["results"] = "results"
    cfg["device"] = "cpu"
    cfg["models"]["shapesworld"]["path"] = str(cwd / "model")
    cfg["datasets"]["shapesworld"].update(n_samples=n)
    cfg["extract"].update(layers=["mid"], timesteps=[300], batch_size=4, spatial_max_size=4, shard_size=8)
    (cwd / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.workflow
def test_snakemake_reruns_a_missing_shard_alone_and_adds_shards_without_redoing_others(tmp_path):
    make_tiny_model("pixel", tmp_path / "model", seed=0)
    target, index = "results/activations/shapesworld/shapesworld/t300.zarr", "results/data/shapesworld/index.json"
    _config(tmp_path, 16)
    _snakemake(tmp_path, target, index)
    shards = tmp_path / "results" / "activations" / "shapesworld" / "shapesworld" / "shards" / "t300"
    assert sorted(p.name for p in shards.iterdir()) == ["00000.zarr", "00001.zarr"]
    assert ActivationStore(tmp_path / target).sample_ids.tolist() == list(range(16))

    # a failed shard (its store absent, so the gather never ran): its job and the gather, nothing else
    aside = tmp_path / "aside"
    aside.mkdir()
    os.replace(shards / "00001.zarr", aside / "00001.zarr")
    os.replace(tmp_path / target, aside / "t300.zarr")
    jobs = planned_jobs(_snakemake(tmp_path, target, "-n"))
    assert sorted((r, w.get("shard", "")) for r, w in jobs) == [("extract_shard", "00001"), ("gather_extract", "")]
    os.replace(aside / "00001.zarr", shards / "00001.zarr")  # back as they were (saves a run)
    os.replace(aside / "t300.zarr", tmp_path / target)

    # more images: one new data shard and its extraction; the finished shards stay as they are
    data = tmp_path / "results" / "data" / "shapesworld"
    watched = [data / "shards" / "00000" / "images.npy", data / "shards" / "00001" / "metadata.parquet",
               shards / "00000.zarr" / "zarr.json", shards / "00001.zarr" / "pooled__mid" / "c" / "0" / "0" / "0"]
    before = [p.stat().st_mtime_ns for p in watched]
    _config(tmp_path, 20)
    jobs = planned_jobs(_snakemake(tmp_path, target, index, "-n"))
    assert sorted((r, w.get("shard", "")) for r, w in jobs) == [
        ("dataset_index", ""), ("extract_shard", "00002"), ("gather_extract", ""), ("make_dataset_shard", "00002")]
    _snakemake(tmp_path, target, index)
    assert [p.stat().st_mtime_ns for p in watched] == before
    store = ActivationStore(tmp_path / target)
    assert store.sample_ids.tolist() == list(range(20))
    index = json.loads((data / "index.json").read_text())
    assert [(s["name"], s["n"]) for s in index["shards"]] == [("00000", 8), ("00001", 8), ("00002", 4)]
