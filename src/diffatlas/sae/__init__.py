"""TopK sparse autoencoders per layer × timestep, and what their latents mean.

- :mod:`diffatlas.sae.config`: :class:`SAEConfig` (the ``sae`` config section) and :class:`SAEArch`.
- :mod:`diffatlas.sae.model`: :class:`TopKSAE` and :func:`geometric_median`.
- :mod:`diffatlas.sae.train`: data from the activation store, split, normalisation, training, :func:`run`.
- :mod:`diffatlas.sae.analysis`: validation metrics and latent meaning on post-TopK codes (streaming top-n).
- :mod:`diffatlas.sae.stats`: label statistics (σ_label, purity, entropy), ranking, curves, grid summary (no torch).
- :mod:`diffatlas.sae.figures`: label statistics vs layer / timestep / model, and image galleries.
"""

from diffatlas.sae.config import SAEArch, SAEConfig

__all__ = ["SAEArch", "SAEConfig"]
