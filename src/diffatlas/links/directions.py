"""Pullback direction ↔ SAE latents: which latents move when an image is edited along v_i?

The geometry stage edits images along the semantic directions v_i of the pullback metric
(``edits.safetensors`` of each ``results/geometry/{model}/t{T}``: images
``[E, m, S, H, W, 3]``, sample × direction × strength, strength 0 the unedited result), and
the world's judge says which factor each direction changes (``meaning_summary.csv``,
column ``dominant`` per (timestep, mode, direction)). Here the edited images go through the
model once more with the extraction hooks, at an SAE run's layer and timestep and exactly as
its activation store was extracted (the store's recorded extraction settings, run by
:mod:`diffatlas.activations.extract`'s own loop; the noise is seeded per edit sample, so all
strengths of one sample share it and only the edit differs), and the run's SAE encodes the
pooled vectors (× the run's input scale). Then, per direction,

* ``change_j`` = mean over samples and nonzero strengths of ``|z_j(edit) − z_j(strength 0)|``
  (post-TopK codes), and the ``links.top_changed`` latents with the largest change, under two
  measures (:data:`MEASURES`): ``raw`` (the change itself) and ``relative`` (divided by the
  latent's mean activation when active on the dataset, ``mean_act`` of latents.parquet). Raw
  change favours latents with a large activation scale whatever the direction (on the demo the
  same few latents top every direction of a timestep); the relative change asks by how many of
  its typical activations a latent moved. Latents that never fire on the dataset have no scale
  and are left out of the relative ranking. Both are reported, side by side;
* a latent's *attribute* is the dataset attribute its top images agree on most beyond chance:
  ``argmax_a purity_a − chance_purity_a`` (``latents.parquet`` and ``metrics.json``) among
  the ranked latents with a positive margin; others are ``unlabelled``;
* the direction *agrees* when the attribute of its most-changed latent is the judge's factor.

Directions whose factor no attribute can express (``count``, ``none``: nothing changed) are
listed but not scored. The agreement rate over the scored (geometry timestep, direction)
pairs comes with a 95% interval (Wilson per SAE run; pooled over runs, a bootstrap over
directions, since every run sees the same directions), beside its *chance*: the mean, over the same
directions, of the share of latents active on the edits whose attribute is the factor — what
picking a latent at random would score.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from diffatlas.errors import UserError
from diffatlas.intervals import bootstrap_mean, wilson
from diffatlas.links.config import LinksConfig

log = logging.getLogger(__name__)

#: Judge factors (diffatlas.geometry.meaning.FACTORS) that an SAE attribute can express.
FACTOR_ATTRIBUTE = {"colour": "colour", "shape": "shape", "size": "size", "position": "position"}
UNLABELLED = "unlabelled"
MEASURES = ("raw", "relative")


def latent_change(codes: np.ndarray, strengths: Sequence[float]) -> np.ndarray:
    """codes [E, m, S, n] (sample, direction, strength, latent) -> change [m, n].

    Mean over samples and nonzero strengths of |z(edit) − z(strength 0)|.
    """
    strengths = np.asarray(strengths, dtype=np.float64)
    zero = np.flatnonzero(strengths == 0)
    if len(zero) != 1:
        raise UserError(f"edit strengths must contain 0 exactly once, got {strengths.tolist()}")
    ref = codes[:, :, zero[0] : zero[0] + 1]
    moved = np.flatnonzero(strengths != 0)
    return np.abs(codes[:, :, moved] - ref).mean(axis=(0, 2))


def relative_change(change: np.ndarray, mean_act: np.ndarray) -> np.ndarray:
    """change [m, n] / mean activation when active [n]; 0 for latents with no scale (never active)."""
    scale = np.asarray(mean_act, dtype=np.float64)
    ok = np.isfinite(scale) & (scale > 0)
    return np.where(ok[None, :], change / np.where(ok, scale, 1.0)[None, :], 0.0)


def latent_attributes(latents: pd.DataFrame, chance: dict[str, float], top_latents: int) -> pd.Series:
    """Each latent's attribute: argmax_a purity_a − chance_a among ranked latents with a positive margin.

    ``chance``: attribute -> the purity of top_n random samples (metrics.json). -> Series by latent id.
    """
    attrs = [a for a in chance if f"purity_{a}" in latents.columns]
    if not attrs:
        raise UserError("latents.parquet has no per-attribute purity columns (purity_colour, ...); re-run train-sae "
                        "with a store that holds the dataset's attributes")
    margin = np.stack([latents[f"purity_{a}"].to_numpy(dtype=np.float64) - float(chance[a]) for a in attrs], axis=1)
    margin = np.nan_to_num(margin, nan=-np.inf)
    best = margin.argmax(axis=1)
    ranked = (latents["rank"].to_numpy() >= 0) & (latents["rank"].to_numpy() < top_latents)
    labels = np.where(ranked & (margin.max(axis=1) > 0), np.asarray(attrs, dtype=object)[best], UNLABELLED)
    return pd.Series(labels, index=latents["latent"].to_numpy(), name="attribute")


def score_directions(change: np.ndarray, active: np.ndarray, attribute: pd.Series, factors: Sequence[str],
                     top: int = LinksConfig.top_changed) -> pd.DataFrame:
    """One row per direction: its factor, top latents, their attributes, agreement.

    change [m, n]; active bool [n] (latents firing on any of the edits); attribute: by latent id;
    factors: the judge's dominant factor per direction.
    """
    labels = attribute.reindex(np.arange(change.shape[1])).fillna(UNLABELLED).to_numpy()
    rows = []
    for d, factor in enumerate(factors):
        order = np.argsort(-change[d], kind="stable")[:top]
        want = FACTOR_ATTRIBUTE.get(str(factor))
        top_attrs = [str(labels[j]) for j in order]
        cand = labels[active]
        rows.append({
            "direction": d,
            "factor": factor,
            "scored": want is not None,
            "top_latents": ",".join(str(int(j)) for j in order),
            "top_changes": ",".join(f"{change[d, j]:.4g}" for j in order),
            "top_attributes": ",".join(top_attrs),
            "agree": float(top_attrs[0] == want) if want is not None else np.nan,
            "agree_share_top": float(np.mean([a == want for a in top_attrs])) if want is not None else np.nan,
            "chance": float(np.mean(cand == want)) if want is not None and len(cand) else np.nan,
        })
    return pd.DataFrame(rows)


def agreement(table: pd.DataFrame, by: Sequence[str] = ("layer", "timestep"), seed: int = 0) -> pd.DataFrame:
    """Agreement rate and chance per group of ``by``, then pooled (every ``by`` = "all").

    Within a group (one SAE run) the scored directions are the units: a 95% Wilson interval.
    The pooled row sees every direction once per SAE run, so its rows are not independent: its
    interval is a percentile bootstrap over the directions ((geometry timestep, direction)
    clusters, each with all its runs), and ``n_directions`` counts them. ``not_scored``: the
    directions whose factor no attribute expresses.
    """
    groups = [(dict(zip(by, key if isinstance(key, tuple) else (key,))), g) for key, g in table.groupby(list(by), sort=True)]
    groups.append(({b: "all" for b in by}, table))
    rows = []
    for i, (key, g) in enumerate(groups):
        scored = g[g["scored"].astype(bool)]
        k, n = int(scored["agree"].sum()), len(scored)
        clusters = scored.groupby(["geo_timestep", "direction"])["agree"].mean() if n else pd.Series(dtype=float)
        if i < len(groups) - 1:
            (lo, hi), how = wilson(k, n), "wilson"
        else:
            (lo, hi), how = bootstrap_mean(clusters.to_numpy(), seed=seed), "bootstrap over directions"
        rows.append({**key, "k": k, "n": n, "n_directions": len(clusters), "agreement": k / n if n else np.nan,
                     "low": lo, "high": hi, "interval": how,
                     "chance": float(scored["chance"].mean()) if n else np.nan,
                     "agree_share_top": float(scored["agree_share_top"].mean()) if n else np.nan,
                     "not_scored": len(g) - n})
    return pd.DataFrame(rows)


def _extract_config(store: Any, timestep: int, layers: list[str]) -> Any:
    from diffatlas.activations.config import ExtractConfig

    recorded = dict(store.attrs.get("extract_config") or {})
    if not recorded:
        raise UserError(f"{store.path} records no extraction settings (extract_config); re-run extract")
    cfg = ExtractConfig.from_dict({**recorded, "timesteps": [int(timestep)], "layers": layers, "spatial": False,
                                   "spatial_layers": None})
    if cfg.conditioning != "empty":
        raise UserError(f"{store.path} was extracted with conditioning {cfg.conditioning!r}; edited images have no "
                        "label or caption, so the direction link needs extract.conditioning: empty")
    return cfg


@torch.no_grad()
def pooled_activations(handle: Any, images: np.ndarray, noise_ids: np.ndarray, cfg: Any) -> dict[str, np.ndarray]:
    """Pooled activations {layer: [N, C]} of uint8 images [N, H, W, 3] at ``cfg``'s one timestep.

    Extraction's own loop (:class:`diffatlas.activations.extract._Runner`), so noise, conditioning,
    pooling and dtype are those of the store; ``noise_ids`` [N] seed each image's noise (repeats allowed).
    """
    from diffatlas.activations.extract import _Runner, prompts_for
    from diffatlas.activations.layers import resolve_layers

    layers = resolve_layers(handle.denoiser, cfg.layers)
    prompts = prompts_for(cfg, [""] * len(images), [""] * len(images), str(getattr(handle, "family", "")))
    runner = _Runner(handle, cfg, layers, set(), prompts, np.asarray(noise_ids, dtype=np.int64), torch.device(handle.device), True)
    out: dict[str, list[np.ndarray]] = {lay.name: [] for lay in layers}
    with tempfile.TemporaryDirectory(prefix="links-") as scratch:
        for batch in runner.iterate(images, Path(scratch)):
            for name, cap in batch.results.items():
                out[name].append(cap.pooled.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def check_model(store: Any, model_name: str | None) -> None:
    """The SAE's activations must come from the model that is hooked now (by the names recorded)."""
    recorded = store.attrs.get("model_name")
    if model_name and recorded and str(recorded) != str(model_name):
        raise UserError(f"{store.path} holds activations of model {recorded!r}, but the edited images are encoded "
                        f"with model {model_name!r}: the SAE would read another model's layer")


def run(handle: Any, sae_runs: Sequence[str | os.PathLike], geometry_dirs: Sequence[str | os.PathLike],
        meaning_summary: str | os.PathLike, out_table: str | os.PathLike, out_agreement: str | os.PathLike,
        links: LinksConfig | None = None, device: torch.device | str = "cpu", model_name: str | None = None,
        record: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Link the edits of every geometry timestep directory to every SAE run; write both tables
    (and, with ``record``, a JSON of the provenance and settings).

    ``links``: the links section (edit mode, noise draws, latents per direction, bootstrap seed).
    """
    from diffatlas.activations.store import ActivationStore
    from diffatlas.geometry.artifacts import load_basis, load_edits
    from diffatlas.io import atomic_file, read_json
    from diffatlas.sae.model import TopKSAE

    links = links or LinksConfig()
    mode, noise_draws = links.edit_mode, links.noise_draws
    summary = pd.read_csv(meaning_summary)
    need = {"timestep", "mode", "direction", "dominant"}
    if not need <= set(summary.columns):
        raise UserError(f"{meaning_summary} lacks columns {sorted(need - set(summary.columns))}; run geometry-meaning first")
    # Every edited image once, flattened in (geometry timestep, sample, direction, strength) order.
    blocks, images, noise_ids, offset, n_samples = [], [], [], 0, 0
    for g in geometry_dirs:
        _, meta = load_basis(g)
        edits = load_edits(g)
        if mode not in edits:
            raise UserError(f"{g}/edits.safetensors has no {mode!r} edits; modes there: {sorted(k for k in edits if k != 'strengths')}")
        # each noise draw is one more copy of the samples (latent_change averages over samples)
        arr = np.concatenate([np.asarray(edits[mode])] * noise_draws)
        E, m, S = arr.shape[:3]
        t_geo = int(meta["timestep"])
        factors = summary[(summary["timestep"] == t_geo) & (summary["mode"] == mode)].set_index("direction")["dominant"]
        missing = [d for d in range(m) if d not in factors.index]
        if missing:
            raise UserError(f"{meaning_summary} has no {mode!r} row for timestep {t_geo}, directions {missing}")
        blocks.append({"geo_timestep": t_geo, "shape": (E, m, S), "start": offset,
                       "strengths": np.asarray(edits["strengths"]), "factors": [str(factors[d]) for d in range(m)]})
        images.append(arr.reshape(-1, *arr.shape[3:]))
        # one noise id per (geometry timestep, sample, draw): every strength and direction of it shares it
        noise_ids.append(np.repeat(np.arange(n_samples, n_samples + E), m * S))
        offset += E * m * S
        n_samples += E
    images_all, ids_all = np.concatenate(images), np.concatenate(noise_ids)

    runs = []
    for r in sae_runs:
        sae, cfg = TopKSAE.load(r, device=device)
        sae.eval()
        runs.append((Path(r), sae, cfg))
    rows = []
    extraction: dict[str, Any] = {}
    by_time: dict[int, list[Any]] = {}
    for item in runs:
        by_time.setdefault(int(item[2]["timestep"]), []).append(item)
    for t, items in sorted(by_time.items()):
        store = ActivationStore(items[0][2]["store"])
        check_model(store, model_name)
        layers = sorted({it[2]["layer"] for it in items})
        cfg_x = _extract_config(store, t, layers)
        extraction[str(t)] = {"store": str(store.path), "layers": layers,
                              **{k: store.attrs.get(k) for k in ("model_name", "model_id", "seed", "pooling", "prompt", "noise", "conditioning")}}
        acts = pooled_activations(handle, images_all, ids_all, cfg_x)
        for run_dir, sae, cfg in items:
            x = torch.from_numpy(acts[cfg["layer"]] * np.float32(cfg["input_scale"])).to(device)
            codes = sae.codes(x).cpu().numpy()
            latents = pd.read_parquet(run_dir / "latents.parquet")
            metrics = read_json(run_dir / "metrics.json")
            chance = {a: v["chance_purity"] for a, v in metrics.get("labels", {}).get("attributes", {}).items()}
            attribute = latent_attributes(latents, chance, int(cfg.get("sae_config", {}).get("top_latents", 100)))
            for b in blocks:
                E, m, S = b["shape"]
                z = codes[b["start"] : b["start"] + E * m * S].reshape(E, m, S, -1)
                change = latent_change(z, b["strengths"])
                active = (z > 0).any(axis=(0, 1, 2))
                scale = latents.set_index("latent")["mean_act"].reindex(np.arange(change.shape[1])).to_numpy()
                for measure, ch in (("raw", change), ("relative", relative_change(change, scale))):
                    df = score_directions(ch, active, attribute, b["factors"], top=links.top_changed)
                    df.insert(0, "geo_timestep", b["geo_timestep"])
                    df.insert(0, "timestep", t)
                    df.insert(0, "layer", cfg["layer"])
                    df.insert(0, "measure", measure)
                    df.insert(0, "mode", mode)
                    rows.append(df)
    table = pd.concat(rows, ignore_index=True)
    agree = pd.concat([agreement(g, seed=links.seed).assign(measure=m) for m, g in table.groupby("measure", sort=False)], ignore_index=True)
    agree = agree[["measure", *[c for c in agree.columns if c != "measure"]]]
    with atomic_file(out_table) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(out_agreement) as tmp:
        agree.to_csv(tmp, index=False)
    if record is not None:
        from diffatlas.io import write_json

        write_json(record, {
            "model": handle.describe() if hasattr(handle, "describe") else str(getattr(handle, "model_id", "")),
            "model_name": model_name, "device": str(device), "dtype": "float32 codes; extraction as the store's",
            "sae_runs": [str(r) for r in sae_runs], "geometry": [str(g) for g in geometry_dirs],
            "meaning_summary": str(meaning_summary), "edit_mode": mode, "measures": list(MEASURES),
            "top_changed": links.top_changed, "factor_attribute": FACTOR_ATTRIBUTE, "links_config": links.to_dict(),
            "noise": f"{noise_draws} seeded draw(s) per (geometry timestep, edit sample), each shared by its directions "
                     "and strengths; the change is averaged over draws",
            "extraction": extraction, "n_rows": len(table),
        })
    return table, agree
