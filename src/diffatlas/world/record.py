"""The fidelity record that travels with a model (no torch: the workflow reads it while planning).

A model directory may hold the output of ``diffatlas world-fidelity`` beside its weights:
``fidelity.json`` (scores, sampler, judge, seed, model revision) and ``fidelity_samples.npy``
(the judged images). The shipped ShapesWorld model does: its fidelity was measured once, and
the demo shows that record instead of spending minutes of sampling to find the same numbers.

The record stands for the model as long as it lives in the model's own directory (exporting a
retrained model replaces the directory, and with it the record) and was measured with the
settings now asked for: the keys of ``world_model.fidelity`` that change the numbers must
equal the record's. Anything else, and the workflow measures (rule ``world_fidelity``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffatlas.errors import UserError
from diffatlas.world.config import FidelityConfig

RECORD_JSON = "fidelity.json"
RECORD_SAMPLES = "fidelity_samples.npy"

#: FidelityConfig fields that do not change the scores (batching, figure layout).
SCORE_FREE_FIELDS = ("batch_size", "grid_rows", "grid_cols")


def _scoring(section: dict[str, Any]) -> dict[str, Any]:
    cfg = FidelityConfig.from_dict(section).to_dict()
    return {k: v for k, v in cfg.items() if k not in SCORE_FREE_FIELDS}


def recorded_fidelity(model_dir: str | os.PathLike, section: dict[str, Any] | None) -> tuple[str, str] | None:
    """(json, samples) paths of the record in ``model_dir`` when it answers ``section``, else None.

    ``section`` is the workflow's ``world_model.fidelity``. A record that cannot be read, lacks
    its samples or was measured with other scoring settings does not count.
    """
    root = Path(model_dir)
    js, samples = root / RECORD_JSON, root / RECORD_SAMPLES
    if not (js.is_file() and samples.is_file()):
        return None
    try:
        record = json.loads(js.read_text())
        recorded = _scoring(record["config"])
    except (OSError, ValueError, KeyError, TypeError, UserError):  # unreadable, or from another version
        return None
    if recorded != _scoring(section or {}):
        return None
    return str(js), str(samples)
