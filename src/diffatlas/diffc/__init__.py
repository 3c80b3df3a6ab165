"""Diff-C and linear probes: how much each layer x timestep knows, measured by classifiers.

Reproduces Revelio's Diff-C analysis: a light convolutional classifier trained on a layer's
stored spatial maps (:mod:`.model`, :mod:`.train`), next to a logistic-regression probe on
the pooled features (:mod:`.probe`), on one stratified split (:mod:`.split`), scored by
:mod:`.metrics`, summarised across the grid and drawn by :mod:`.summary` and :mod:`.figures`.
"""

from diffatlas.diffc.config import DiffCConfig

__all__ = ["DiffCConfig"]
