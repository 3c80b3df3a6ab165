"""Interventions during generation: steer, clamp or ablate one SAE latent at one layer.

The question an intervention answers is causal: does latent ``j`` of an SAE trained at a layer
*make* the image show what its label statistics say it means? Three edits, each applied to the
layer's output while the sampler is inside a timestep window (the model's own training-step
convention, inclusive at both ends), on both CFG branches or the conditional one only:

* **steer** (:data:`~diffatlas.interventions.spec.MODES`): ``out = x + α d_j`` at every
  position, or only where latent j is active, with ``d_j`` the unit decoder atom or the atom in
  raw activation units (``W_dec[j] / input_scale``, what one unit of ``z_j`` adds);
* **clamp**: ``z_j := value`` through the SAE, keeping its reconstruction error,
  ``out = x + decode(z') − decode(z)``;
* **ablate**: clamp to 0.

An edit that changes nothing (α = 0, an inactive latent ablated, a clamp to the current value,
a timestep outside the window) leaves the layer's output untouched, bit for bit.

Modules: :mod:`.spec` (what to do, validated), :mod:`.edit` (the maths on ``[B, P, C]``
activations, and the SAE checks), :mod:`.hook` (the forward hook, a context manager),
:mod:`.generate` (DDIM with CFG from the diffusion core, with and without the hook, and the
artifact). The judged experiment (issue 20 item 2, ``rules/intervene.smk``): :mod:`.config`
(the ``intervene`` section), :mod:`.judged` (choice of latents, rates with Wilson intervals,
verdicts), :mod:`.experiment` (generate and judge one layer x timestep), :mod:`.summary`
(the table over the grid and the dose-response figure).
"""

from diffatlas.interventions.spec import CFG_BRANCHES, DIRECTIONS, MODES, WHERE, Intervention

__all__ = ["CFG_BRANCHES", "DIRECTIONS", "MODES", "WHERE", "Intervention"]
