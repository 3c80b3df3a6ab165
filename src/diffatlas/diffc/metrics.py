"""Classification metrics computed from a confusion matrix, with explicit warnings.

Everything derives from one confusion matrix (rows: true class, columns: predicted class,
both in the order of ``classes``), so accuracy, per-class accuracy and macro-F1 can never
disagree with each other. Accuracy comes with its 95% Wilson interval over the test samples
(``accuracy_ci95``): at ~100 test images it is about ±0.1 wide, which is what separates a
real layer ordering from noise. A class with no test sample has no per-class accuracy (``None``)
and is left out of macro-F1; both facts are written into ``warnings`` instead of being
hidden behind a number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffatlas.errors import UserError
from diffatlas.intervals import wilson

log = logging.getLogger(__name__)


def check_classes(classes: Sequence[str], where: str) -> None:
    """A classifier needs at least two classes; say where the single class came from."""
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if len(classes) == 1 else "none"
        raise UserError(f"{where}: a classifier needs at least 2 classes, found {found}")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] int64 counts; rows true class, columns predicted class."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    where: str = "metrics",
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class accuracy and the confusion matrix of integer predictions.

    ``y_true``, ``y_pred``: [N] class indices into ``classes``. Raises :class:`UserError`
    for fewer than two classes or an empty test set.
    """
    classes = [str(c) for c in classes]
    check_classes(classes, where)
    n = len(y_true)
    if n == 0:
        raise UserError(f"{where}: the test split is empty; use more samples or a larger diffc.test_fraction")
    cm = confusion_matrix(y_true, y_pred, len(classes))
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    warnings: list[str] = []

    per_class: dict[str, float | None] = {}
    f1s = []
    for i, name in enumerate(classes):
        if support[i] == 0:
            per_class[name] = None
            warnings.append(
                f"class {name!r} has no test samples: its per-class accuracy is undefined (null) "
                "and it is left out of macro_f1"
                + (f"; it was still predicted {int(predicted[i])} time(s)" if predicted[i] else "")
            )
            continue
        per_class[name] = float(tp[i] / support[i])
        denom = 2 * tp[i] + (predicted[i] - tp[i]) + (support[i] - tp[i])
        f1s.append(float(2 * tp[i] / denom) if denom else 0.0)
    for w in warnings:
        log.warning("%s: %s", where, w)
    return {
        "accuracy": float(tp.sum() / n),
        "n_correct": int(tp.sum()),
        "accuracy_ci95": wilson(int(tp.sum()), int(n)),
        "macro_f1": float(np.mean(f1s)),
        "macro_f1_classes": int(len(f1s)),
        "per_class_accuracy": per_class,
        "confusion_matrix": {"classes": classes, "rows": "true", "columns": "predicted", "matrix": cm.tolist()},
        "n_test": int(n),
        "chance_uniform": 1.0 / len(classes),
        "warnings": warnings,
    }
