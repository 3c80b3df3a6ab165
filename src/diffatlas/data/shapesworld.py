"""ShapesWorld: a small rendered world whose ground truth is known by construction.

Each image shows one or two objects on a plain dark background. An object has a shape
(circle, square, triangle: the coarse class), a colour (red, green, blue, yellow; with the
shape, the fine class), a size (small, large) and a position. Captions come from a tiny
grammar::

    caption := phrase ("and" phrase)*
    phrase  := "a" [size] [colour] shape

so the parse of every caption is known: which word names which object, and the
dependency relations ``det`` (noun -> "a"), ``amod`` (noun -> adjective), ``conj``
(first noun -> later noun) and ``cc`` (later noun -> "and"), in Universal Dependencies
style with the noun as head.

Geometry. An object with size ``s`` spans ``diameter(s, image_size)`` pixels (10 and 14 at
32x32: clearly different, and two large squares still fit side by side). Positions are
stored as the object's centre in fractions of the image side (``x`` to the right, ``y``
down, both in [0, 1]) so a scene re-renders at any resolution. A pixel belongs to an object
when its centre lies inside the shape; the renderer snaps each object's bounding box to the
pixel grid so no pixel centre lies exactly on a shape's edge, hence masks are exact (no
anti-aliasing) and the same on every platform.
Two objects in a scene never touch: their masks are disjoint even after growing one by a
pixel (8-neighbourhood), which keeps them separate connected components for
:func:`detect_objects`.

Attributes. Every sample carries the categorical attributes :data:`ATTRIBUTES` (colour, shape,
size, position) as metadata columns, named in the dataset's info.json so extraction stores
them and SAE label statistics are computed per attribute. They describe the *first-named*
object, the one the fine label ("red circle") names, in two-object scenes too: a sample
has exactly one value per attribute, and label and attributes always agree. ``position`` is
the cell of a :data:`POSITION_GRID` x :data:`POSITION_GRID` grid holding the object's centre
(:func:`position_bucket`); ``n_objects`` and the JSON ``objects`` column keep the full scene.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from diffatlas.data.config import ShapesWorldConfig
from diffatlas.errors import UserError

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "large")
#: Every word a caption can contain, in a fixed order (determiner, conjunction, adjectives, nouns).
VOCABULARY: tuple[str, ...] = ("a", "and", *SIZES, *COLOURS, *SHAPES)
#: Fine classes "{colour} {shape}", shape-major, the order the generator cycles through.
FINE_CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)

#: RGB of each colour: saturated and at least ~170 apart from each other and from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 50),
}
BACKGROUND: tuple[int, int, int] = (16, 16, 16)

#: Object diameter as a fraction of the image side (10 px and 14 px at 32x32).
SIZE_FRACTION: dict[str, float] = {"small": 0.3125, "large": 0.4375}
MAX_OBJECTS = 2
#: Rows and columns of the grid that buckets an object's centre into a position attribute.
POSITION_GRID = 3
_ROWS: tuple[str, ...] = ("top", "middle", "bottom")
_COLUMNS: tuple[str, ...] = ("left", "centre", "right")
#: Position buckets, row-major: "top-left" .. "bottom-right".
POSITIONS: tuple[str, ...] = tuple(f"{r}-{c}" for r in _ROWS for c in _COLUMNS)
#: Categorical attributes of every sample (of its first-named object), as metadata columns.
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")
#: Objects keep this many pixels from the image border.
MARGIN = 1


def diameter(size: str, image_size: int) -> int:
    """Side of the object's bounding box in pixels."""
    _check_choice("size", size, SIZES)
    return max(2, int(round(SIZE_FRACTION[size] * image_size)))


def position_bucket(x: float, y: float) -> str:
    """Grid cell of a centre (x right, y down, fractions of the side): e.g. "top-left".

    Cell edges are at multiples of 1 / POSITION_GRID; a centre on an edge goes to the cell
    right of / below it (at 32 px generated centres are multiples of 1/32 and never lie on
    one; at 48 px one can, and rounding to 9 decimals first keeps 16/48 * 3 on the edge).
    """
    col = min(POSITION_GRID - 1, max(0, int(np.floor(round(float(x) * POSITION_GRID, 9)))))
    row = min(POSITION_GRID - 1, max(0, int(np.floor(round(float(y) * POSITION_GRID, 9)))))
    return POSITIONS[row * POSITION_GRID + col]


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserError(f"ShapesWorld object {key} = {value!r} is not allowed; allowed: {', '.join(allowed)}")


# ----------------------------------------------------------------------------- rendering


def snap_centre(frac: float, d: int, image_size: int) -> float:
    """Centre in pixels of a ``d``-pixel box centred nearest to ``frac`` of the side.

    The box's edges fall on pixel boundaries, so no pixel centre lies exactly on a shape's
    edge (half-integer offsets never equal the radius): masks are exact and symmetric.
    """
    left = np.floor(frac * image_size - d / 2.0 + 0.5)
    return float(left + d / 2.0)


def _shape_masks(shape: str, d: int, cx: np.ndarray, cy: np.ndarray, image_size: int) -> np.ndarray:
    """Masks of ``shape`` with diameter ``d`` at on-grid centres (pixels).  cx, cy [K] -> bool [K, H, W]."""
    r = d / 2.0
    centres = np.arange(image_size) + 0.5
    dx = centres[None, None, :] - np.asarray(cx, dtype=np.float64)[:, None, None]  # [K, 1, W]
    dy = centres[None, :, None] - np.asarray(cy, dtype=np.float64)[:, None, None]  # [K, H, 1]
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # triangle: width grows linearly from 0 at the apex (cy - r) to 2r at the base (cy + r)
    depth = dy + r  # distance below the apex
    return (depth >= 0) & (dy <= r) & (np.abs(dx) <= depth / 2.0)


def object_mask(obj: dict[str, Any], image_size: int) -> np.ndarray:
    """Pixels whose centre lies inside the object.  -> bool [H, W] with H = W = image_size.

    ``obj`` needs ``shape``, ``size``, ``x``, ``y`` (centre as fractions of the side).
    The triangle points up: apex at the top of the bounding box, base along its bottom.
    """
    for key in ("shape", "size", "x", "y"):
        if key not in obj:
            raise UserError(f"ShapesWorld object {obj!r} lacks key {key!r}; needs shape, colour, size, x, y")
    _check_choice("shape", obj["shape"], SHAPES)
    d = diameter(obj["size"], image_size)
    cx, cy = snap_centre(float(obj["x"]), d, image_size), snap_centre(float(obj["y"]), d, image_size)
    return _shape_masks(obj["shape"], d, np.array([cx]), np.array([cy]), image_size)[0]


def render_scene(objects: Sequence[dict[str, Any]], image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``objects`` in order on the dark background.

    Returns ``(image, masks)``: image uint8 [H, W, 3]; masks bool [n_objects, H, W], where
    ``masks[i]`` is exactly the set of pixels painted in object i's colour and left visible
    (a later object hides what it covers of an earlier one; generated scenes never overlap).
    """
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    masks = np.zeros((len(objects), image_size, image_size), dtype=bool)
    for i, obj in enumerate(objects):
        _check_choice("colour", obj.get("colour"), COLOURS)
        m = object_mask(obj, image_size)
        masks[:i] &= ~m
        masks[i] = m
        image[m] = PALETTE[obj["colour"]]
    return image, masks


def render_object(
    shape: str, colour: str, size: str, x: float = 0.5, y: float = 0.5, image_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """A scene with a single object.  -> (image uint8 [H, W, 3], mask bool [H, W])."""
    image, masks = render_scene([{"shape": shape, "colour": colour, "size": size, "x": x, "y": y}], image_size)
    return image, masks[0]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow bool masks [..., H, W] by one pixel in the 8-neighbourhood."""
    out = mask.copy()
    out[..., 1:, :] |= mask[..., :-1, :]
    out[..., :-1, :] |= mask[..., 1:, :]
    grown = out.copy()
    grown[..., :, 1:] |= out[..., :, :-1]
    grown[..., :, :-1] |= out[..., :, 1:]
    return grown


def _draw_lefts(rng: np.random.Generator, size: str, image_size: int, k: int) -> np.ndarray:
    """``k`` random top-left corners (pixels) keeping the object MARGIN px inside.  -> int [k, 2] (x, y)."""
    d = diameter(size, image_size)
    hi = max(MARGIN, image_size - d - MARGIN)
    return rng.integers(MARGIN, hi + 1, size=(k, 2))


def _centre(left: int, size: str, image_size: int) -> float:
    """Centre (fraction of the side) of an object whose box starts at pixel ``left``."""
    return float((left + diameter(size, image_size) / 2.0) / image_size)


# ----------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class Caption:
    """A caption with its parse, known by construction.

    ``words[j] = {"word", "object", "role"}``: ``object`` is the index of the object the
    word refers to (-1 for "and"); ``role`` is det, size, colour, shape or cc.
    ``relations`` are ``[relation, head_word_index, dependent_word_index]``.
    """

    text: str
    words: list[dict[str, Any]]
    relations: list[list[Any]]


def caption_for(
    objects: Sequence[dict[str, Any]],
    size_words: bool | Sequence[bool] = True,
    colour_words: bool | Sequence[bool] = True,
) -> Caption:
    """The caption naming ``objects`` in order, e.g. "a small red circle and a blue square".

    ``size_words`` / ``colour_words``: whether each object's size / colour is named (one
    bool for all objects, or one per object).
    """
    if not objects:
        raise UserError("caption_for needs at least one object")
    n = len(objects)
    with_size = [size_words] * n if isinstance(size_words, (bool, np.bool_)) else list(size_words)
    with_colour = [colour_words] * n if isinstance(colour_words, (bool, np.bool_)) else list(colour_words)
    if len(with_size) != n or len(with_colour) != n:
        raise UserError(f"caption_for: size_words/colour_words need one flag per object ({n})")
    words: list[dict[str, Any]] = []
    relations: list[list[Any]] = []
    first_noun = -1
    for i, obj in enumerate(objects):
        _check_choice("shape", obj.get("shape"), SHAPES)
        and_index = -1
        if i > 0:
            and_index = len(words)
            words.append({"word": "and", "object": -1, "role": "cc"})
        det = len(words)
        words.append({"word": "a", "object": i, "role": "det"})
        adjectives = []
        if with_size[i]:
            _check_choice("size", obj.get("size"), SIZES)
            adjectives.append(len(words))
            words.append({"word": obj["size"], "object": i, "role": "size"})
        if with_colour[i]:
            _check_choice("colour", obj.get("colour"), COLOURS)
            adjectives.append(len(words))
            words.append({"word": obj["colour"], "object": i, "role": "colour"})
        noun = len(words)
        words.append({"word": obj["shape"], "object": i, "role": "shape"})
        relations.append(["det", noun, det])
        relations.extend(["amod", noun, a] for a in adjectives)
        if i == 0:
            first_noun = noun
        else:
            relations.append(["conj", first_noun, noun])
            relations.append(["cc", noun, and_index])
    return Caption(" ".join(w["word"] for w in words), words, relations)


def parse_caption(text: str) -> tuple[Caption, list[dict[str, Any]]]:
    """Parse a caption of the grammar.  -> (Caption, objects named: {shape, colour?, size?}).

    Raises :class:`UserError` for text outside the grammar, naming the offending word.
    """
    tokens = text.strip().lower().split()
    objects: list[dict[str, Any]] = []
    sizes, colours = [], []
    pos = 0

    def fail(expected: str) -> UserError:
        found = repr(tokens[pos]) if pos < len(tokens) else "the end"
        return UserError(
            f"caption {text!r} is not in the ShapesWorld grammar: expected {expected} at word {pos}, found {found}; "
            f"vocabulary: {', '.join(VOCABULARY)}"
        )

    while True:
        if pos >= len(tokens) or tokens[pos] != "a":
            raise fail("'a'")
        pos += 1
        obj: dict[str, Any] = {}
        if pos < len(tokens) and tokens[pos] in SIZES:
            obj["size"] = tokens[pos]
            pos += 1
        if pos < len(tokens) and tokens[pos] in COLOURS:
            obj["colour"] = tokens[pos]
            pos += 1
        if pos >= len(tokens) or tokens[pos] not in SHAPES:
            allowed = (() if obj else SIZES) + (() if "colour" in obj else COLOURS) + SHAPES
            raise fail(f"one of {', '.join(allowed)}")
        obj["shape"] = tokens[pos]
        pos += 1
        objects.append(obj)
        sizes.append("size" in obj)
        colours.append("colour" in obj)
        if pos == len(tokens):
            break
        if tokens[pos] != "and":
            raise fail("'and' or the end")
        pos += 1
    return caption_for(objects, sizes, colours), objects


# ----------------------------------------------------------------------------- generator


@dataclass
class ShapesWorldData:
    """A generated dataset in memory.

    images uint8 [N, H, W, 3]; masks bool [N, MAX_OBJECTS, H, W] (unused slots all False);
    meta: one row per image (see :func:`generate_shapesworld`).
    """

    images: np.ndarray
    masks: np.ndarray
    meta: pd.DataFrame


def sample_scene(rng: np.random.Generator, first_class: str, cfg: ShapesWorldConfig) -> list[dict[str, Any]]:
    """Draw the objects of one scene; the first object has fine class ``first_class``.

    With two objects, both positions are drawn again until the objects keep a one-pixel
    gap (rejection sampling, so pairs are uniform over the valid placements; candidates
    are tried in batches of 32 for speed). If a batch round finds none the second object
    becomes small (two large squares fit in few places), so generation always terminates.
    """
    s = cfg.image_size
    colour, shape = first_class.split(" ")
    first: dict[str, Any] = {"shape": shape, "colour": colour, "size": SIZES[rng.integers(len(SIZES))]}
    (left, top), = _draw_lefts(rng, first["size"], s, 1)
    first["x"], first["y"] = _centre(left, first["size"], s), _centre(top, first["size"], s)
    if rng.random() >= cfg.two_object_fraction:
        return [first]
    second: dict[str, Any] = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": COLOURS[rng.integers(len(COLOURS))],
        "size": SIZES[rng.integers(len(SIZES))],
    }
    batch = 32
    for attempt in range(40):
        if attempt == 20:
            second["size"] = "small"
        d0, d1 = diameter(first["size"], s), diameter(second["size"], s)
        l0, l1 = _draw_lefts(rng, first["size"], s, batch), _draw_lefts(rng, second["size"], s, batch)
        m0 = _shape_masks(first["shape"], d0, l0[:, 0] + d0 / 2.0, l0[:, 1] + d0 / 2.0, s)
        m1 = _shape_masks(second["shape"], d1, l1[:, 0] + d1 / 2.0, l1[:, 1] + d1 / 2.0, s)
        ok = ~(_dilate(m0) & m1).any(axis=(1, 2))
        if ok.any():
            k = int(ok.argmax())
            first["x"], first["y"] = _centre(l0[k, 0], first["size"], s), _centre(l0[k, 1], first["size"], s)
            second["x"], second["y"] = _centre(l1[k, 0], second["size"], s), _centre(l1[k, 1], second["size"], s)
            return [first, second]
    log.warning("could not place a second object next to %s at %d px; keeping one object", first, s)
    return [first]


def generate_shapesworld(cfg: ShapesWorldConfig | dict[str, Any], rows: range | None = None) -> ShapesWorldData:
    """Render the dataset described by ``cfg``; a pure function of the config.

    Sample ``i`` draws from its own generator seeded with ``(seed, i)``, so the first k
    images are the same whatever ``n_samples`` is, and ``rows`` (default: all ``n_samples``)
    renders any range of sample ids alone (one shard of a sharded dataset). The first-named
    object cycles through the 12 fine classes, so fine and coarse labels are balanced.

    meta columns: sample_id, label ("{colour} {shape}" of the first object), coarse_label
    (its shape), the attributes shape, colour, size, position (of the first object, see
    :data:`ATTRIBUTES`), caption, n_objects, and JSON strings objects, words, relations
    (see :class:`Caption`).
    """
    if isinstance(cfg, dict):
        cfg = ShapesWorldConfig(**cfg)
    ids = range(cfg.n_samples) if rows is None else rows
    n, s = len(ids), cfg.image_size
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    masks = np.zeros((n, MAX_OBJECTS, s, s), dtype=bool)
    table = []
    for row, i in enumerate(ids):
        rng = np.random.default_rng([cfg.seed, i])
        objects = sample_scene(rng, FINE_CLASSES[i % len(FINE_CLASSES)], cfg)
        size_flags = [bool(f) for f in rng.random(len(objects)) < cfg.size_word_prob]
        colour_flags = [bool(f) for f in rng.random(len(objects)) < cfg.colour_word_prob]
        caption = caption_for(objects, size_flags, colour_flags)
        image, obj_masks = render_scene(objects, s)
        images[row] = image
        masks[row, : len(objects)] = obj_masks
        first = objects[0]
        table.append(
            {
                "sample_id": i,
                "label": f"{first['colour']} {first['shape']}",
                "coarse_label": first["shape"],
                "shape": first["shape"],
                "colour": first["colour"],
                "size": first["size"],
                "position": position_bucket(first["x"], first["y"]),
                "caption": caption.text,
                "n_objects": len(objects),
                "objects": json.dumps(objects),
                "words": json.dumps(caption.words),
                "relations": json.dumps(caption.relations),
            }
        )
    meta = pd.DataFrame(table)
    meta["sample_id"] = meta["sample_id"].astype("int64")
    meta["n_objects"] = meta["n_objects"].astype("int64")
    return ShapesWorldData(images=images, masks=masks, meta=meta)


# ----------------------------------------------------------------------------- detector


def _shape_from_fill(mask: np.ndarray, bbox: tuple[int, int, int, int]) -> str:
    """Guess the shape from how much of its bounding box a component fills.

    Square ~1, circle ~pi/4 ~0.79, triangle ~0.5: thresholds halfway between.
    """
    x0, y0, x1, y1 = bbox
    fill = mask.sum() / float((x1 - x0) * (y1 - y0))
    if fill > 0.89:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def detect_objects(
    image: np.ndarray, min_area: int | None = None, max_distance: float = 120.0
) -> list[dict[str, Any]]:
    """Find ShapesWorld objects in an RGB image by colour.

    Each pixel takes the nearest of the background and the four palette colours (pixels
    farther than ``max_distance`` in RGB from all of them are ignored); each 8-connected
    component of one palette colour with at least ``min_area`` pixels (default 1% of the
    image) is an object. Works on rendered images exactly and on generated ones roughly.

    image: uint8 [H, W, 3].  Returns, largest first, dicts with ``colour``, ``mask`` (bool
    [H, W]), ``area`` (pixels), ``centroid`` ((x, y) in fractions of the side, like the
    objects' x, y), ``bbox`` ((x0, y0, x1, y1) pixels, end exclusive) and ``shape`` (a guess
    from the fill of the bounding box).
    """
    from scipy import ndimage

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"detect_objects needs an RGB image [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    if min_area is None:
        min_area = max(2, int(round(0.01 * h * w)))
    refs = np.array([BACKGROUND, *(PALETTE[c] for c in COLOURS)], dtype=np.float32)  # [5, 3]
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - refs[None, None], axis=-1)  # [H, W, 5]
    nearest = dist.argmin(-1)
    nearest[dist.min(-1) > max_distance] = 0
    found = []
    for ci, colour in enumerate(COLOURS, start=1):
        labelled, count = ndimage.label(nearest == ci, structure=np.ones((3, 3), dtype=bool))
        for k in range(1, count + 1):
            mask = labelled == k
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            found.append(
                {
                    "colour": colour,
                    "mask": mask,
                    "area": area,
                    "centroid": (float((xs + 0.5).mean() / w), float((ys + 0.5).mean() / h)),
                    "bbox": bbox,
                    "shape": _shape_from_fill(mask, bbox),
                }
            )
    found.sort(key=lambda d: (-d["area"], d["bbox"][1], d["bbox"][0]))
    return found
