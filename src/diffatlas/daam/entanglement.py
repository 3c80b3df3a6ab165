"""Entanglement of DAAM maps (DAAM paper, §5).

*Cohyponyms*: prompts "a X and a Y" whose nouns share a hypernym vs control prompts; the
world's judge says whether both objects were generated, and the IoU of the two nouns' masks
says how much their maps overlap. *Adjectives*: "a {adj} {noun}" generated from the same
seeds with different adjectives; the change the swap causes is measured inside the object
(union of the objects found in both images) and outside it (mean absolute RGB difference in
[0, 1]), next to the share of the adjective's mask that falls outside the object.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.daam.measures import intersection_over, iou
from diffatlas.daam.parses import world_parse
from diffatlas.daam.words import TracedRun


def judge(images: np.ndarray) -> tuple[list[dict[str, Any]], str]:
    """The world's verdict on each image (:func:`diffatlas.world.judge.judge_images`): dicts
    with ``objects`` (shape, colour, size, ...), and the judge's name."""
    from diffatlas.world.judge import judge_images

    return list(judge_images(images)), "diffatlas.world.judge.judge_images"


def _present(objects: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[bool]:
    """Whether each named object was generated: a found object of its shape (and colour, if
    named), each found object used once."""
    used: set[int] = set()
    out = []
    for obj in objects:
        hit = next(
            (i for i, f in enumerate(found) if i not in used and f.get("shape") == obj["shape"] and obj.get("colour", f.get("colour")) == f.get("colour")),
            None,
        )
        if hit is not None:
            used.add(hit)
        out.append(hit is not None)
    return out


def cohyponym_prompts(pairs: Sequence[Sequence[str]], template: str = "a {0} and a {1}") -> list[str]:
    return [template.format(*p) for p in pairs]


def evaluate_cohyponyms(run: TracedRun, groups: dict[str, list[int]], tau: float) -> pd.DataFrame:
    """One row per item of each group: both objects present (judge), each present, and the
    IoU of the two nouns' masks. ``groups`` maps a group name to its items' prompt indices."""
    from diffatlas.world.judge import matches_caption

    verdicts, judge_name = judge(run.images)
    group_of = {p: g for g, ps in groups.items() for p in ps}
    rows = []
    for k, (maps, item) in enumerate(zip(run.maps, run.items)):
        g = group_of.get(int(item["prompt_index"]))
        parsed = world_parse(maps.prompt)
        if g is None or parsed is None or len(parsed[2]) != 2:
            continue
        words, _, objects = parsed
        nouns = [i for i, w in enumerate(words) if w["role"] == "shape"]
        present = _present(objects, verdicts[k]["objects"])
        rows.append(
            {
                "group": g,
                "item": k,
                "prompt": maps.prompt,
                "first_present": present[0],
                "second_present": present[1],
                "both_present": all(present),
                "caption_match": bool(matches_caption(verdicts[k], objects)["all"]),
                "n_found": int(verdicts[k]["n_objects"]),
                "noun_mask_iou": iou(maps.mask(nouns[0], tau), maps.mask(nouns[1], tau)),
                "judge": judge_name,
            }
        )
    return pd.DataFrame(rows)


def evaluate_adjective_swaps(run: TracedRun, items_by_noun: dict[str, dict[str, list[int]]], tau: float) -> pd.DataFrame:
    """Change caused by swapping the adjective, per (noun, adjective pair, seed).

    ``items_by_noun[noun][adjective]``: item indices (one per seed, same seed order for
    every adjective). Objects are found with :func:`detect_objects`.
    """
    from diffatlas.data.shapesworld import detect_objects

    rows = []
    for noun, by_adj in items_by_noun.items():
        for a1, a2 in itertools.combinations(sorted(by_adj), 2):
            for s, (i1, i2) in enumerate(zip(by_adj[a1], by_adj[a2])):
                im1, im2 = run.images[i1].astype(np.float32) / 255, run.images[i2].astype(np.float32) / 255
                obj = np.zeros(im1.shape[:2], bool)
                for im in (run.images[i1], run.images[i2]):
                    for det in detect_objects(im):
                        obj |= det["mask"]
                diff = np.abs(im1 - im2).mean(-1)
                spread = []
                for i, adj in ((i1, a1), (i2, a2)):
                    m = run.maps[i]
                    adj_mask = m.mask(adj, tau)
                    noun_mask = m.mask(noun, tau)
                    spread.append(1.0 - intersection_over(noun_mask, adj_mask) if adj_mask.any() else float("nan"))
                rows.append(
                    {
                        "noun": noun,
                        "adjective_1": a1,
                        "adjective_2": a2,
                        "seed_index": s,
                        "object_fraction": float(obj.mean()),
                        "change_inside": float(diff[obj].mean()) if obj.any() else float("nan"),
                        "change_outside": float(diff[~obj].mean()) if (~obj).any() else float("nan"),
                        "adjective_outside_noun": float(np.nanmean(spread)) if not np.all(np.isnan(spread)) else float("nan"),
                    }
                )
    return pd.DataFrame(rows)
