"""Thumbnails and overlays for the atlas: small PNGs, written once each.

Images are uint8 ``[H, W, 3]``; a map ``[h, w]`` is resized to the thumbnail with bilinear
interpolation, coloured with matplotlib's ``inferno`` and blended over the image, so the
reader sees where a latent (or a word) fires on the image it fires for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

#: Largest side of a thumbnail in pixels. Smaller images keep their size (pages show them at
#: this size with pixelated scaling), so a 32-pixel dataset costs 32-pixel files.
THUMB = 96


def _side(image: np.ndarray, side: int) -> int:
    return min(side, max(int(image.shape[0]), int(image.shape[1])))


def _resize(image: np.ndarray, side: int) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(image))
    side = _side(image, side)
    return img if img.size == (side, side) else img.resize((side, side), Image.BILINEAR)


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``img`` to ``path`` (parents created) through a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def thumbnail(image: np.ndarray, path: str | os.PathLike, side: int = THUMB) -> Path:
    """The image as a ``side``-pixel square PNG."""
    return save_png(_resize(image, side), path)


def heat_rgb(heat: np.ndarray, side: int) -> np.ndarray:
    """A map in [0, 1], [h, w] -> uint8 [side, side, 3] coloured with inferno (bilinear resize)."""
    from matplotlib import colormaps

    h = Image.fromarray(np.clip(np.asarray(heat, dtype=np.float32), 0, 1)).resize((side, side), Image.BILINEAR)
    rgb = colormaps["inferno"](np.asarray(h, dtype=np.float32))[..., :3]
    return (rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, path: str | os.PathLike, alpha: float = 0.55, side: int = THUMB,
            outline: np.ndarray | None = None) -> Path:
    """``heat`` (in [0, 1], any size) blended over ``image``; ``outline`` (bool mask) drawn in white."""
    side = _side(image, side)
    base = np.asarray(_resize(image, side), dtype=np.float32)
    colour = heat_rgb(heat, side).astype(np.float32)
    weight = alpha * np.asarray(Image.fromarray(np.clip(np.asarray(heat, np.float32), 0, 1)).resize((side, side), Image.BILINEAR))[..., None]
    out = base * (1 - weight) + colour * weight
    if outline is not None:
        m = np.asarray(Image.fromarray(np.asarray(outline, np.uint8) * 255).resize((side, side), Image.NEAREST)) > 0
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255
    return save_png(Image.fromarray(out.clip(0, 255).astype(np.uint8)), path)


def mask_image(mask: np.ndarray, path: str | os.PathLike, side: int = THUMB) -> Path:
    """A boolean mask as a black-and-white thumbnail."""
    img = Image.fromarray((np.asarray(mask, dtype=bool) * 255).astype(np.uint8)).convert("RGB")
    side = _side(np.asarray(mask), side)
    return save_png(img if img.size == (side, side) else img.resize((side, side), Image.NEAREST), path)
