"""The pullback map ``f: x_t -> h`` and its top singular vectors, without forming ``J``.

Park et al. (NeurIPS 2023) pull the Euclidean metric of a U-Net's bottleneck features back
to the latent ``x_t``: the right singular vectors ``v_i`` of ``J = ∂f/∂x_t`` are the local
latent basis (semantic directions in X), the left ones ``u_i = J v_i / σ_i`` the matching
tangent basis in H.

The feature map
---------------
:class:`PullbackMap` is ``f(x) = pool(layer output of denoiser(x, t, cond))``. The layer is
resolved with the extraction engineer's :func:`~diffatlas.activations.layers.resolve_layers`
(aliases ``mid``, ``up_ft1``, ``block3`` or a module path). Its output is captured by a
forward hook, which then raises a private exception: the forward stops at the layer, so the
up path (most of a U-Net's cost above ``mid``) is never run, neither in the primal pass nor
in its JVP/VJP. The exception is caught inside ``f`` itself, so it never crosses a
``torch.func`` transform boundary. A one-off full pass checks that the module runs exactly
once per forward (a module that runs twice has no single output to stop at).

Pooling over space: ``sum`` (Park et al.), ``mean``, or ``none`` (the flattened map).

Joint-attention transformers (SD3, Flux; issue 21): a joint block returns ``(text tokens,
image tokens)``; the layer's stream (``block{i}`` = ``block{i}.image``) is read through
extraction's one reader, :func:`~diffatlas.activations.hooks.stream_tensor`. So ``h`` is a
chosen block's image-token output, and ``J = ∂h/∂x_t`` is defined on the image-token stream.
The image tokens ``[B, N, C]`` are laid back on their patch grid ``[B, C, h, w]`` as extraction
lays them (row-major patches, the grid found by :func:`~diffatlas.activations.hooks.token_grid`
from the ``[B, C, H, W]`` latent the map takes; Flux's 2x2-packed tokens land on ``H/2 × W/2``):
``sum`` / ``mean`` pooling is the same either way, and for ``none`` the flattened ``h`` (and so
every ``u``) then has one layout, ``[C, h, w]``, for U-Nets and transformers alike, the layout of
extraction's spatial maps of that layer. A text stream (``block{i}.text``) has no grid and is
used as the sequence ``[B, L, C]``.

The singular vectors
--------------------
:func:`top_singular` runs block subspace iteration on ``JᵀJ`` with Rayleigh–Ritz:

1. ``Q = qr(Y)`` (re-orthonormalised every round), ``k = n + oversample`` columns;
2. ``W = J Q`` - one *batched* forward-mode pass (``torch.func.jvp`` vmapped over the ``k``
   tangents: the primal forward runs once, the tangents ride along as a batch);
3. ``W = U_w S V_wᵀ`` (a tiny ``d × k`` SVD); Ritz vectors ``V = Q V_w``, values ``S``, and
   ``U = U_w`` which is exactly ``J v_i / σ_i``;
4. ``Z = Jᵀ U`` - one *batched* reverse-mode pass (the ``torch.func.vjp`` closure of a
   single forward, kept for the whole run, vmapped over the ``k`` cotangents);
5. residual ``r_i = ||Jᵀu_i − σ_i v_i|| / σ_i``; stop when ``max_{i<n} r_i <= tol``,
   else ``Y = Z`` (``span Z = span JᵀJ Q``) and repeat.

The residual bounds the error of each singular triple (a singular-vector angle is at most
``r σ_i / gap``, a singular value error is second order), so ``tol`` is meaningful whatever
the model. Per round: one JVP pass and one VJP pass over ``k`` directions, each batched;
several points (samples) ride through the same passes as one batch, since ``f`` treats
samples independently.
``batching="loop"`` does the same maths with one JVP and one VJP call per direction (the
reference the benchmark compares against).

Forward-mode AD is not implemented for PyTorch's CPU scaled-dot-product-attention kernel,
so :func:`forward_ad_safe_attention` switches every attention module to
:class:`ChunkedAttnProcessor` (plain matmuls, one block of queries at a time: exact, and never
a full attention matrix per tangent, which at SD1.5 size is what does not fit a 24 GB card)
for the computation and restores the original processors afterwards, even on error. It also
runs each transformer feed-forward on the same blocks of tokens (its widened GEGLU states are
the next largest tensors per tangent). On the CPU, for SD-class models, glibc is told to return
large freed blocks to the OS at once (:func:`~diffatlas.accel.return_large_host_blocks`): else
its heap keeps ~3x what the chunked passes ever hold at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffatlas.activations.hooks import stream_tensor, token_grid
from diffatlas.accel import HOST_MMAP_MIN_PARAMS, return_large_host_blocks, strict_float32
from diffatlas.activations.layers import ResolvedLayer, resolve_layers
from diffatlas.errors import UserError
from diffatlas.geometry.config import GeometryConfig

log = logging.getLogger(__name__)


class _StopAtLayer(Exception):
    """Raised by the capture hook to skip everything after the pulled-back layer."""


DEFAULT_ATTENTION_CHUNK: int | None = GeometryConfig.attention_chunk
"""Queries per block of :class:`ChunkedAttnProcessor` when a caller gives none (the config's default)."""


class ChunkedAttnProcessor:
    """Exact ``softmax(QKᵀ)V`` a block of queries at a time, with plain (forward-AD-safe) ops.

    Each query row's attention weights depend only on that row, so cutting the queries into
    blocks of ``query_chunk`` changes no value: the result is the classic processor's up to
    float rounding, and so are its JVPs and VJPs. What changes is memory. Under
    ``vmap(jvp)`` over ``k`` tangents the classic processor holds scores and probabilities of
    shape ``[k, B·heads, N_q, N_k]`` - at SD1.5's 64x64 self-attention that is 4096x4096 per
    head and per tangent. Here only ``[k, B·heads, query_chunk, N_k]`` is alive at once; the
    reverse pass keeps the probabilities of one forward (no tangent axis) for its VJP.

    The scores of a block come from the module's own ``get_attention_scores`` (its scale,
    mask, ``upcast_attention`` / ``upcast_softmax``), so every diffusers ``Attention``
    variant the classic processor serves is served the same way.
    """

    def __init__(self, query_chunk: int = DEFAULT_ATTENTION_CHUNK) -> None:
        if not isinstance(query_chunk, int) or isinstance(query_chunk, bool) or query_chunk < 1:
            raise UserError(f"attention query chunk {query_chunk!r} is not allowed; allowed: an integer >= 1")
        self.query_chunk = query_chunk

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # [B, C, H, W] -> tokens [B, H·W, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [B·heads, N_q, d_head]
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        blocks = []
        for start in range(0, query.shape[1], self.query_chunk):
            rows = slice(start, start + self.query_chunk)
            block_mask = None if mask is None else (mask[:, rows] if mask.shape[1] > 1 else mask)
            probs = attn.get_attention_scores(query[:, rows], key, block_mask)
            blocks.append(torch.bmm(probs, value))
        out = attn.batch_to_head_dim(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0])
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _keeps_own_processor(module: nn.Module) -> bool:
    """Attention whose processor :class:`ChunkedAttnProcessor` cannot stand in for: joint text-image
    attention (SD3's ``JointAttnProcessor2_0``: context projections ``add_q_proj`` and a
    ``(image, text)`` pair out) and q/k-normalised attention (``norm_q``). Such a module keeps
    its processor; its ``scaled_dot_product_attention`` call is made forward-AD safe instead
    (:func:`chunked_sdpa`)."""
    return getattr(module, "add_q_proj", None) is not None or getattr(module, "norm_q", None) is not None


def chunked_sdpa(query_chunk: int | None) -> Callable[..., torch.Tensor]:
    """A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` made of plain ops.

    ``softmax(q kᵀ · scale + mask) v`` for ``query_chunk`` query rows at a time (None = all at
    once): exact, forward-AD safe (CPU's fused SDPA kernels have no forward derivative), and
    never the whole attention matrix per tangent. It serves the processors that keep their own
    maths (SD3's joint attention, Flux's ``FluxAttnProcessor`` through diffusers' dispatcher).
    Dropout and causal masks are refused (eval-mode denoisers use neither).
    """

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        if dropout_p or is_causal:
            raise UserError("the pullback Jacobian's attention takes no dropout and no causal mask (eval-mode denoisers)")
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
        scale = scale if scale is not None else query.shape[-1] ** -0.5
        step = query.shape[-2] if query_chunk is None else query_chunk
        blocks = []
        for start in range(0, query.shape[-2], step):
            rows = slice(start, start + step)
            scores = (query[..., rows, :] @ key.transpose(-2, -1)) * scale
            if attn_mask is not None:
                m = attn_mask[..., rows, :] if attn_mask.shape[-2] > 1 else attn_mask
                scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
            blocks.append(scores.softmax(dim=-1) @ value)
        return torch.cat(blocks, dim=-2) if len(blocks) > 1 else blocks[0]

    return sdpa


@contextlib.contextmanager
def forward_ad_safe_attention(denoiser: nn.Module, query_chunk: int | None = DEFAULT_ATTENTION_CHUNK) -> Iterator[None]:
    """Use an attention processor made of plain matmuls in every attention module for the block.

    The default ``AttnProcessor2_0`` calls SDPA, whose CPU kernel has no forward-mode
    derivative. ``query_chunk`` (an int) installs :class:`ChunkedAttnProcessor` - exact,
    never a full attention matrix per tangent; ``None`` installs diffusers' classic
    ``AttnProcessor`` (the whole matrix at once; kept as the reference the bench measures
    against). Every diffusers ``Attention`` module under ``denoiser`` is switched (U-Nets and
    DiTs alike, whether or not the model exposes ``set_attn_processor``), and each module's
    original processor (possibly a custom one, e.g. a DAAM tracer's) is put back on exit,
    error or not. Joint and q/k-normalised attention (SD3, Flux: :func:`_keeps_own_processor`;
    Flux's ``FluxAttention`` is no ``Attention``) keep their processors, and
    ``torch.nn.functional.scaled_dot_product_attention``, which they call, is
    :func:`chunked_sdpa` for the block (put back on exit, error or not).
    """
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention, AttnProcessor

    processor = AttnProcessor() if query_chunk is None else ChunkedAttnProcessor(query_chunk)
    saved = [(m, m.processor) for m in denoiser.modules() if isinstance(m, Attention) and not _keeps_own_processor(m)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    feed_forwards = [] if query_chunk is None else [m for m in denoiser.modules() if isinstance(m, FeedForward)]
    # An instance attribute shadows the class's forward; one set before us (a hook library's,
    # or an outer use of this context) is put back afterwards, not deleted.
    own_forwards = [(m, m.__dict__.get("forward")) for m in feed_forwards]
    try:
        torch.nn.functional.scaled_dot_product_attention = chunked_sdpa(query_chunk)
        for module, _ in saved:
            module.set_processor(processor)
        for module in feed_forwards:
            module.forward = _TokenChunkedForward(module.forward, query_chunk)
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for module, processor in saved:
            module.set_processor(processor)
        for module, previous in own_forwards:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


class _TokenChunkedForward:
    """A transformer feed-forward run on ``chunk`` tokens at a time (exact: it acts per token).

    Under ``vmap(jvp)`` over ``k`` tangents a GEGLU feed-forward holds its widened hidden
    states (``[k, B, N, 8·C]`` for the projection, several ``[k, B, N, 4·C]`` for the gate's
    product rule): at SD1.5's first block that is the largest tensor of the pass once the
    attention is chunked. Token blocks keep only ``[k, B, chunk, ·]`` alive.
    """

    def __init__(self, forward: Callable[..., torch.Tensor], chunk: int) -> None:
        self.forward, self.chunk = forward, chunk

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states.ndim != 3 or hidden_states.shape[1] <= self.chunk:  # [B, N, C] tokens, or nothing to cut
            return self.forward(hidden_states, *args, **kwargs)
        return torch.cat([self.forward(block, *args, **kwargs) for block in hidden_states.split(self.chunk, dim=1)], dim=1)


def _pool(x: torch.Tensor, pooling: str, name: str) -> torch.Tensor:
    """Pool a layer output ``[B, C, h, w]`` or tokens ``[B, N, C]`` to ``[B, d]``."""
    if x.ndim == 4:
        dims = (2, 3)
    elif x.ndim == 3:
        dims = (1,)
    elif x.ndim == 2:
        return x
    else:
        raise UserError(f"layer {name!r} outputs a tensor of shape {tuple(x.shape)}; expected [B,C,h,w] or [B,N,C]")
    if pooling == "sum":
        return x.sum(dim=dims)
    if pooling == "mean":
        return x.mean(dim=dims)
    return x.flatten(1)


class PullbackMap:
    """``f: x_t [B, C, H, W] -> h [B, d]``: a layer's output, pooled over space.

    Args:
        denoiser: the model whose module is hooked (``handle.denoiser``).
        predict: ``predict(x) -> anything`` runs one denoiser forward at the fixed timestep
            and conditioning (e.g. ``lambda x: handle.predict_noise(x, t, cond)``); it must
            broadcast a batch-1 conditioning to ``x``'s batch.
        layer: alias or module path (exactly one module).
        pooling: ``sum`` | ``mean`` | ``none``.
    """

    def __init__(self, denoiser: nn.Module, predict: Callable[[torch.Tensor], Any], layer: str = "mid",
                 pooling: str = "sum") -> None:
        if pooling not in ("sum", "mean", "none"):
            raise UserError(f"pooling {pooling!r} is not one of: sum, mean, none")
        resolved = resolve_layers(denoiser, [layer])
        if len(resolved) != 1:
            raise UserError(
                f"layer {layer!r} matches {len(resolved)} modules ({', '.join(r.module_path for r in resolved[:5])}, ...); "
                "the pullback needs exactly one module: give an alias or one module path"
            )
        self.layer: ResolvedLayer = resolved[0]
        self.module = dict(denoiser.named_modules())[self.layer.module_path]
        self.denoiser = denoiser
        self.predict = predict
        self.pooling = pooling
        self._checked = False

    @classmethod
    def from_handle(cls, handle, timestep, layer: str = "mid", pooling: str = "sum",
                    cond: dict[str, Any] | None = None, prompt: str = "") -> "PullbackMap":
        """The map of a loaded :class:`~diffatlas.models.loader.ModelHandle` at ``timestep``: the
        model's own time (an int step; for a flow model σ as ``"s0.500"`` or a Time), checked."""
        from diffatlas.geometry.sampling import geometry_time

        time = geometry_time(handle, timestep)
        mt = float(time.value) if time.kind == "sigma" else int(time.value)
        cond = cond if cond is not None else handle.conditioning([prompt])
        return cls(handle.denoiser, lambda x: handle.model_output(x, mt, cond), layer, pooling)

    def check(self, x: torch.Tensor) -> None:
        """One full pass (no grad, batch 1): the module must run exactly once per forward.

        Called once, before any ``torch.func`` transform sees the map.
        """
        if self._checked:
            return
        calls = []
        handle = self.module.register_forward_hook(lambda m, i, o: calls.append(1))
        try:
            with torch.no_grad():
                self.predict(x[:1].detach())
        finally:
            handle.remove()
        if len(calls) != 1:
            raise UserError(
                f"layer {self.layer.name!r} ({self.layer.module_path}) runs {len(calls)} times per forward pass; "
                "select a module that runs exactly once (e.g. its parent block)"
            )
        self._checked = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._checked:
            self.check(x)
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = stream_tensor(output, self.layer.stream, self.layer.name)
            if out is None:
                raise UserError(f"layer {self.layer.name!r} does not output a tensor; select a module that does")
            captured.append(out)
            raise _StopAtLayer  # the rest of the network cannot change h: skip it

        handle = self.module.register_forward_hook(hook)
        try:
            try:
                self.predict(x)
            except _StopAtLayer:
                pass
        finally:
            handle.remove()
        if not captured:
            raise UserError(f"layer {self.layer.name!r} did not run in the forward pass of {type(self.denoiser).__name__}")
        h = captured[0]
        if self.layer.stream == "image" and h.ndim == 3 and x.ndim == 4:
            h = self._on_grid(h, x)
        return _pool(h, self.pooling, self.layer.name)

    def _on_grid(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, N, C]`` -> ``[B, C, h, w]`` on the patch grid of the latent ``x``."""
        try:
            h, w = token_grid(int(tokens.shape[1]), int(x.shape[-2]), int(x.shape[-1]))
        except ValueError as err:
            raise UserError(f"layer {self.layer.name!r}: {err}") from None
        return tokens.transpose(1, 2).unflatten(2, (h, w))


def check_timestep(timestep: Any, num_train_timesteps: int) -> int:
    """``timestep`` as an int in ``0..T-1``, or a UserError naming it."""
    try:
        t = int(timestep)
    except (TypeError, ValueError):
        raise UserError(f"timestep {timestep!r} is not an integer; allowed: 0..{num_train_timesteps - 1}") from None
    if t != timestep or not 0 <= t < num_train_timesteps:
        raise UserError(f"timestep {timestep!r} is out of range; allowed: integers 0..{num_train_timesteps - 1} (training scale)")
    return t


@dataclass
class PullbackBasis:
    """Top-n singular triples of ``J = ∂f/∂x_t`` at one point.

    v: [N, n, *x_shape] right singular vectors (unit norm; the local latent basis in X).
    s: [N, n] singular values, descending.
    u: [N, n, d] left singular vectors (unit norm; ``u_i = J v_i / σ_i``, the tangent basis in H).
    residuals: [N, n] ``||Jᵀu_i − σ_i v_i|| / σ_i`` at the last round.
    iterations: rounds run; converged: every sample's residuals <= tol.
    """

    v: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    converged: bool

    @property
    def n(self) -> int:
        return int(self.s.shape[-1])

    def sample(self, i: int) -> "PullbackBasis":
        """The basis of sample ``i`` alone (leading axis kept, length 1)."""
        sl = slice(i, i + 1)
        return PullbackBasis(self.v[sl], self.s[sl], self.u[sl], self.residuals[sl], self.iterations, self.converged)


class _Products:
    """``J_s m_s`` and ``J_sᵀ c_s`` for every sample ``s`` of ``X`` [N, *shape] and ``k`` rows each.

    ``f`` treats samples independently (eval-mode U-Nets and DiTs do), so one pass over the
    batch ``X`` gives every sample's product at once. One forward pass builds the VJP
    closure (reused for every round); JVPs re-run the (truncated) forward with the tangents,
    the primal computed once and the ``k`` tangents batched by ``vmap``.
    """

    def __init__(self, fmap: PullbackMap, x: torch.Tensor, batching: str, chunk_size: int | None) -> None:
        self.fmap, self.x, self.batching, self.chunk_size = fmap, x, batching, chunk_size
        self.h, self._vjp = torch.func.vjp(fmap, x)
        self.d = int(self.h.shape[1])
        self.D = int(x[0].numel())

    def jvp(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` [N, k, D] -> ``J_s r_{s,j}`` as [N, k, d]."""
        x, f = self.x, self.fmap

        def one(r: torch.Tensor) -> torch.Tensor:  # r [N, D]: one direction per sample
            return torch.func.jvp(f, (x,), (r.reshape(x.shape),))[1]

        if self.batching == "loop":
            return torch.stack([one(rows[:, j]) for j in range(rows.shape[1])], dim=1)
        return torch.func.vmap(one, in_dims=1, out_dims=1, chunk_size=self.chunk_size)(rows)

    def vjp(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` [N, k, d] -> ``J_sᵀ c_{s,j}`` as [N, k, D]."""
        n = rows.shape[0]
        if self.batching == "loop":
            # The naive reference: a fresh forward and backward per direction.
            return torch.stack(
                [torch.func.vjp(self.fmap, self.x)[1](rows[:, j])[0].reshape(n, -1) for j in range(rows.shape[1])], dim=1
            )

        def one(c: torch.Tensor) -> torch.Tensor:  # c [N, d]
            return self._vjp(c)[0].reshape(n, -1)

        return torch.func.vmap(one, in_dims=1, out_dims=1, chunk_size=self.chunk_size)(rows)


def _fix_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic signs: each u_i's largest-magnitude entry is positive (v_i follows).

    u: [..., n, d], v: [..., n, D].
    """
    idx = u.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(u.gather(-1, idx))
    sign[sign == 0] = 1
    return u * sign, v * sign


def top_singular(
    fmap: PullbackMap,
    x: torch.Tensor,
    n: int,
    *,
    oversample: int = 4,
    tol: float = 1e-3,
    max_iters: int = 40,
    batching: str = "vmap",
    chunk_size: int | None = None,
    attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK,
    conv_tf32: bool = GeometryConfig.conv_tf32,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> PullbackBasis:
    """Top-``n`` singular triples of ``∂f/∂x`` at each sample of ``x`` [N, C, H, W].

    Every sample gets its own basis; the samples ride through each pass as one batch.

    Args:
        n: directions kept; must not exceed the input dimension D = C·H·W nor the feature
            dimension d (J has rank <= min(d, D)).
        oversample: extra block columns (block k = min(n + oversample, d, D)).
        tol: relative residual that counts as converged (see the module docstring).
        max_iters: round cap; a run that hits it returns ``converged=False`` (logged).
        batching: ``vmap`` (batched) or ``loop`` (one call per direction; for reference).
        chunk_size: vmap chunk (directions per batched pass); None = all.
        attention_chunk: queries per block of the forward-AD-safe attention
            (:class:`ChunkedAttnProcessor`); None = the classic whole-matrix processor.
        init: optional start block [N, m, D] or [N, m, C, H, W] (e.g. the previous V when shooting).
        generator: RNG of the random start block (CPU generator).

    Returns:
        :class:`PullbackBasis` with a leading sample axis: v [N, n, C, H, W], s [N, n],
        u [N, n, d], residuals [N, n].

    Raises:
        UserError: ``n`` larger than the input dimension (or the feature dimension).
    """
    if batching not in ("vmap", "loop"):
        raise UserError(f"batching {batching!r} is not one of: vmap, loop")
    if x.ndim == 3:
        x = x[None]
    x = x.detach()
    N, D = int(x.shape[0]), int(x[0].numel())
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > D:
        raise UserError(
            f"n_directions = {n!r} is not allowed: it must be an integer in 1..{D}, the input dimension "
            f"(x_t has shape {tuple(x.shape[1:])})"
        )
    fmap.check(x)
    if x.device.type == "cpu" and sum(p.numel() for p in fmap.denoiser.parameters()) >= HOST_MMAP_MIN_PARAMS:
        return_large_host_blocks()  # else the heap keeps what the chunked passes free (see there)
    with strict_float32(convolutions=not conv_tf32), forward_ad_safe_attention(fmap.denoiser, attention_chunk):
        prod = _Products(fmap, x, batching, chunk_size)
        d = prod.d
        if n > d:
            raise UserError(
                f"n_directions = {n} is not allowed: the Jacobian of layer {fmap.layer.name!r} "
                f"(pooling {fmap.pooling}) has only {d} rows, so at most {d} singular directions exist"
            )
        k = min(n + max(0, int(oversample)), d, D)
        dev, dt = x.device, x.dtype
        if init is not None:
            y = init.reshape(N, init.shape[1], -1).to(dev, dt)[:, :k]
            if y.shape[1] < k:  # top up a short warm start with random columns
                extra = torch.randn(N, k - y.shape[1], D, generator=generator, device="cpu").to(dev, dt)
                y = torch.cat([y, extra], dim=1)
        else:
            # Drawn on the CPU (the generator's device) whatever x's device: same start everywhere.
            y = torch.randn(N, k, D, generator=generator, device="cpu").to(dev, dt)
        it, converged = 0, False
        for it in range(1, max_iters + 1):
            q = torch.linalg.qr(y.transpose(1, 2)).Q.transpose(1, 2)  # [N, k, D], orthonormal rows
            w = prod.jvp(q)  # [N, k, d]: row j = J q_j
            uw, s, vwt = torch.linalg.svd(w.transpose(1, 2), full_matrices=False)  # J Qᵀ = U_w S V_wᵀ
            v = vwt @ q  # [N, k, D] Ritz vectors: v_i = Q V_w[:, i]
            u = uw.transpose(1, 2)  # [N, k, d]: u_i = J v_i / σ_i
            z = prod.vjp(u)  # [N, k, D]: row i = Jᵀ u_i
            floor = s[:, :1].clamp_min(torch.finfo(s.dtype).tiny) * 1e-12
            res = (z - s[..., None] * v).norm(dim=-1) / torch.maximum(s, floor)
            worst = float(res[:, :n].max())
            log.debug("subspace iteration %d: max residual %.2e", it, worst)
            if bool(torch.isfinite(res[:, :n]).all()) and worst <= tol:
                converged = True
                break
            y = z
    if not converged:
        log.warning("subspace iteration stopped after %d rounds without reaching tol %.1e (max residual %.2e)",
                    it, tol, worst)
    u_n, v_n = _fix_signs(u[:, :n].detach(), v[:, :n].detach())
    return PullbackBasis(
        v=v_n.reshape(N, n, *x.shape[1:]),
        s=s[:, :n].detach(),
        u=u_n,
        residuals=res[:, :n].detach(),
        iterations=it,
        converged=converged,
    )


def full_jacobian(fmap: PullbackMap, x: torch.Tensor, attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK) -> torch.Tensor:
    """The dense ``J`` [d, D] at one point ``x`` [1, C, H, W] by reverse mode (``torch.func.jacrev``).

    An oracle for tests: it costs d backward passes, so only for small models.
    """
    if x.ndim == 3:
        x = x[None]
    if x.shape[0] != 1:
        raise UserError(f"full_jacobian takes one point x [1, C, H, W]; got a batch of {x.shape[0]}")
    fmap.check(x)
    with forward_ad_safe_attention(fmap.denoiser, attention_chunk):
        jac = torch.func.jacrev(lambda z: fmap(z)[0])(x.detach())
    return jac.reshape(jac.shape[0], -1)

