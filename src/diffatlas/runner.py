"""The one command runner: the flags every command shares, parsed and acted on in one place.

Every module in :mod:`diffatlas.commands` builds its parser with :class:`Runner`, adds its own
flags, and lets the runner handle the shared ones:

========================  ================================================================
``--model``               diffusers model directory or cached hub id (model commands)
``--model-name``          name recorded with the artifacts (default: ``--model``)
``--revision``            hub revision of ``--model``; cache only, never downloaded
``--allow-pickle-weights`` read .bin (pickle) weights when a model has no safetensors
``--config-json``         the command's config section as JSON (absent keys: defaults)
``--config``              a workflow config YAML instead; its section is used
``--set key=value``       override one key of the section (value parsed as JSON)
``--device``              auto | cpu | cuda | cuda:N
``--threads``             torch CPU threads (Snakemake passes the rule's ``threads``)
========================  ================================================================

The section a command reads is a :class:`~diffatlas.sections.ConfigSection` (its defaults
and field docs live there); :meth:`Runner.config` builds it from the flags and fails on a
bad value before any model loads. :meth:`Runner.load_model` sets the threads, picks the
device and loads the model with its revision.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from diffatlas.errors import UserError
from diffatlas.sections import ConfigSection, parse_overrides, parse_section_json

MODEL_FLAGS = ("required", "optional")


@dataclass
class Runner:
    """Shared flags of one command.

    Args:
        prog: the command name (``diffatlas NAME``).
        doc: the command module's docstring (its first paragraph is the description).
        section: the config section class the command reads, or None.
        model: ``"required"`` / ``"optional"`` adds ``--model``, ``--model-name``, ``--revision``.
        device: add ``--device``.
        threads: add ``--threads``.
        torch_threads: ``--threads`` sizes torch's pool (False: the command uses it itself).
    """

    prog: str
    doc: str | None = None
    section: type[ConfigSection] | None = None
    model: str | None = None
    device: bool = False
    threads: bool = False
    torch_threads: bool = True

    def __post_init__(self) -> None:
        if self.model is not None and self.model not in MODEL_FLAGS:
            raise ValueError(f"model must be one of {MODEL_FLAGS} or None")

    # ------------------------------------------------------------------ parsing
    def parser(self, **kwargs: Any) -> argparse.ArgumentParser:
        """An argparse parser with the shared flags added; the command adds its own."""
        description = (self.doc or "").strip().split("\n\n")[0] or None
        ap = argparse.ArgumentParser(prog=f"diffatlas {self.prog}", description=description, **kwargs)
        if self.model is not None:
            ap.add_argument("--model", required=self.model == "required", default=None,
                            help="diffusers model directory or cached hub id")
            ap.add_argument("--model-name", default=None, help="model name recorded with the artifacts (default: --model)")
            ap.add_argument("--revision", default=None,
                            help="hub revision (branch, tag or commit) of --model; looked up in the local cache only")
            ap.add_argument("--allow-pickle-weights", action="store_true",
                            help="also read pickle-based .bin weights (models.<name>.allow_pickle_weights)")
        if self.section is not None:
            name = self.section.SECTION
            src = ap.add_mutually_exclusive_group()
            src.add_argument("--config-json", default=None, help=f"the {name} config section as JSON (absent keys: defaults)")
            src.add_argument("--config", default=None, help=f"workflow config YAML; its {name} section is used")
            ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help=f"override one {name} setting (value parsed as JSON)")
        if self.device:
            ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
        if self.threads:
            what = "torch CPU threads" if self.torch_threads else "worker threads"
            ap.add_argument("--threads", type=int, default=None, help=f"{what} (default: OMP_NUM_THREADS)")
        return ap

    # ------------------------------------------------------------------ the config section
    def section_dict(self, args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The section's keys as given: ``--config-json`` or ``--config``, then ``--set``, then
        ``overrides`` (a command's own flags; None values are left out)."""
        if self.section is None:
            raise ValueError(f"{self.prog} reads no config section")
        name = self.section.SECTION
        if getattr(args, "config", None):
            from diffatlas.config import load_config

            data: Any = load_config(args.config)
            for part in name.split("."):
                data = data.get(part, {}) if isinstance(data, dict) else {}
        else:
            data = parse_section_json(args.config_json, name) or {}
        extra = {k: v for k, v in (overrides or {}).items() if v is not None}
        return {**data, **parse_overrides(args.set), **extra}

    def config(self, args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Any:
        """The validated section (a bad value is a UserError naming the key)."""
        return self.section.from_dict(self.section_dict(args, overrides))

    # ------------------------------------------------------------------ compute
    def setup(self, args: argparse.Namespace) -> Any:
        """Set torch's threads and return the device (``torch.device``)."""
        from diffatlas.io import pick_device, set_threads

        if self.threads and self.torch_threads:
            set_threads(args.threads)
        return pick_device(getattr(args, "device", "auto"))

    def load_model(self, args: argparse.Namespace) -> Any:
        """Threads, device, then ``load_model(--model, revision=--revision, allow_pickle_weights=...)``."""
        if not args.model:
            raise UserError(f"diffatlas {self.prog}: --model is required")
        device = self.setup(args)
        from diffatlas.models.loader import load_model

        return load_model(args.model, device=device, revision=args.revision,
                          allow_pickle_weights=args.allow_pickle_weights)

    @staticmethod
    def model_name(args: argparse.Namespace) -> str:
        """The name recorded with the artifacts: ``--model-name``, else ``--model``."""
        return args.model_name or args.model
