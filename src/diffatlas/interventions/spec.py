"""What an intervention does, as one validated dataclass (recorded with every artifact)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from diffatlas.errors import UserError

#: steer: add α · direction; clamp: set z_j to ``value`` through the SAE; ablate: clamp to 0.
MODES = ("steer", "clamp", "ablate")
#: Steering direction: ``unit`` = W_dec[j] / |W_dec[j]| (α in raw activation units);
#: ``atom`` = W_dec[j] / input_scale (α in units of the latent's code z_j: what z_j = α adds
#: to the SAE's reconstruction of the raw activation).
DIRECTIONS = ("unit", "atom")
#: Where the edit applies: every position, or only where latent j is active (z_j > 0).
WHERE = ("all", "active")
#: CFG rows edited: both branches, or the conditional rows only (with no CFG, every row is
#: conditional).
CFG_BRANCHES = ("both", "cond")


@dataclass(frozen=True)
class Intervention:
    """One edit of one SAE latent at one layer and a window of timesteps.

    Attributes:
        latent: index j of the SAE latent (0..n_latents-1, checked against the SAE).
        mode: one of :data:`MODES`.
        alpha: steering strength α (steer only; 0 is the identity).
        value: the code z_j is clamped to (clamp only; ablate uses 0).
        direction: one of :data:`DIRECTIONS` (steer only).
        where: one of :data:`WHERE`. For an SAE trained on pooled vectors a "position" is the
            whole image (see :mod:`diffatlas.interventions.edit`).
        t_max, t_min: the timestep window, training-scale steps, inclusive: the edit is live
            for passes at ``t_min <= t <= t_max``.
        cfg_branch: one of :data:`CFG_BRANCHES`.
    """

    latent: int
    mode: str = "steer"
    alpha: float = 0.0
    value: float = 0.0
    direction: str = "unit"
    where: str = "all"
    t_max: int = 999
    t_min: int = 0
    cfg_branch: str = "both"

    def __post_init__(self) -> None:
        for key, allowed in (("mode", MODES), ("direction", DIRECTIONS), ("where", WHERE), ("cfg_branch", CFG_BRANCHES)):
            if getattr(self, key) not in allowed:
                raise UserError(f"intervention {key} = {getattr(self, key)!r} is not allowed; allowed: {', '.join(allowed)}")
        if isinstance(self.latent, bool) or int(self.latent) != self.latent or self.latent < 0:
            raise UserError(f"intervention latent = {self.latent!r} is not allowed; allowed: an integer >= 0")
        for key in ("alpha", "value"):
            if not math.isfinite(float(getattr(self, key))):
                raise UserError(f"intervention {key} = {getattr(self, key)!r} is not allowed; allowed: a finite number")
        if self.mode == "ablate" and self.value != 0.0:
            raise UserError(f"intervention value = {self.value} is set with mode ablate (which clamps to 0); use mode clamp")
        if int(self.t_min) > int(self.t_max):
            raise UserError(f"intervention window t_max = {self.t_max} < t_min = {self.t_min}; allowed: t_min <= t_max")

    @property
    def target(self) -> float:
        """The code z_j is set to by clamp / ablate."""
        return 0.0 if self.mode == "ablate" else float(self.value)

    def is_noop(self) -> bool:
        """True when the edit cannot change anything whatever the activations (α = 0 steering)."""
        return self.mode == "steer" and float(self.alpha) == 0.0

    def in_window(self, t: int) -> bool:
        return int(self.t_min) <= int(t) <= int(self.t_max)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
