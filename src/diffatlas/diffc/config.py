"""Settings of one Diff-C + linear-probe job (the ``diffc`` section of config.yaml).

The dataclass defaults are the paper's settings (Revelio: 4 shrinking convolutions, feature
dim 1024, AdamW lr 1e-4, 30 epochs); the embedded CPU demo in config.yaml overrides a few of
them so that each (layer, timestep) job trains in seconds. Values are re-checked in
``__post_init__`` so the library is safe to call without Snakemake.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffatlas.errors import UserError
from diffatlas.sections import ConfigSection

GRANULARITIES = ("coarse", "fine")


@dataclass
class DiffCConfig(ConfigSection):
    """Diff-C classifier, linear probe and data split of one job."""

    SECTION = "diffc"
    JOB_FREE_KEYS = ("layers", "timesteps", "threads")  # the grid, and the rule's threads

    layers: list[str] | None = None
    """Layers to classify (each extracted, with spatial maps); null = each model's extraction
    layers that keep maps (models.<name>.layers, else extract.layers; workflow grid)."""
    timesteps: list[int | str] | None = None
    """Times to classify (each extracted): steps, or a flow-matching model's sigmas ('s0.500');
    null = each model's extraction times (workflow grid)."""
    threads: int = 1
    """CPU threads per train_diffc job (several small jobs run side by side)."""
    granularities: list[str] = field(default_factory=lambda: ["coarse", "fine"])
    """Label granularities to classify (``coarse``, ``fine``); one classifier each."""
    n_convs: int = 4
    """Convolutions in Diff-C; each halves the map (stride 2) until it is 1x1."""
    feature_dim: int = 1024
    """Channels of the last convolution = length of the pooled feature fed to the head."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    epochs: int = 30
    """Training epochs (the maximum, with early stopping)."""
    batch_size: int = 64
    """Samples per optimiser step."""
    dropout: float = 0.0
    """Dropout before the fully connected head."""
    early_stopping: bool = False
    """Stop when validation accuracy has not improved for ``patience`` epochs, keep the best."""
    patience: int = 5
    """Epochs without validation improvement before stopping (with ``early_stopping``)."""
    val_fraction: float = 0.15
    """Share of samples held out for validation (0 disables validation)."""
    test_fraction: float = 0.2
    """Share of samples held out for the test metrics."""
    seed: int = 0
    """Seed of the split, the initialisation and the batch order."""
    seeds: int = 1
    """Training runs per job, with seeds ``seed, seed + 1, ...`` (each its own split, initialisation
    and batch order). The first is saved; metrics.json reports every run's accuracy and their spread."""
    shuffle_buffer: int = 1024
    """Maps (samples) in the streaming loader's shuffle buffer; a layer whose maps all fit is
    read into memory once (as float16) and trained on exactly as in memory."""
    probe_c: float = 1.0
    """Inverse L2 strength of the logistic-regression probe."""
    probe_max_iter: int = 1000
    """Iterations of the probe's solver (lbfgs)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> UserError:
            return UserError(f"diffc.{key} = {getattr(self, key)!r} is not allowed; allowed: {allowed}")

        if not self.granularities or any(g not in GRANULARITIES for g in self.granularities):
            raise bad("granularities", "a non-empty list of coarse, fine")
        if len(set(self.granularities)) != len(self.granularities):
            raise bad("granularities", "each of coarse, fine at most once")
        for key in ("n_convs", "feature_dim", "epochs", "batch_size", "patience", "probe_max_iter", "threads", "seeds", "shuffle_buffer"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        for key in ("lr", "probe_c"):
            if not isinstance(getattr(self, key), (int, float)) or not getattr(self, key) > 0:
                raise bad(key, "a number > 0")
        if not 0 <= self.weight_decay:
            raise bad("weight_decay", "a number >= 0")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "a number in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "a number in [0, 1)")
        if not 0 < self.test_fraction < 1:
            raise bad("test_fraction", "a number in (0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError(
                f"diffc.val_fraction + diffc.test_fraction = {self.val_fraction + self.test_fraction} "
                "leaves no training samples; allowed: a sum < 1"
            )
        if self.early_stopping and self.val_fraction == 0:
            raise UserError("diffc.early_stopping needs validation samples; set diffc.val_fraction > 0")
        self.reject_unknown()
