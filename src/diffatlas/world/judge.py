"""A deterministic judge that reads ShapesWorld images: which objects, of what shape and colour.

Used to score generated samples (caption fidelity), and by the geometry and DAAM stages to
check what an edit or a prompt produced. It needs no training, so its verdict is the same on
every machine, and it is exact on rendered images (tests/test_judge.py checks >= 98% on
rendered scenes with known labels, clean and with added noise and blur).

How it reads an image ``[H, W, 3]``:

1. **Foreground.** Each pixel takes the nearest of the background colour and the four
   palette colours (RGB distance); pixels nearest to a palette colour are foreground.
2. **Objects.** 8-connected components of the foreground with at least ``min_area`` pixels
   (default 1.2% of the image: a small triangle covers ~5%) and at most ``max_area``
   (default 35%: the largest object, a large square, covers 19%; a bigger blob is a
   coloured background and is counted in ``n_background_blobs``, not as an object). A component's colour is the
   palette colour most of its pixels are nearest to, so the blended rim of a generated
   object (a yellow edge fading into the dark background passes close to red and green)
   does not become an object of its own. A component in which a second colour holds at
   least ``split_fraction`` of the pixels (two objects that touch), or one larger than
   ``max_area`` with a second colour of at least ``2 * min_area`` pixels (an object on a
   coloured background), is split by colour.
3. **Shape.** The object's mask, cropped to its bounding box, is compared with the three
   shapes drawn in that box (circle: inscribed ellipse; square: the full box; triangle:
   apex at the top centre, base along the bottom, as the renderer draws them); the shape
   of highest intersection-over-union wins. Scale-free, so it works at any resolution.
4. **Size.** ``large`` when the box's longer side exceeds the midpoint between the small
   and large diameters (12 px at 32x32), else ``small``.

Output of :func:`judge_images` — one dict per image::

    {"n_objects": 2,
     "n_background_blobs": 0,         # palette-coloured regions too large to be objects
     "objects": [   # largest first
        {"shape": "circle", "colour": "red", "size": "large",
         "centroid": [x, y],          # fractions of the side, x right, y down (like the renderer)
         "area": 152,                 # pixels
         "bbox": [x0, y0, x1, y1],    # pixels, end exclusive
         "shape_scores": {"circle": 0.97, "square": 0.78, "triangle": 0.49},  # IoU per shape
         "mask": bool [H, W]},        # only with return_masks=True
        ...]}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffatlas.errors import UserError

#: Share of a component's pixels a second colour must hold for the component to be split.
SPLIT_FRACTION = 0.25
#: Default minimum object area as a share of the image.
MIN_AREA_FRACTION = 0.012
#: Default maximum object area as a share of the image: the largest ShapesWorld object (a
#: large square) covers 19% of it; a bigger blob is a coloured background, not an object.
MAX_AREA_FRACTION = 0.35


def _palette():
    from diffatlas.data.shapesworld import BACKGROUND, COLOURS, PALETTE, SIZE_FRACTION

    refs = np.array([BACKGROUND, *(PALETTE[c] for c in COLOURS)], dtype=np.float32)  # [5, 3]
    return refs, COLOURS, SIZE_FRACTION


def as_uint8_images(images: Any) -> np.ndarray:
    """Accept uint8 [N, H, W, 3] / [H, W, 3], or floats in [0, 1]; return uint8 [N, H, W, 3]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise UserError(f"judge_images needs RGB images [N, H, W, 3] (or one [H, W, 3]), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise UserError(f"judge_images needs uint8 images or floats in [0, 1], got dtype {arr.dtype}")
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    return arr


def _shape_templates(h: int, w: int) -> dict[str, np.ndarray]:
    """The three shapes drawn in an ``h`` x ``w`` box, sampled at pixel centres.  -> bool [h, w] each."""
    v = (np.arange(h) + 0.5)[:, None] / h  # 0 at the top, 1 at the bottom
    u = (np.arange(w) + 0.5)[None, :] / w
    circle = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    square = np.ones((h, w), dtype=bool)
    triangle = np.abs(u - 0.5) <= v / 2.0
    return {"circle": circle, "square": square, "triangle": triangle}


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """Shape of one object mask bool [H, W] by IoU with the shapes drawn in its bounding box."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise UserError("classify_shape needs a non-empty mask")
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scores = {}
    for name, tpl in _shape_templates(*crop.shape).items():
        inter = np.logical_and(crop, tpl).sum()
        union = np.logical_or(crop, tpl).sum()
        scores[name] = float(inter / union) if union else 0.0
    # Fixed order on ties (circle, square, triangle) keeps the verdict deterministic.
    best = max(scores, key=lambda k: scores[k])
    return best, scores


def judge_image(image: np.ndarray, min_area: int | None = None, return_masks: bool = False,
                split_fraction: float = SPLIT_FRACTION, max_area: int | None = None) -> dict[str, Any]:
    """Objects in one RGB image uint8 [H, W, 3].  See the module docstring for the output."""
    from scipy import ndimage

    refs, colours, size_fraction = _palette()
    h, w = image.shape[:2]
    if min_area is None:
        min_area = max(3, int(round(MIN_AREA_FRACTION * h * w)))
    if max_area is None:
        max_area = int(round(MAX_AREA_FRACTION * h * w))
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - refs[None, None], axis=-1)  # [H, W, 5]
    nearest = dist.argmin(-1)  # 0 = background, 1..4 = palette colour
    colour_of_pixel = dist[:, :, 1:].argmin(-1)  # nearest palette colour, ignoring the background
    fg = nearest > 0
    eight = np.ones((3, 3), dtype=bool)
    labelled, count = ndimage.label(fg, structure=eight)
    pieces: list[tuple[np.ndarray, int]] = []  # (mask, colour index)
    for k in range(1, count + 1):
        comp = labelled == k
        area = int(comp.sum())
        if area < min_area:
            continue
        votes = np.bincount(colour_of_pixel[comp], minlength=len(colours))
        # A component too large to be one object (an object on a coloured background)
        # splits by every colour with a sizeable share; others only by a second colour
        # holding split_fraction of it.
        need = 2 * min_area if area > max_area else max(min_area, split_fraction * area)
        present = [c for c in np.argsort(-votes) if votes[c] >= need]
        if len(present) <= 1:
            pieces.append((comp, int(votes.argmax())))
            continue
        # Two touching objects of different colours: split the component by colour.
        sub = dist[:, :, 1:][:, :, present].argmin(-1)
        for j, c in enumerate(present):
            part_labels, n_part = ndimage.label(comp & (sub == j), structure=eight)
            for p in range(1, n_part + 1):
                part = part_labels == p
                if part.sum() >= min_area:
                    pieces.append((part, int(c)))
    objects = []
    threshold = 0.5 * (size_fraction["small"] + size_fraction["large"]) * max(h, w)
    n_background = sum(int(mask.sum()) > max_area for mask, _ in pieces)
    for mask, c in pieces:
        if int(mask.sum()) > max_area:
            continue
        ys, xs = np.nonzero(mask)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        shape, scores = classify_shape(mask)
        obj = {
            "shape": shape,
            "colour": colours[c],
            "size": "large" if extent > threshold else "small",
            "centroid": [float((xs + 0.5).mean() / w), float((ys + 0.5).mean() / h)],
            "area": int(mask.sum()),
            "bbox": bbox,
            "shape_scores": {k: round(v, 4) for k, v in scores.items()},
        }
        if return_masks:
            obj["mask"] = mask
        objects.append(obj)
    objects.sort(key=lambda o: (-o["area"], o["bbox"][1], o["bbox"][0]))
    return {"n_objects": len(objects), "n_background_blobs": n_background, "objects": objects}


def judge_images(images: Any, min_area: int | None = None, return_masks: bool = False,
                 max_area: int | None = None) -> list[dict[str, Any]]:
    """Judge a batch: images uint8 [N, H, W, 3] (or floats in [0, 1]).  -> N dicts (module docstring).

    ``min_area`` / ``max_area``: smallest / largest object in pixels (default 1.2% / 35% of
    the image).
    """
    arr = as_uint8_images(images)
    return [judge_image(img, min_area=min_area, return_masks=return_masks, max_area=max_area) for img in arr]


def matches_caption(verdict: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, bool]:
    """Compare one verdict with the objects a caption names (``parse_caption``'s second value).

    Returns ``count`` (as many objects as named), and for single-object captions ``shape`` /
    ``colour`` (the largest object found has the named shape / colour; a caption that does
    not name a colour counts as matching), and ``all`` (every named object is found with its
    named attributes, each found object used once).
    """
    found = verdict["objects"]
    out = {"count": verdict["n_objects"] == len(objects)}
    if len(objects) == 1:
        top = found[0] if found else None
        out["shape"] = bool(top and top["shape"] == objects[0]["shape"])
        out["colour"] = bool(top and ("colour" not in objects[0] or top["colour"] == objects[0]["colour"]))
    used: set[int] = set()
    ok = True
    for named in objects:
        hit = next(
            (i for i, f in enumerate(found) if i not in used and f["shape"] == named["shape"]
             and named.get("colour", f["colour"]) == f["colour"] and named.get("size", f["size"]) == f["size"]),
            None,
        )
        if hit is None:
            ok = False
            break
        used.add(hit)
    out["all"] = ok and out["count"]
    return out
