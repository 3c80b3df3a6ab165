"""A CLIP-style tokenizer over a small closed vocabulary, built offline in milliseconds.

Stable Diffusion's tokenizer is a byte-pair encoding (BPE) with the word-end marker ``</w>``,
``<|startoftext|>``/``<|endoftext|>`` around every prompt, lower-casing and a fixed length of
77 tokens. We build the same kind of tokenizer (the very same ``transformers`` class,
:class:`transformers.CLIPTokenizer`, a.k.a. ``CLIPTokenizerFast``) but with a vocabulary we
choose, so that nothing is downloaded and the ShapesWorld model reads its captions the way
SD reads real prompts: the DAAM word→token alignment code path is the one a user runs on SD.

How the vocabulary is made (this is what makes unknown words degrade gracefully):

* **Base alphabet**: every single character ``a-z``, ``0-9`` and common punctuation, each
  twice: as a word-inner piece (``"s"``) and as a word-final piece (``"s</w>"``).
* **Whole words**: for each vocabulary word we append BPE merges, longest-prefix first
  (``"c"+"i"``, ``"ci"+"r"``, ...), until BPE turns the word into the single token
  ``"circle</w>"``. Merges are appended only when BPE (simulated with the real merge ranks)
  does not already produce one token, so adding a word never changes how earlier words
  tokenize; every word is checked to be one token after the build.
* **Unknown words** therefore fall back to several sub-word pieces (prefixes of vocabulary
  words and single characters) that spell the word, instead of one ``<|unk|>``: with the
  ShapesWorld words ``"squares"`` becomes ``["squa", "re", "s</w>"]`` and ``"zebra"``
  ``["z", "e", "b", "r", "a</w>"]``; the exact split depends on the vocabulary, and only
  the last piece carries ``</w>``. This is what word-to-token alignment code must handle on
  real SD prompts too. A character outside the base alphabet (e.g. ``"é"``) maps to the
  dedicated unknown token ``<|unk|>`` (id 0); nothing ever raises.
* Special tokens: ``<|unk|>`` has id 0; ``<|startoftext|>`` and ``<|endoftext|>`` are the last
  two ids, as in CLIP, so ``CLIPTextModel``'s pooling (argmax of ids, or ``eos_token_id``)
  picks the end-of-text position either way. ``<|endoftext|>`` is also the padding token
  (SD1.x convention).

Shapes: ``tok(prompts, padding="max_length", max_length=77, truncation=True,
return_tensors="pt").input_ids`` is ``[B, 77]``.
"""

from __future__ import annotations

import logging
import os
import string
from pathlib import Path
from typing import Any

from diffatlas.errors import UserError

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
UNK = "<|unk|>"
SUFFIX = "</w>"
MODEL_MAX_LENGTH = 77

#: Characters of the base alphabet (each also present as a word-final piece).
BASE_CHARS = string.ascii_lowercase + string.digits + ".,!?'-:;\"()&/"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokenize one pre-token (already lower-cased) with BPE merges of the given ranks.

    Mirrors the ``tokenizers`` BPE: start from characters (the last one carrying ``</w>``),
    and repeatedly merge the adjacent pair of lowest rank (leftmost on ties).
    """
    pieces = list(word[:-1]) + [word[-1] + SUFFIX]
    while len(pieces) > 1:
        best, best_rank = -1, None
        for i in range(len(pieces) - 1):
            r = ranks.get((pieces[i], pieces[i + 1]))
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best < 0:
            break
        pieces[best : best + 2] = [pieces[best] + pieces[best + 1]]
    return pieces


def _normalize_words(words: list[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for w in words:
        if not isinstance(w, str):
            raise UserError(f"tokenizer vocabulary entries must be strings, got {w!r}")
        for part in w.lower().split():
            bad = [c for c in part if c not in BASE_CHARS]
            if bad:
                raise UserError(
                    f"tokenizer vocabulary word {w!r} has characters {sorted(set(bad))} outside the "
                    f"allowed alphabet {BASE_CHARS!r}"
                )
            if part not in seen:
                seen.add(part)
                out.append(part)
    return out


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return the BPE ``vocab`` (token -> id) and ordered ``merges`` for ``words``.

    See the module docstring for the construction. Deterministic in the order of ``words``.
    """
    words = _normalize_words(words)
    tokens: list[str] = [UNK]
    known: set[str] = {UNK}

    def add(tok: str) -> None:
        if tok not in known:
            known.add(tok)
            tokens.append(tok)

    for c in BASE_CHARS:
        add(c)
    for c in BASE_CHARS:
        add(c + SUFFIX)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        # Merge left to right until the word is one token; each new merge has the lowest
        # priority of all, so it can only fire once no earlier merge applies.
        for _ in range(len(w)):
            pieces = _bpe(w, ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            add(pair[0] + pair[1])
        if _bpe(w, ranks) != [w + SUFFIX]:  # pragma: no cover - construction guarantees it
            raise RuntimeError(f"BPE construction failed for {w!r}")
    add(BOS)
    add(EOS)
    return {t: i for i, t in enumerate(tokens)}, merges


def build_world_tokenizer(words: list[str], path: str | os.PathLike | None = None):
    """Build a CLIP-style tokenizer whose whole-word tokens are ``words`` (lower-cased).

    Args:
        words: vocabulary words (multi-word strings are split on whitespace; duplicates dropped).
        path: if given, the tokenizer is saved there with ``save_pretrained``
            (``tokenizer.json`` + ``tokenizer_config.json``) and can be reloaded with
            ``CLIPTokenizer.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.

    Returns:
        a :class:`transformers.CLIPTokenizer` (``CLIPTokenizerFast`` is the same class in
        transformers 5) with ``model_max_length=77``, BOS ``<|startoftext|>``, EOS and PAD
        ``<|endoftext|>``, UNK ``<|unk|>``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges(words)
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL_MAX_LENGTH,
    )
    # Guard against a transformers change in the pre-tokenizer / BPE semantics.
    _check_whole_and_save(tok, {w: vocab[w + SUFFIX] for w in _normalize_words(words)}, path, "world")
    log.debug("built world tokenizer: %d words, %d tokens, %d merges", len(words), len(vocab), len(merges))
    return tok


def _check_whole_and_save(tok: Any, whole: dict[str, int], path: str | Path | None, kind: str) -> None:
    """Check that ``tok`` keeps every word of ``whole`` as its one token id, then save it to ``path``."""
    for w, token_id in whole.items():
        ids = tok(w, add_special_tokens=False).input_ids
        if ids != [token_id]:
            raise RuntimeError(f"{kind} tokenizer does not keep {w!r} whole (got ids {ids})")
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(path))


# ------------------------------------------------------------------------------ T5 style
#: The word-start marker of SentencePiece (T5's tokenizer).
T5_SPACE = "\u2581"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
#: Token budget of the tiny models' T5 tokenizer (real T5 tokenizers: 512; SD3 reads 256).
T5_MODEL_MAX_LENGTH = 32

#: Unigram log-probabilities: a whole word always beats its spelling in characters.
_WORD_SCORE, _CHAR_SCORE = -1.0, -8.0


def build_t5_tokenizer(
    words: list[str], path: str | os.PathLike | None = None, model_max_length: int = T5_MODEL_MAX_LENGTH
):
    """Build a T5-style (SentencePiece Unigram) tokenizer whose whole-word tokens are ``words``.

    Layout as T5's: ``<pad>`` = 0, ``</s>`` = 1 (appended to every prompt, no BOS), ``<unk>`` = 2,
    then the pieces. Pieces: ``"▁word"`` for each vocabulary word (lower-cased; T5 is
    case-sensitive, so ``"Red"`` is spelled out), and every base character (letters of both
    cases, digits, punctuation) both word-initial (``"▁r"``) and word-inner (``"r"``), so an
    unknown word falls back to its characters and only a character outside that alphabet is
    ``<unk>``. No sentinel (``<extra_id_*>``) tokens.

    Args:
        words: vocabulary words (multi-word strings split on whitespace; duplicates dropped).
        path: if given, saved there with ``save_pretrained`` (``tokenizer.json``), reloadable
            with ``T5TokenizerFast.from_pretrained(path)``.
        model_max_length: the tokenizer's limit (prompts longer than this are refused by
            :class:`~diffatlas.models.loader.ModelHandle`).

    Returns:
        a :class:`transformers.T5TokenizerFast` (the same class as ``T5Tokenizer`` in transformers 5).
    """
    from transformers import T5TokenizerFast

    chars = BASE_CHARS + string.ascii_uppercase
    pieces: list[tuple[str, float]] = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (T5_SPACE, _CHAR_SCORE)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    norm = _normalize_words(words)
    for w in norm:
        add(T5_SPACE + w, _WORD_SCORE)
    for c in chars:
        add(T5_SPACE + c, _CHAR_SCORE)
        add(c, _CHAR_SCORE)
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=int(model_max_length))
    vocab = tok.get_vocab()
    # guard against a change of the Unigram / pre-tokenizer semantics
    _check_whole_and_save(tok, {w: vocab[T5_SPACE + w] for w in norm}, path, "T5")
    log.debug("built T5 tokenizer: %d words, %d pieces", len(norm), len(pieces))
    return tok
