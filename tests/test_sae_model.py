"""TopK SAE maths against brute-force references on tiny problems, and dictionary recovery."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffatlas.errors import UserError
from diffatlas.sae.config import SAEArch, SAEConfig
from diffatlas.sae.model import TopKSAE, geometric_median
from diffatlas.sae.train import Adam, init_sae, split_samples, train_sae, warmup_lr

torch.set_num_threads(1)


def _random_sae(d=5, n=7, k=2, k_aux=3, seed=0) -> TopKSAE:
    sae = TopKSAE(SAEArch(d_in=d, n_latents=n, k=k, k_aux=k_aux), seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=g, dtype=torch.float64))
        sae.b_enc.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.3)
        sae.b_pre.copy_(torch.randn(d, generator=g, dtype=torch.float64))
    return sae


def _brute_forward(sae: TopKSAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loops over samples and latents: pre, z = ReLU(TopK(pre)), x_hat = W_dec z + b_pre."""
    W_enc = sae.W_enc.detach().numpy()
    b_enc = sae.b_enc.detach().numpy()
    W_dec = sae.W_dec.detach().numpy()  # [n, d], row j = atom j
    b_pre = sae.b_pre.detach().numpy()
    n, d = W_enc.shape
    B = x.shape[0]
    pre = np.zeros((B, n))
    z = np.zeros((B, n))
    x_hat = np.zeros((B, d))
    for b in range(B):
        for j in range(n):
            pre[b, j] = sum(W_enc[j, i] * (x[b, i] - b_pre[i]) for i in range(d)) + b_enc[j]
        top = sorted(range(n), key=lambda j: -pre[b, j])[: sae.k]
        for j in top:
            z[b, j] = max(pre[b, j], 0.0)
        for i in range(d):
            x_hat[b, i] = sum(W_dec[j, i] * z[b, j] for j in range(n)) + b_pre[i]
    return pre, z, x_hat


def test_forward_matches_brute_force():
    sae = _random_sae()
    with torch.no_grad():
        sae.b_enc.sub_(2.0)  # push some of the top k below zero, so the ReLU after TopK matters
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pre, z, x_hat = _brute_forward(sae, x.numpy())
    out = sae(x)
    np.testing.assert_allclose(out.pre.detach().numpy(), pre, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.x_hat.detach().numpy(), x_hat, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sae.codes(x).numpy(), z, rtol=1e-12, atol=1e-12)
    # at most k non-zeros per row, all non-negative
    assert ((sae.codes(x) > 0).sum(1) <= sae.k).all()
    # some pre-activations in the top k are negative here, so ReLU matters: the test sees it
    assert (np.sort(pre, axis=1)[:, -sae.k] < 0).any()
    assert (z == 0).sum() > x.shape[0] * (sae.arch.n_latents - sae.k)


def _brute_aux(sae: TopKSAE, x: np.ndarray, dead: np.ndarray, coef: float) -> tuple[float, float, float]:
    pre, _, x_hat = _brute_forward(sae, x)
    W_dec = sae.W_dec.detach().numpy()
    mse = float(np.mean((x_hat - x) ** 2))
    e = x - x_hat
    dead_ids = [j for j in range(len(dead)) if dead[j]]
    ka = min(sae.arch.k_aux, len(dead_ids))
    e_hat = np.zeros_like(e)
    for b in range(x.shape[0]):
        top = sorted(dead_ids, key=lambda j: -pre[b, j])[:ka]
        for j in top:
            e_hat[b] += max(pre[b, j], 0.0) * W_dec[j]
    aux = float(((e_hat - e) ** 2).sum() / (e**2).sum()) if dead_ids else 0.0
    return mse + coef * aux, mse, aux


@pytest.mark.parametrize("dead_ids", [[], [0, 3], [1, 2, 4, 5, 6]])
def test_auxk_loss_matches_brute_force(dead_ids):
    sae = _random_sae(n=7, k=2, k_aux=3)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dead = torch.zeros(7, dtype=torch.bool)
    dead[dead_ids] = True
    loss, parts = sae.loss(x, dead, aux_coef=1 / 32)
    ref_loss, ref_mse, ref_aux = _brute_aux(sae, x.numpy(), dead.numpy(), 1 / 32)
    assert float(parts["mse"]) == pytest.approx(ref_mse, rel=1e-12)
    assert float(parts["aux"]) == pytest.approx(ref_aux, rel=1e-12, abs=1e-15)
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-12)
    assert parts["n_dead"] == len(dead_ids)
    if len(dead_ids) >= 2:
        assert ref_aux > 0


def test_auxk_gradient_reaches_only_dead_latents():
    sae = _random_sae(n=7, k=2, k_aux=2)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dead = torch.tensor([False, True, False, True, True, False, False])
    _, parts = sae.loss(x, dead, aux_coef=1.0)
    # aux alone: differentiate (loss − mse) = aux
    sae.zero_grad()
    loss, parts = sae.loss(x, dead, aux_coef=1.0)
    (loss - parts["out"].x_hat.sub(x).pow(2).mean()).backward()
    row_grad = sae.W_enc.grad.abs().sum(1)
    assert (row_grad[~dead] == 0).all()
    assert (row_grad[dead] > 0).any()
    dec_grad = sae.W_dec.grad.abs().sum(1)
    assert (dec_grad[~dead] == 0).all()


def test_decoder_normalisation_and_gradient_projection():
    sae = _random_sae(d=4, n=6)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(6, 4, generator=g, dtype=torch.float64) * 3)
    directions = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    sae.normalize_decoder_()
    W = sae.W_dec.detach().numpy()
    for j in range(6):
        assert math.sqrt(sum(W[j, i] ** 2 for i in range(4))) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(W, directions.numpy(), atol=1e-12)

    grad = torch.randn(6, 4, generator=g, dtype=torch.float64)
    sae.W_dec.grad = grad.clone()
    sae.project_decoder_grad_()
    G = sae.W_dec.grad.numpy()
    for j in range(6):
        dot = sum(grad[j, i].item() * W[j, i] for i in range(4))
        expected = [grad[j, i].item() - dot * W[j, i] for i in range(4)]
        np.testing.assert_allclose(G[j], expected, atol=1e-12)
        assert abs(sum(G[j, i] * W[j, i] for i in range(4))) < 1e-12


def test_geometric_median_against_references():
    # 1-D: the geometric median is the median
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])
    assert float(geometric_median(x)[0]) == pytest.approx(2.0, abs=1e-4)
    # symmetric cross: the centre, whatever the arm lengths
    x = torch.tensor([[5.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -2.0]])
    np.testing.assert_allclose(geometric_median(x).numpy(), [0.0, 0.0], atol=1e-4)
    # general points: compare with brute-force minimisation of the sum of distances
    from scipy.optimize import minimize

    pts = np.random.default_rng(0).standard_normal((40, 3)) * [1.0, 2.0, 0.5]
    pts[:3] += 50  # outliers the median resists
    obj = lambda y: np.linalg.norm(pts - y, axis=1).sum()  # noqa: E731
    ref = minimize(obj, pts.mean(0), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
    gm = geometric_median(torch.from_numpy(pts)).numpy()
    np.testing.assert_allclose(gm, ref, atol=1e-4)
    assert obj(gm) <= obj(ref) + 1e-7
    assert obj(gm) < obj(pts.mean(0)) - 1.0  # far from the mean, pulled by outliers


def test_init_encoder_is_decoder_transpose_and_b_pre_is_geometric_median():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1)) + 4.0
    cfg = SAEConfig(k=2, expansion=2, init_sample=200)
    sae = init_sae(x, cfg.arch(6), cfg)
    # encoder weight [n, d] == (decoder matrix [d, n])ᵀ, stored as rows = atoms
    np.testing.assert_array_equal(sae.W_enc.detach().numpy(), sae.W_dec.detach().numpy())
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=1).numpy(), np.ones(12), rtol=1e-6)
    assert (sae.b_enc == 0).all()
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(cfg.seed))[:200]
    np.testing.assert_allclose(sae.b_pre.detach().numpy(), geometric_median(x[rows]).float().numpy(), rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True] if hasattr(torch, "_fused_adam_") else [False])
def test_adam_and_warmup_match_the_formulas(fused):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = Adam([p], betas=(0.9, 0.999), eps=1e-8, fused=fused)
    m = v = np.zeros(2)
    ref = np.array([1.0, -2.0])
    for t, g in enumerate([np.array([0.5, -1.0]), np.array([0.1, 2.0]), np.array([-0.3, 0.0])], start=1):
        p.grad = torch.tensor(g)
        opt.step(lr=0.01)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-10)
    assert [warmup_lr(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(0, 0.3, 0) == 0.3


def _sparse_dictionary_data(d=16, m=24, k=2, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    vals = torch.rand(n, k, generator=g) + 0.5
    x = torch.zeros(n, m).scatter_(1, idx, vals) @ atoms
    return x * (d / x.pow(2).sum(1).mean()).sqrt(), atoms


def test_sae_recovers_a_known_sparse_dictionary():
    x, atoms = _sparse_dictionary_data()
    cfg = SAEConfig(k=2, expansion=2, steps=300, batch_size=128, lr=1e-2, warmup=10, dead_steps=20, eval_every=10)
    sae, fitted = train_sae(x, cfg.arch(16), cfg)
    history = fitted.curve
    cos = (atoms @ sae.W_dec.detach().T).abs().max(dim=1).values
    assert float(cos.mean()) >= 0.9, cos
    # and a random dictionary of the same size does not (the bar is meaningful)
    rand = torch.randn(32, 16, generator=torch.Generator().manual_seed(9))
    rand /= rand.norm(dim=1, keepdim=True)
    assert float((atoms @ rand.T).abs().max(dim=1).values.mean()) < 0.8
    assert history[-1]["train_mse"] < 0.1 * history[0]["train_mse"]
    assert not fitted.converged and fitted.steps == 300  # no validation data: the cap decides


def test_save_and_load_round_trip(tmp_path):
    sae = _random_sae().float()
    sae.save(tmp_path, {"input_scale": 0.5, "layer": "mid", "timestep": 50})
    loaded, cfg = TopKSAE.load(tmp_path)
    x = torch.randn(4, 5)
    np.testing.assert_array_equal(loaded(x).x_hat.detach().numpy(), sae(x).x_hat.detach().numpy())
    assert cfg["input_scale"] == 0.5 and cfg["k"] == 2 and cfg["n_latents"] == 7
    assert json.loads((tmp_path / "cfg.json").read_text())["layer"] == "mid"
    with pytest.raises(UserError, match="sae.safetensors"):
        TopKSAE.load(tmp_path / "nowhere")


def test_split_is_by_sample_and_seeded():
    a = split_samples(100, 0.2, seed=3)
    assert a.sum() == 20
    np.testing.assert_array_equal(a, split_samples(100, 0.2, seed=3))
    assert not np.array_equal(a, split_samples(100, 0.2, seed=4))
    assert split_samples(2, 0.9, 0).sum() == 1  # always one sample on each side
    with pytest.raises(UserError, match="at least 2 samples"):
        split_samples(1, 0.2, 0)


@pytest.mark.parametrize(
    ("kwargs", "d", "pattern"),
    [
        ({"k": 0}, 8, r"sae.k = 0"),
        ({"k": 32, "expansion": 4}, 8, r"sae.k = 32 .*n_latents = 32"),
        ({"k": 40, "expansion": 4}, 8, r"sae.k = 40"),
        ({"aux_k": 100, "k": 2}, 8, r"sae.aux_k = 100"),
        ({"samples": "patches"}, 8, r"sae.samples = 'patches'"),
        ({"val_fraction": 1.0}, 8, r"sae.val_fraction = 1.0"),
        ({"lr": 0}, 8, r"sae.lr = 0"),
    ],
)
def test_bad_config_values_are_named(kwargs, d, pattern):
    with pytest.raises(UserError, match=pattern):
        SAEConfig(**kwargs).arch(d)


def test_unknown_config_key_is_named():
    with pytest.raises(UserError, match="unknown config key.*in sae: kk"):
        SAEConfig.from_dict({"kk": 3})
    assert SAEConfig.from_dict({"k": 3}).k == 3


def test_real_channel_counts_build():
    for d in (640, 1280):
        arch = SAEConfig(k=32, expansion=4).arch(d)
        assert (arch.n_latents, arch.k_aux) == (4 * d, d // 2)
        sae = TopKSAE(arch)
        out = sae(torch.randn(3, d))
        assert out.x_hat.shape == (3, d) and out.idx.shape == (3, 32)
        assert int(out.idx.max()) < 4 * d
        assert all(len(set(row.tolist())) == 32 for row in out.idx)  # k distinct latents per sample
