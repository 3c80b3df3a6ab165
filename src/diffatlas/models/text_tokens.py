"""Where each word of a prompt sits in the text sequence a joint-attention transformer sees.

SD3 and Flux concatenate text and image tokens inside one attention; the text part is the
``encoder_hidden_states`` built by the pipelines' ``encode_prompt``
(:meth:`diffatlas.models.loader.ModelHandle.conditioning`):

* **SD3**: 77 CLIP positions (CLIP-L and CLIP-G side by side on the channel axis, so they
  share positions; each starts with ``<|startoftext|>``), then the T5 positions (no start
  token, ``</s>`` after the words): position ``77 + i`` is T5 content token ``i``.
* **Flux**: the T5 positions only (CLIP enters through its pooled vector, not as tokens).

:func:`word_tokens` maps every word of a prompt to its positions per tokenisation, the
layout a word map over joint attention (DAAM) reads. A word that one tokenisation does not
hold (cut off by CLIP's 77-token window while T5 still reads it) is a UserError naming the
word and the tokenisation, not a silently empty map.

Shapes: positions index axis 1 of ``encoder_hidden_states [B, L, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffatlas.errors import UserError

#: CLIP's text window (SD3's ``tokenizer_max_length``), the length of SD3's CLIP block.
CLIP_WINDOW = 77


@dataclass(frozen=True)
class Tokenisation:
    """One tokenisation in the joint text sequence: ``name``, its tokenizer, the position of
    its first token, its window (tokens kept) and whether it opens with a start token."""

    name: str
    tokenizer: Any
    offset: int
    window: int
    has_start: bool


@dataclass(frozen=True)
class WordTokens:
    """A word of the prompt (``index``-th, characters ``start:end``) and its positions in
    the joint text sequence, per tokenisation name."""

    word: str
    index: int
    start: int
    end: int
    positions: dict[str, tuple[int, ...]]


def tokenisations(handle: Any) -> list[Tokenisation]:
    """The tokenisations of a joint-attention model's text sequence, in sequence order."""
    toks = handle.tokenizers
    if handle.family == "sd3":
        return [Tokenisation("clip_l", toks[0], 0, CLIP_WINDOW, True),
                Tokenisation("clip_g", toks[1], 0, CLIP_WINDOW, True),
                Tokenisation("t5", toks[2], CLIP_WINDOW, int(handle.t5_length), False)]
    if handle.family == "flux":
        return [Tokenisation("t5", toks[1], 0, int(handle.t5_length), False)]
    raise UserError(f"model {handle.model_id} ({handle.family}) has no joint text-image attention; "
                    "allowed: sd3, flux")


def _positions(tk: Tokenisation, prompt: str) -> list[tuple[int, tuple[int, int]]]:
    """(sequence position, character span) of every content token of ``prompt`` kept in the window."""
    enc = tk.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    first = 1 if tk.has_start else 0
    kept = tk.window - first - 1  # the end token always takes the last kept slot
    return [(tk.offset + first + i, tuple(span)) for i, span in enumerate(enc["offset_mapping"][:max(kept, 0)])]


def word_tokens(handle: Any, prompt: str) -> list[WordTokens]:
    """Every word of ``prompt`` with its positions in each tokenisation (see module docstring).

    Raises UserError for an empty prompt, or for a word that a tokenisation does not hold.
    """
    # DAAM's word splitting (one definition of a word for every stage).
    from diffatlas.daam.words import split_words

    words = split_words(prompt) if isinstance(prompt, str) else []
    if not words:
        raise UserError(f"prompt {prompt!r} has no words; give a prompt with at least one word")
    layout = [(tk, _positions(tk, prompt)) for tk in tokenisations(handle)]
    out: list[WordTokens] = []
    for index, (text, s, e) in enumerate(words):
        pos: dict[str, tuple[int, ...]] = {}
        for tk, tokens in layout:
            hit = tuple(p for p, (a, b) in tokens if b > a and a < e and b > s)
            if not hit:
                raise UserError(
                    f"word {text!r} (word {index} of prompt {prompt[:60]!r}) has no token in the {tk.name} "
                    f"tokenisation of model {handle.model_id}, which keeps {tk.window} tokens; shorten the prompt "
                    f"so every word is read by every text encoder"
                )
            pos[tk.name] = hit
        out.append(WordTokens(text, index, s, e, pos))
    return out
