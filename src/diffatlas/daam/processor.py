"""The DAAM attention processor: cross-attention that also adds up its own attention maps.

diffusers' default processor (``AttnProcessor2_0``, i.e. SDPA) never materialises the
attention probabilities, so a tracer must compute them itself. :class:`DAAMAttnProcessor`
does exactly what the classic ``AttnProcessor`` does (plus ``norm_q``/``norm_k`` when a
module has them, as ``AttnProcessor2_0`` does), with the probabilities coming from
``attn.get_attention_scores``, and hands the head-summed probabilities of every call to a
:class:`MapAccumulator`. The output is the stock processor's output up to float rounding.

Memory: the accumulator keeps one running sum per (forward slot, map resolution), shaped
``[rows, query_positions, tokens]`` in float32: O(tokens × map size) per batch row, however
many steps, layers and heads there are. Only when time-resolved maps are asked for does it
also keep one sum per (step, resolution) (that is O(steps × tokens × map size), still not
per layer or head).

Installing and restoring processors is done by :func:`install_processors`, a context manager
that puts back the ORIGINAL processor objects on exit, even when the block raises.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffatlas.daam.config import PAPER_LAYERS
from diffatlas.errors import UserError

log = logging.getLogger(__name__)

#: Default module-path globs: DAAM's (the down and up blocks' cross-attention), defined once
#: in :data:`diffatlas.daam.config.PAPER_LAYERS`.
DEFAULT_LAYERS = PAPER_LAYERS


def map_shape(n_queries: int, latent_hw: tuple[int, int], max_levels: int = 8) -> tuple[int, int]:
    """The (h, w) of a flattened query map of ``n_queries`` positions.

    The UNet halves the latent (rounding up, as its stride-2 convolutions with padding 1 do)
    at every down block, so a map is the latent size divided by 2**k for some k. Reading the
    latent size from the actual input makes this right for any model and non-square inputs;
    nothing assumes 64×64.
    """
    h, w = latent_hw
    for _ in range(max_levels + 1):
        if h * w == n_queries:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise RuntimeError(
        f"cannot place {n_queries} attention queries on a downsampled {latent_hw[0]}x{latent_hw[1]} latent grid"
    )


@dataclass
class MapAccumulator:
    """Running sums of cross-attention maps, filled by the processors during a traced run.

    ``sums[(slot, h, w)]`` is ``[rows_of_slot, h*w, tokens]`` float32, summed over heads,
    layers and denoiser calls (timesteps). A *slot* is the k-th denoiser call at one
    timestep: pipelines that run the conditional and unconditional halves as two separate
    calls put them in two slots; pipelines that batch them use one slot. ``counts`` holds
    how many head maps went into each sum. With ``time_resolved`` the same sums are also
    kept per step: ``per_step[(step, slot, h, w)]`` (float16 on CPU).
    """

    time_resolved: bool = False
    sums: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[int, int, int], int] = field(default_factory=dict)
    per_step: dict[tuple[int, int, int, int], torch.Tensor] = field(default_factory=dict)
    # Sums of the current step only (float32, on the model's device), flushed to per_step.
    _step_buf: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    # State of the current denoiser call, set by the tracer's forward pre-hook.
    latent_hw: tuple[int, int] | None = None
    step: int = -1
    slot: int = 0
    slot_rows: dict[int, int] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    text_len: int = 0  # text tokens of the current call (joint attention: where image tokens start)
    layers_seen: set[str] = field(default_factory=set)
    enabled: bool = True

    def reset(self) -> None:
        """Forget everything recorded (start of a new traced run)."""
        self.sums.clear()
        self.counts.clear()
        self.per_step.clear()
        self._step_buf.clear()
        self.latent_hw = None
        self.step = -1
        self.slot = 0
        self.slot_rows.clear()
        self.timesteps.clear()
        self.layers_seen.clear()

    def begin_call(self, latent_hw: tuple[int, int], timestep: float, rows: int) -> None:
        """Called before each denoiser forward: a new timestep starts a new step, a repeated
        timestep is the next slot of the same step (split CFG)."""
        if self.timesteps and self.step >= 0 and timestep == self.timesteps[-1]:
            self.slot += 1
        else:
            self.flush_step()
            self.step += 1
            self.slot = 0
            self.timesteps.append(timestep)
        known = self.slot_rows.get(self.slot)
        if known is not None and known != rows:
            raise RuntimeError(
                f"denoiser batch changed from {known} to {rows} rows within one traced run; "
                "trace one pipeline call at a time (call tracer.reset() between runs)"
            )
        self.slot_rows[self.slot] = rows
        self.latent_hw = latent_hw

    def add(self, layer: str, probs: torch.Tensor, heads: int, hw: tuple[int, int]) -> None:
        """Add one call's probabilities ``[rows*heads, h*w, tokens]`` (summed over heads here)."""
        rows = probs.shape[0] // heads
        summed = probs.reshape(rows, heads, probs.shape[1], probs.shape[2]).sum(1, dtype=torch.float32)
        self.add_summed(layer, summed, heads, hw)

    def add_summed(self, layer: str, summed: torch.Tensor, heads: int, hw: tuple[int, int]) -> None:
        """Add one call's maps already summed over its ``heads``: float32 ``[rows, h*w, tokens]``."""
        key = (self.slot, hw[0], hw[1])
        if key in self.sums:
            self.sums[key].add_(summed)
        else:
            self.sums[key] = summed.clone()
        self.counts[key] = self.counts.get(key, 0) + heads
        self.layers_seen.add(layer)
        if self.time_resolved:
            if key in self._step_buf:
                self._step_buf[key].add_(summed)
            else:
                self._step_buf[key] = summed.clone()

    def flush_step(self) -> None:
        """Move the current step's sums to ``per_step`` (float16, CPU); called at step ends."""
        for key, buf in self._step_buf.items():
            self.per_step[(self.step, *key)] = buf.to("cpu", torch.float16)
        self._step_buf.clear()

    @property
    def n_steps(self) -> int:
        return self.step + 1

    def resolutions(self) -> list[tuple[int, int]]:
        """Map sizes seen, largest first."""
        return sorted({(h, w) for _, h, w in self.sums}, key=lambda x: -x[0] * x[1])

    def rows_total(self) -> int:
        return sum(self.slot_rows.values())

    def slot_offsets(self) -> dict[int, int]:
        """Row offset of each slot in the concatenated row space (slot 0 first)."""
        out, acc = {}, 0
        for s in sorted(self.slot_rows):
            out[s] = acc
            acc += self.slot_rows[s]
        return out


class DAAMAttnProcessor:
    """Cross-attention with explicit probabilities that are added to an accumulator.

    Self-attention calls (no ``encoder_hidden_states``) and calls while the accumulator is
    disabled go to the module's original processor unchanged.
    """

    def __init__(self, name: str, accumulator: MapAccumulator, original: Any) -> None:
        self.name = name
        self.accumulator = accumulator
        self.original = original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        acc = self.accumulator
        if encoder_hidden_states is None or not acc.enabled or acc.latent_hw is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, temb=temb, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
            hw = (height, width)
        else:
            hw = map_shape(hidden_states.shape[1], acc.latent_hw)
        batch, n_tokens, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, n_tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None or attn.norm_k is not None:
            # AttnProcessor2_0 normalises per head on [B, heads, N, d]; do the same.
            head_dim = key.shape[-1] // attn.heads
            if attn.norm_q is not None:
                q4 = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                query = attn.norm_q(q4).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
            if attn.norm_k is not None:
                k4 = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                key = attn.norm_k(k4).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, N, tokens]
        with torch.no_grad():
            acc.add(self.name, probs.detach(), attn.heads, hw)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, *hw)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _is_attention(module: Any) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "processor") and hasattr(module, "get_attention_scores")


def find_cross_attention(
    denoiser: torch.nn.Module, layers: str | Sequence[str] = DEFAULT_LAYERS, model_name: str | None = None
) -> dict[str, torch.nn.Module]:
    """Cross-attention modules of ``denoiser`` whose module path matches a glob in ``layers``.

    Raises :class:`UserError` naming the model when it has no cross-attention at all (a DiT
    conditioned on class labels) or when the globs match none of its cross-attention modules.
    """
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise UserError("daam: layers must list at least one module-path glob (e.g. 'up_blocks.*attn2')")
    label = model_name or type(denoiser).__name__
    cross = {
        name: m
        for name, m in denoiser.named_modules()
        if _is_attention(m) and getattr(m, "is_cross_attention", False)
    }
    if not cross:
        raise UserError(
            f"model {label!r} has no cross-attention modules (a class-conditioned DiT, or an unconditional "
            "model): DAAM needs text cross-attention (a UNet2DConditionModel such as SD or the ShapesWorld model)"
        )
    return choose_modules(cross, patterns, label, "cross-attention")


def choose_modules(modules: dict[str, Any], patterns: Sequence[str], label: str, kind: str) -> dict[str, Any]:
    """The ``modules`` (path -> module) whose path matches a glob of ``patterns``; a UserError
    naming the model ``label`` and example paths of its ``kind`` modules when none does."""
    chosen = {n: m for n, m in modules.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not chosen:
        examples = ", ".join(list(modules)[:4])
        raise UserError(
            f"daam layers {list(patterns)} match none of the {kind} modules of {label!r}; "
            f"allowed: globs over module paths such as {examples}"
        )
    return chosen


@contextlib.contextmanager
def install_processors(
    modules: dict[str, torch.nn.Module], accumulator: MapAccumulator, make: Any = None
) -> Iterator[dict[str, Any]]:
    """Put a :class:`DAAMAttnProcessor` (or ``make(name, accumulator, original)``, e.g. the
    joint-attention processor) on each module; restore the original objects on exit.

    The originals are the very processor objects that were installed (not fresh defaults),
    so a user's custom processors survive tracing, also when the block raises.
    """
    originals = {name: m.processor for name, m in modules.items()}
    installed: dict[str, Any] = {}
    make = make or DAAMAttnProcessor
    try:
        for name, m in modules.items():
            proc = make(name, accumulator, originals[name])
            m.set_processor(proc)
            installed[name] = proc
        yield installed
    finally:
        for name, m in modules.items():
            if name in originals:
                m.set_processor(originals[name])
