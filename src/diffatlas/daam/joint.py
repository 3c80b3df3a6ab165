"""DAAM for joint text-image attention (SD3's and Flux's diffusion transformers).

SD3 and Flux have no cross-attention: text and image tokens are concatenated and attend in
ONE softmax over all keys (SD3 ``[image; text]``, Flux ``[text; image]``). The DAAM word map
of text token j is then the attention probability from every image-token query i to key j
*inside that joint softmax*,

    P[i, j] = exp(s_ij − LSE_i),   s_ij = q_i · k_j / sqrt(d),   LSE_i = log Σ_{all keys m} exp(s_im),

summed over heads, blocks and steps. It is deliberately NOT renormalised over the text keys
only: the share of attention an image patch gives to a word is what the model uses; the
mass it gives to other image patches is part of that share's denominator.

Cheap route. Only the ``[image queries, text keys]`` columns are needed. The model's own
attention still runs as one fused SDPA call; on CPU that call is the very kernel
``F.scaled_dot_product_attention`` dispatches to (``_scaled_dot_product_flash_attention_for_cpu``),
which also returns LSE, so the output is bit-identical and the word columns cost one small
matmul ``q_img · k_textᵀ`` ([heads, N_img, N_text]). Where the dispatcher would choose another
kernel (CUDA, masks, other diffusers attention backends) the model's own call is kept
unchanged and LSE is computed by hand from ``q_img · k_allᵀ``, in query chunks (never the
whole ``[heads, N, N]`` matrix at once).

Exactness. :class:`JointDAAMProcessor` computes q, k, v with the block's own modules in the
stock processors' order (``JointAttnProcessor2_0``; ``FluxAttnProcessor`` including its
``norm_q``/``norm_k``/``norm_added_*`` and the rotary embedding applied to q and k), so the
recorded map uses exactly the q, k the model used. Flux's single-stream blocks get the
``[text; image]`` sequence in ``hidden_states``; the text length comes from the transformer's
``encoder_hidden_states`` (read by the tracer's pre-hook).

Which text stream the word maps read (:data:`TEXT_STREAM`):

* **SD3: the CLIP block** (joint positions 0..76, CLIP-L and CLIP-G side by side on the
  channel axis, so one position holds both encoders' token). DAAM is defined on CLIP tokens,
  and this block has CLIP's ``[start] words [end]`` layout. The T5 positions are traced too
  (the raw trace keeps every text position) but not turned into word maps.
* **Flux: the T5 tokens**, the only text tokens it has (CLIP enters as a pooled vector).
  T5 has no start token: the word maps of Flux have no start-token map.

Word positions come from :mod:`diffatlas.models.text_tokens` (one place for the layout).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from diffatlas.daam.processor import choose_modules
from diffatlas.errors import UserError

log = logging.getLogger(__name__)

#: Module-path globs of the joint attention modules: every double-stream (SD3, Flux) and
#: single-stream (Flux) block. Used when ``daam.layers`` is the UNet default.
JOINT_LAYERS = ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn")

#: The text stream turned into word maps, per family (see module docstring). Both start at
#: joint position 0, which the time-resolved writer (``words.write_time_resolved``, first
#: positions of the raw trace) relies on.
TEXT_STREAM = {"sd3": "clip", "flux": "t5"}

#: Tokenisations (names in :func:`diffatlas.models.text_tokens.tokenisations`) of each stream.
_STREAM_TOKENISATIONS = {"clip": ("clip_l", "clip_g"), "t5": ("t5",)}

#: Query rows per chunk when LSE has to be computed by hand.
_LSE_CHUNK = 1024


def joint_family(denoiser: torch.nn.Module) -> str | None:
    """``"sd3"`` or ``"flux"`` for a joint-attention transformer, else None."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(denoiser, SD3Transformer2DModel):
        return "sd3"
    if isinstance(denoiser, FluxTransformer2DModel):
        return "flux"
    return None


def find_joint_attention(
    denoiser: torch.nn.Module, layers: tuple[str, ...] | list[str], model_name: str | None = None
) -> dict[str, torch.nn.Module]:
    """The joint attention modules of ``denoiser`` whose path matches a glob in ``layers``.

    Only diffusers' stock processors are traced (their math is what
    :class:`JointDAAMProcessor` reproduces); any other processor is a UserError naming it.
    """
    import fnmatch

    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    label = model_name or type(denoiser).__name__
    stock = (JointAttnProcessor2_0, FluxAttnProcessor)
    joint = {
        name: m
        for name, m in denoiser.named_modules()
        if fnmatch.fnmatchcase(name, JOINT_LAYERS[0]) or fnmatch.fnmatchcase(name, JOINT_LAYERS[1])
    }
    chosen = choose_modules(joint, list(layers), label, "joint attention")
    for name, m in chosen.items():
        if type(m.processor) not in stock:
            raise UserError(
                f"daam: module {name} of {label!r} runs attention processor {type(m.processor).__name__}; DAAM for "
                "joint attention traces diffusers' JointAttnProcessor2_0 (SD3) and FluxAttnProcessor (Flux) only"
            )
    return chosen


def token_grid(family: str, denoiser: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(h, w) of the image tokens of one transformer call, read from its inputs.

    SD3 patchifies ``hidden_states [B, C, H, W]`` by ``patch_size``; Flux takes packed tokens
    ``[B, N, C]`` whose grid positions are ``img_ids[:, 1:3]`` (row, column).
    """
    x = kwargs["hidden_states"]
    if family == "sd3":
        p = int(denoiser.config.patch_size)
        return int(x.shape[-2]) // p, int(x.shape[-1]) // p
    ids = kwargs["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != x.shape[1]:
        raise RuntimeError(f"Flux img_ids describe a {h}x{w} grid but the transformer got {x.shape[1]} image tokens")
    return h, w


#: FluxTransformer2DModel takes σ and scales it by 1000 itself; SD3's takes σ·1000 (its
#: scheduler's "timestep"). Traces record the σ·1000 scale for both.
TIMESTEP_SCALE = 1000.0


def timestep_to_train_scale(family: str, t: float) -> float:
    """A transformer call's timestep on SD3's σ·1000 scale (Flux's input is σ itself)."""
    return float(t) * TIMESTEP_SCALE if family == "flux" else float(t)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention(q, k, v)`` ([B, H, S, d]) and, where the kernel the
    dispatcher picks returns it, the log-sum-exp of every query's scores ``[B, H, S]``.

    On CPU the dispatcher's fused choice is the flash kernel, called here directly (same
    kernel, same inputs: the same output bit for bit) to get LSE as well. Elsewhere the output
    comes from the stock call and LSE is None (computed by hand by the caller).
    """
    from torch.nn.attention import SDPBackend

    if q.device.type == "cpu" and torch._fused_sdp_choice(q, k, v) == int(SDPBackend.FLASH_ATTENTION):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    return F.scaled_dot_product_attention(q, k, v), None


def image_text_attention(
    q_img: torch.Tensor, k_text: torch.Tensor, lse_img: torch.Tensor | None, k_all: torch.Tensor
) -> torch.Tensor:
    """Joint-softmax probabilities of image queries on text keys, summed over heads.

    ``q_img [B, H, N, d]``, ``k_text [B, H, T, d]``, ``lse_img [B, H, N]`` (None: computed here
    from ``k_all [B, H, S, d]``, all keys, in chunks of queries). Returns float32 ``[B, N, T]``.
    """
    scale = 1.0 / math.sqrt(q_img.shape[-1])
    qf = q_img.float()
    scores = torch.matmul(qf, k_text.float().transpose(-1, -2)).mul_(scale)  # [B, H, N, T]
    if lse_img is None:
        kt = k_all.float().transpose(-1, -2)
        lse_img = torch.cat(
            [torch.logsumexp(torch.matmul(qf[:, :, i : i + _LSE_CHUNK], kt).mul_(scale), dim=-1)
             for i in range(0, qf.shape[2], _LSE_CHUNK)],
            dim=2,
        )
    return scores.sub_(lse_img.float().unsqueeze(-1)).exp_().sum(1)


class JointDAAMProcessor:
    """SD3's / Flux's attention with the image→text columns of the joint softmax recorded.

    The output equals the stock processor's (bit for bit on CPU, see :func:`attention_with_lse`).
    Calls while the accumulator is disabled, or with an attention mask (not used by the
    pipelines), go to the original processor unchanged.
    """

    def __init__(self, name: str, accumulator: Any, original: Any, family: str) -> None:
        self.name = name
        self.accumulator = accumulator
        self.original = original
        self.family = family

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        acc = self.accumulator
        if not acc.enabled or acc.latent_hw is None or attention_mask is not None:
            if image_rotary_emb is not None:  # FluxAttention passes it (positionally); SD3 never does
                kwargs["image_rotary_emb"] = image_rotary_emb
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **kwargs)
        if self.family == "sd3":
            return self._sd3(attn, hidden_states, encoder_hidden_states)
        return self._flux(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

    def _record(self, q_img: torch.Tensor, k_text: torch.Tensor, lse_img: torch.Tensor | None, k_all: torch.Tensor) -> None:
        acc = self.accumulator
        hw = acc.latent_hw
        if q_img.shape[2] != hw[0] * hw[1]:
            raise RuntimeError(f"{self.name}: {q_img.shape[2]} image queries do not fill the {hw[0]}x{hw[1]} token grid")
        with torch.no_grad():
            probs = image_text_attention(q_img.detach(), k_text.detach(), None if lse_img is None else lse_img.detach(), k_all.detach())
        acc.add_summed(self.name, probs, q_img.shape[1], hw)

    def _sd3(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> Any:
        """JointAttnProcessor2_0's computation; sequence ``[image; text]`` on [B, H, S, d]."""
        if encoder_hidden_states is None:  # an image-only attention (SD3.5's attn2): no text keys
            return self.original(attn, hidden_states)
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(b, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        e_q, e_k, e_v = (
            proj(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2)
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            e_q = attn.norm_added_q(e_q)
        if attn.norm_added_k is not None:
            e_k = attn.norm_added_k(e_k)
        q_img = query
        query, key, value = torch.cat([query, e_q], dim=2), torch.cat([key, e_k], dim=2), torch.cat([value, e_v], dim=2)
        out, lse = attention_with_lse(query, key, value)
        self._record(q_img, e_k, None if lse is None else lse[:, :, :n_img], key)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states

    def _flux(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
              image_rotary_emb: Any) -> Any:
        """FluxAttnProcessor's computation; sequence ``[text; image]`` on [B, S, H, d]."""
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, e_q, e_k, e_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            e_q, e_k, e_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (e_q, e_k, e_v))
            e_q, e_k = attn.norm_added_q(e_q), attn.norm_added_k(e_k)
            query, key, value = torch.cat([e_q, query], dim=1), torch.cat([e_k, key], dim=1), torch.cat([e_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # Double-stream blocks get the text separately; single-stream blocks get [text; image]
        # in hidden_states, the text length being the transformer's (set by the tracer).
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.accumulator.text_len
        proc = self.original
        native = (getattr(proc, "_attention_backend", None) is None and getattr(proc, "_parallel_config", None) is None
                  and _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE)
        q4, k4, v4 = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # what the native backend hands SDPA
        if native:
            out, lse = attention_with_lse(q4, k4, v4)
            out = out.permute(0, 2, 1, 3)
        else:
            out, lse = dispatch_attention_fn(query, key, value, attn_mask=None, backend=proc._attention_backend,
                                             parallel_config=proc._parallel_config), None
        self._record(q4[:, :, n_text:], k4[:, :, :n_text], None if lse is None else lse[:, :, n_text:], k4)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_hidden_states, hidden_states = out.split_with_sizes(
            [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


# ------------------------------------------------------------------------------- words
def joint_prompt_tokens(handle: Any, prompt: str) -> tuple[Any, int]:
    """The word layout of ``prompt`` in the family's :data:`TEXT_STREAM`, and the stream's
    offset in the joint text sequence.

    Returns ``(PromptTokens, offset)``: positions in the PromptTokens are relative to the
    stream's first position (SD3's CLIP block: 0 = ``<|startoftext|>``; T5: 0 = first word
    token, no start token). A word missing from any tokenisation, or a prompt past T5's
    limit, is a UserError (:func:`diffatlas.models.text_tokens.word_tokens`,
    ``ModelHandle._check_t5_length``).
    """
    from diffatlas.daam.words import PromptTokens, Word
    from diffatlas.models.text_tokens import _positions, tokenisations, word_tokens

    handle._check_t5_length([prompt])
    per_word = word_tokens(handle, prompt)
    names = _STREAM_TOKENISATIONS[TEXT_STREAM[handle.family]]
    tks = [tk for tk in tokenisations(handle) if tk.name in names]
    tk = tks[0]
    first = 1 if tk.has_start else 0
    kept = _positions(tk, prompt)
    # CLIP-L and CLIP-G share positions: a position carries both encoders' token, so a word
    # owns every position either tokenisation puts it at.
    words = [
        Word(w.word, w.index, w.start, w.end,
             tuple(sorted({p - tk.offset for t in tks for p in w.positions[t.name]})), False)
        for w in per_word
    ]
    ids = tk.tokenizer(prompt, add_special_tokens=False).input_ids
    token_names = tk.tokenizer.convert_ids_to_tokens(ids[: len(kept)])
    tokens = (["<start>"] if tk.has_start else []) + list(token_names) + ["<end>"]
    out = PromptTokens(prompt, words, tokens, first + len(kept), tk.window, len(ids), [], start_token=tk.has_start)
    return out, tk.offset


def describe_joint(handle: Any, tracer: Any, raw: Any) -> dict[str, Any]:
    """What a joint-attention trace recorded, for ``info.json`` (merged into the run's info)."""
    stream = TEXT_STREAM[handle.family]
    offset = next(tk.offset for tk in _tokenisations(handle) if tk.name in _STREAM_TOKENISATIONS[stream])
    return {
        "timesteps": [float(t) for t in raw.timesteps],
        "sigmas": [float(t) / TIMESTEP_SCALE for t in raw.timesteps],
        "aggregation": "sum over heads, joint blocks and steps of the image-query -> text-key probabilities of the "
                       "joint softmax (over text + image keys, not renormalised over text keys) on the image-token "
                       "grid; bicubic upsampling; clamp >= 0",
        "joint_attention": {
            "family": handle.family,
            "blocks": list(raw.layers),
            "layer_globs": list(tracer.layers),
            "text_stream": stream,
            "text_tokenisations": list(_STREAM_TOKENISATIONS[stream]),
            "stream_offset": int(offset),
            "text_length": int(tracer.accumulator.text_len),
            "token_grid": list(raw.latent_hw),
            "guidance_embedded": bool(getattr(handle.denoiser.config, "guidance_embeds", False)),
        },
    }


def _tokenisations(handle: Any) -> list[Any]:
    from diffatlas.models.text_tokens import tokenisations

    return tokenisations(handle)
