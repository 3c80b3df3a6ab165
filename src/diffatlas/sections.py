"""What every stage's config dataclass shares: building it from its config.yaml section.

Every stage config (``ExtractConfig``, ``SAEConfig``, ``DiffCConfig``, ``DAAMConfig``,
``GeometryConfig``, ``WorldModelConfig``, ``FidelityConfig``) is a dataclass with an
``extra`` field that collects unknown keys, so that its ``__post_init__`` can name them
together with the allowed keys (see :meth:`ConfigSection.reject_unknown`). The class names
its section in ``SECTION`` (dotted for a nested section, ``world_model.train``); that name
appears in every message a user sees. The dataclass is the one place a section's defaults
and field documentation are written; tests/test_sections.py checks config.schema.yaml
against it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, TypeVar

from diffatlas.errors import UserError

S = TypeVar("S", bound="ConfigSection")


def parse_section_json(text: str | None, section: str) -> dict[str, Any] | None:
    """The ``--config-json`` text of a config section as a dict; None when it is empty."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--config-json is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"--config-json must be a JSON object (the {section} section), got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs -> dict (each value parsed as JSON, else kept as a bare string)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string such as samples=spatial
    return out


class ConfigSection:
    """Mixin for a dataclass mirroring one config.yaml section (keys = fields, plus ``extra``)."""

    SECTION: ClassVar[str] = ""
    #: Keys no job of the section reads (the workflow grid, figure settings): rules leave them
    #: out of a job's settings, so growing the grid re-runs no finished job.
    JOB_FREE_KEYS: ClassVar[tuple[str, ...]] = ()
    #: For a section with several kinds of job: the keys each job reads, by job name.
    JOBS: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any] | None) -> S:
        """Build from the section; unknown keys go to ``extra`` and are reported by ``reject_unknown``."""
        if data is not None and not isinstance(data, dict):
            raise UserError(f"config {cls.SECTION} must be a mapping of keys to values, got {type(data).__name__}")
        data = dict(data or {})
        known = {k: data.pop(k) for k in list(data) if k in cls.field_names()}
        # YAML and JSON give lists; a caller in Python may pass tuples. Keep one form.
        known = {k: list(v) if isinstance(v, tuple) else v for k, v in known.items()}
        return cls(**known, extra=data)

    @classmethod
    def from_json(cls: type[S], text: str | None) -> S:
        """Build from ``--config-json`` text (empty: all defaults)."""
        data = parse_section_json(text, cls.SECTION)
        return cls() if data is None else cls.from_dict(data)

    @classmethod
    def from_args(cls: type[S], config_json: str | None, overrides: list[str] | None = None) -> S:
        """Build from ``--config-json`` text with ``--set key=value`` overrides on top."""
        data = parse_section_json(config_json, cls.SECTION) or {}
        return cls.from_dict({**data, **parse_overrides(overrides)})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default: the one place a section's defaults are written."""
        return cls().to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def job_keys(cls, job: str | None = None) -> tuple[str, ...]:
        """The keys job ``job`` reads (``JOBS[job]``; without ``JOBS``: every key but ``JOB_FREE_KEYS``)."""
        if cls.JOBS:
            if job not in cls.JOBS:
                raise ValueError(f"{cls.SECTION} has jobs {', '.join(cls.JOBS)}, not {job!r}")
            return cls.JOBS[job]
        return tuple(k for k in cls.field_names() if k not in cls.JOB_FREE_KEYS)

    @classmethod
    def job_json(cls, section: dict[str, Any], job: str | None = None, **narrowed: Any) -> str:
        """``--config-json`` of one job: only the keys it reads (``narrowed`` replaces values
        with the job's own slice, e.g. its one prompt set), as sorted JSON so that Snakemake
        sees a change exactly when the job's inputs change."""
        keys = cls.job_keys(job)
        bad = set(narrowed) - set(keys)
        if bad:
            raise ValueError(f"{sorted(bad)} are not keys of {cls.SECTION} job {job!r}")
        return json.dumps({**{k: section[k] for k in keys if k in section}, **narrowed}, sort_keys=True)

    def reject_unknown(self) -> None:
        """Raise naming the unknown keys in ``extra`` and the allowed ones (call from ``__post_init__``)."""
        extra = getattr(self, "extra", None)
        if extra:
            raise UserError(
                f"unknown config key(s) in {self.SECTION}: {', '.join(sorted(extra))}; "
                f"allowed keys: {', '.join(self.field_names())}"
            )
