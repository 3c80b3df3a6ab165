"""Links between methods, on the same images (issue 20, item 3).

* :mod:`diffatlas.links.sae_daam` — where a labelled k-SAE latent fires vs where DAAM puts
  the word of its label, each scored against the object's true mask;
* :mod:`diffatlas.links.directions` — which SAE latents change most when an image is edited
  along a pullback direction v_i, and whether their labels agree with the factor the world's
  judge says v_i changes;
* :mod:`diffatlas.links.figures` — one figure for each.
"""
