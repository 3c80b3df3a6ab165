"""Published Stable Diffusion architectures with random weights, counted on the meta device."""

from __future__ import annotations

import pytest

from diffatlas.cli import main as cli


@pytest.mark.parametrize(
    "size, unet, vae, text",
    [
        # Parameter counts of the published checkpoints (stable-diffusion-v1-5, stable-diffusion-2-1):
        # UNet 859,520,964 / 865,910,724; VAE 83,653,863; CLIP ViT-L/14 text 123,060,480;
        # OpenCLIP ViT-H/14 text (23 layers, as diffusers ships it) 340,387,840.
        ("sd15", 859_520_964, 83_653_863, 123_060_480),
        ("sd2v", 865_910_724, 83_653_863, 340_387_840),
    ],
)
def test_full_size_parameter_counts_on_meta(size, unet, vae, text):
    from diffatlas.models.fullsize import build_pipeline

    pipe = build_pipeline(size, device="meta")  # shapes only: nothing is allocated

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert pipe.unet.device.type == "meta"
    assert (count(pipe.unet), count(pipe.vae), count(pipe.text_encoder)) == (unet, vae, text)
    assert round(count(pipe.unet) / 1e6, 2) == {"sd15": 859.52, "sd2v": 865.91}[size]
    assert pipe.scheduler.config.prediction_type == {"sd15": "epsilon", "sd2v": "v_prediction"}[size]
    # Text states match the UNet's cross-attention width; latents are 8x smaller than images.
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    assert pipe.vae.config.sample_size == 8 * pipe.unet.config.sample_size


def test_full_size_needs_family_sd(tmp_path, capsys):
    rc = cli(["make-tiny-model", "dit", str(tmp_path / "m"), "--size", "sd15"])
    assert rc == 2
    assert "family sd" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
