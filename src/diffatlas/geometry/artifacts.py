"""Reading the geometry stage's artifacts (path grammar in :mod:`diffatlas.geometry.run`).

Readers return numpy arrays by default (``safetensors.numpy``), so figure, meaning and
table jobs never import torch (a few CPU seconds per job on a laptop); ``torch=True``
returns tensors for the jobs that compute with them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffatlas.errors import UserError
from diffatlas.io import read_json


def _load(path: Path, torch: bool) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} not found: run the geometry job that writes it first (diffatlas geometry ...)")
    if torch:
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file
    return load_file(str(path))


def load_basis(run_dir: str | os.PathLike, torch: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays of ``basis.safetensors``, ``meta.json``) of one ``t{timestep}`` directory."""
    run_dir = Path(run_dir)
    return _load(run_dir / "basis.safetensors", torch), read_json(run_dir / "meta.json")


def load_edits(run_dir: str | os.PathLike, torch: bool = False) -> dict[str, Any]:
    """Arrays of ``edits.safetensors`` of one ``t{timestep}`` directory."""
    return _load(Path(run_dir) / "edits.safetensors", torch)


def load_global(global_dir: str | os.PathLike, torch: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays of ``global.safetensors``, ``meta.json``) of a ``global`` directory."""
    global_dir = Path(global_dir)
    return _load(global_dir / "global.safetensors", torch), read_json(global_dir / "meta.json")
