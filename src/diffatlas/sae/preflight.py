"""What can be known wrong about one SAE job before it runs: checked from the store's metadata.

The workflow runs this as the light rule ``check_sae`` on the submitting host, between the
extraction and the GPU job ``train_sae``: a bad setting (``sae.k`` not below
``sae.expansion`` x the layer's channels, a layer or timestep the store lacks, spatial samples
from a layer stored without maps) then fails in seconds, before a GPU job is queued, instead of
inside it, where the cluster profile's retry would submit it again with twice the time.
Only array shapes and attributes are read, never activations.
"""

from __future__ import annotations

import os
from typing import Any

from diffatlas.activations.store import POOLED, ActivationStore
from diffatlas.errors import UserError
from diffatlas.sae.config import SAEConfig


def check(store_path: str | os.PathLike, layer: str, timestep: int, cfg: SAEConfig) -> dict[str, Any]:
    """Check one (layer, timestep) SAE of ``cfg`` against the store; return its architecture.

    Raises :class:`UserError` naming the setting and what is allowed; the rules themselves
    live where training applies them (:meth:`SAEConfig.arch`, :class:`ActivationStore`).
    """
    store = ActivationStore(store_path)
    if layer not in store.layers:
        raise UserError(f"layer {layer!r} is not in {store.path}; stored layers: {', '.join(store.layers)}")
    store.t_index(timestep)
    arch = cfg.arch(int(store.group[POOLED.format(layer)].shape[2]), layer)
    positions = 1
    if cfg.samples == "spatial":
        if not store.has_spatial(layer):
            raise UserError(
                f"config sae.samples = 'spatial', but layer {layer!r} in {store.path} was extracted without "
                "spatial maps; set extract.spatial: true (or sae.samples: pooled)"
            )
        _, h, w = store.spatial_shape(layer)
        positions = h * w
    return {
        "store": str(store.path),
        "layer": layer,
        "timestep": int(timestep),
        "samples": cfg.samples,
        "n_samples": len(store),
        "positions_per_sample": positions,
        "d_in": arch.d_in,
        "n_latents": arch.n_latents,
        "k": arch.k,
        "k_aux": arch.k_aux,
    }
