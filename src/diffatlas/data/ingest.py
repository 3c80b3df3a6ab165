"""Real image datasets: an image folder or a CSV/Parquet manifest, into the dataset layout.

Two sources:

- ``image_folder``: ``path/<class>/**/<image>``; the class is the sub-folder name, the
  coarse class the same unless ``coarse_labels`` maps it. Samples are in sorted order of
  their relative paths; ``sample_id`` is the index in that sorted list of candidate files,
  so it stays the same whether or not other files are skipped.
- ``manifest``: a ``.csv``/``.tsv``/``.parquet`` table with columns ``path`` and ``label``,
  optional ``coarse_label`` and ``caption``. Relative paths are resolved against the
  manifest's folder. Samples keep the manifest's row order; ``sample_id`` is the row index.

Every image becomes RGB uint8 [S, S, 3]: EXIF orientation is applied; grayscale, 16-bit,
palette and CMYK images are converted; transparency (RGBA, LA, palette transparency) is
composited onto ``alpha_background`` (black by default, matching ShapesWorld's dark
background and what most diffusion VAEs see as "empty"); the centred square of side
min(width, height) is resized to S (Lanczos), i.e. shorter side to S then centre crop.

A file that cannot be decoded stops the job with a :class:`UserError` naming it
(``on_bad_image: error``), or is skipped, logged and listed in info.json
(``on_bad_image: skip``). An image and its label travel together through decoding, so a
skipped file never shifts labels against images. A file or class folder whose name is not
valid UTF-8 (the metadata table stores text) counts as unreadable: it is named with its bad
bytes escaped (``\\xff``), before any image is decoded under ``error``.

No choice is silent: an empty class folder, a defaulted coarse label and duplicated manifest
rows (``on_duplicate: error | drop | keep``) are logged and recorded in info.json
(``empty_classes``, ``defaulted``, ``duplicates``); a label that is empty or only spaces is
an error naming its row or folder.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from diffatlas.data.config import ImageFolderConfig, ManifestConfig
from diffatlas.data.dataset import open_streaming_writer
from diffatlas.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".parquet", ".pq")
_BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass(frozen=True)
class Candidate:
    """One file to ingest, with everything that must stay attached to it."""

    sample_id: int
    file: Path  # absolute or cwd-relative path to open
    path: str  # as recorded in the metadata (relative to the folder, or as in the manifest)
    label: str
    coarse_label: str
    caption: str
    bad: str = ""  # why the file is unusable before decoding (e.g. its name), or ""
    attributes: tuple[tuple[str, str], ...] = ()  # (name, value) of the manifest's attribute columns

    def fingerprint(self) -> str:
        """One text line naming everything the sample's rows will hold (shard digests)."""
        row = [self.sample_id, self.path, self.label, self.coarse_label, self.caption, self.bad]
        return json.dumps(row + [dict(self.attributes)] if self.attributes else row)


class BadImage(Exception):
    """A file that cannot be decoded (internal; becomes a UserError or a skip)."""


# ----------------------------------------------------------------------------- decoding


def to_rgb(img: Image.Image, alpha_background: str = "black") -> Image.Image:
    """Any PIL image -> mode RGB, compositing transparency onto ``alpha_background``."""
    if img.mode in _HIGH_BIT_MODES:
        # PIL's own convert clips 16-bit values at 255 (almost everything turns white):
        # rescale to 8 bits instead. Integer modes are taken as 16-bit, float as [0, 1].
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if img.mode == "F" and arr.max(initial=0.0) <= 1.0 else (arr if img.mode == "F" else arr / 257.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*_BACKGROUNDS[alpha_background], 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def square_resize(img: Image.Image, size: int) -> np.ndarray:
    """Centre square crop, resized to ``size``.  RGB image -> uint8 [size, size, 3]."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    out = img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8).copy()


def load_image(file: str | os.PathLike, size: int, alpha_background: str = "black") -> np.ndarray:
    """Decode ``file`` into RGB uint8 [size, size, 3]; raises :class:`BadImage` if it can't."""
    try:
        with Image.open(file) as img:
            if img.format == "JPEG":
                img.draft(None, (size, size))  # decode big JPEGs at a reduced scale >= size
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.size[0] < 1 or img.size[1] < 1:
                raise BadImage("image has no pixels")
            return square_resize(to_rgb(img, alpha_background), size)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except Exception as err:  # any decoder failure means the file is unusable
        raise BadImage(f"{type(err).__name__}: {err}") from None


# ----------------------------------------------------------------------------- sources


def escaped_name(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that are not UTF-8 (held as surrogates by
    Python's file-system decoding) are shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def list_image_folder(cfg: ImageFolderConfig, notes: dict[str, Any] | None = None) -> list[Candidate]:
    """Candidates of an image folder, sorted by relative path (class-major).

    ``notes`` (optional) receives ``empty_classes``: class folders without images.
    """
    notes = {} if notes is None else notes
    root = Path(cfg.path)
    if not root.is_dir():
        raise UserError(f"image_folder path {root} is not a directory (expected one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    blank = [c for c in classes if not c.strip()]
    if blank:
        raise UserError(f"class folder {escaped_name(blank[0])!r} in {root} is not a class name (empty or only spaces); rename it")
    if cfg.coarse_labels is not None:
        missing = [c for c in classes if c not in cfg.coarse_labels]
        if missing:
            raise UserError(f"coarse_labels has no entry for class folder(s) {missing} of {root}; classes: {classes}")
    files: list[tuple[str, str]] = []
    ignored = 0
    empty: list[str] = []
    for cls in classes:
        n_before = len(files)
        for f in (root / cls).rglob("*"):
            rel = f.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not f.is_file():
                continue
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((rel.as_posix(), cls))
            else:
                ignored += 1
        if len(files) == n_before:
            empty.append(escaped_name(cls))
    if empty:
        log.warning("class folder(s) %s in %s hold no images: they are not classes of this dataset", empty, root)
        notes["empty_classes"] = {"folders": empty, "rule": "a class folder without image files gives no class"}
    if ignored:
        log.info("ignored %d non-image files in %s (image extensions: %s)", ignored, root, ", ".join(IMAGE_EXTENSIONS))
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        log.warning("ignored %d images directly in %s (not in a class sub-folder), e.g. %s", len(loose), root, loose[0])
    if not files:
        raise UserError(
            f"no images found in {root}: expected one sub-folder per class holding image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    files.sort()
    coarse = cfg.coarse_labels or {}
    out = []
    for i, (rel, cls) in enumerate(files):
        bad = "" if _is_utf8(rel) else "file name is not valid UTF-8 (rename the file)"
        label = cls if _is_utf8(cls) else escaped_name(cls)
        out.append(Candidate(i, root / rel, escaped_name(rel), label, coarse.get(cls, label), "", bad))
    return out


def read_manifest(cfg: ManifestConfig, notes: dict[str, Any] | None = None) -> list[Candidate]:
    """Candidates of a CSV/TSV/Parquet manifest, in row order.

    ``notes`` (optional) receives ``defaulted`` (rows whose coarse label is their label) and
    ``duplicates`` (rows naming an already listed file, handled by ``cfg.on_duplicate``).
    """
    notes = {} if notes is None else notes
    file = Path(cfg.path)
    suffix = file.suffix.lower()
    if suffix not in MANIFEST_EXTENSIONS:
        raise UserError(f"manifest {file} has extension {suffix!r}; allowed: {', '.join(MANIFEST_EXTENSIONS)}")
    if not file.is_file():
        raise UserError(f"manifest file not found: {file}")
    try:
        if suffix in (".parquet", ".pq"):
            table = pd.read_parquet(file)
        else:  # read every cell as text so labels like "NA" or "001" stay what they are
            table = pd.read_csv(file, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    except Exception as err:
        raise UserError(f"manifest {file} cannot be read: {type(err).__name__}: {err}") from err
    missing = [c for c in ("path", "label", *cfg.attributes) if c not in table.columns]
    if missing:
        raise UserError(
            f"manifest {file} lacks column(s) {missing}; needs path, label, optionally coarse_label, caption, "
            f"and the columns named in attributes {cfg.attributes} (found: {', '.join(map(str, table.columns))})"
        )
    if table.empty:
        raise UserError(f"manifest {file} has no rows")

    def column(name: str) -> list[str]:
        if name not in table.columns:
            return [""] * len(table)
        return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in table[name].tolist()]

    paths, labels, coarse, captions = column("path"), column("label"), column("coarse_label"), column("caption")
    attribute_rows = list(zip(*(column(a) for a in cfg.attributes))) if cfg.attributes else [()] * len(table)
    out = []
    defaulted: list[int] = []
    for i, (p, lab, co, cap) in enumerate(zip(paths, labels, coarse, captions)):
        for key, value in (("path", p), ("label", lab)):
            if not value.strip():
                raise UserError(
                    f"manifest {file} row {i} has an empty {key} {value!r} (path={p!r}, label={lab!r}); "
                    f"every row needs a {key} that is not empty or only spaces"
                )
        if co and not co.strip():
            raise UserError(f"manifest {file} row {i} has coarse_label {co!r} (only spaces); leave the cell empty to use the label")
        if not co:
            defaulted.append(i)
        f = Path(p)
        out.append(Candidate(i, f if f.is_absolute() else file.parent / f, p, lab, co or lab, cap,
                             attributes=tuple(zip(cfg.attributes, attribute_rows[i]))))
    if defaulted:
        # Rule: a missing coarse label (no column, empty cell, NaN/None) is the fine label.
        where = "has no coarse_label column" if "coarse_label" not in table.columns else f"has {len(defaulted)} rows without coarse_label"
        log.info("manifest %s %s: their coarse label is their label", file, where)
        notes["defaulted"] = {"coarse_label": {"rows": len(defaulted), "first_rows": defaulted[:20],
                                               "rule": "coarse_label = label where the manifest gives none"}}
    return _handle_duplicates(out, cfg, file, notes)


def _handle_duplicates(cands: list[Candidate], cfg: ManifestConfig, file: Path, notes: dict[str, Any]) -> list[Candidate]:
    """Rows naming a file an earlier row names (same normalised path): cfg.on_duplicate."""
    first: dict[str, int] = {}
    dups: list[dict[str, Any]] = []
    for c in cands:
        key = os.path.normpath(os.path.abspath(c.file))
        if key in first:
            dups.append({"row": c.sample_id, "first_row": first[key], "path": c.path, "label": c.label})
        else:
            first[key] = c.sample_id
    if not dups:
        return cands
    shown = "; ".join(f"row {d['row']} repeats row {d['first_row']} ({d['path']})" for d in dups[:5])
    more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
    if cfg.on_duplicate == "error":
        raise UserError(
            f"manifest {file}: {len(dups)} row(s) name an image file already listed: {shown}{more}. "
            "The same image could land in both train and test splits; remove them, or set on_duplicate: drop "
            "(keep each file's first row) or keep in the dataset config"
        )
    notes["duplicates"] = {"policy": cfg.on_duplicate, "n_rows": len(dups), "rows": dups[:100],
                           "rule": "drop keeps each file's first row" if cfg.on_duplicate == "drop" else "keep keeps every row"}
    log.warning("manifest %s: %d duplicated row(s) (%s%s): on_duplicate: %s", file, len(dups), shown, more, cfg.on_duplicate)
    if cfg.on_duplicate == "keep":
        return cands
    dropped = {d["row"] for d in dups}
    return [c for c in cands if c.sample_id not in dropped]


# ----------------------------------------------------------------------------- ingestion


def candidates_of(cfg: ImageFolderConfig | ManifestConfig, notes: dict[str, Any] | None = None) -> list[Candidate]:
    """Every candidate of the source, in sample order (no image is opened)."""
    return list_image_folder(cfg, notes) if isinstance(cfg, ImageFolderConfig) else read_manifest(cfg, notes)


def ingest(
    cfg: ImageFolderConfig | ManifestConfig,
    out: str | os.PathLike,
    name: str = "dataset",
    threads: int = 1,
    rows: tuple[int, int] | None = None,
    digest: str | None = None,
) -> dict[str, Any]:
    """Decode every candidate of ``cfg`` and write the dataset directory ``out``.

    ``rows = (start, stop)`` ingests only candidates ``start:stop`` (one shard, see
    :mod:`diffatlas.data.shards`); ``digest``, the shard's fingerprint from planning, must
    still match, so a source edited after the workflow was planned is an error, not a shard
    of other images under the old name. Returns the info dict written to info.json. Decoding
    runs on ``threads`` threads (PIL releases the GIL) in fixed-size chunks whose results are
    consumed in order.
    """
    notes: dict[str, Any] = {}
    candidates = candidates_of(cfg, notes)
    if rows is not None:
        start, stop = rows
        if not 0 <= start < stop <= len(candidates):
            raise UserError(
                f"dataset {name}: shard rows {start}:{stop} are outside the {len(candidates)} candidates of {cfg.path}; "
                "the source shrank since the workflow was planned: run snakemake again"
            )
        candidates = candidates[start:stop]
        if digest is not None:
            from diffatlas.data.shards import digest_lines

            now = digest_lines([c.fingerprint() for c in candidates])
            if now != digest:
                raise UserError(
                    f"dataset {name}: the candidates {start}:{stop} of {cfg.path} changed since the workflow was planned "
                    f"(digest {now}, planned {digest}): run snakemake again"
                )
    skipped: list[dict[str, str]] = []
    named_bad = [c for c in candidates if c.bad]
    if named_bad and cfg.on_bad_image == "error":  # known before decoding anything
        c = named_bad[0]
        raise UserError(
            f"cannot read image {c.path} in {cfg.path}: {c.bad}"
            + (f" ({len(named_bad) - 1} more such files)" if len(named_bad) > 1 else "")
            + " (set on_bad_image: skip in the dataset config to skip unreadable files)"
        )

    def decode(c: Candidate) -> np.ndarray | str:
        if c.bad:
            return c.bad
        try:
            return load_image(c.file, cfg.image_size, cfg.alpha_background)
        except BadImage as err:
            return str(err)

    log.info("ingesting %d images from %s at %dx%d", len(candidates), cfg.path, cfg.image_size, cfg.image_size)
    chunk = 64 * max(1, threads)
    with open_streaming_writer(out, len(candidates), cfg.image_size) as writer, ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, len(candidates), chunk):
            part = candidates[start : start + chunk]
            for c, result in zip(part, pool.map(decode, part)):
                if isinstance(result, str):
                    if cfg.on_bad_image == "error":
                        raise UserError(
                            f"cannot read image {c.file}: {result} (set on_bad_image: skip in the dataset config to skip unreadable files)"
                        )
                    log.warning("skipping unreadable image %s: %s", escaped_name(str(c.file)), result)
                    skipped.append({"path": c.path, "reason": result})
                    continue
                writer.append(
                    result,
                    {"sample_id": c.sample_id, "label": c.label, "coarse_label": c.coarse_label, "caption": c.caption, "path": c.path,
                     **dict(c.attributes)},
                )
        if len(skipped) == len(candidates):
            raise UserError(f"dataset {name}: all {len(candidates)} images in {cfg.path} are unreadable (first: {skipped[0]['path']})")
        writer.info.update(
            {
                "name": name,
                "kind": cfg.kind,
                "config": asdict(cfg),
                "source": str(Path(cfg.path).resolve()),
                "n_candidates": len(candidates),
                **({"attributes": list(cfg.attributes)} if getattr(cfg, "attributes", None) else {}),
                **({"rows": list(rows), "digest": digest} if rows is not None else {}),
                "n_skipped": len(skipped),
                "skipped": skipped,
                # what was dropped, merged or defaulted, and the rule that decided it
                **notes,
            }
        )
    if skipped:
        log.warning("dataset %s: skipped %d of %d unreadable images (listed in info.json)", name, len(skipped), len(candidates))
    return writer.info
