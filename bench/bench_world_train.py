"""Training throughput of the ShapesWorld model on CPU, and what attention costs.

Runs, side by side in one process and interleaved (so a busy machine slows every variant
alike), full training steps (text encoder + UNet forward, backward, AdamW) of:

* ``default``: the shipped architecture (attention at 16x16, 8x8 and mid);
* ``no_attention``: the same UNet with every transformer block replaced by the identity:
  ``default - no_attention`` is the cost of attention (self + cross + feed-forward);
* ``attn_32px``: attention also at 32x32 (what the design avoids);
* ``contiguous``: the default without channels-last memory format;
* ``classic_attn``: the default with diffusers' classic ``AttnProcessor`` (explicit
  ``softmax(QK^T)V`` by batched matmuls) instead of PyTorch's SDPA kernel;
* ``four_heads``: 4 attention heads of 16 channels instead of the default 2 of 32 (the
  CPU attention kernel is slower on narrow heads).

* ``sd3:L:H:D`` (any number of them): the SD3 world model (``world_model.architecture: sd3``)
  with L joint-attention blocks of H heads of D channels, through the trainer's own
  rectified-flow loss (``diffatlas.world.train.flow_matching_loss``): candidates for its size.

Prints images/s (wall clock) and CPU seconds per image for each, and the ratios. Usage::

    python bench/bench_world_train.py [--threads 2] [--batch 16] [--steps 4]
    python bench/bench_world_train.py --threads 1 --variants default,sd3:4:2:32,sd3:6:2:32,sd3:4:3:32
"""

from __future__ import annotations

import argparse
import os
import time

import torch


class _Identity(torch.nn.Module):
    """Stands in for a Transformer2DModel: returns its input unchanged (as a 1-tuple)."""

    def forward(self, hidden_states, *args, **kwargs):  # noqa: ARG002
        return (hidden_states,)


def _sd3_variant(name: str, batch: int):
    """A training step of the SD3 world model ``sd3:layers:heads:head_dim`` (the trainer's loss)."""
    from diffatlas.world.config import WorldModelConfig
    from diffatlas.world.train import build_pipeline, flow_matching_loss, sample_batch, step_generator, to_model_space

    _, layers, heads, head_dim = name.split(":")
    cfg = WorldModelConfig(architecture="sd3", batch_size=batch, sd3_layers=int(layers), sd3_heads=int(heads),
                           sd3_head_dim=int(head_dim))
    pipe = build_pipeline(cfg)
    mods = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    for m in mods:
        m.train()
    params = [p for m in mods for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images, captions = sample_batch(cfg, 0)
    x0 = to_model_space(images)

    def step():
        loss = flow_matching_loss(pipe, cfg, x0, captions, step_generator(0, 0), torch.device("cpu"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in pipe.transformer.parameters())


def _variant(name: str, batch: int):
    from diffusers import UNet2DConditionModel

    if name.startswith("sd3:"):
        return _sd3_variant(name, batch)

    from diffatlas.world.config import WorldModelConfig
    from diffatlas.world.train import build_pipeline

    cfg = WorldModelConfig(batch_size=batch, **({"num_attention_heads": 4} if name == "four_heads" else {}))
    pipe = build_pipeline(cfg)
    unet, te = pipe.unet, pipe.text_encoder
    if name == "attn_32px":
        conf = dict(unet.config)
        conf["down_block_types"] = ("CrossAttnDownBlock2D",) * 3
        conf["up_block_types"] = ("CrossAttnUpBlock2D",) * 3
        unet = UNet2DConditionModel(**{k: v for k, v in conf.items() if not k.startswith("_")})
    if name == "no_attention":
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            if hasattr(block, "attentions"):
                block.attentions = torch.nn.ModuleList(_Identity() for _ in block.attentions)
    if name == "classic_attn":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())  # explicit softmax(QK^T)V instead of SDPA
    channels_last = name != "contiguous"
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = pipe.tokenizer(["a small red circle and a blue square"] * batch, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,))

    def step():
        ctx = te(ids).last_hidden_state
        loss = (unet(x, t, encoder_hidden_states=ctx).sample - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    n_params = sum(p.numel() for p in unet.parameters())
    return step, n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--variants", default="default,no_attention,attn_32px,contiguous,classic_attn,four_heads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    runs = {n: _variant(n, args.batch) for n in names}
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for n in names:
        runs[n][0]()  # warm-up (oneDNN primitive creation)
    for _ in range(args.steps):
        for n in names:  # interleaved: load changes hit every variant
            w0, c0 = time.perf_counter(), time.process_time()
            runs[n][0]()
            wall[n] += time.perf_counter() - w0
            cpu[n] += time.process_time() - c0
    imgs = args.steps * args.batch
    print(f"threads={args.threads} batch={args.batch} timed steps={args.steps} (torch {torch.__version__})")
    print(f"{'variant':<14}{'denoiser params':>16}{'images/s':>10}{'CPU ms/image':>14}")
    for n in names:
        print(f"{n:<14}{runs[n][1]:>16,}{imgs / wall[n]:>10.1f}{1000 * cpu[n] / imgs:>14.1f}")
    if "default" in names and "no_attention" in names:
        share = 1 - cpu["no_attention"] / cpu["default"]
        print(f"attention (16x16, 8x8, mid; self+cross+FF) share of a training step: {share:.1%} of CPU time")
    if "default" in names and "attn_32px" in names:
        print(f"attention also at 32x32 costs x{cpu['attn_32px'] / cpu['default']:.2f} CPU time per image")
    if "default" in names and "contiguous" in names:
        print(f"channels-last speed-up: x{cpu['contiguous'] / cpu['default']:.2f} (CPU time)")
    if "default" in names and "classic_attn" in names:
        print(f"classic attention processor vs SDPA: x{cpu['default'] / cpu['classic_attn']:.2f} speed-up (CPU time)")
    if "default" in names and "four_heads" in names:
        print(f"2 heads of 32 channels vs 4 of 16: x{cpu['four_heads'] / cpu['default']:.2f} speed-up (CPU time)")
    if "default" in names:
        from diffatlas.world.config import WorldModelConfig

        shipped = WorldModelConfig()  # the defaults are the shipped checkpoint's settings
        n_images = shipped.steps * shipped.batch_size
        minutes = n_images / (imgs / wall["default"]) / 60
        print(f"default: the shipped {shipped.steps} steps x {shipped.batch_size} images take ~{minutes:.0f} wall minutes "
              f"at this run's {imgs / wall['default']:.1f} images/s with {args.threads} threads (the trainer also "
              f"renders the scenes, ~2% of a step, and updates the EMA; neither is timed here)")


if __name__ == "__main__":
    main()
