"""Train the ShapesWorld text-to-image model: epsilon-prediction DDPM loss (UNet) or the
rectified-flow loss (SD3 transformer), CFG dropout, EMA.

``cfg.architecture`` picks the denoiser. ``unet`` is the shipped model and what follows
describes it; ``sd3`` differs only in steps 2-4, see :func:`flow_matching_loss`.

What a training step does (all of it a pure function of ``cfg.seed`` and the step index,
so a resumed run repeats exactly the steps an uninterrupted run would have taken):

1. draw ``batch_size`` fresh random scenes with the ShapesWorld renderer and caption them
   with its grammar (``np.random.default_rng([seed, step])``); a share
   ``caption_dropout`` of the captions becomes the empty prompt, so the model also learns
   the unconditional score that classifier-free guidance needs;
2. draw timesteps ``t ~ U{0..T-1}`` and noise ``eps ~ N(0, I)`` from a torch generator
   seeded with ``(seed, step)``; ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps`` with the DDIM
   scheduler's own ``alphas_cumprod`` (T = 1000), so training and sampling agree;
3. loss = mean over the batch of ``w_t * ||eps_hat - eps||^2 / (3 H W)`` with the
   Min-SNR weight ``w_t = min(SNR_t, gamma) / SNR_t`` (Hang et al. 2023: it stops the
   nearly-noiseless timesteps from dominating the epsilon loss and converges several times
   faster per step; ``snr_gamma = 0`` gives plain MSE);
4. AdamW step on the UNet and the text encoder (trained jointly: the random CLIP encoder
   mixes the words of a caption arbitrarily, and a few % more compute per step lets it
   learn to keep "red" bound to "circle"), then an EMA update.

Checkpoints (``checkpoint_dir/last``: weights, EMA weights, optimiser state, step and the
config) are written every ``checkpoint_every`` steps and on interruption; a later run with a
config of the same trajectory hash resumes from them. The final model (the EMA weights) is
saved with ``ShapesWorldPipeline.save_pretrained`` in diffusers layout (safetensors) and
loads with :func:`diffatlas.models.loader.load_model`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffatlas.errors import UserError
from diffatlas.io import atomic_dir, read_json
from diffatlas.models.diffusion import add_noise, flow_add_noise, flow_velocity, images_to_tensor
from diffatlas.world.config import WorldModelConfig

log = logging.getLogger(__name__)

#: Name of the JSON file describing the training run, written next to model_index.json.
TRAINING_INFO = "diffatlas_training.json"
CHECKPOINT_NAME = "last"


# ----------------------------------------------------------------------------- model


def make_scheduler(cfg: WorldModelConfig):
    """The DDIM scheduler whose betas define training and sampling (T = 1000).

    ``linear`` betas (DDPM's 1e-4 .. 0.02) by default, not the cosine schedule, for a reason
    measured on this model: with epsilon prediction and DDIM's "leading" timesteps (the
    first step is t = 950 for 20 steps) the cosine schedule keeps sqrt(ᾱ_950) = 0.076 of
    the image in x_950. The ShapesWorld mean image (dark background, -0.73 per channel)
    then shifts x_950's per-channel mean by -0.055, three times the +-0.018 spread of that
    mean in N(0, I) noise, so a sampler that starts from N(0, I) hands the model an x_950
    far brighter than any real one, and it paints tinted backgrounds and extra objects
    (a cosine run at step 3000 gave 2-4 objects for every single-object caption). Starting
    at t = 999 ("trailing") does not help: there ᾱ ~ 2e-9, and x0 = (x_t - sqrt(1 - ᾱ) eps) /
    sqrt(ᾱ) amplifies the network's error 20000-fold. With linear betas sqrt(ᾱ_950) = 0.010:
    the shift is 0.4 of the noise's spread, as in DDPM/DDIM's own 32x32 models.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )


def build_pipeline(cfg: WorldModelConfig):
    """A freshly initialised pipeline of ``cfg.architecture`` (weights drawn from ``cfg.seed``)."""
    if cfg.architecture == "sd3":
        return build_sd3_pipeline(cfg)
    return build_unet_pipeline(cfg)


def build_unet_pipeline(cfg: WorldModelConfig):
    """A freshly initialised ShapesWorldPipeline (weights drawn from ``cfg.seed``).

    Uses the models engineer's factories, so module paths match SD's: ``down_blocks``,
    ``mid_block``, ``up_blocks``, ``...attentions.N.transformer_blocks.0.attn2``.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffatlas.data.shapesworld import VOCABULARY
    from diffatlas.models.architecture import world_text_encoder_config, world_unet_config
    from diffatlas.models.pipeline import ShapesWorldPipeline
    from diffatlas.models.tokenizer import build_world_tokenizer

    tok = build_world_tokenizer(list(VOCABULARY))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **world_text_encoder_config(
                    len(tok),
                    hidden_size=cfg.text_hidden_size,
                    num_hidden_layers=cfg.text_layers,
                    num_attention_heads=cfg.text_heads,
                    bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
            )
        )
        unet = UNet2DConditionModel(
            **world_unet_config(
                cfg.image_size,
                block_out_channels=tuple(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block,
                cross_attention_dim=cfg.text_hidden_size,
                num_attention_heads=cfg.num_attention_heads,
                norm_num_groups=cfg.norm_num_groups,
            )
        )
    return ShapesWorldPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tok, scheduler=make_scheduler(cfg))


def make_flow_scheduler(cfg: WorldModelConfig):
    """SD3's scheduler (flow matching, T = 1000) with ``cfg.flow_shift``: it sets the sampling sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.flow_shift)


def sd3_tokenizers(cfg: WorldModelConfig) -> tuple[Any, Any, Any]:
    """Fresh CLIP-L, CLIP-G and T5 tokenizers over the ShapesWorld vocabulary, ``cfg.text_max_length`` tokens each."""
    from diffatlas.data.shapesworld import VOCABULARY
    from diffatlas.models.tokenizer import build_t5_tokenizer, build_world_tokenizer

    tok, tok2 = build_world_tokenizer(list(VOCABULARY)), build_world_tokenizer(list(VOCABULARY))
    for t in (tok, tok2):
        # StableDiffusion3Pipeline pads CLIP prompts to the tokenizer's model_max_length.
        t.model_max_length = cfg.text_max_length
    return tok, tok2, build_t5_tokenizer(list(VOCABULARY), model_max_length=cfg.text_max_length)


def build_sd3_pipeline(cfg: WorldModelConfig):
    """A freshly initialised ``StableDiffusion3Pipeline`` on pixels (no VAE; weights from ``cfg.seed``).

    SD3's layout at ShapesWorld size: a ``SD3Transformer2DModel`` on the 3 x S x S image in
    patches of ``sd3_patch_size`` (32 px, patch 2: 256 image tokens) with ``sd3_layers``
    joint-attention blocks; CLIP-L and CLIP-G (with projections) of ``text_hidden_size / 2``
    each, whose penultimate states side by side are exactly as wide as T5's
    (``text_hidden_size`` = the transformer's ``joint_attention_dim``, so SD3's zero padding
    of CLIP to T5's width is empty); a T5 encoder with the offline T5 tokenizer. T5 is kept
    (not ``text_encoder_3=None``) so the model has all three tokenisations DAAM reads words
    from and the loader's T5-length check sees a T5 tokenizer; it costs a few % of a step.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffatlas.models.architecture import world_text_encoder_config

    tok, tok2, tok3 = sd3_tokenizers(cfg)
    half = cfg.text_hidden_size // 2

    def clip(t):
        return CLIPTextModelWithProjection(CLIPTextConfig(**world_text_encoder_config(
            len(t), hidden_size=half, num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
            projection_dim=half)))

    width = cfg.sd3_heads * cfg.sd3_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        text_encoder, text_encoder_2 = clip(tok), clip(tok2)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tok3), d_model=cfg.text_hidden_size, d_kv=cfg.text_hidden_size // cfg.text_heads,
            d_ff=2 * cfg.text_hidden_size, num_layers=cfg.text_layers, num_heads=cfg.text_heads,
            relative_attention_num_buckets=8, dropout_rate=0.0,  # no dropout: a resumed run repeats the steps exactly
            pad_token_id=tok3.pad_token_id, eos_token_id=tok3.eos_token_id,
            decoder_start_token_id=tok3.pad_token_id))
        transformer = SD3Transformer2DModel(
            sample_size=cfg.image_size, patch_size=cfg.sd3_patch_size, in_channels=3, out_channels=3,
            num_layers=cfg.sd3_layers, attention_head_dim=cfg.sd3_head_dim, num_attention_heads=cfg.sd3_heads,
            joint_attention_dim=cfg.text_hidden_size,
            caption_projection_dim=width,  # = heads * head_dim, as in SD3
            pooled_projection_dim=cfg.text_hidden_size,  # CLIP-L + CLIP-G pooled projections
            pos_embed_max_size=cfg.image_size // cfg.sd3_patch_size,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_flow_scheduler(cfg), vae=None,
        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok2,
        text_encoder_3=text_encoder_3, tokenizer_3=tok3,
    )


def denoiser_name(cfg: WorldModelConfig) -> str:
    """Attribute of the pipeline holding the denoiser: ``unet`` or ``transformer``."""
    return "transformer" if cfg.architecture == "sd3" else "unet"


def text_encoder_names(cfg: WorldModelConfig) -> tuple[str, ...]:
    """Attributes of the pipeline holding its text encoders."""
    return ("text_encoder", "text_encoder_2", "text_encoder_3") if cfg.architecture == "sd3" else ("text_encoder",)


def count_parameters(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ----------------------------------------------------------------------------- data


def sample_batch(cfg: WorldModelConfig, step: int, batch_size: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Fresh random scenes for ``step``: a pure function of ``(cfg.seed, step)``.

    Returns ``(images uint8 [B, S, S, 3], captions)``; captions are ``""`` with probability
    ``caption_dropout``. The first object's fine class is uniform over the 12 classes.
    """
    from diffatlas.data.config import ShapesWorldConfig
    from diffatlas.data.shapesworld import FINE_CLASSES, caption_for, render_scene, sample_scene

    b = batch_size or cfg.batch_size
    rng = np.random.default_rng([cfg.seed, step])
    world = ShapesWorldConfig(
        n_samples=1,
        image_size=cfg.image_size,
        two_object_fraction=cfg.two_object_fraction,
        size_word_prob=cfg.size_word_prob,
        colour_word_prob=cfg.colour_word_prob,
    )
    images = np.empty((b, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(b):
        objects = sample_scene(rng, FINE_CLASSES[int(rng.integers(len(FINE_CLASSES)))], world)
        sizes = [bool(f) for f in rng.random(len(objects)) < cfg.size_word_prob]
        colours = [bool(f) for f in rng.random(len(objects)) < cfg.colour_word_prob]
        images[i] = render_scene(objects, cfg.image_size)[0]
        captions.append(caption_for(objects, sizes, colours).text)
    drop = rng.random(b) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop)]
    return images, captions


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (the pipeline's pixel space)."""
    return images_to_tensor(images)


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator of the noise and timesteps of ``step`` (independent of device)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, 7]).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


# ----------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """What a run keeps besides the weights: step, losses and wall time, for logs and resume."""

    step: int = 0
    elapsed_s: float = 0.0
    images_seen: int = 0
    loss_history: list[list[float]] = field(default_factory=list)  # [step, mean loss since last log]


def _named(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _load_prefixed(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing, unexpected = module.load_state_dict(sub, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint does not fit the model ({prefix}): missing {missing[:3]}, unexpected {unexpected[:3]}")


def save_checkpoint(
    path: Path, cfg: WorldModelConfig, state: TrainState, models: dict[str, torch.nn.Module],
    ema: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
) -> None:
    """Write ``path`` atomically: model.safetensors, optimizer.safetensors, state.json."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, m in models.items():
        tensors.update(_named(name, m))
    for name, m in ema.items():
        tensors.update(_named(f"ema.{name}", m))
    opt = optimizer.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(float(value))
            opt_tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous().clone()
    meta = {
        "step": state.step,
        "elapsed_s": state.elapsed_s,
        "images_seen": state.images_seen,
        "loss_history": state.loss_history,
        "config": cfg.to_dict(),
        "trajectory_hash": cfg.trajectory_hash(),
        "param_groups": opt["param_groups"],
        "note": "data, noise and timesteps of step s are drawn from (seed, s): no RNG state is needed to resume",
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_checkpoint(
    path: Path, cfg: WorldModelConfig, models: dict[str, torch.nn.Module], ema: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
) -> TrainState | None:
    """Restore a checkpoint made with a config of the same trajectory; None if there is none.

    A checkpoint of another trajectory (different seed, lr, architecture, ...) is ignored with
    a warning: training starts afresh and overwrites it. One past ``cfg.steps`` is an error.
    """
    from safetensors.torch import load_file

    if not (path / "state.json").is_file():
        return None
    meta = read_json(path / "state.json")
    if meta.get("trajectory_hash") != cfg.trajectory_hash():
        theirs = meta.get("config", {})
        diff = sorted(k for k, v in cfg.to_dict().items() if theirs.get(k) != v and k not in cfg.resume_free_fields())
        log.warning("checkpoint %s was made with another config (differs in %s); starting afresh", path, ", ".join(diff))
        return None
    if int(meta["step"]) > cfg.steps:
        # Never silently throw away a longer run: the user asks for fewer steps than it has.
        raise UserError(
            f"checkpoint {path} is at step {meta['step']}, past world_model.train.steps = {cfg.steps}; "
            f"raise steps to at least {meta['step']}, or delete {path} to train afresh"
        )
    tensors = load_file(str(path / "model.safetensors"))
    for name, m in models.items():
        _load_prefixed(m, tensors, name)
    for name, m in ema.items():
        _load_prefixed(m, tensors, f"ema.{name}")
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt_tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    log.info("resumed from %s at step %d", path, meta["step"])
    return TrainState(
        step=int(meta["step"]), elapsed_s=float(meta["elapsed_s"]), images_seen=int(meta["images_seen"]),
        loss_history=[list(x) for x in meta.get("loss_history", [])],
    )


def pipeline_from_checkpoint(path: str | os.PathLike, ema_weights: bool = True):
    """The pipeline of a training checkpoint (``checkpoint_dir/last``), read only.

    Lets a user look at (or run the fidelity check on) a run in progress. -> (pipeline, step).
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_json(path / "state.json")
    cfg = WorldModelConfig.from_dict(meta["config"])
    pipe = build_pipeline(cfg)
    tensors = load_file(str(path / "model.safetensors"))
    prefix = "ema." if ema_weights else ""
    for name in (denoiser_name(cfg), *text_encoder_names(cfg)):
        _load_prefixed(getattr(pipe, name), tensors, f"{prefix}{name}")
        getattr(pipe, name).eval()
    return pipe, int(meta["step"])


# ----------------------------------------------------------------------------- training


def lr_at(cfg: WorldModelConfig, step: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to ``cfg.lr``, then the schedule.

    ``constant`` keeps ``cfg.lr`` (the EMA does the averaging). ``cosine`` falls from
    ``cfg.lr`` after the warm-up to ``cfg.lr * cfg.lr_final`` at the last step: a short run
    settles into a minimum in its last few hundred steps instead of ending at full lr.
    """
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - 1 - cfg.warmup, 1)
    progress = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.lr * (cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-timestep weight of the epsilon loss: ``min(SNR_t, gamma) / SNR_t`` ([T]; ones if gamma = 0).

    ``SNR_t = ᾱ_t / (1 - ᾱ_t)``. For epsilon prediction the weight is 1 wherever SNR <= gamma
    (the noisy half of the schedule, where layout, shape and colour are decided) and falls
    as 1/SNR at the nearly clean end.
    """
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if gamma <= 0:
        return torch.ones_like(snr)
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def _ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def _tokenize(tokenizer, captions: list[str], cache: dict[str, torch.Tensor]) -> torch.Tensor:
    missing = sorted({c for c in captions if c not in cache})
    if missing:
        ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        cache.update(zip(missing, ids))
    return torch.stack([cache[c] for c in captions])


#: The training objectives, recorded in diffatlas_training.json.
EPSILON_OBJECTIVE = "epsilon prediction, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1}, Min-SNR weight"
FLOW_OBJECTIVE = ("rectified flow (velocity), x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, "
                  "plain MSE, sigma from world_model.train.sigma_sampling")


def sample_sigmas(cfg: WorldModelConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels σ ``[n]`` in (0, 1) from ``cfg.sigma_sampling``.

    ``logit_normal`` is SD3's choice (Esser et al. 2024, "lognorm(0.00, 1.00)", their best
    sampler in the rectified-flow comparison): σ = sigmoid(u), u ~ N(logit_mean, logit_std²).
    It spends the steps on the middle of the path, where the velocity is hardest to predict
    (near σ = 0 and σ = 1 it is nearly ε or nearly -x0 from the input alone), and is the
    same as a time-weighted uniform loss. ``uniform``: σ ~ U(0, 1), the plain rectified flow.
    """
    if cfg.sigma_sampling == "uniform":
        return torch.rand((n,), generator=generator, device="cpu")
    return torch.sigmoid(torch.randn((n,), generator=generator, device="cpu") * cfg.logit_std + cfg.logit_mean)


def sd3_condition(pipe, captions: list[str], device: torch.device, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states, pooled_projections) of ``captions`` from the pipeline's own
    ``encode_prompt``, so training conditions the transformer exactly as sampling does."""
    with torch.set_grad_enabled(grad):
        emb, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=int(pipe.tokenizer_3.model_max_length),
        )
    return emb, pooled


def flow_matching_loss(pipe, cfg: WorldModelConfig, x0: torch.Tensor, captions: list[str], g: torch.Generator,
                       device: torch.device) -> torch.Tensor:
    """The rectified-flow loss of one batch (SD3's objective), with the core's noising rule and velocity.

    σ from :func:`sample_sigmas` and ε ~ N(0, I) from ``g``; ``x_σ = (1 - σ) x0 + σ ε``
    (:func:`~diffatlas.models.diffusion.flow_add_noise`); the transformer, called as SD3's
    pipeline calls it (timestep σ·T), predicts ``v = ε - x0``
    (:func:`~diffatlas.models.diffusion.flow_velocity`); loss = mean squared error. No Min-SNR
    weight: the logit-normal σ density already plays the weighting's part.
    """
    sigma = sample_sigmas(cfg, x0.shape[0], g)
    noise = torch.randn(x0.shape, generator=g, device="cpu")
    x0, sigma, noise = x0.to(device), sigma.to(device), noise.to(device)
    x_t = flow_add_noise(x0, noise, sigma)
    emb, pooled = sd3_condition(pipe, captions, device, cfg.train_text_encoder)
    T = int(pipe.scheduler.config.num_train_timesteps)
    v = pipe.transformer(hidden_states=x_t, timestep=sigma * T, encoder_hidden_states=emb,
                         pooled_projections=pooled).sample
    return (v.float() - flow_velocity(x0, noise)).pow(2).mean()


def train_world_model(
    cfg: WorldModelConfig,
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Train (or resume) the model and save its EMA weights to ``out_dir`` (diffusers layout).

    Args:
        cfg: the training config.
        out_dir: the final pipeline directory (replaced atomically at the end).
        checkpoint_dir: where ``last/`` (the resumable checkpoint) lives; None disables
            checkpoints. Keep it outside Snakemake's declared outputs.
        device: torch device.
        resume: resume from ``checkpoint_dir/last`` when it matches ``cfg``.
        max_seconds: stop after this much wall time in this call (checkpoint, no final
            save); None = train to ``cfg.steps``. Lets a caller train in slices.

    Returns:
        the training summary (also written to ``out_dir/diffatlas_training.json``), with
        ``finished`` False when ``max_seconds`` stopped the run early.
    """
    import copy

    device = torch.device(device)
    pipe = build_pipeline(cfg)
    flow = cfg.architecture == "sd3"
    denoiser = getattr(pipe, denoiser_name(cfg)).to(device)
    channels_last = cfg.channels_last and device.type == "cpu" and not flow  # a UNet's convolutions only
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)
    encoders = {name: getattr(pipe, name).to(device) for name in text_encoder_names(cfg)}
    models = {denoiser_name(cfg): denoiser, **encoders}
    ema = {k: copy.deepcopy(m).requires_grad_(False).eval() for k, m in models.items()}
    denoiser.train()
    for enc in encoders.values():
        enc.requires_grad_(cfg.train_text_encoder)
        enc.train(cfg.train_text_encoder)
    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    ema_params = [e for k in models for e, p in zip(ema[k].parameters(), models[k].parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)

    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state = (load_checkpoint(ckpt, cfg, models, ema, optimizer) if (ckpt is not None and resume) else None) or TrainState()

    if not flow:
        alphas_cumprod = pipe.scheduler.alphas_cumprod.to(torch.float32)
        loss_weight = min_snr_weights(alphas_cumprod, cfg.snr_gamma).to(device)
        alphas_cumprod = alphas_cumprod.to(device)
        T = alphas_cumprod.shape[0]
    tok_cache: dict[str, torch.Tensor] = {}

    parameters = {k: count_parameters(m) for k, m in models.items()}
    n_den, n_text = parameters[denoiser_name(cfg)], sum(parameters[k] for k in encoders)
    log.info(
        "training ShapesWorld model (%s): %s %.2fM + text encoders %.2fM parameters, %d steps x batch %d on %s "
        "(start at step %d, trajectory %s)",
        cfg.architecture, denoiser_name(cfg), n_den / 1e6, n_text / 1e6, cfg.steps, cfg.batch_size, device,
        state.step, cfg.trajectory_hash(),
    )

    t_call = time.perf_counter()
    t_log, n_log, loss_sum = time.perf_counter(), 0, 0.0
    stopped_early = False
    try:
        while state.step < cfg.steps:
            step = state.step
            images, captions = sample_batch(cfg, step)
            x0 = to_model_space(images)
            g = step_generator(cfg.seed, step)
            if flow:
                loss = flow_matching_loss(pipe, cfg, x0, captions, g, device)
            else:
                t = torch.randint(0, T, (x0.shape[0],), generator=g, device="cpu")
                noise = torch.randn(x0.shape, generator=g, device="cpu")
                x0, t, noise = x0.to(device), t.to(device), noise.to(device)
                x_t = add_noise(x0, noise, alphas_cumprod[t].view(-1, 1, 1, 1))
                if channels_last:
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                ids = _tokenize(pipe.tokenizer, captions, tok_cache).to(device)
                with torch.set_grad_enabled(cfg.train_text_encoder):
                    context = pipe.text_encoder(ids).last_hidden_state
                eps = pipe.unet(x_t, t, encoder_hidden_states=context).sample
                per_sample = (eps.float() - noise).pow(2).mean(dim=(1, 2, 3))
                loss = (loss_weight[t] * per_sample).mean()
            if not torch.isfinite(loss):
                raise UserError(f"training diverged: loss is {loss.item()} at step {step}; lower world_model.train.lr (now {cfg.lr})")

            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            _ema_update(ema_params, params, min(cfg.ema, (1 + step) / (10 + step)))

            state.step += 1
            state.images_seen += x0.shape[0]
            loss_sum += float(loss.detach())
            n_log += 1
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                now = time.perf_counter()
                state.elapsed_s += now - t_log
                ips = n_log * cfg.batch_size / max(now - t_log, 1e-9)
                mean_loss = loss_sum / n_log
                state.loss_history.append([state.step, round(mean_loss, 6)])
                eta = (cfg.steps - state.step) * cfg.batch_size / max(ips, 1e-9)
                log.info(
                    "step %d/%d  loss %.4f  %.1f images/s  lr %.2e  elapsed %.0fs  eta %.0fs",
                    state.step, cfg.steps, mean_loss, ips, lr_at(cfg, step), state.elapsed_s, eta,
                )
                t_log, n_log, loss_sum = now, 0, 0.0
            if ckpt is not None and state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
                _flush_elapsed(state, t_log)
                t_log = time.perf_counter()
                save_checkpoint(ckpt, cfg, state, models, ema, optimizer)
                log.info("checkpoint at step %d -> %s", state.step, ckpt)
            if max_seconds is not None and time.perf_counter() - t_call > max_seconds and state.step < cfg.steps:
                stopped_early = True
                break
    except KeyboardInterrupt:
        if ckpt is not None and state.step > 0:
            _flush_elapsed(state, t_log)
            save_checkpoint(ckpt, cfg, state, models, ema, optimizer)
            log.warning("interrupted at step %d; checkpoint written to %s (re-run to resume)", state.step, ckpt)
        raise

    _flush_elapsed(state, t_log)
    if ckpt is not None:
        save_checkpoint(ckpt, cfg, state, models, ema, optimizer)
    summary = {
        "finished": not stopped_early,
        "step": state.step,
        "steps": cfg.steps,
        "images_seen": state.images_seen,
        "train_seconds": round(state.elapsed_s, 1),
        "images_per_second": round(state.images_seen / max(state.elapsed_s, 1e-9), 2),
        "final_loss": state.loss_history[-1][1] if state.loss_history else None,
        "loss_history": state.loss_history,
        "parameters": parameters,
        "architecture": cfg.architecture,
        "objective": FLOW_OBJECTIVE if flow else EPSILON_OBJECTIVE,
        "config": cfg.to_dict(),
        "trajectory_hash": cfg.trajectory_hash(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    if stopped_early:
        log.info("stopped after max_seconds at step %d/%d; checkpoint kept for the next call", state.step, cfg.steps)
        return summary
    save_model(pipe, ema, out_dir, summary)
    log.info("saved model (EMA weights) to %s: %d steps, %.0f s, %.1f images/s",
             out_dir, state.step, state.elapsed_s, summary["images_per_second"])
    return summary


def _flush_elapsed(state: TrainState, t_log: float) -> None:
    # Time since the last log line counts too (logging adds it in slices).
    state.elapsed_s += time.perf_counter() - t_log


def save_model(pipe, ema: dict[str, torch.nn.Module], out_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Save the pipeline with the EMA weights (diffusers layout, safetensors) + training JSON."""
    from diffatlas.data.shapesworld import VOCABULARY
    from diffatlas.models.pipeline import ShapesWorldPipeline
    from diffatlas.models.tokenizer import build_world_tokenizer

    # Fresh tokenizers, not the ones used in training: the fast backend keeps the padding and
    # truncation of its last call and would write them into tokenizer.json, so a retrained
    # model's files would differ from the shipped ones for no reason (loaders reset them).
    if "transformer" in ema:
        from diffusers import StableDiffusion3Pipeline

        cfg = WorldModelConfig.from_dict(summary["config"])
        tok, tok2, tok3 = sd3_tokenizers(cfg)
        final = StableDiffusion3Pipeline(
            transformer=ema["transformer"].to("cpu"), scheduler=pipe.scheduler, vae=None,
            text_encoder=ema["text_encoder"].to("cpu"), tokenizer=tok,
            text_encoder_2=ema["text_encoder_2"].to("cpu"), tokenizer_2=tok2,
            text_encoder_3=ema["text_encoder_3"].to("cpu"), tokenizer_3=tok3,
        )
    else:
        unet = ema["unet"].to("cpu").to(memory_format=torch.contiguous_format)
        final = ShapesWorldPipeline(unet=unet, text_encoder=ema["text_encoder"].to("cpu"),
                                    tokenizer=build_world_tokenizer(list(VOCABULARY)), scheduler=pipe.scheduler)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        final.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / TRAINING_INFO).write_text(json.dumps(summary, indent=1) + "\n")
    return out


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}

