"""Small I/O helpers shared by every stage: atomic outputs, JSON, safetensors, devices.

A failed job must leave nothing a later job would trust, so every directory or file output
is written under a temporary name next to its destination and renamed into place only once
it is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from diffatlas.errors import UserError

log = logging.getLogger(__name__)


def ensure_writable_parent(path: str | os.PathLike) -> Path:
    """Create ``path``'s parent directory, or fail naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output directory {path.parent}: {err.strerror}") from err
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"output directory {path.parent} is not writable")
    return path


def _chmod_like_umask(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) paths; give results the usual permissions
    so collaborators on a shared cluster can read them."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    An existing ``path`` is replaced; on error the temporary directory is removed, so a
    killed or failed job never leaves a half-written store in place.
    """
    path = ensure_writable_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _chmod_like_umask(tmp, directory=True)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that becomes ``path`` only if the block succeeds."""
    path = ensure_writable_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _chmod_like_umask(tmp, directory=False)
    os.replace(tmp, path)


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (numpy values converted, NaN written as null)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_to_jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err


def pick_device(requested: str = "auto") -> "torch.device":  # noqa: F821
    """``auto`` takes CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device {requested!r} requested (config key device / --device) but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); set device: auto or cpu"
        )
    if requested not in ("cpu",) and not requested.startswith("cuda"):
        raise UserError(f"device {requested!r} is not one of: auto, cpu, cuda, cuda:N")
    return torch.device(requested)


def set_threads(threads: int | None) -> None:
    """Use the threads Snakemake gave the rule (it sets OMP_NUM_THREADS to ``threads``)."""
    import torch

    n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
