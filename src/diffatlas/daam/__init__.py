"""DAAM: word attribution maps from cross-attention, checked against known masks.

- :mod:`~diffatlas.daam.processor`: the attention processor that records maps on the fly.
- :mod:`~diffatlas.daam.trace`: the tracer, CFG bookkeeping, generation with tracing.
- :mod:`~diffatlas.daam.words`: token -> word maps, masks at τ, saved runs.
- :mod:`~diffatlas.daam.realimage`: maps of real images (noise or invert, then denoise).
- :mod:`~diffatlas.daam.evaluate`: mIoU vs true/detected masks, baselines, syntax, entanglement.
- :mod:`~diffatlas.daam.figures`: overlay grids, mIoU table/curve, relation and entanglement plots.
- :mod:`~diffatlas.daam.config`: the ``daam`` config section and its prompt sets.
"""
