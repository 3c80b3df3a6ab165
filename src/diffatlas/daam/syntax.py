"""Head–dependent relations of DAAM maps (DAAM paper, §4).

For each relation (head h, dependent d) of a caption's parse (:mod:`diffatlas.daam.parses`),
with binary masks H and D at τ::

    IoU = |H ∩ D| / |H ∪ D|     IoD = |H ∩ D| / |D|     IoH = |H ∩ D| / |H|

averaged over occurrences of the relation (mIoU, mIoD, mIoH). mIoD > mIoH means the
dependent's map lies inside the head's (the head "contains" the dependent), as the paper
finds for adjectives and their nouns.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from diffatlas.daam.measures import intersection_over, iou
from diffatlas.daam.words import TracedRun


def relation_rows(run: TracedRun, parses: list[list[list[Any]] | None], tau: float, source: str = "") -> pd.DataFrame:
    """IoU, IoD, IoH of head and dependent masks for every relation of every item.

    ``parses[k]``: item k's relations ``[rel, head_word_index, dep_word_index]`` (None: no parse).
    """
    rows = []
    for k, (maps, rels) in enumerate(zip(run.maps, parses)):
        if not rels:
            continue
        for rel, head, dep in rels:
            head, dep = int(head), int(dep)
            if not (maps.words[head].positions and maps.words[dep].positions):
                continue
            hm, dm = maps.mask(head, tau), maps.mask(dep, tau)
            rows.append(
                {
                    "source": source,
                    "item": k,
                    "relation": str(rel),
                    "head": maps.words[head].text,
                    "dependent": maps.words[dep].text,
                    "iou": iou(hm, dm),
                    "iod": intersection_over(hm, dm),
                    "ioh": intersection_over(dm, hm),
                }
            )
    return pd.DataFrame(rows, columns=["source", "item", "relation", "head", "dependent", "iou", "iod", "ioh"])




def summarize_relations(rows: pd.DataFrame) -> pd.DataFrame:
    """mIoU, mIoD, mIoH and n per (source, relation)."""
    if rows.empty:
        return pd.DataFrame(columns=["source", "relation", "miou", "miod", "mioh", "n"])
    return rows.groupby(["source", "relation"], as_index=False).agg(
        miou=("iou", "mean"), miod=("iod", "mean"), mioh=("ioh", "mean"), n=("iou", "size")
    )
