"""From token maps to word maps and masks.

A prompt is encoded as ``[start] content tokens... [end] [padding...]`` and cut to the text
encoder's window (77 for CLIP). :func:`align_prompt` finds, for every word of the prompt,
the positions of its tokens in that sequence, from the tokenizer's character offsets (every
fast tokenizer has them; a slow one is handled piece by piece). Words are runs of letters and
digits (with inner apostrophes: "don't"); punctuation tokens belong to no word.

:class:`WordMaps` holds the aggregated maps of one image ``[positions, H, W]`` and answers:

* ``word_map(word)``: a word's tokens are **summed** (a word split into pieces spreads its
  attention mass over them) and repeated occurrences are **averaged** (saying a word twice
  should not double its map); ``word_map(index)`` picks one occurrence by word index.
* the start and end tokens are never part of a word; they are available explicitly as
  :meth:`WordMaps.start_map` / :meth:`WordMaps.end_map` (the start token soaks up most of
  the attention in SD and would otherwise dominate any normalisation).
* ``normalize=True`` divides, per pixel, by the total over the prompt's content tokens
  (start, end and padding excluded), so maps of different words compare as shares.
* ``mask(word, tau)``: the map scaled to [0, 1] by its own min and max, thresholded
  ``> tau`` (the ``daam.tau`` config key; the DAAM paper uses 0.4).

For joint-attention models (SD3, Flux; :mod:`diffatlas.daam.joint`) the maps of the traced
text stream use the same layout; a T5 stream has no start token (``start_token=False``:
content starts at position 0).

Prompts longer than the window are never an error: the words that fall (partly) outside are
logged once and recorded in :attr:`PromptTokens.truncated_words`; asking for a word whose
tokens were all cut off is a :class:`UserError` that says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffatlas.errors import UserError

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")


@dataclass(frozen=True)
class Word:
    """One word occurrence of a prompt."""

    text: str  # as written in the prompt
    index: int  # position among the prompt's words (0-based)
    start: int  # character span in the prompt
    end: int
    positions: tuple[int, ...]  # token positions in the encoded sequence (start token = 0), kept ones
    truncated: bool = False  # some of its tokens lie beyond the text encoder's window


@dataclass
class PromptTokens:
    """How a prompt was encoded: words, their token positions, and what was cut off."""

    prompt: str
    words: list[Word]
    tokens: list[str]  # token strings of the kept sequence, start and end included
    end_position: int  # position of the end token (the last kept position)
    window: int
    n_content_tokens: int  # before truncation
    truncated_words: list[str] = field(default_factory=list)
    start_token: bool = True  # position 0 is a start token (CLIP); T5 streams have none

    @property
    def first_content(self) -> int:
        """Position of the first content token (after the start token, if any)."""
        return 1 if self.start_token else 0

    @property
    def n_positions(self) -> int:
        """Kept positions: start + content + end (padding excluded)."""
        return self.end_position + 1

    @property
    def content_positions(self) -> list[int]:
        return list(range(self.first_content, self.end_position))

    @property
    def truncated(self) -> bool:
        return self.n_content_tokens + self.first_content + 1 > self.window

    def find(self, word: str) -> list[Word]:
        """All occurrences of ``word`` (case-insensitive)."""
        key = word.strip().lower()
        return [w for w in self.words if w.text.lower() == key]


def split_words(prompt: str) -> list[tuple[str, int, int]]:
    """Words of ``prompt`` with their character spans: [(text, start, end)]."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(prompt)]


def _text_window(tokenizer: Any, window: int | None) -> int:
    limit = int(window or getattr(tokenizer, "model_max_length", 77) or 77)
    # Tokenizers without a limit report a huge model_max_length; CLIP text encoders take 77.
    return limit if limit < 100_000 else 77


def _content_offsets(tokenizer: Any, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Content token ids of ``prompt`` (no special tokens) and their character spans."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Slow tokenizer: CLIP's pre-tokenizer never lets a token cross a word or a
    # punctuation boundary, so tokenizing piece by piece gives the same ids, with spans.
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for m in re.finditer(r"\S+", prompt):
        for piece in re.finditer(r"[^\W_]+(?:['\u2019][^\W_]+)*|[^\w\s]+|_", m.group(0)):
            piece_ids = tokenizer(piece.group(0), add_special_tokens=False)["input_ids"]
            s, e = m.start() + piece.start(), m.start() + piece.end()
            ids.extend(piece_ids)
            spans.extend([(s, e)] * len(piece_ids))
    return ids, spans


def align_prompt(tokenizer: Any, prompt: str, window: int | None = None) -> PromptTokens:
    """Token positions of every word of ``prompt`` as the pipeline encodes it.

    The encoded sequence is ``[start] + content[: window - 2] + [end]``: content token ``i``
    sits at position ``i + 1`` and is kept when ``i + 1 <= window - 2``.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"daam: empty prompt {prompt!r}; give a prompt with at least one word")
    window = _text_window(tokenizer, window)
    ids, spans = _content_offsets(tokenizer, prompt)
    kept = max(0, min(len(ids), window - 2))
    words: list[Word] = []
    truncated_words: list[str] = []
    for index, (text, s, e) in enumerate(split_words(prompt)):
        positions_all = [i + 1 for i, (a, b) in enumerate(spans) if b > a and a < e and b > s]
        positions = tuple(p for p in positions_all if p <= kept)
        cut = len(positions) < len(positions_all)
        if cut:
            truncated_words.append(text)
        words.append(Word(text, index, s, e, positions, cut))
    if not words:
        raise UserError(f"daam: prompt {prompt!r} has no words (only punctuation or spaces)")
    names = tokenizer.convert_ids_to_tokens(ids[:kept]) if hasattr(tokenizer, "convert_ids_to_tokens") else [str(i) for i in ids[:kept]]
    tokens = ["<start>", *names, "<end>"]
    out = PromptTokens(prompt, words, tokens, kept + 1, window, len(ids), truncated_words)
    if truncated_words:
        log.warning(
            "prompt %r has %d tokens, more than the text encoder's window of %d; cut off: %s",
            prompt[:60] + ("..." if len(prompt) > 60 else ""),
            len(ids) + 2,
            window,
            ", ".join(truncated_words),
        )
    return out


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] by its own min and max (a constant map becomes all zeros)."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def threshold_mask(heat: np.ndarray, tau: float) -> np.ndarray:
    """DAAM's binary mask: min-max normalised map ``> tau``.  [H, W] -> bool [H, W]."""
    if not 0.0 <= tau <= 1.0:
        raise UserError(f"daam: tau = {tau!r} is not allowed; allowed: a number in [0, 1]")
    return minmax(heat) > tau


class WordMaps:
    """The aggregated attribution maps of one image, addressed by word.

    ``token_maps``: float32 ``[n_positions, H, W]`` for the kept positions of the prompt
    (start token, content tokens, end token), already summed over heads, layers, timesteps
    and resolutions.
    """

    def __init__(self, token_maps: np.ndarray, tokens: PromptTokens, meta: dict[str, Any] | None = None) -> None:
        token_maps = np.asarray(token_maps, dtype=np.float32)
        if token_maps.ndim != 3 or token_maps.shape[0] < tokens.n_positions:
            raise ValueError(f"token_maps must be [>= {tokens.n_positions}, H, W], got {token_maps.shape}")
        self.token_maps = token_maps[: tokens.n_positions]
        self.tokens = tokens
        self.meta = dict(meta or {})

    @property
    def prompt(self) -> str:
        return self.tokens.prompt

    @property
    def words(self) -> list[Word]:
        return self.tokens.words

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.token_maps.shape[1]), int(self.token_maps.shape[2])

    def _source(self, normalize: bool) -> np.ndarray:
        if not normalize:
            return self.token_maps
        content = self.token_maps[self.tokens.first_content : self.tokens.end_position]
        total = content.sum(0, keepdims=True) if len(content) else np.zeros_like(self.token_maps[:1])
        return self.token_maps / (total + 1e-8)

    def _occurrences(self, word: str | int) -> list[Word]:
        if isinstance(word, (int, np.integer)):
            if not 0 <= int(word) < len(self.words):
                raise UserError(
                    f"daam: word index {word} is out of range for prompt {self.prompt!r} ({len(self.words)} words)"
                )
            found = [self.words[int(word)]]
        else:
            found = self.tokens.find(str(word))
            if not found:
                listed = ", ".join(dict.fromkeys(w.text.lower() for w in self.words))
                raise UserError(f"daam: word {word!r} is not in the prompt {self.prompt!r}; its words: {listed}")
        kept = [w for w in found if w.positions]
        if not kept:
            raise UserError(
                f"daam: word {found[0].text!r} of prompt {self.prompt[:60]!r} lies beyond the text encoder's "
                f"{self.tokens.window}-token window, so the model never saw it"
            )
        return kept

    def word_map(self, word: str | int, normalize: bool = False) -> np.ndarray:
        """Map of a word (all occurrences, averaged) or of one word index.  -> float32 [H, W]."""
        src = self._source(normalize)
        occ = self._occurrences(word)
        return np.mean([src[list(w.positions)].sum(0) for w in occ], axis=0).astype(np.float32)

    def start_map(self, normalize: bool = False) -> np.ndarray:
        """Map of the start-of-text token (position 0).  -> [H, W]."""
        if not self.tokens.start_token:
            raise UserError(f"daam: the text stream of prompt {self.prompt[:60]!r} (T5) has no start token; "
                            "allowed: word maps and end_map()")
        return self._source(normalize)[0]

    def end_map(self, normalize: bool = False) -> np.ndarray:
        """Map of the end-of-text token.  -> [H, W]."""
        return self._source(normalize)[self.tokens.end_position]

    def mask(self, word: str | int, tau: float, normalize: bool = False) -> np.ndarray:
        """DAAM mask of a word: min-max scaled map ``> tau``.  -> bool [H, W]."""
        return threshold_mask(self.word_map(word, normalize), tau)


# ----------------------------------------------------------------------------- traced runs


@dataclass
class TracedRun:
    """Images and word maps of one traced run (generation or real images), ready to save.

    images: uint8 ``[items, H, W, 3]``; maps: one :class:`WordMaps` per item; items: one
    dict per item (prompt, prompt_index, image_index, seed, sample_id, ...); info: run-level
    settings (model, scheduler, guidance, steps, layers, timesteps, ...). ``time_resolved``
    optionally holds per-step raw maps to write next to the aggregated ones.
    """

    images: np.ndarray
    maps: list[WordMaps]
    items: list[dict[str, Any]]
    info: dict[str, Any]
    time_resolved: list[tuple[int, Any]] = field(default_factory=list)  # (item offset, RawTrace)

    def __len__(self) -> int:
        return len(self.maps)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/`` atomically: maps.zarr, items.parquet, words.parquet, info.json.

        maps.zarr holds ``images`` [item, y, x, rgb] uint8 and ``token_maps``
        [item, token, y, x] float16 (positions past an item's end token are zero), plus
        ``steps__{h}x{w}`` [step, item, token, y, x] when time-resolved maps were asked for.
        """
        import pandas as pd
        import zarr

        from diffatlas.io import atomic_dir, write_json

        n = len(self.maps)
        h, w = self.maps[0].shape if n else self.images.shape[1:3]
        n_pos = max((m.tokens.n_positions for m in self.maps), default=0)
        with atomic_dir(path) as tmp:
            g = zarr.open_group(str(tmp / "maps.zarr"), mode="w", zarr_format=3)
            img = g.create_array(
                "images", shape=self.images.shape, dtype="uint8", chunks=(max(1, min(64, n)), *self.images.shape[1:]),
                dimension_names=["item", "y_image", "x_image", "rgb"],
            )
            img[:] = self.images
            tm = g.create_array(
                "token_maps", shape=(n, n_pos, h, w), dtype="float16", chunks=(1, n_pos, h, w), fill_value=0,
                dimension_names=["item", "token", "y", "x"],
            )
            for i, m in enumerate(self.maps):
                block = np.zeros((n_pos, h, w), np.float16)
                block[: m.tokens.n_positions] = m.token_maps.astype(np.float16)
                tm[i] = block
            for offset, raw in self.time_resolved:
                write_time_resolved(g, raw, offset, n, n_pos)
            g.attrs.update(json.loads(json.dumps(self.info, default=str)))  # JSON-safe copy of the run settings
            with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec": we read by path anyway
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(g.store)
            rows, words = [], []
            for i, (m, item) in enumerate(zip(self.maps, self.items)):
                t = m.tokens
                rows.append(
                    {
                        "item": i,
                        **item,
                        "prompt": t.prompt,
                        "n_positions": t.n_positions,
                        "window": t.window,
                        "n_content_tokens": t.n_content_tokens,
                        "truncated_words": json.dumps(t.truncated_words),
                        "tokens": json.dumps(t.tokens),
                        "start_token": t.start_token,
                    }
                )
                for wd in t.words:
                    words.append(
                        {
                            "item": i,
                            "word_index": wd.index,
                            "word": wd.text,
                            "start": wd.start,
                            "end": wd.end,
                            "positions": json.dumps(list(wd.positions)),
                            "truncated": wd.truncated,
                        }
                    )
            pd.DataFrame(rows).to_parquet(tmp / "items.parquet", index=False)
            pd.DataFrame(words, columns=["item", "word_index", "word", "start", "end", "positions", "truncated"]).to_parquet(
                tmp / "words.parquet", index=False
            )
            write_json(tmp / "info.json", self.info)

    @staticmethod
    def load(path: str | os.PathLike) -> "TracedRun":
        """Read a run written by :meth:`save` (time-resolved arrays stay on disk)."""
        import pandas as pd
        import zarr

        from diffatlas.io import read_json

        path = Path(path)
        if not (path / "maps.zarr").exists() or not (path / "items.parquet").exists():
            raise UserError(f"{path} is not a DAAM run (needs maps.zarr and items.parquet); run the daam rule first")
        g = zarr.open_group(str(path / "maps.zarr"), mode="r")
        images = np.asarray(g["images"][:])
        token_maps = g["token_maps"]
        items = pd.read_parquet(path / "items.parquet")
        words = pd.read_parquet(path / "words.parquet")
        by_item = {i: df for i, df in words.groupby("item")}
        maps, item_dicts = [], []
        reserved = {"item", "prompt", "n_positions", "window", "n_content_tokens", "truncated_words", "tokens", "start_token"}
        for row in items.to_dict("records"):
            i = int(row["item"])
            wdf = by_item.get(i)
            wl = [] if wdf is None else [
                Word(str(r["word"]), int(r["word_index"]), int(r["start"]), int(r["end"]), tuple(json.loads(r["positions"])), bool(r["truncated"]))
                for r in wdf.sort_values("word_index").to_dict("records")
            ]
            tokens = PromptTokens(
                prompt=str(row["prompt"]),
                words=wl,
                tokens=json.loads(row["tokens"]),
                end_position=int(row["n_positions"]) - 1,
                window=int(row["window"]),
                n_content_tokens=int(row["n_content_tokens"]),
                truncated_words=json.loads(row["truncated_words"]),
                start_token=bool(row.get("start_token", True)),  # runs written before joint attention: CLIP
            )
            maps.append(WordMaps(np.asarray(token_maps[i], dtype=np.float32), tokens))
            item_dicts.append({k: v for k, v in row.items() if k not in reserved})
        return TracedRun(images=images, maps=maps, items=item_dicts, info=read_json(path / "info.json"))


def write_time_resolved(group: Any, raw: Any, item_offset: int, n_items_total: int, n_positions: int) -> None:
    """Write ``raw``'s per-step maps into a zarr group (arrays created on first use).

    Arrays ``steps__{h}x{w}``: float16 ``[step, item, token, y__{h}x{w}, x__{h}x{w}]`` at
    each map's native resolution (summed over heads and the layers of that resolution), rows
    ``item_offset:item_offset+n``; ``timestep`` [step] holds the training-scale timesteps.
    """
    if not raw.per_step:
        return
    n_steps = len(raw.timesteps)
    if "timestep" not in group:  # the step coordinate: training-scale timesteps, in sampling order
        ts = group.create_array("timestep", shape=(n_steps,), dtype="int64", dimension_names=["step"])
        ts[:] = np.asarray([int(round(t)) for t in raw.timesteps], dtype=np.int64)
    for (step, h, w), m in raw.per_step.items():
        name = f"steps__{h}x{w}"
        if name not in group:
            group.create_array(
                name,
                shape=(n_steps, n_items_total, n_positions, h, w),
                chunks=(1, max(1, m.shape[0]), n_positions, h, w),
                dtype="float16",
                fill_value=0,
                dimension_names=["step", "item", "token", f"y__{h}x{w}", f"x__{h}x{w}"],
            )
        arr = group[name]
        k = min(n_positions, m.shape[1])
        block = np.zeros((m.shape[0], n_positions, h, w), dtype=np.float16)
        block[:, :k] = np.asarray(m[:, :k].float().numpy() if hasattr(m, "numpy") else m[:, :k], dtype=np.float16)
        arr[step, item_offset : item_offset + m.shape[0]] = block
