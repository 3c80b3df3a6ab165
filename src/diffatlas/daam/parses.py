"""Syntactic parses of traced prompts: which word is the head of which.

A run's relations ``[rel, head_word_index, dep_word_index]`` come from the dataset (real-image
mode: the caption's parse stored with the images), from the ShapesWorld grammar (captions
are parsed by construction), or from spaCy for free prompts when it is installed. Word
indices follow :func:`diffatlas.daam.words.split_words`; a parse whose words differ from the
prompt's is dropped (its indices would point at other words).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd

from diffatlas.daam.words import TracedRun, WordMaps, split_words
from diffatlas.errors import UserError

log = logging.getLogger(__name__)


def world_parse(prompt: str) -> tuple[list[dict[str, Any]], list[list[Any]], list[dict[str, Any]]] | None:
    """(words, relations, objects) of a ShapesWorld caption, or None outside the grammar."""
    from diffatlas.data.shapesworld import parse_caption

    try:
        caption, objects = parse_caption(prompt)
    except UserError:
        return None
    return caption.words, caption.relations, objects


_SPACY: dict[str, Any] = {}


def spacy_relations(prompt: str, model: str = "en_core_web_sm") -> list[list[Any]] | None:
    """Dependency relations ``[rel, head_word_index, dep_word_index]`` from spaCy, or None
    when spaCy (or its English model) is not installed. Word indices follow
    :func:`diffatlas.daam.words.split_words`."""
    if model not in _SPACY:
        try:
            import spacy

            _SPACY[model] = spacy.load(model)
        except (ImportError, OSError):
            log.info("spaCy or its model %s is not installed: free prompts get no syntactic parse", model)
            _SPACY[model] = None
    nlp = _SPACY[model]
    if nlp is None:
        return None
    words = split_words(prompt)
    starts = {s: i for i, (_, s, _) in enumerate(words)}
    out = []
    for tok in nlp(prompt):
        if tok.dep_ == "ROOT" or tok.idx not in starts or tok.head.idx not in starts:
            continue
        out.append([tok.dep_, starts[tok.head.idx], starts[tok.idx]])
    return out


def check_words(maps: WordMaps, words: list[dict[str, Any]]) -> bool:
    """The parse's words must be the prompt's words, in order (else indices would not match)."""
    ours = [w.text.lower() for w in maps.words]
    theirs = [str(w["word"]).lower() for w in words]
    if ours != theirs:
        log.warning("caption words %s do not match the prompt's words %s; item skipped", theirs, ours)
        return False
    return True


def parses_for_run(run: TracedRun, meta: pd.DataFrame | None = None) -> tuple[list[list[list[Any]] | None], str]:
    """Relations per item: the dataset's (real mode), the world grammar's, or spaCy's."""
    out: list[list[list[Any]] | None] = []
    sources = set()
    index = {int(s): i for i, s in enumerate(meta["sample_id"])} if meta is not None and "relations" in meta.columns else {}
    for maps, item in zip(run.maps, run.items):
        sid = int(item.get("sample_id", -1))
        if sid in index:
            r = index[sid]
            words = json.loads(meta["words"].iloc[r])
            out.append(json.loads(meta["relations"].iloc[r]) if check_words(maps, words) else None)
            sources.add("dataset")
            continue
        parsed = world_parse(maps.prompt)
        if parsed is not None and check_words(maps, parsed[0]):
            out.append(parsed[1])
            sources.add("shapesworld-grammar")
            continue
        rels = spacy_relations(maps.prompt)
        out.append(rels)
        sources.add("spacy" if rels is not None else "none")
    return out, "+".join(sorted(sources))
