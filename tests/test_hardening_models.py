"""Model loading hardening (issue 13): safetensors only unless allowed; no revision on a local folder."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffatlas.cli import main as cli_main
from diffatlas.errors import UserError
from diffatlas.models.loader import load_model
from diffatlas.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model("pixel", tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture(scope="module")
def bin_only(tiny, tmp_path_factory):
    """The tiny model with its UNet stored only as pickle-based diffusion_pytorch_model.bin."""
    out = tmp_path_factory.mktemp("b") / "tiny_bin"
    shutil.copytree(tiny, out)
    unet_dir = out / "unet"
    state = load_file(str(unet_dir / "diffusion_pytorch_model.safetensors"))
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    return out, state


def test_bin_only_model_is_refused_naming_the_files(bin_only):
    path, _ = bin_only
    with pytest.raises(UserError) as err:
        load_model(path)
    msg = str(err.value)
    assert "unet/diffusion_pytorch_model.bin" in msg and "allow_pickle_weights: true" in msg


def test_bin_only_model_loads_when_allowed_with_the_same_weights(bin_only):
    path, state = bin_only
    handle = load_model(path, allow_pickle_weights=True)
    loaded = handle.denoiser.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():  # oracle: the tensors that were written to the .bin
        assert torch.equal(loaded[k], v), k


def test_safetensors_model_loads_without_the_flag(tiny):
    handle = load_model(tiny)
    ref = load_file(str(tiny / "unet" / "diffusion_pytorch_model.safetensors"))
    k = next(iter(ref))
    assert torch.equal(handle.denoiser.state_dict()[k], ref[k])


def test_revision_on_a_local_directory_is_refused_by_a_real_run(tiny, tmp_path, capsys):
    """`diffatlas extract --revision main` on a saved tiny model: a named error, exit 2."""
    from diffatlas.data.build import make_dataset

    data = make_dataset({"kind": "shapesworld", "n_samples": 4, "image_size": 32}, tmp_path / "data")
    rc = cli_main(["extract", "--model", str(tiny), "--dataset", str(data), "--out", str(tmp_path / "a.zarr"),
                   "--revision", "main", "--config-json", '{"layers": ["mid"], "timesteps": [10]}'])
    err = capsys.readouterr().err
    assert rc == 2
    assert "revision 'main'" in err and str(tiny) in err and "local directory" in err
    assert not (tmp_path / "a.zarr").exists()


def test_workflow_refuses_revision_on_local_model_naming_the_key(tiny):
    from diffatlas.config import check_revisions

    cfg = {"models": {"tinyworld": {"path": str(tiny), "revision": "v1.0"}}}
    with pytest.raises(UserError, match=r"models\.tinyworld\.revision"):
        check_revisions(cfg, {"tinyworld": str(tiny)})
    check_revisions({"models": {"hub": {"path": "owner/name", "revision": "v1.0"}}}, {"hub": "owner/name"})


def test_extract_cli_reads_bin_weights_only_with_the_flag(bin_only, tmp_path, capsys):
    from diffatlas.data.build import make_dataset

    path, _ = bin_only
    data = make_dataset({"kind": "shapesworld", "n_samples": 4, "image_size": 32}, tmp_path / "data")
    args = ["extract", "--model", str(path), "--dataset", str(data), "--device", "cpu",
            "--config-json", '{"layers": ["mid"], "timesteps": [10], "spatial": false}']
    assert cli_main([*args, "--out", str(tmp_path / "refused.zarr")]) == 2
    assert "diffusion_pytorch_model.bin" in capsys.readouterr().err
    assert not (tmp_path / "refused.zarr").exists()
    assert cli_main([*args, "--out", str(tmp_path / "ok.zarr"), "--allow-pickle-weights"]) == 0
    assert (tmp_path / "ok.zarr").is_dir()
