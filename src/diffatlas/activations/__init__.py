"""Activations of a diffusion model per layer × timestep, captured by hooks, stored in zarr."""
