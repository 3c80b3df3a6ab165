"""Dataclasses of the ``world_model`` config section: training and the fidelity check.

``config.yaml``::

    world_model:
      source: shipped          # shipped | trained
      train: {architecture: unet, steps: 5000, batch_size: 16, ...}       # -> WorldModelConfig
      fidelity: {n_single: 48, n_two: 48, ...}        # -> FidelityConfig

The JSON Schema checks the section before any job runs; ``__post_init__`` re-checks every
value so the library and the CLI are just as safe without Snakemake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from diffatlas.errors import UserError
from diffatlas.sections import ConfigSection

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2", "scaled_linear")
#: Denoisers of the world model: SD's UNet (epsilon, DDIM) or SD3's joint-attention transformer (flow matching).
ARCHITECTURES = ("unet", "sd3")
#: How the flow-matching noise level sigma of a training example is drawn (``sd3`` only).
SIGMA_SAMPLINGS = ("logit_normal", "uniform")

#: Fields that only one architecture reads. The other architecture's fields are left out of
#: the trajectory hash, so adding SD3 fields did not change the hash of a UNet run (its
#: checkpoints still resume) and vice versa.
ARCHITECTURE_FIELDS = {
    "unet": ("block_out_channels", "layers_per_block", "num_attention_heads", "norm_num_groups", "snr_gamma",
             "beta_schedule", "channels_last"),
    "sd3": ("sd3_layers", "sd3_heads", "sd3_head_dim", "sd3_patch_size", "text_max_length", "sigma_sampling",
            "logit_mean", "logit_std", "flow_shift"),
}
LR_SCHEDULES = ("constant", "cosine")

#: Fields that do not change the training trajectory up to a given step: a checkpoint made
#: with other values of these resumes (e.g. raise ``steps`` to train longer). ``steps`` is
#: one of them only under the constant learning rate: the cosine schedule is a function of
#: the total step count.
RESUME_FREE_FIELDS = ("steps", "checkpoint_every", "log_every", "channels_last")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        upper = f" and <= {hi}" if hi is not None else ""
        raise UserError(f"config world_model.{name} = {value!r} is not allowed; allowed: an integer >= {lo}{upper}")


def _check_float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise UserError(f"config world_model.{name} = {value!r} is not allowed; allowed: a number in {lb}{lo}, {hi}{rb}")


@dataclass
class WorldModelConfig(ConfigSection):
    """How the ShapesWorld model is built and trained (``world_model.train``).

    The defaults are those of the shipped checkpoint (resources/models/shapesworld/README.md).
    """

    SECTION = "world_model.train"

    architecture: str = "unet"
    """Denoiser: ``unet`` (the shipped UNet, epsilon loss, DDIM) or ``sd3`` (a small
    ``SD3Transformer2DModel`` on pixels, rectified-flow loss, flow Euler sampling). Set as
    ``world_model.architecture`` in the workflow config."""
    steps: int = 5000
    """Optimiser steps. Raising it and re-running resumes from the last checkpoint."""
    batch_size: int = 16
    """Images per step (fresh random scenes every step)."""
    lr: float = 1e-3
    """AdamW peak learning rate (reached at the end of the warm-up)."""
    warmup: int = 200
    """Linear learning-rate warm-up, in steps."""
    lr_schedule: str = "cosine"
    """After the warm-up: ``constant``, or ``cosine`` decay to ``lr * lr_final`` at the last step."""
    lr_final: float = 0.1
    """Cosine schedule: the learning rate of the last step as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    ema: float = 0.999
    """EMA decay of the saved weights; early steps use min(ema, (1 + step) / (10 + step))."""
    caption_dropout: float = 0.1
    """Probability that a caption is replaced by the empty prompt (classifier-free guidance)."""
    snr_gamma: float = 5.0
    """Min-SNR-gamma loss weighting min(SNR, gamma) / SNR of the epsilon loss (0 = plain MSE)."""
    seed: int = 0
    """Seed of the initial weights and of the per-step scene / noise streams."""
    image_size: int = 32
    """Side of the generated images (pixels)."""
    two_object_fraction: float = 0.5
    """Share of training scenes with two objects."""
    size_word_prob: float = 0.5
    """Probability that a training caption names an object's size."""
    colour_word_prob: float = 0.9
    """Probability that a training caption names an object's colour."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """UNet channels per resolution level (32, 16, 8 px at 32x32); attention below the first level."""
    layers_per_block: int = 1
    """ResNet layers per UNet block."""
    num_attention_heads: int = 2
    """Heads of every UNet attention layer (2 of 32 channels: CPU attention is slower on narrower heads)."""
    norm_num_groups: int = 16
    """GroupNorm groups of the UNet."""
    text_hidden_size: int = 64
    """CLIP text encoder width (= the UNet's cross_attention_dim); ``sd3``: T5's width and the
    transformer's joint_attention_dim, CLIP-L and CLIP-G half of it each."""
    text_layers: int = 2
    """CLIP text encoder layers."""
    text_heads: int = 4
    """CLIP text encoder heads."""
    sd3_layers: int = 4
    """``sd3``: joint-attention blocks of the transformer (the last one is context_pre_only, as in SD3)."""
    sd3_heads: int = 2
    """``sd3``: attention heads (width = sd3_heads * sd3_head_dim)."""
    sd3_head_dim: int = 32
    """``sd3``: channels per head (32, as the UNet's heads: CPU attention is slower on narrower heads)."""
    sd3_patch_size: int = 2
    """``sd3``: pixels per side of an image token (SD3's 2: 32x32 px -> 256 tokens)."""
    text_max_length: int = 16
    """``sd3``: tokens each text encoder reads (CLIP-L, CLIP-G, T5). The longest ShapesWorld
    caption is 11 CLIP tokens; SD3's 77 + 256 would make the text stream ~110 of ~365 joint tokens."""
    sigma_sampling: str = "logit_normal"
    """``sd3``: training sigma density: SD3's ``logit_normal`` (sigma = sigmoid(N(logit_mean, logit_std))),
    or ``uniform`` on (0, 1)."""
    logit_mean: float = 0.0
    """``sd3``: mean of the logit-normal sigma density (SD3: 0)."""
    logit_std: float = 1.0
    """``sd3``: standard deviation of the logit-normal sigma density (SD3: 1)."""
    flow_shift: float = 1.0
    """``sd3``: ``shift`` of the saved FlowMatchEulerDiscreteScheduler (sampling sigmas); SD3 uses 3 at
    1024 px and the shift grows with resolution, so 32 px takes none (1)."""
    train_text_encoder: bool = True
    """Train the text encoder jointly (True) or keep its random initialisation frozen."""
    beta_schedule: str = "linear"
    """Noise schedule of the DDIM scheduler (T = 1000); see ``train.make_scheduler`` for why linear."""
    channels_last: bool = True
    """Channels-last memory format on CPU (faster oneDNN convolutions; same maths)."""
    checkpoint_every: int = 250
    """Write the resumable checkpoint every this many steps (and at the end)."""
    log_every: int = 25
    """Log steps, loss and images/s every this many steps."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(
                f"config world_model.architecture = {self.architecture!r} is not allowed; allowed: {', '.join(ARCHITECTURES)}"
            )
        _check_int("train.steps", self.steps, 1)
        _check_int("train.batch_size", self.batch_size, 1)
        _check_float("train.lr", self.lr, 0.0, 1.0, lo_open=True)
        _check_int("train.warmup", self.warmup, 0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(
                f"config world_model.train.lr_schedule = {self.lr_schedule!r} is not allowed; allowed: {', '.join(LR_SCHEDULES)}"
            )
        _check_float("train.lr_final", self.lr_final, 0.0, 1.0)
        _check_float("train.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_float("train.grad_clip", self.grad_clip, 0.0, 1e6)
        _check_float("train.ema", self.ema, 0.0, 1.0, hi_open=True)
        _check_float("train.caption_dropout", self.caption_dropout, 0.0, 1.0, hi_open=True)
        _check_float("train.snr_gamma", self.snr_gamma, 0.0, 1e6)
        _check_int("train.seed", self.seed, 0)
        _check_int("train.image_size", self.image_size, 16, 256)
        _check_float("train.two_object_fraction", self.two_object_fraction, 0.0, 1.0)
        _check_float("train.size_word_prob", self.size_word_prob, 0.0, 1.0)
        _check_float("train.colour_word_prob", self.colour_word_prob, 0.0, 1.0)
        if not isinstance(self.block_out_channels, (list, tuple)) or len(self.block_out_channels) < 2:
            raise UserError(
                f"config world_model.train.block_out_channels = {self.block_out_channels!r} is not allowed; "
                "allowed: a list of at least 2 positive integers"
            )
        self.block_out_channels = [int(c) for c in self.block_out_channels]
        for c in self.block_out_channels:
            _check_int("train.block_out_channels[]", c, 1)
            if c % self.norm_num_groups or c % self.num_attention_heads:
                raise UserError(
                    f"config world_model.train.block_out_channels = {self.block_out_channels} is not allowed; allowed: "
                    f"multiples of norm_num_groups ({self.norm_num_groups}) and num_attention_heads ({self.num_attention_heads})"
                )
        if self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise UserError(
                f"config world_model.train.image_size = {self.image_size} is not allowed; allowed: a multiple of "
                f"2**(len(block_out_channels) - 1) = {2 ** (len(self.block_out_channels) - 1)}"
            )
        _check_int("train.layers_per_block", self.layers_per_block, 1, 4)
        _check_int("train.num_attention_heads", self.num_attention_heads, 1)
        _check_int("train.norm_num_groups", self.norm_num_groups, 1)
        _check_int("train.text_hidden_size", self.text_hidden_size, 8)
        _check_int("train.text_layers", self.text_layers, 1, 12)
        _check_int("train.text_heads", self.text_heads, 1)
        if self.text_hidden_size % self.text_heads:
            raise UserError(
                f"config world_model.train.text_hidden_size = {self.text_hidden_size} is not allowed; "
                f"allowed: a multiple of text_heads ({self.text_heads})"
            )
        _check_int("train.sd3_layers", self.sd3_layers, 1, 48)
        _check_int("train.sd3_heads", self.sd3_heads, 1, 64)
        _check_int("train.sd3_head_dim", self.sd3_head_dim, 4, 256)
        _check_int("train.sd3_patch_size", self.sd3_patch_size, 1, 8)
        if self.image_size % self.sd3_patch_size:
            raise UserError(
                f"config world_model.train.sd3_patch_size = {self.sd3_patch_size} is not allowed with image_size "
                f"{self.image_size}; allowed: a divisor of image_size"
            )
        _check_int("train.text_max_length", self.text_max_length, 4, 77)
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise UserError(
                f"config world_model.train.sigma_sampling = {self.sigma_sampling!r} is not allowed; allowed: {', '.join(SIGMA_SAMPLINGS)}"
            )
        _check_float("train.logit_mean", self.logit_mean, -10.0, 10.0)
        _check_float("train.logit_std", self.logit_std, 0.0, 10.0, lo_open=True)
        _check_float("train.flow_shift", self.flow_shift, 0.0, 100.0, lo_open=True)
        if self.architecture == "sd3" and self.text_hidden_size % (2 * self.text_heads):
            raise UserError(
                f"config world_model.train.text_hidden_size = {self.text_hidden_size} is not allowed for architecture sd3; "
                f"allowed: a multiple of 2 * text_heads = {2 * self.text_heads} (CLIP-L and CLIP-G take half the "
                "width each, T5 the whole width)"
            )
        if not isinstance(self.train_text_encoder, bool):
            raise UserError(f"config world_model.train.train_text_encoder = {self.train_text_encoder!r} is not allowed; allowed: true, false")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UserError(
                f"config world_model.train.beta_schedule = {self.beta_schedule!r} is not allowed; allowed: {', '.join(BETA_SCHEDULES)}"
            )
        _check_int("train.checkpoint_every", self.checkpoint_every, 1)
        _check_int("train.log_every", self.log_every, 1)
        self.reject_unknown()

    def resume_free_fields(self) -> tuple[str, ...]:
        """Fields a checkpoint may differ in and still resume (``steps`` only at constant lr)."""
        if self.lr_schedule == "constant":
            return RESUME_FREE_FIELDS
        return tuple(f for f in RESUME_FREE_FIELDS if f != "steps")

    def trajectory_hash(self) -> str:
        """Hash of every field that changes the training trajectory (resume compatibility)."""
        free = set(self.resume_free_fields()) | {
            f for arch, fields in ARCHITECTURE_FIELDS.items() if arch != self.architecture for f in fields
        }
        if self.architecture == "unet":
            free.add("architecture")  # the hash of UNet runs from before the field existed
        d = {k: v for k, v in self.to_dict().items() if k not in free}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FidelityConfig(ConfigSection):
    """How the caption fidelity of a model is measured (``world_model.fidelity``).

    Single-object captions ``"a {colour} {shape}"`` cycle through the 12 fine classes;
    two-object captions ``"a {colour} {shape} and a {colour} {shape}"`` are drawn at random
    (two different fine classes) from ``seed``.
    """

    n_single: int = 48
    """Samples for single-object captions (the 12 fine classes, cycled)."""
    n_two: int = 48
    """Samples for two-object captions."""
    num_inference_steps: int = 50
    """DDIM steps per sample (SD's usual 50: at 20, more two-object captions get a third object)."""
    guidance_scale: float = 2.0
    """Classifier-free guidance weight (<= 1 switches CFG off)."""
    seed: int = 0
    """Seed of the captions and of the initial noise."""
    batch_size: int = 96
    """Images per pipeline call."""
    grid_rows: int = 4
    """Rows of the sample grid figure (each row: single-object then two-object samples)."""
    grid_cols: int = 12
    """Columns of the sample grid figure."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    SECTION = "world_model.fidelity"
    #: world_fidelity samples and judges; world_samples_figure only lays the samples out.
    JOBS = {
        "sample": ("n_single", "n_two", "num_inference_steps", "guidance_scale", "seed", "batch_size"),
        "figure": ("grid_rows", "grid_cols"),
    }

    def __post_init__(self) -> None:
        _check_int("fidelity.n_single", self.n_single, 1)
        _check_int("fidelity.n_two", self.n_two, 0)
        _check_int("fidelity.num_inference_steps", self.num_inference_steps, 1, 1000)
        _check_float("fidelity.guidance_scale", self.guidance_scale, 0.0, 100.0)
        _check_int("fidelity.seed", self.seed, 0)
        _check_int("fidelity.batch_size", self.batch_size, 1)
        _check_int("fidelity.grid_rows", self.grid_rows, 1, 32)
        _check_int("fidelity.grid_cols", self.grid_cols, 1, 32)
        self.reject_unknown()
