"""Tracing a denoiser's cross-attention during a run, and the bookkeeping around it.

:class:`AttentionTracer` installs :class:`~diffatlas.daam.processor.DAAMAttnProcessor` on the
chosen cross-attention modules and a forward pre-hook on the denoiser that reads, at every
call, the latent size (so map sizes follow the model, never a hard-coded 64×64), the
timestep and the batch size. On exit it restores the original processors and removes the
hook, even on error.

Which rows of the denoiser batch are the **conditional branch** is not guessed: after a
pipeline call, :func:`layout_from_pipeline` asks the pipeline what it did

* :class:`diffatlas.models.pipeline.ShapesWorldPipeline` records its layout after every
  call (``pipe.last_cfg_layout``, see its docstring);
* diffusers pipelines (``StableDiffusionPipeline``, SDXL) expose
  ``do_classifier_free_guidance``, computed from the guidance scale the call actually used:
  with guidance the batch is ``[negative rows, conditional rows]``, without it every row is
  conditional (SD3 too);
* ``FluxPipeline`` (guidance-distilled or guidance-free) has no negative rows: every row is
  conditional.

Joint-attention transformers (SD3, Flux) are traced by
:class:`~diffatlas.daam.joint.JointDAAMProcessor` on every joint block (the map grid is the
image-token grid; see :mod:`diffatlas.daam.joint`).

The number of rows the tracer saw is checked against that layout, so a pipeline that
batches differently fails loudly instead of silently mixing branches.

:meth:`RawTrace.aggregate` turns the per-resolution sums into image-size maps: each
resolution's sum (over heads, layers and timesteps) is upsampled bicubically to the output
size and clamped at zero (bicubic overshoots below zero next to sharp peaks), then the
resolutions are added.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from diffatlas.daam import joint
from diffatlas.daam.processor import DEFAULT_LAYERS, MapAccumulator, find_cross_attention, install_processors

from diffatlas.daam.words import TracedRun  # noqa: F401  (re-exported: runs are saved/loaded there)

if TYPE_CHECKING:
    from diffatlas.daam.words import WordMaps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CFGLayout:
    """Where each generated item's conditional branch sits in the denoiser batch.

    ``cond_rows[i]`` is the row (in the concatenation of a step's denoiser calls) that
    carries item ``i``'s conditional prediction; ``n_rows`` is the total per step.
    """

    n_rows: int
    cond_rows: tuple[int, ...]
    guidance: bool
    source: str = ""

    @staticmethod
    def batched(n_items: int, guidance: bool, uncond_first: bool = True, source: str = "") -> "CFGLayout":
        """The usual layout: ``[uncond x n, cond x n]`` with guidance, ``[cond x n]`` without."""
        if not guidance:
            return CFGLayout(n_items, tuple(range(n_items)), False, source)
        first = n_items if uncond_first else 0
        return CFGLayout(2 * n_items, tuple(range(first, first + n_items)), True, source)


def layout_from_pipeline(pipe: Any, n_items: int) -> CFGLayout:
    """The CFG layout ``pipe`` used in its last call, for ``n_items`` generated images."""
    recorded = getattr(pipe, "last_cfg_layout", None)
    if isinstance(recorded, CFGLayout):
        return recorded
    if isinstance(recorded, dict):
        # ShapesWorldPipeline: {"do_cfg", "batch_size", "num_images", "cond_slice", ...}.
        cond = recorded["cond_slice"]
        rows = tuple(range(cond.start or 0, cond.stop))
        if len(rows) != n_items or int(recorded["num_images"]) != n_items:
            raise RuntimeError(
                f"{type(pipe).__name__} generated {recorded['num_images']} images in its last call, expected {n_items}"
            )
        return CFGLayout(int(recorded["batch_size"]), rows, bool(recorded["do_cfg"]), type(pipe).__name__)
    if hasattr(getattr(getattr(pipe, "transformer", None), "config", None), "guidance_embeds"):
        # FluxPipeline: guidance is distilled into the model (an embedding) or absent; there
        # is no negative batch half. Its optional "true CFG" runs the negative prompt as a
        # second call per step, which would show up as a second slot and fail collect()'s
        # row check instead of being mixed in.
        return CFGLayout.batched(n_items, False, source=type(pipe).__name__)
    if hasattr(pipe, "do_classifier_free_guidance"):
        if not hasattr(pipe, "_guidance_scale"):
            raise RuntimeError(f"{type(pipe).__name__} has not been called yet; its CFG layout is unknown")
        return CFGLayout.batched(n_items, bool(pipe.do_classifier_free_guidance), source=type(pipe).__name__)
    raise RuntimeError(
        f"cannot tell which denoiser rows {type(pipe).__name__} used for the conditional branch "
        "(it neither records last_cfg_layout nor exposes do_classifier_free_guidance)"
    )


@dataclass
class RawTrace:
    """Cross-attention sums of the conditional rows of one traced run.

    maps[(h, w)]: float32 ``[items, tokens, h, w]`` summed over heads, layers and steps;
    counts[(h, w)]: head maps added per item at that resolution;
    per_step[(step, h, w)]: float16 ``[items, tokens, h, w]`` (only when time-resolved);
    timesteps: the denoiser's timestep at each step (training scale, in call order).
    """

    maps: dict[tuple[int, int], torch.Tensor]
    counts: dict[tuple[int, int], int]
    timesteps: list[float]
    latent_hw: tuple[int, int]
    layers: list[str]
    per_step: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return int(next(iter(self.maps.values())).shape[0])

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        return sorted(self.maps, key=lambda x: -x[0] * x[1])

    def aggregate(
        self,
        out_hw: tuple[int, int],
        items: Sequence[int] | None = None,
        tokens: int | None = None,
        step: int | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Image-size maps ``[items, tokens, H, W]`` (float32).

        Every resolution is upsampled bicubically to ``out_hw``, clamped at zero, and the
        resolutions summed. ``tokens`` keeps the first positions only (the prompt, not the
        padding), counted from ``offset`` (where a joint text sequence's traced stream starts); ``step`` aggregates one step of a time-resolved trace instead of all.
        """
        source = self.maps if step is None else {(h, w): m for (s, h, w), m in self.per_step.items() if s == step}
        if not source:
            raise ValueError("nothing traced" if step is None else f"no time-resolved maps for step {step}")
        total: torch.Tensor | None = None
        for hw, m in source.items():
            m = m.float()
            if items is not None:
                m = m[list(items)]
            if tokens is not None or offset:
                m = m[:, offset : None if tokens is None else offset + tokens]
            up = m if tuple(hw) == tuple(out_hw) else F.interpolate(m, size=tuple(out_hw), mode="bicubic", align_corners=False)
            up = up.clamp(min=0)
            total = up if total is None else total + up
        assert total is not None
        return total


class AttentionTracer:
    """Context manager that records cross-attention maps of ``denoiser``.

    Usage::

        with AttentionTracer(unet) as tracer:
            out = pipe(prompts, ...)
            raw = tracer.collect(layout_from_pipeline(pipe, len(prompts)))

    ``layers``: module-path globs of the cross-attention modules to trace (default: the
    down and up blocks', as DAAM; ``*attn2`` adds the mid block). ``time_resolved`` also keeps one sum per step (memory grows with steps).
    Call :meth:`reset` between runs; :meth:`paused` stops recording inside a block (e.g.
    during DDIM inversion).
    """

    def __init__(
        self,
        denoiser: torch.nn.Module,
        layers: str | Sequence[str] = DEFAULT_LAYERS,
        time_resolved: bool = False,
        model_name: str | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.accumulator = MapAccumulator(time_resolved=time_resolved)
        self._stack: contextlib.ExitStack | None = None
        self._make: Any = None
        patterns = [layers] if isinstance(layers, str) else list(layers)
        # Joint-attention transformers (SD3, Flux) have no attn2: the UNet default layers
        # stand for "every joint block" there (the paper traces every cross-attention layer
        # that carries text; in these models that is every block).
        self.family = joint.joint_family(denoiser)
        if self.family is not None:
            if tuple(patterns) == tuple(DEFAULT_LAYERS):
                patterns = list(joint.JOINT_LAYERS)
            self.modules = joint.find_joint_attention(denoiser, patterns, model_name)
            self._make = lambda name, acc, original: joint.JointDAAMProcessor(name, acc, original, self.family)
        else:
            self.modules = find_cross_attention(denoiser, patterns, model_name)
        self.layers = patterns

    # -- install / remove ------------------------------------------------------------
    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.accumulator.enabled:
            return
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if isinstance(t, torch.Tensor):
            t = float(t.reshape(-1)[0]) if t.numel() else 0.0
        if self.family is not None:
            # Joint attention: the map grid is the image-token grid; the text length tells
            # Flux's single-stream blocks where the image tokens start.
            hw = joint.token_grid(self.family, self.denoiser, {"hidden_states": sample, **kwargs})
            self.accumulator.text_len = int(kwargs["encoder_hidden_states"].shape[1])
            self.accumulator.begin_call(hw, joint.timestep_to_train_scale(self.family, float(t)), int(sample.shape[0]))
            return
        self.accumulator.begin_call((int(sample.shape[-2]), int(sample.shape[-1])), float(t), int(sample.shape[0]))

    def __enter__(self) -> "AttentionTracer":
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(install_processors(self.modules, self.accumulator, self._make))
            handle = self.denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self.accumulator.reset()
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def reset(self) -> None:
        self.accumulator.reset()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run the denoiser inside the block without recording (nor counting steps)."""
        acc = self.accumulator
        enabled, acc.enabled = acc.enabled, False
        try:
            yield
        finally:
            acc.enabled = enabled

    # -- results ---------------------------------------------------------------------
    def collect(self, layout: CFGLayout) -> RawTrace:
        """The conditional rows' maps, in item order, as a :class:`RawTrace` on the CPU."""
        acc = self.accumulator
        acc.flush_step()
        if not acc.sums:
            raise RuntimeError("the tracer recorded no cross-attention (was the denoiser called inside the block?)")
        seen = acc.rows_total()
        if seen != layout.n_rows:
            raise RuntimeError(
                f"the denoiser saw {seen} rows per step but the pipeline's CFG layout ({layout.source}) "
                f"has {layout.n_rows}: cannot tell the conditional rows apart"
            )
        offsets = acc.slot_offsets()
        # Map each conditional row to (slot, row within slot).
        where = []
        for r in layout.cond_rows:
            slot = max(s for s, off in offsets.items() if off <= r)
            where.append((slot, r - offsets[slot]))

        def gather(src: dict, res_keys: list[tuple]) -> dict:
            out = {}
            for key in res_keys:
                prefix, hw = key[:-2], key[-2:]
                parts = []
                for slot, row in where:
                    t = src.get((*prefix, slot, *hw))
                    if t is None:
                        raise RuntimeError(f"no maps at resolution {hw} for slot {slot}")
                    parts.append(t[row])
                stacked = torch.stack(parts)  # [items, N, T]
                h, w = hw
                out[key] = stacked.permute(0, 2, 1).reshape(len(parts), stacked.shape[2], h, w).cpu().contiguous()
            return out

        res = sorted({(h, w) for _, h, w in acc.sums})
        maps = gather(acc.sums, res)
        counts = {hw: acc.counts.get((where[0][0], *hw), 0) for hw in res}
        per_step = {}
        if acc.time_resolved:
            keys = sorted({(s, h, w) for s, _, h, w in acc.per_step})
            per_step = gather(acc.per_step, keys)
        return RawTrace(
            maps=maps,
            counts=counts,
            timesteps=list(acc.timesteps),
            latent_hw=acc.latent_hw or (0, 0),
            layers=sorted(acc.layers_seen),
            per_step=per_step,
        )


def describe(raw: RawTrace) -> dict[str, Any]:
    """JSON-able summary of a trace (resolutions, head maps per item, timesteps, layers)."""
    return {
        "resolutions": [f"{h}x{w}" for h, w in raw.resolutions],
        "head_maps_per_item": {f"{h}x{w}": c for (h, w), c in raw.counts.items()},
        "timesteps": [float(t) for t in raw.timesteps],
        "latent_hw": list(raw.latent_hw),
        "layers": raw.layers,
    }



def _to_uint8(images: Any) -> np.ndarray:
    """Pipeline output (float [0, 1], numpy [N, H, W, 3] or tensor [N, 3, H, W]) -> uint8 [N, H, W, 3]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images, dtype=np.float32)
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


def build_word_maps(
    raw: RawTrace, prompts: Sequence[str], tokenizer: Any, out_hw: tuple[int, int], window: int | None = None
) -> list["WordMaps"]:
    """One :class:`WordMaps` per traced item (``prompts[i]`` is item i's prompt)."""
    from diffatlas.daam.words import WordMaps, align_prompt

    aligned = [align_prompt(tokenizer, p, window) for p in prompts]
    n_pos = max(a.n_positions for a in aligned)
    agg = raw.aggregate(out_hw, tokens=n_pos).numpy()  # [items, n_pos, H, W]
    return [WordMaps(agg[i, : a.n_positions], a) for i, a in enumerate(aligned)]


def build_joint_word_maps(raw: RawTrace, aligned: Sequence[tuple[Any, int]], out_hw: tuple[int, int]) -> list["WordMaps"]:
    """One :class:`WordMaps` per traced item of a joint-attention model; ``aligned[i]`` is item
    i's ``(PromptTokens, stream offset)`` from :func:`diffatlas.daam.joint.joint_prompt_tokens`."""
    from diffatlas.daam.words import WordMaps

    offset = aligned[0][1]
    n_pos = max(a.n_positions for a, _ in aligned)
    agg = raw.aggregate(out_hw, tokens=n_pos, offset=offset).numpy()  # [items, n_pos, H, W]
    return [WordMaps(agg[i, : a.n_positions], a) for i, (a, _) in enumerate(aligned)]


def text_window(handle: Any) -> int:
    """Tokens the text encoder reads (77 for CLIP)."""
    tok = handle.tokenizers[0]
    limits = [int(getattr(tok, "model_max_length", 77) or 77)]
    enc = handle.text_encoders[0] if handle.text_encoders else None
    if enc is not None and getattr(enc.config, "max_position_embeddings", None):
        limits.append(int(enc.config.max_position_embeddings))
    return min(x for x in limits if x > 0)


def check_text_model(handle: Any, name: str | None = None) -> None:
    """DAAM needs a text-conditioned model with cross-attention: reject DiT by name."""
    from diffatlas.errors import UserError

    label = name or handle.model_id
    if handle.family == "dit" or not handle.tokenizers:
        raise UserError(
            f"model {label!r} is a {handle.family} model without text cross-attention (class-conditioned); "
            "DAAM needs a text-conditioned UNet (SD, SDXL or the ShapesWorld model)"
        )


def trace_generation(
    handle: Any,
    prompts: Sequence[str],
    *,
    n_images: int = 1,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 3.0,
    layers: str | Sequence[str] = DEFAULT_LAYERS,
    time_resolved: bool = False,
    batch_size: int = 8,
    out_size: int | None = None,
    model_name: str | None = None,
) -> TracedRun:
    """Generate ``n_images`` images per prompt with the model's own pipeline while tracing.

    Item ``k`` (prompt-major: prompt ``k // n_images``, image ``k % n_images``) is drawn from
    its own generator seeded ``seed + k``, so an image does not depend on ``batch_size``.
    The conditional rows are taken from the pipeline's recorded CFG layout.
    """
    from diffatlas.errors import UserError

    check_text_model(handle, model_name)
    prompts = list(prompts)
    if not prompts:
        raise UserError("daam: the prompt set is empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise UserError(f"daam: prompt {i} is empty ({p!r}); every prompt needs at least one word")
    if n_images < 1 or steps < 1 or batch_size < 1:
        raise UserError(f"daam: n_images ({n_images}), steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    pipe = handle.pipeline
    tok = handle.tokenizers[0]
    window = text_window(handle)
    size = int(out_size or handle.image_size)
    tracer = AttentionTracer(handle.denoiser, layers, time_resolved, model_name or handle.model_id)
    call_extra: dict[str, Any] = {}
    if tracer.family is not None:
        # Joint attention: every prompt's word layout first (a word a tokenisation lacks, or a
        # prompt past T5's limit, fails before any generation); the pipeline reads the same
        # T5 length as the layout, at the model's own image size.
        joint_layout = {p: joint.joint_prompt_tokens(handle, p) for p in dict.fromkeys(prompts)}
    # A pixel-space pipeline without a VAE (the SD3-architecture ShapesWorld model): diffusers'
    # SD3 pipeline decodes through its VAE unconditionally and sizes its latents by its default
    # scale factor, so ask for the size that gives the model's own input side and take the final
    # x0 as latents, turned into images by the handle's decode (the identity clamped to [-1, 1]).
    pixel_joint = tracer.family == "sd3" and handle.vae is None
    output_type = "latent" if pixel_joint else "np"
    if tracer.family is not None:
        side = handle.latent_size * pipe.vae_scale_factor if pixel_joint else handle.image_size
        call_extra = {"max_sequence_length": handle.t5_length, "height": side, "width": side}
    images, maps, items, per_step = [], [], [], []
    per_batch = max(1, batch_size // n_images)
    with tracer:
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start : start + per_batch]
            n_items = len(chunk) * n_images
            k0 = start * n_images
            seeds = [seed + k0 + j for j in range(n_items)]
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            tracer.reset()
            out = pipe(
                prompt=chunk,
                num_images_per_prompt=n_images,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type=output_type,
                **call_extra,
            )
            layout = layout_from_pipeline(pipe, n_items)
            raw = tracer.collect(layout)
            per_item_prompts = [p for p in chunk for _ in range(n_images)]
            images.append(_to_uint8((handle.decode(out.images) + 1) / 2 if pixel_joint else out.images))
            if tracer.family is not None:
                maps.extend(build_joint_word_maps(raw, [joint_layout[p] for p in per_item_prompts], (size, size)))
            else:
                maps.extend(build_word_maps(raw, per_item_prompts, tok, (size, size), window))
            for j in range(n_items):
                items.append(
                    {"prompt_index": start + j // n_images, "image_index": j % n_images, "seed": seeds[j], "sample_id": -1}
                )
            if time_resolved:
                per_step.append((k0, raw))
            last_raw = raw
    info = {
        "mode": "generate",
        "model": handle.describe(),
        "steps": steps,
        "guidance": float(guidance),
        "cfg": bool(layout.guidance),
        "cfg_layout_source": layout.source,
        "n_images_per_prompt": n_images,
        "seed": seed,
        "layers": list([layers] if isinstance(layers, str) else layers),
        "map_size": size,
        "aggregation": "sum over heads, layers, timesteps per resolution; bicubic upsampling; clamp >= 0; sum over resolutions",
        "trace": describe(last_raw),
        "time_resolved": bool(time_resolved),
    }
    if tracer.family is not None:
        info.update(joint.describe_joint(handle, tracer, last_raw))
    else:
        info["timesteps"] = [int(round(t)) for t in last_raw.timesteps]
        info["alpha_bar"] = [float(handle.ddpm_alphas("DAAM")[int(round(t))]) for t in last_raw.timesteps]
    return TracedRun(np.concatenate(images), maps, items, info, per_step)
