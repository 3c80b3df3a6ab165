"""Joint attention computed by hand (float64), the oracle of the DAAM tests on SD3 and Flux:
the image-query -> text-key columns of softmax(q kᵀ / sqrt(d)) over ALL keys, from each
attention module's own inputs (captured with :func:`capture_attention_inputs`)."""

from __future__ import annotations

import copy
import math

import torch


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, n*d] -> [B, n, S, d]"""
    return x.reshape(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def _norm(module, x):
    return x if module is None else module(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive channel pair (x[2k], x[2k+1]) by its angle θ_k, written as the
    complex product (x[2k] + i x[2k+1]) e^{iθ_k}; cos/sin [S, d] hold each θ_k twice."""
    theta = torch.atan2(sin[:, 0::2], cos[:, 0::2]).double()
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(theta), theta)).flatten(-2)


def _softmax_text_columns(q_img: torch.Tensor, k_all: torch.Tensor, text: slice) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) over ALL keys, its text columns, summed over heads: [B, N, T]."""
    p = torch.softmax(q_img @ k_all.transpose(-1, -2) / math.sqrt(q_img.shape[-1]), dim=-1)
    return p[..., text].sum(1)


def hand_maps(family: str, calls: dict[str, dict], text_len: int) -> torch.Tensor:
    """Sum over the traced attention modules of the image→text joint-softmax columns."""
    total = 0
    for name, kw in calls.items():
        m = copy.deepcopy(kw["module"]).double()
        x = kw["hidden_states"].double()
        n = m.heads
        if family == "sd3":  # sequence [image; text]
            e = kw["encoder_hidden_states"].double()
            q = _norm(m.norm_q, _heads(m.to_q(x), n))
            k = _norm(m.norm_k, _heads(m.to_k(x), n))
            ek = _norm(m.norm_added_k, _heads(m.add_k_proj(e), n))
            total = total + _softmax_text_columns(q, torch.cat([k, ek], 2), slice(x.shape[1], None))
            continue
        cos, sin = (t.double() for t in kw["image_rotary_emb"])
        if name.startswith("single_"):  # [text; image] in hidden_states
            q = _rope(m.norm_q(_heads(m.to_q(x), n)), cos, sin)
            k = _rope(m.norm_k(_heads(m.to_k(x), n)), cos, sin)
            total = total + _softmax_text_columns(q[:, :, text_len:], k, slice(0, text_len))
        else:  # double-stream: text from encoder_hidden_states, placed first
            e = kw["encoder_hidden_states"].double()
            q = torch.cat([m.norm_added_q(_heads(m.add_q_proj(e), n)), m.norm_q(_heads(m.to_q(x), n))], 2)
            k = torch.cat([m.norm_added_k(_heads(m.add_k_proj(e), n)), m.norm_k(_heads(m.to_k(x), n))], 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            total = total + _softmax_text_columns(q[:, :, text_len:], k, slice(0, text_len))
    return total


def capture_attention_inputs(denoiser, names):
    """Forward pre-hooks that keep each attention module's inputs (of its last call)."""
    calls, handles = {}, []
    modules = dict(denoiser.named_modules())
    for name in names:
        def hook(mod, args, kwargs, name=name):
            kw = dict(kwargs)
            if args:
                kw["hidden_states"] = args[0]
            calls[name] = {"module": mod, **kw}
        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles
