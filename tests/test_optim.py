"""The shared Adam/AdamW (diffatlas.optim) against torch.optim, including skipped gradients."""

from __future__ import annotations

import pytest
import torch

from diffatlas.optim import Adam

FUSED = [False, True] if hasattr(torch, "_fused_adam_") else [False]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_torch_with_a_parameter_that_skips_steps(fused, wd):
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    ours = [torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())]
    ref = [torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())]
    opt = Adam(ours, lr=0.05, weight_decay=wd, fused=fused)
    cls = torch.optim.AdamW if wd else torch.optim.Adam
    opt_ref = cls(ref, lr=0.05, weight_decay=wd, foreach=False)
    for step in range(6):
        grads = [torch.randn(5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
        for params in (ours, ref):
            params[0].grad = grads[0].clone()
            params[1].grad = grads[1].clone() if step % 3 != 1 else None  # b skips steps 1 and 4
        opt.step()
        opt_ref.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert opt.steps == [6, 4]
