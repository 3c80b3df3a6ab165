"""The forward hook that edits one layer's output during generation.

:class:`InterventionHook` registers, for the life of a ``with`` block, a forward pre-hook on
the denoiser (it reads the timestep of each pass, so it works inside any sampler, ours or a
diffusers pipeline's) and a forward hook on the selected module that replaces its output by
the edited one (:mod:`diffatlas.interventions.edit`). Outputs are read as extraction reads
them (:mod:`diffatlas.activations.hooks`):

* ``[B, C, h, w]`` maps: positions are the h·w cells;
* ``[B, N, C]`` tokens (DiT blocks): positions are the tokens;
* ``[B, C]`` vectors: one position;
* a tuple (down blocks return ``(hidden, res_samples)``) has its first tensor edited, and so
  is every skip tensor that *is* that hidden state (the block's last residual), so the edit
  reaches the up path exactly as the layer's output would;
* a joint-attention block (SD3, Flux) returns ``(text tokens, image tokens)``: the layer's
  stream (``block{i}`` = ``block{i}.image``) is read through extraction's one reader,
  :func:`~diffatlas.activations.hooks.stream_tensor`, and only that element is replaced.

CFG rows follow the house layout (:mod:`diffatlas.models.diffusion`): with guidance the batch
is ``[uncond rows, cond rows]``; ``cfg_branch = "cond"`` edits the second half only.
Passes at timesteps outside the window, and edits that change nothing, return the module's
output object itself (bit-identical).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from diffatlas.activations.hooks import stream_tensor
from diffatlas.activations.layers import ResolvedLayer
from diffatlas.errors import UserError
from diffatlas.interventions.edit import SteeringSAE, apply_delta, changed, edit_delta
from diffatlas.interventions.spec import Intervention

log = logging.getLogger(__name__)


class InterventionHook:
    """Edit ``layer`` of ``denoiser`` by ``spec`` with ``sae`` while the block is open.

    Args:
        denoiser: the UNet / DiT (``handle.denoiser``).
        layer: the resolved layer (:func:`diffatlas.activations.layers.resolve_layers`).
        spec: what to do.
        sae: the SAE (checked against the layer by the caller, see :meth:`SteeringSAE.check`).
        guided: True when each pass holds CFG rows ``[uncond, cond]``.

    Attributes ``passes`` and ``edited_passes`` count the passes seen and changed (for the record;
    the changed count is kept on the activations' device and read only when asked, so the hook
    itself never waits for the device).
    """

    def __init__(self, denoiser: nn.Module, layer: ResolvedLayer, spec: Intervention, sae: SteeringSAE,
                 *, guided: bool) -> None:
        modules = dict(denoiser.named_modules())
        if layer.module_path not in modules:
            raise UserError(f"layer {layer.name!r}: module {layer.module_path!r} is not in {type(denoiser).__name__}")
        self.denoiser, self.module, self.layer = denoiser, modules[layer.module_path], layer
        self.spec, self.sae, self.guided = spec, sae, bool(guided)
        self._handles: list[Any] = []
        self._times: list[int] | None = None
        self.passes = 0
        self._edited: list[torch.Tensor] = []  # per edited pass, a 0-d bool on the device: did it change anything

    @property
    def edited_passes(self) -> int:
        """Passes whose output the edit changed (reads the device-side flags: one sync, when asked)."""
        return sum(bool(f) for f in self._edited)

    def __enter__(self) -> "InterventionHook":
        try:
            self._handles.append(self.denoiser.register_forward_pre_hook(self._read_time, with_kwargs=True))
            self._handles.append(self.module.register_forward_hook(self._edit))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks ------------------------------------------------------------------------------
    def _read_time(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if t is None:
            raise UserError(f"{type(module).__name__} was called without a timestep; cannot place the intervention in time")
        self._times = [int(v) for v in torch.as_tensor(t).reshape(-1).tolist()]

    def _rows(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """Rows to edit ``[B]`` bool (window and CFG branch), or None when there are none."""
        times = self._times or []
        if len(times) == 1:
            times = times * batch
        if len(times) != batch:
            raise UserError(f"layer {self.layer.name!r}: batch of {batch} rows with {len(times)} timesteps")
        rows = [self.spec.in_window(t) for t in times]
        if self.guided and self.spec.cfg_branch == "cond":
            if batch % 2:
                raise UserError(f"layer {self.layer.name!r}: a CFG batch must have an even number of rows, got {batch}")
            rows = [False] * (batch // 2) + rows[batch // 2:]
        if not any(rows):
            return None
        return torch.tensor(rows, device=device)

    def _edit(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        self.passes += 1
        x = stream_tensor(output, self.layer.stream, self.layer.name)
        if x is None:
            raise UserError(f"layer {self.layer.name!r} does not output a tensor; select a module that does")
        rows = self._rows(x.shape[0], x.device)
        if rows is None:
            return None  # keep the module's output object
        # [B, P, C] view of the output (no copy)
        if x.ndim == 4:
            v = x.flatten(2).transpose(1, 2)
        elif x.ndim == 3:
            v = x
        elif x.ndim == 2:
            v = x[:, None, :]
        else:
            raise UserError(f"layer {self.layer.name!r} outputs shape {tuple(x.shape)}; expected [B,C,h,w], [B,N,C] or [B,C]")
        self.sae.check_channels(int(v.shape[-1]), self.layer.name)
        with torch.no_grad():
            delta = edit_delta(v, rows, self.spec, self.sae)
        if delta is None:
            return None
        self._edited.append(changed(delta))
        if x.ndim == 4:
            delta = delta.transpose(1, 2).reshape(x.shape)
        elif x.ndim == 2:
            delta = delta[:, 0, :]
        new = apply_delta(x, delta)
        return _replace(output, x, new)


def _replace(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """``output`` with its first tensor ``old`` (and any other reference to it) replaced by ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, (tuple, list)):
        items = [new if (isinstance(o, torch.Tensor) and o is old) else _replace(o, old, new)
                 if isinstance(o, (tuple, list)) else o for o in output]
        return type(output)(items)
    raise UserError(f"cannot edit a layer output of type {type(output).__name__}; select a module that returns a tensor")
