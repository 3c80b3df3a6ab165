"""Capture every selected layer in one forward pass, reduced on the fly.

:class:`ActivationCapture` registers one forward hook per selected module for the life of a
``with`` block and removes them on exit, error or not. Each hook reduces the module's output
*while the forward runs* — a spatial mean (or sum) ``[B, C]`` and, for layers that keep maps,
a ``[B, C, h, w]`` map average-pooled down to ``spatial_max_size`` — so the full-size
activation is released as soon as the network is done with it and nothing is copied beyond
the small results.

Because the hooks know which layers are still to come, the pass can stop as soon as the last
selected module has fired (``stop_early``): layers after it cannot change what is captured,
so e.g. ``[mid, up_ft0, up_ft1]`` never pays for the last, full-resolution up block. The first
pass of a capture always runs to the end, so a module that runs twice per pass (which has no
single output to record) is refused rather than silently recorded at its first call.

Outputs are normalised to maps:

* a tensor ``[B, C, h, w]`` is used as is;
* a tuple (down blocks return ``(hidden, res_samples)``) or a diffusers ``BaseOutput``
  contributes its first element;
* tokens ``[B, N, C]`` (DiT blocks, attention modules) are laid back on their grid
  ``[B, C, h, w]``: row-major patch order, with ``h, w`` found from the denoiser's input size
  (``N = ceil(H/s) * ceil(W/s)`` for an integer stride ``s``);
* a vector ``[B, C]`` (e.g. an embedding) is pooled as itself and cannot keep maps;
* a joint-attention block (SD3, Flux) returns ``(text tokens, image tokens)``: a layer with a
  ``stream`` takes its element (:data:`~diffatlas.activations.layers.STREAMS`); image tokens
  are laid on the patch grid as above, text tokens ``[B, L, C]`` are pooled over the sequence
  and keep no map. Where the denoiser's input is not a map (Flux's packed latents), the
  caller gives the image-token ``grid``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffatlas.activations.layers import STREAMS, ResolvedLayer
from diffatlas.errors import UserError

log = logging.getLogger(__name__)

POOLINGS = ("mean", "sum")


class _StopForward(Exception):
    """Raised by the last hook of a pass to skip the rest of the network."""


@dataclass
class Captured:
    """What one layer yielded in one pass.

    pooled: [B, C] float32; spatial: [B, C, h, w] (``spatial_dtype``) or None.
    """

    pooled: torch.Tensor
    spatial: torch.Tensor | None


def first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    if isinstance(output, dict) and output:  # diffusers BaseOutput is an OrderedDict
        return first_tensor(next(iter(output.values())))
    return None


def stream_tensor(output: Any, stream: str | None, name: str = "") -> torch.Tensor | None:
    """A layer's tensor in a module's ``output``: the ``stream`` (``"image"`` / ``"text"``,
    :attr:`ResolvedLayer.stream`) of a joint block's ``(text, image)`` tuple, else the first
    tensor (:func:`first_tensor`). Every stage hooking a resolved layer reads it through this."""
    if stream is None:
        return first_tensor(output)
    if not isinstance(output, (tuple, list)) or len(output) != len(STREAMS) or output[STREAMS[stream]] is None:
        raise UserError(f"layer {name!r}: the module does not return a {stream} stream; got {type(output).__name__}")
    return output[STREAMS[stream]]


def token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """Grid ``(h, w)`` of ``n_tokens`` tokens from an input of ``height × width``.

    Tries the integer strides ``s`` near ``sqrt(H W / N)`` with floor and ceil division
    (patch embeddings floor, stride-2 convolutions ceil).
    """
    guess = math.sqrt(height * width / max(n_tokens, 1))
    for s in sorted({max(1, math.floor(guess)), max(1, math.ceil(guess)), max(1, round(guess))}):
        for h, w in ((height // s, width // s), (-(-height // s), -(-width // s))):
            if h * w == n_tokens:
                return h, w
    raise ValueError(f"cannot lay {n_tokens} tokens on a grid for an input of {height}x{width}")


def cap_size(h: int, w: int, max_size: int | None) -> tuple[int, int]:
    """Stored map size: each side capped at ``max_size`` (None keeps the full size)."""
    if max_size is None:
        return h, w
    return min(h, max_size), min(w, max_size)


class ActivationCapture:
    """Forward hooks on every selected module of ``model`` for the life of a ``with`` block.

    Usage::

        with ActivationCapture(unet, layers, spatial_layers={"mid"}) as cap:
            out = cap.run(handle.predict_noise, x_t, t, cond)   # {name: Captured}

    Hooks are idle outside :meth:`run`, so the same model can run uncaptured passes (e.g.
    DDIM inversion) inside the block. ``run`` returns one :class:`Captured` per layer.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[ResolvedLayer],
        *,
        pooling: str = "mean",
        spatial_layers: Iterable[str] = (),
        spatial_max_size: int | None = None,
        spatial_dtype: torch.dtype = torch.float16,
        stop_early: bool = True,
        grid: tuple[int, int] | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise UserError(f"pooling {pooling!r} is not one of: {', '.join(POOLINGS)}")
        if spatial_max_size is not None and spatial_max_size < 1:
            raise UserError(f"spatial_max_size {spatial_max_size} must be >= 1 (or null for full size)")
        self.model = model
        self.layers = list(layers)
        self.pooling = pooling
        self.spatial_layers = set(spatial_layers)
        unknown = self.spatial_layers - {layer.name for layer in self.layers}
        if unknown:
            raise UserError(f"spatial layers {sorted(unknown)} are not among the selected layers {[x.name for x in self.layers]}")
        self.spatial_max_size = spatial_max_size
        self.spatial_dtype = spatial_dtype
        self.stop_early = stop_early
        self.grid = grid
        self._stream = {layer.name: layer.stream for layer in self.layers}
        text_maps = sorted(n for n in self.spatial_layers if self._stream.get(n) == "text")
        if text_maps:
            raise UserError(
                f"layers {text_maps} are text-token streams (a sequence, no spatial grid) and cannot keep "
                "spatial maps; leave them out of extract.spatial_layers"
            )
        modules = dict(model.named_modules())
        missing = [layer.module_path for layer in self.layers if layer.module_path not in modules]
        if missing:
            raise UserError(f"modules {missing} are not in {type(model).__name__}")
        self._modules = [modules[layer.module_path] for layer in self.layers]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False
        self._validated = False  # set after the first complete pass
        self._stop_now = False
        self._input_hw: tuple[int, int] | None = None
        self._results: dict[str, Captured] = {}
        self._calls: dict[str, int] = {}

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> ActivationCapture:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._record_input, with_kwargs=True))
            for layer, module in zip(self.layers, self._modules):
                self._handles.append(module.register_forward_hook(self._make_hook(layer.name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False

    # -- hooks ----------------------------------------------------------------------------
    def _record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            self._input_hw = (int(x.shape[-2]), int(x.shape[-1]))

    def _make_hook(self, name: str) -> Callable[..., None]:
        keep_spatial = name in self.spatial_layers

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._active:
                return
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._calls[name] > 1:
                raise UserError(
                    f"layer {name!r} runs more than once per forward pass (a shared module such as an "
                    "activation function); select its parent module instead"
                )
            self._results[name] = self._reduce(name, self._select(name, output), keep_spatial)
            if self._stop_now and len(self._results) == len(self.layers):
                raise _StopForward

        return hook

    def _select(self, name: str, output: Any) -> torch.Tensor | None:
        return stream_tensor(output, self._stream[name], name)

    def _reduce(self, name: str, x: torch.Tensor | None, keep_spatial: bool) -> Captured:
        """Pool (and cap) one output; shapes: [B,C,h,w] | [B,N,C] | [B,C] -> Captured."""
        if x is None:
            raise UserError(f"layer {name!r} does not output a tensor; select a module that does")
        x = x.detach()
        if x.ndim == 3 and self._stream[name] == "text":
            # text tokens [B, L, C]: pooled over the sequence (padding included, as the model sees it)
            pool = x.mean if self.pooling == "mean" else x.sum
            return Captured(pooled=pool(dim=1, dtype=torch.float32), spatial=None)
        if x.ndim == 3 and self.grid is not None:
            h, w = self.grid
            if h * w != x.shape[1]:
                raise UserError(f"layer {name!r} has {x.shape[1]} tokens, not the {h}x{w} image-token grid")
            x = x.transpose(1, 2).unflatten(2, (h, w))
        if x.ndim == 3:
            if self._input_hw is None:
                raise UserError(f"layer {name!r} outputs tokens but the model input size is unknown")
            try:
                h, w = token_grid(x.shape[1], *self._input_hw)
            except ValueError as err:
                raise UserError(f"layer {name!r}: {err}") from None
            # [B, N, C] with row-major patches -> [B, C, h, w]; a view, no copy.
            x = x.transpose(1, 2).unflatten(2, (h, w))
        if x.ndim == 2:
            if keep_spatial:
                raise UserError(
                    f"layer {name!r} outputs vectors [B, C] and has no spatial map to store; "
                    "name the layers that keep maps in extract.spatial_layers (or set extract.spatial: false)"
                )
            return Captured(pooled=x.to(torch.float32), spatial=None)
        if x.ndim != 4:
            raise UserError(f"layer {name!r} outputs a tensor of shape {tuple(x.shape)}; expected [B,C,h,w] or [B,N,C]")
        if self.pooling == "mean":
            pooled = x.mean(dim=(2, 3), dtype=torch.float32)
        else:
            pooled = x.sum(dim=(2, 3), dtype=torch.float32)
        spatial = None
        if keep_spatial:
            size = cap_size(x.shape[2], x.shape[3], self.spatial_max_size)
            if size != tuple(x.shape[2:]):
                # Pooling makes a new (small) tensor; converting it needs no further copy.
                spatial = F.adaptive_avg_pool2d(x.to(torch.float32), size).to(self.spatial_dtype)
            else:
                # Full size: one copy, which is also the dtype conversion the store needs and
                # protects the result from in-place updates later in the network.
                spatial = x.to(self.spatial_dtype, copy=True, memory_format=torch.contiguous_format)
        return Captured(pooled=pooled, spatial=spatial)

    # -- running ----------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Captured]:
        """Call ``fn`` (one forward pass) with hooks live; return ``{layer name: Captured}``.

        Raises RuntimeError when a selected module did not run in the pass (so no layer is
        ever silently missing).
        """
        if not self._handles:
            raise RuntimeError("ActivationCapture.run called outside its with-block")
        self._results, self._calls, self._input_hw = {}, {}, None
        # The first pass always runs to the end, so a module that fires twice per pass is
        # caught before later passes stop early.
        self._stop_now = self.stop_early and self._validated
        self._active = True
        try:
            fn(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            self._active = False
        missing = [layer.name for layer in self.layers if layer.name not in self._results]
        if missing:
            raise UserError(f"layers {missing} did not run in the forward pass of {type(self.model).__name__}")
        self._validated = True
        results, self._results = self._results, {}
        return results
