"""DAAM: word attribution maps from cross-attention, checked against known masks.

- :mod:`~diffatlas.daam.processor`: the attention processor that records maps on the fly.
- :mod:`~diffatlas.daam.joint`: the same for joint text-image attention (SD3, Flux).
- :mod:`~diffatlas.daam.trace`: the tracer, CFG bookkeeping, generation with tracing.
- :mod:`~diffatlas.daam.words`: token -> word maps, masks at τ, saved runs.
- :mod:`~diffatlas.daam.realimage`: maps of real images (noise or invert, then denoise).
- :mod:`~diffatlas.daam.measures`: IoU, one-sided intersections, centre prior, CIs.
- :mod:`~diffatlas.daam.parses`: head/dependent relations of prompts (dataset, grammar, spaCy).
- :mod:`~diffatlas.daam.objects`: mIoU of word masks vs true/detected objects, baselines, τ curve.
- :mod:`~diffatlas.daam.syntax`: mIoU/mIoD/mIoH per syntactic relation.
- :mod:`~diffatlas.daam.entanglement`: cohyponym and adjective-swap studies.
- :mod:`~diffatlas.daam.run`: the daam-generate / daam-real jobs (trace, score, write).
- :mod:`~diffatlas.daam.figures`: overlay grids, mIoU table/curve, relation and entanglement plots.
- :mod:`~diffatlas.daam.config`: the ``daam`` config section and its prompt sets.
"""
