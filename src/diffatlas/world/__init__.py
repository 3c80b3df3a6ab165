"""The ShapesWorld model: training, the judge that reads generated images, caption fidelity.

- :mod:`diffatlas.world.config`: ``WorldModelConfig`` (training) and ``FidelityConfig``.
- :mod:`diffatlas.world.train`: the training loop (``train_world_model``), resumable.
- :mod:`diffatlas.world.judge`: ``judge_images(images)`` -> objects (shape, colour, size,
  centroid) found in generated or rendered images; used by the fidelity check, geometry
  and DAAM stages.
- :mod:`diffatlas.world.fidelity`: caption-fidelity scores and the sample grid figure.
"""
