"""Diffusion models of every family behind one interface.

* :mod:`diffatlas.models.diffusion`: the one diffusion core (ε/x0 for every prediction type,
  DDIM step and inversion, ``add_noise``, CFG, image input, the :class:`Time` type); every
  stage takes its sampling maths from here.
* :func:`diffatlas.models.loader.load_model` -> :class:`~diffatlas.models.loader.ModelHandle`
  (SD1.x/2.x, SDXL, DiT, and pixel-space ShapesWorld models; local dirs or the HF cache only).
* :func:`diffatlas.models.tiny.make_tiny_model`: tiny random models of each family (tests).
* :func:`diffatlas.models.tokenizer.build_world_tokenizer`: a CLIP-style tokenizer built offline.
* :class:`diffatlas.models.pipeline.ShapesWorldPipeline`: pixel-space text-to-image DDIM + CFG.
* :mod:`diffatlas.models.architecture`: config factories of the ShapesWorld UNet / text encoder.

Submodules are imported lazily (``import diffatlas.models`` does not import torch).
"""
