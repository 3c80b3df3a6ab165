"""Running on an accelerator: compute precision per stage, and out-of-memory as a clear error.

Precision
---------
Weights are loaded in float32 everywhere. What runs in lower precision is chosen per stage by
its ``dtype`` setting; ``auto`` means:

=====================  ============================  =========================================
stage (config key)     ``auto`` on CUDA              always float32 (the maths needs it)
=====================  ============================  =========================================
extract.dtype          float16 autocast (forwards)   stored statistics are accumulated in float32
geometry.dtype         float16 autocast (DDIM        the Jacobian: JVP/VJP passes, subspace
                       sampling, edits)              iteration, QR/SVD, residuals
daam, sae, diffc,      float32                       -
world fidelity
=====================  ============================  =========================================

On the CPU ``auto`` is float32 (CPU half-precision kernels are slow or missing). Forward-mode
derivatives in float16 lose the small singular values the subspace iteration needs (its
residual ``tol`` of 1e-2..1e-3 is near float16's resolution), so the Jacobian ignores
``dtype``. ``bfloat16`` keeps float32's range (no overflow on random or badly scaled
weights) at lower precision. Every artifact records the resolved dtypes
(:func:`describe_precision`).

Out of memory
-------------
:func:`out_of_memory_hint` turns a ``torch.OutOfMemoryError`` inside a stage into a
:class:`~diffatlas.errors.UserError` naming the stage, the size it tried and the settings to
lower; callers write outputs atomically, so nothing half-written is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from diffatlas.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: configs import DTYPES without it
    import torch

DTYPES = ("auto", "float32", "float16", "bfloat16")
"""Allowed values of every stage's ``dtype`` setting."""

AUTO_ON_CUDA = {"extract": "float16", "geometry": "float16"}
"""What ``dtype: auto`` means on CUDA for the stages that autocast (others: float32)."""



def resolve_dtype(requested: str, device: "torch.device | str", stage: str) -> str:
    """The compute dtype name of ``stage`` on ``device`` for the setting ``requested``."""
    import torch

    if requested not in DTYPES:
        raise UserError(f"config {stage}.dtype = {requested!r} is not allowed; allowed: {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    return AUTO_ON_CUDA.get(stage, "float32") if torch.device(device).type == "cuda" else "float32"


def amp_dtype(requested: str, device: "torch.device | str", stage: str) -> "torch.dtype | None":
    """The autocast dtype of ``stage`` (None: no autocast, float32)."""
    import torch

    name = resolve_dtype(requested, device, stage)
    return None if name == "float32" else getattr(torch, name)


def autocast(device: "torch.device | str", dtype: "torch.dtype | None") -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``; a no-op for ``None``."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def strict_float32(convolutions: bool = True) -> Iterator[None]:
    """Float32 that is float32 on CUDA: TensorFloat-32 off for matmuls and, with
    ``convolutions``, for cuDNN convolutions too. Restored on exit.

    cuDNN convolutions run in TF32 by default on Ampere and later (10 mantissa bits). In the
    pullback basis that rounding shows in the singular values; measured on an H200 at SD1.5
    size, 512 px, n = 8, one round (bench_geometry): σ rel. diff between two exact attention
    paths 1.6e-4 with TF32 convolutions and 2.4e-6 without, at a peak of 6.5 vs 18.8 GiB
    (cuDNN's float32 algorithms take far larger workspaces). Matmuls are strict either way
    (PyTorch's default, made sure of here)."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    if convolutions:
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def describe_precision(weights: "torch.dtype", **compute: "torch.dtype | str | None") -> dict[str, str]:
    """JSON-able record: the weights' dtype and each named computation's (None = float32)."""
    def name(d) -> str:
        if d is None:
            return "float32"
        return d if isinstance(d, str) else str(d).removeprefix("torch.")

    return {"weights": name(weights), **{k: name(v) for k, v in compute.items()}}


@contextlib.contextmanager
def out_of_memory_hint(stage: str, tried: str, lower: str) -> Iterator[None]:
    """Re-raise out-of-memory inside the block as a UserError naming what to change.

    stage: e.g. ``"geometry basis (t999)"`` (the time in the model's own convention: t999,
    s0.500); tried: the size, e.g. ``"3 samples x 6 directions, x_t (4, 64, 64)"``; lower: the
    settings, e.g. ``"geometry.chunk_size"``.
    """
    import torch

    try:
        yield
    except torch.OutOfMemoryError as err:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
        raise UserError(
            f"{stage}: out of memory with {tried} ({first}); lower {lower}, or use a device with more memory"
        ) from None


HOST_MMAP_THRESHOLD = 1 << 20
"""Host allocations from this size up (bytes) get their own pages, returned to the OS when freed."""

HOST_MMAP_MIN_PARAMS = 100_000_000
"""Denoiser size (parameters) from which the Jacobian fixes the threshold: below it (ShapesWorld,
1.7M) the page faults of fresh pages cost ~40% of a round and the heap's excess is small."""

_host_allocator_set = False


def return_large_host_blocks() -> bool:
    """Make glibc give freed large host blocks back to the OS at once (Linux; once per process).

    PyTorch's CPU tensors come from ``malloc``. glibc serves a large block by ``mmap`` only
    while it is above a threshold that grows to the size of every such block freed (up to
    32 MiB), so after the first few a pass's many short-lived tensors of 1-32 MiB are carved
    from the heap, where interleaved longer-lived tensors fragment it and freed space is kept:
    in a chunked forward-mode pass the resident set grew to ~3x the memory ever live at once.
    A fixed threshold (``M_MMAP_THRESHOLD``, which also stops the growth) keeps blocks of
    :data:`HOST_MMAP_THRESHOLD` and more out of the heap. It changes no value. Returns whether
    it could be set (False off glibc; then nothing changes).
    """
    global _host_allocator_set
    if _host_allocator_set:
        return True
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        _host_allocator_set = bool(libc.mallopt(m_mmap_threshold, HOST_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return _host_allocator_set
