"""Word maps: sub-token merging with the world tokenizer, repeated words, start/end tokens,
normalisation, long prompts, masks at tau, and errors naming the bad word."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from diffatlas.daam.words import WordMaps, align_prompt, threshold_mask
from diffatlas.errors import UserError


@pytest.fixture(scope="module")
def tok():
    from diffatlas.data.shapesworld import VOCABULARY
    from diffatlas.models.tokenizer import build_world_tokenizer

    return build_world_tokenizer(list(VOCABULARY))


def ramp_maps(n_positions: int, size: int = 4) -> np.ndarray:
    """token_maps[p] = (p + 1) everywhere: a word's map value tells which positions were merged."""
    return np.stack([np.full((size, size), p + 1.0, np.float32) for p in range(n_positions)])


def test_word_split_into_pieces_is_merged(tok):
    # "zebra" is not in the world's vocabulary: the tokenizer splits it into pieces.
    prompt = "a zebra and a red circle"
    aligned = align_prompt(tok, prompt)
    zebra = aligned.find("zebra")[0]
    pieces = [aligned.tokens[p] for p in zebra.positions]
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "zebra"
    assert tok.convert_tokens_to_ids(pieces) == tok("zebra", add_special_tokens=False).input_ids
    maps = WordMaps(ramp_maps(aligned.n_positions), aligned)
    # sum of the pieces' maps: positions 2..2+k-1 hold values 3..3+k-1
    k = len(pieces)
    assert zebra.positions == tuple(range(2, 2 + k))
    assert maps.word_map("zebra")[0, 0] == pytest.approx(sum(range(3, 3 + k)))
    circle = aligned.find("circle")[0]
    assert maps.word_map("circle")[0, 0] == pytest.approx(circle.positions[0] + 1)
    # start and end tokens belong to no word and are reachable explicitly
    assert maps.start_map()[0, 0] == 1.0
    assert maps.end_map()[0, 0] == aligned.n_positions
    assert aligned.tokens[0] == "<start>" and aligned.tokens[-1] == "<end>"
    assert all(0 not in w.positions and aligned.end_position not in w.positions for w in aligned.words)


def test_repeated_words_are_averaged_and_indices_pick_one(tok):
    aligned = align_prompt(tok, "a circle and a Circle")
    maps = WordMaps(ramp_maps(aligned.n_positions), aligned)
    # positions: a=1 circle=2 and=3 a=4 circle=5 -> values 3 and 6
    assert maps.word_map("circle")[0, 0] == pytest.approx(4.5)
    assert maps.word_map(1)[0, 0] == pytest.approx(3.0)
    assert maps.word_map(4)[0, 0] == pytest.approx(6.0)
    assert maps.word_map("a")[0, 0] == pytest.approx((2 + 5) / 2)


def test_normalisation_over_content_tokens(tok):
    aligned = align_prompt(tok, "a red, square")
    rng = np.random.default_rng(0)
    maps = WordMaps(rng.random((aligned.n_positions, 5, 5)).astype(np.float32) + 0.1, aligned)
    total = sum(maps.word_map(i, normalize=True) for i in range(len(aligned.words)))
    comma = [p for p in aligned.content_positions if aligned.tokens[p] == ",</w>"]
    assert len(comma) == 1  # punctuation belongs to no word but counts in the normaliser
    comma_share = maps.token_maps[comma[0]] / maps.token_maps[1 : aligned.end_position].sum(0)
    np.testing.assert_allclose(total + comma_share, 1.0, rtol=1e-5)


def test_long_prompt_reported_not_crashing(tok, caplog):
    words = ["circle"] * 80 + ["triangle"]
    with caplog.at_level(logging.WARNING):
        aligned = align_prompt(tok, " ".join(words))
    assert aligned.truncated and aligned.n_positions == 77
    assert "triangle" in aligned.truncated_words and "window of 77" in caplog.text
    maps = WordMaps(ramp_maps(aligned.n_positions), aligned)
    assert maps.word_map("circle").shape == (4, 4)  # the 75 kept occurrences
    with pytest.raises(UserError, match="'triangle'.*beyond the text encoder's 77-token window"):
        maps.word_map("triangle")


def test_bad_words_and_prompts(tok):
    aligned = align_prompt(tok, "a red square")
    maps = WordMaps(ramp_maps(aligned.n_positions), aligned)
    with pytest.raises(UserError, match="word 'circle' is not in the prompt 'a red square'"):
        maps.word_map("circle")
    with pytest.raises(UserError, match="empty prompt"):
        align_prompt(tok, "   ")
    with pytest.raises(UserError, match="tau"):
        threshold_mask(np.zeros((2, 2)), 1.5)


def test_threshold_mask_known_answer():
    heat = np.linspace(2.0, 12.0, 11, dtype=np.float32).reshape(1, 11)  # min-max -> 0, 0.1, ..., 1
    mask = threshold_mask(heat, 0.45)
    assert mask.sum() == 6 and not mask[0, 4] and mask[0, 5]  # 0.5..1.0
    assert threshold_mask(heat, 0.35).sum() == 7  # 0.4..1.0
    assert not threshold_mask(np.ones((3, 3)), 0.4).any()  # a flat map selects nothing
