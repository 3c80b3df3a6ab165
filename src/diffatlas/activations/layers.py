"""Resolve the user's layer selection to modules of a diffusers denoiser.

A selection is either a readable alias or a native module path (``named_modules`` name),
where a path may be an fnmatch glob that expands to every matching module:

====================  ======================================================================
``mid``               output of ``mid_block`` (the U-Net bottleneck, Revelio's "mid" / h-space)
``up_ft{i}``          output of ``up_blocks[i]`` (the DIFT / Revelio convention, 0 = lowest
                      resolution)
``down_ft{i}``        hidden state of ``down_blocks[i]`` (down blocks return
                      ``(hidden, res_samples)``; the hook keeps the hidden state)
``block{i}``          output of ``transformer_blocks[i]`` of a DiT; tokens ``[B, N, C]`` become
                      maps ``[B, C, h, w]`` on the patch grid. On a joint-attention transformer
                      (SD3, Flux) it is the image-token stream, the same as ``block{i}.image``
``block{i}.image``    image-token output of the joint (double-stream) block
                      ``transformer_blocks[i]`` of SD3 / Flux, laid on the patch grid
``block{i}.text``     text-token output of that block ``[B, L, C]``: a sequence without a grid,
                      pooled over the tokens, no map. SD3's last block updates no text
                      (``context_pre_only``) and has no ``.text`` alias
``single_block{i}``   the same (also ``.image`` / ``.text``) for Flux's single-stream blocks
                      ``single_transformer_blocks[i]`` (text and image tokens split back apart)
``up_blocks.1.*``     every module under ``up_blocks.1`` (fnmatch ``*`` also crosses dots)
====================  ======================================================================

A module path of a joint block (``transformer_blocks.0``) means its image stream, like the alias.

Aliases exist only where the model has the block: ``mid`` on a DiT, or ``up_ft3`` on a U-Net
with three up blocks, is a :class:`UserError` that lists the aliases the model does have.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from diffatlas.errors import UserError

log = logging.getLogger(__name__)

_ALIAS_RE = re.compile(r"^(mid|up_ft\d+|down_ft\d+|(single_)?block\d+(\.(image|text))?)$")

#: Streams of a joint-attention block's output ``(text tokens, image tokens)`` (diffusers'
#: ``JointTransformerBlock``, ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``
#: all return ``(encoder_hidden_states, hidden_states)``): the index of each in that tuple.
STREAMS = {"text": 0, "image": 1}
_GLOB_CHARS = set("*?[")


def is_text_stream(name: str) -> bool:
    """True for a text-token stream alias (``block{i}.text``, ``single_block{i}.text``): a
    sequence pooled over its tokens, stored without a map (:attr:`ResolvedLayer.keeps_maps`).
    Known from the name alone, so the workflow plans map-reading jobs without the model."""
    return bool(_ALIAS_RE.match(name)) and name.endswith(".text")


@dataclass(frozen=True)
class ResolvedLayer:
    """One selected module.

    ``name`` is what the user wrote for an alias or an exact path, and the module path for
    each match of a glob; it names the layer in the store and in result paths.
    """

    name: str
    module_path: str
    selection: str = ""  # the entry of extract.layers it came from
    stream: str | None = None  # "image" / "text" of a joint block's (text, image) output; None: the output

    @property
    def keeps_maps(self) -> bool:
        """False for a text-token stream (a sequence without a spatial grid)."""
        return self.stream != "text"


def _is_joint(block: nn.Module) -> bool:
    """A block with joint text-image attention that returns ``(text, image)`` tokens."""
    return type(block).__name__ in ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def _block_aliases(prefix: str, path: str, blocks: nn.ModuleList) -> dict[str, tuple[str, str | None]]:
    out: dict[str, tuple[str, str | None]] = {}
    for i, block in enumerate(blocks):
        if not _is_joint(block):
            out[f"{prefix}{i}"] = (f"{path}.{i}", None)
            continue
        out[f"{prefix}{i}"] = (f"{path}.{i}", "image")
        out[f"{prefix}{i}.image"] = (f"{path}.{i}", "image")
        if not getattr(block, "context_pre_only", False):  # SD3's last block returns no text
            out[f"{prefix}{i}.text"] = (f"{path}.{i}", "text")
    return out


def layer_streams(denoiser: nn.Module) -> dict[str, tuple[str, str | None]]:
    """Aliases this model supports -> (module path, stream), in forward order."""
    out: dict[str, tuple[str, str | None]] = {a: (p, None) for a, p in _unet_aliases(denoiser).items()}
    blocks = getattr(denoiser, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList):
        out.update(_block_aliases("block", "transformer_blocks", blocks))
    single = getattr(denoiser, "single_transformer_blocks", None)
    if isinstance(single, nn.ModuleList):
        out.update(_block_aliases("single_block", "single_transformer_blocks", single))
    return out


def layer_aliases(denoiser: nn.Module) -> dict[str, str]:
    """Aliases this model supports, mapped to their module paths (in forward order)."""
    return {a: p for a, (p, _) in layer_streams(denoiser).items()}


def _unet_aliases(denoiser: nn.Module) -> dict[str, str]:
    out: dict[str, str] = {}
    down = getattr(denoiser, "down_blocks", None)
    if isinstance(down, nn.ModuleList):
        out.update({f"down_ft{i}": f"down_blocks.{i}" for i in range(len(down))})
    if isinstance(getattr(denoiser, "mid_block", None), nn.Module):
        out["mid"] = "mid_block"
    up = getattr(denoiser, "up_blocks", None)
    if isinstance(up, nn.ModuleList):
        out.update({f"up_ft{i}": f"up_blocks.{i}" for i in range(len(up))})
    return out


def _describe_available(denoiser: nn.Module, aliases: dict[str, str]) -> str:
    """A readable list: the aliases, then module paths up to depth 2 (full list is long)."""
    names = [n for n, _ in denoiser.named_modules() if n]
    shallow = [n for n in names if n.count(".") <= 1]
    alias_txt = ", ".join(aliases) if aliases else "(none for this model)"
    more = len(names) - len(shallow)
    paths_txt = ", ".join(shallow) + (f" (and {more} deeper module paths; globs such as 'up_blocks.1.*' match them)" if more else "")
    return f"available aliases: {alias_txt}; module paths: {paths_txt}"


def resolve_layers(denoiser: nn.Module, selections: Sequence[str]) -> list[ResolvedLayer]:
    """Expand aliases and globs to a de-duplicated list of modules, in the order given.

    Raises :class:`UserError` naming the selection when it matches nothing in this model.
    """
    if not selections:
        raise UserError("extract.layers is empty: select at least one layer (e.g. mid, up_ft1)")
    streams = layer_streams(denoiser)
    aliases = {a: p for a, (p, _) in streams.items()}
    modules = dict(denoiser.named_modules())
    modules.pop("", None)
    joint = {p: st for p, st in streams.values() if st is not None}  # joint blocks: image stream by default
    resolved: list[ResolvedLayer] = []
    seen: dict[tuple[str, str | None], str] = {}

    def add(name: str, path: str, stream: str | None = None) -> None:
        key = (path, stream)
        if key in seen:
            log.warning("layer %r is the same output as %r (%s); keeping it once", name, seen[key], path)
            return
        seen[key] = name
        resolved.append(ResolvedLayer(name=name, module_path=path, selection=sel, stream=stream))

    for sel in selections:
        sel = str(sel)
        if _ALIAS_RE.match(sel):
            if sel not in aliases:
                raise UserError(
                    f"layer {sel!r}: this model ({type(denoiser).__name__}) has no such block; "
                    + _describe_available(denoiser, aliases)
                )
            add(sel, *streams[sel])
        elif sel in modules:
            add(sel, sel, "image" if sel in joint else None)
        elif _GLOB_CHARS & set(sel):
            hits = [n for n in modules if fnmatch.fnmatchcase(n, sel)]
            if not hits:
                raise UserError(f"layer glob {sel!r} matches no module of {type(denoiser).__name__}; " + _describe_available(denoiser, aliases))
            for n in hits:
                add(n, n, "image" if n in joint else None)
        else:
            raise UserError(f"unknown layer {sel!r} for {type(denoiser).__name__}; " + _describe_available(denoiser, aliases))
    return resolved
