"""The static atlas: a self-contained HTML folder built from the files under results/.

``diffatlas atlas --results results --out results/atlas`` writes ``index.html`` and one page per
(model, dataset) grid, per layer × timestep, per ranked SAE latent, per DAAM run, per geometry
model and for the world model. Pages are rendered with Jinja2 templates (``templates/``) and
streamed to disk one at a time; images are small PNG thumbnails loaded lazily. No analysis runs
here: every number on a page is read from a results file (:mod:`diffatlas.atlas.sources`), and a
stage whose files are missing is listed as missing instead of failing the build.
"""

from diffatlas.atlas.build import build_atlas

__all__ = ["build_atlas"]
