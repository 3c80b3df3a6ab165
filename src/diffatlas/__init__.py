"""diffatlas: an atlas of what a diffusion model knows, layer by layer and timestep by timestep.

The package holds all the logic; the Snakemake workflow only calls its command-line entry
points (``diffatlas <command> ...``), so every step runs and is tested outside Snakemake.
"""

__version__ = "0.1.0"
