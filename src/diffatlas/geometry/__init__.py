"""Riemannian latent geometry of diffusion models (Park et al., NeurIPS 2023), on any U-Net.

Modules, one concern each:

* :mod:`~diffatlas.geometry.config` - :class:`GeometryConfig` (the ``geometry`` section).
* :mod:`~diffatlas.geometry.jacobian` - the pullback map ``f: x_t -> h`` (a layer's output,
  pooled; the forward stops at the layer) and its top singular triples by batched block
  subspace iteration with ``torch.func.jvp`` / ``vjp`` (J is never formed).
* :mod:`~diffatlas.geometry.sampling` - DDIM between arbitrary training timesteps with the
  model's own schedule.
* :mod:`~diffatlas.geometry.editing` - one-step, x0-normalised and iterative (parallel
  transport) edits.
* :mod:`~diffatlas.geometry.global_directions` - matched, averaged directions at t = T-1.
* :mod:`~diffatlas.geometry.measures` - principal-angle distances, lerp/slerp path lengths,
  power spectra of directions.
* :mod:`~diffatlas.geometry.meaning` - which ShapesWorld factor each direction changes.
* :mod:`~diffatlas.geometry.run` - the stage's jobs and their artifacts (path grammar).
* :mod:`~diffatlas.geometry.figures` - the stage's figures.
"""

from typing import Any

__all__ = ["GeometryConfig", "PullbackBasis", "PullbackMap", "forward_ad_safe_attention", "top_singular"]


def __getattr__(name: str) -> Any:
    # Lazy re-exports: the figure and table jobs import this package without paying for torch.
    if name == "GeometryConfig":
        from diffatlas.geometry.config import GeometryConfig

        return GeometryConfig
    if name in __all__:
        from diffatlas.geometry import jacobian

        return getattr(jacobian, name)
    raise AttributeError(f"module 'diffatlas.geometry' has no attribute {name!r}")
