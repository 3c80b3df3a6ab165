"""Settings of the links stage (the ``links`` section of config.yaml).

Two kinds of job read it (:attr:`LinksConfig.JOBS`): the SAE latent ↔ DAAM word link
(:mod:`diffatlas.links.sae_daam`: which latents carry a word's label) and the pullback
direction ↔ SAE latents link (:mod:`diffatlas.links.directions`: how many latents are reported,
how many noise draws average the change, which edits are linked). Both bootstrap their
intervals with ``seed``. :class:`LinksConfig` is the one place the defaults live; the schema
(config.schema.yaml) documents the same keys with the same defaults, and each job records the
values it ran with (``sae_daam.json`` / ``directions.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from diffatlas.errors import UserError
from diffatlas.sections import ConfigSection

#: Edits a direction link can read (geometry's edits.safetensors keys, each with its own rows in
#: meaning_summary.csv): Park et al.'s x0-normalised one-step edits, or the plain linear ones.
EDIT_MODES = ("normalised", "linear")


def _bad(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"config links.{key} = {value!r} is not allowed; allowed: {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class LinksConfig(ConfigSection):
    """The links between methods (defaults: the demo's values)."""

    SECTION = "links"
    JOBS = {
        "sae_daam": ("min_purity", "latents_per_word", "seed"),
        "directions": ("top_changed", "noise_draws", "edit_mode", "seed"),
    }

    min_purity: float = 0.5
    """A latent carries a caption word's label when its purity for that attribute (share of its top images with the
    word's value, latents.parquet purity_<attribute>) is at least this."""
    latents_per_word: int = 2
    """Labelled latents kept per word for the SAE-DAAM link (the purest first, then the best ranked)."""
    top_changed: int = 3
    """Latents reported per pullback direction, the most changed first (the first one is scored against the judge's
    factor)."""
    noise_draws: int = 1
    """Forward-noise draws per edit sample, each shared by the sample's directions and strengths; the change is
    averaged over them. One draw is noisy (on the demo another seed moved the pooled agreement from 0.24 to 0.43)."""
    edit_mode: str = "normalised"
    """Geometry edits linked to the SAE latents: normalised (Park et al.'s x0-normalised one-step edits) or linear
    (x_t + gamma v)."""
    seed: int = 0
    """Seed of the bootstrap intervals (over images for SAE-DAAM, over directions for the pooled agreement)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self.min_purity
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p <= 1:
            raise _bad("min_purity", p, "a number in [0, 1]")
        for key, low in (("latents_per_word", 1), ("top_changed", 1), ("noise_draws", 1), ("seed", 0)):
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise _bad(key, value, f"an integer >= {low}")
        if self.edit_mode not in EDIT_MODES:
            raise _bad("edit_mode", self.edit_mode, ", ".join(EDIT_MODES))
        self.reject_unknown()
