"""Linear probe: standardised logistic regression on pooled features (scikit-learn).

The baseline Diff-C must beat or explain: if a linear read-out of the spatially pooled
activations already separates the classes, Diff-C's convolutions add nothing. The probe is
fitted on the same training split as Diff-C. Its weights are saved as plain arrays in
safetensors (no pickle), and :func:`probe_predict` recomputes predictions from them.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from diffatlas.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ProbeWeights:
    """A fitted probe as arrays: logits = ((x - mean) / scale) @ coef.T + intercept.

    Shapes: mean, scale [C]; coef [K', C]; intercept [K']; class_index [K] (indices into the
    job's class list of the classes seen in training). Binary problems have K' = 1 (the
    logit of ``class_index[1]``), as in scikit-learn.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    class_index: np.ndarray
    n_iter: int = 0
    warnings: list[str] = field(default_factory=list)


def fit_probe(
    features: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    c: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> ProbeWeights:
    """Fit on rows ``train`` of ``features`` [N, C] with integer labels ``y`` [N]."""
    x_train = features[train].astype(np.float64)
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    # BLAS threads beyond the job's share oversubscribe a busy machine (measured 6-8x slower
    # on 2 shared cores); use as many as torch was given (diffatlas.io.set_threads).
    with threadpool_limits(limits=torch.get_num_threads()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(scaler.transform(x_train), y[train])
    notes = []
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.append(f"the probe did not converge in {max_iter} iterations (diffc.probe_max_iter); its accuracy may be low")
    return ProbeWeights(
        mean=np.asarray(scaler.mean_, np.float64),
        scale=np.asarray(scaler.scale_, np.float64),
        coef=np.asarray(clf.coef_, np.float64),
        intercept=np.asarray(clf.intercept_, np.float64),
        class_index=np.asarray(clf.classes_, np.int64),
        n_iter=int(np.max(clf.n_iter_)),
        warnings=notes,
    )


def probe_logits(w: ProbeWeights, features: np.ndarray) -> np.ndarray:
    """[N, C] -> [N, K'] decision values."""
    z = (np.asarray(features, np.float64) - w.mean) / w.scale
    return z @ w.coef.T + w.intercept


def probe_predict(w: ProbeWeights, features: np.ndarray) -> np.ndarray:
    """[N, C] -> [N] class indices (into the job's class list)."""
    logits = probe_logits(w, features)
    if logits.shape[1] == 1:
        return w.class_index[(logits[:, 0] > 0).astype(np.int64)]
    return w.class_index[np.argmax(logits, axis=1)]


def save_probes(path: str | Path, probes: dict[str, ProbeWeights], classes: dict[str, list[str]], metadata: dict[str, str]) -> None:
    """Write the probes of each granularity to one safetensors file (keys ``{granularity}.{array}``)."""
    from safetensors.numpy import save_file

    tensors = {}
    meta = dict(metadata)
    for gran, w in probes.items():
        for name in ("mean", "scale", "coef", "intercept", "class_index"):
            tensors[f"{gran}.{name}"] = np.ascontiguousarray(getattr(w, name))
        meta[f"{gran}.classes"] = json.dumps(classes[gran])
    save_file(tensors, str(path), metadata=meta)


def load_probe(path: str | Path, granularity: str) -> tuple[ProbeWeights, list[str]]:
    """Read one granularity's probe and its class names back from ``save_probes`` output."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
        if f"{granularity}.classes" not in meta:
            raise UserError(f"{path} holds no {granularity!r} probe; it has: {sorted(k[:-8] for k in meta if k.endswith('.classes'))}")
        arrays = {name: fh.get_tensor(f"{granularity}.{name}") for name in ("mean", "scale", "coef", "intercept", "class_index")}
    return ProbeWeights(**arrays), json.loads(meta[f"{granularity}.classes"])
