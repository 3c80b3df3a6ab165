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
  ``> tau`` (0.4 by default, as in the DAAM paper).

Prompts longer than the window are never an error: the words that fall (partly) outside are
logged once and recorded in :attr:`PromptTokens.truncated_words`; asking for a word whose
tokens were all cut off is a :class:`UserError` that says so.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffatlas.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TAU = 0.4
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

    @property
    def n_positions(self) -> int:
        """Kept positions: start + content + end (padding excluded)."""
        return self.end_position + 1

    @property
    def content_positions(self) -> list[int]:
        return list(range(1, self.end_position))

    @property
    def truncated(self) -> bool:
        return self.n_content_tokens + 2 > self.window

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


def threshold_mask(heat: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
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
        content = self.token_maps[1 : self.tokens.end_position]
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
        return self._source(normalize)[0]

    def end_map(self, normalize: bool = False) -> np.ndarray:
        """Map of the end-of-text token.  -> [H, W]."""
        return self._source(normalize)[self.tokens.end_position]

    def mask(self, word: str | int, tau: float = DEFAULT_TAU, normalize: bool = False) -> np.ndarray:
        """DAAM mask of a word: min-max scaled map ``> tau``.  -> bool [H, W]."""
        return threshold_mask(self.word_map(word, normalize), tau)
