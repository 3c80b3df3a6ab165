"""SAE latent ↔ DAAM word: do a latent and the word of its label point at the same object?

On the images DAAM traced in real-image mode (dataset samples with captions and true object
masks), for every *labelled* latent of an SAE run and every image whose caption names its
label:

* the latent's activation map on that image: the run's SAE applied to each position of the
  stored spatial map of the image (:func:`diffatlas.sae.spatial.latent_maps`, the same
  encoding as ``sae-spatial``), ``[h, w]``;
* upsampled to the image size bicubically and clamped at zero, as DAAM upsamples each
  resolution of its maps (:mod:`diffatlas.daam.trace`), then thresholded exactly as a DAAM
  map is (:func:`diffatlas.daam.words.threshold_mask`: min-max scaled, ``> tau``, with the
  DAAM run's own ``tau``);
* three IoUs (:func:`diffatlas.daam.measures.iou`): latent mask vs the word's DAAM mask
  (``iou_sae_daam``), latent mask vs the true mask of the object the word names
  (``iou_sae_true``), DAAM mask vs that true mask (``iou_daam_true``, DAAM's own score).

The DAAM maps are read from the DAAM run as stored (float16), so ``iou_daam_true`` can differ
from the DAAM stage's own table (scored on the float32 maps) where a pixel sits at the threshold.

A latent that does not fire on an image has an all-zero map, hence an empty mask and IoU 0:
it is kept (``active`` = False), not dropped, so a latent that ignores its own word's object
scores low instead of vanishing.

A latent is *labelled* with a word when, among the run's ranked latents (``rank`` in
``[0, top_latents)``, the summary's set), its majority value of the word's attribute
(``majority_colour``, ``majority_shape``, ``majority_size``) is the word and its purity for
that attribute (``purity_colour``, ...) is at least ``links.min_purity``; the
``links.latents_per_word`` purest (then best-ranked) latents per word are kept.

Outputs: one row per (run, latent, image) (Parquet) and one per (layer, timestep, latent,
word) with the mean of each IoU and its 95% bootstrap interval over images (CSV).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from diffatlas.daam.measures import iou
from diffatlas.daam.words import threshold_mask
from diffatlas.errors import UserError
from diffatlas.intervals import bootstrap_mean
from diffatlas.links.config import LinksConfig

log = logging.getLogger(__name__)

#: Roles of caption words (the dataset's parse) -> the SAE attribute that labels them.
ROLE_ATTRIBUTE = {"colour": "colour", "shape": "shape", "size": "size"}
IOUS = ("iou_sae_daam", "iou_sae_true", "iou_daam_true")


def upsample(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[..., h, w] -> float32 [..., H, W]: bicubic, then clamped at zero (as DAAM's maps)."""
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, *x.shape[-2:])
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, size=tuple(hw), mode="bicubic", align_corners=False)
    return x.clamp(min=0).reshape(*lead, *hw).numpy()


def latent_mask(latent_map: np.ndarray, hw: tuple[int, int], tau: float) -> np.ndarray:
    """The binary mask of a latent's [h, w] activation map at image size [H, W], thresholded as DAAM's."""
    return threshold_mask(upsample(latent_map, hw), tau)


def labelled_latents(latents: pd.DataFrame, words: Sequence[tuple[str, str]], top_latents: int,
                     min_purity: float = LinksConfig.min_purity, per_word: int = LinksConfig.latents_per_word) -> pd.DataFrame:
    """Latents labelled with each ``(word, attribute)``: -> columns word, attribute, latent, purity, rank.

    ``latents``: a run's ``latents.parquet``; only ranked latents (``0 <= rank < top_latents``) count.
    """
    ranked = latents[(latents["rank"] >= 0) & (latents["rank"] < top_latents)]
    rows = []
    for word, attr in words:
        maj, pur = f"majority_{attr}", f"purity_{attr}"
        if maj not in ranked.columns or pur not in ranked.columns:
            raise UserError(f"latents.parquet has no {maj}/{pur} columns: re-run train-sae with a store that holds the "
                            f"dataset's attribute {attr!r} (ShapesWorld stores colour, shape, size, position)")
        sel = ranked[(ranked[maj].astype(str).str.lower() == word.lower()) & (ranked[pur] >= min_purity)]
        sel = sel.sort_values([pur, "rank"], ascending=[False, True]).head(per_word)
        rows += [{"word": word, "attribute": attr, "latent": int(r["latent"]), "purity": float(r[pur]), "rank": int(r["rank"])}
                 for _, r in sel.iterrows()]
    return pd.DataFrame(rows, columns=["word", "attribute", "latent", "purity", "rank"])


def caption_targets(meta: pd.DataFrame, sample_id: int) -> list[dict[str, Any]]:
    """The object-naming words of a sample's caption (dataset parse): word_index, word, attribute, object."""
    row = meta.loc[meta["sample_id"] == sample_id]
    if row.empty:
        raise UserError(f"sample {sample_id} of the DAAM run is not in the dataset")
    words = json.loads(row["words"].iloc[0])
    return [
        {"word_index": j, "word": str(w["word"]).lower(), "attribute": ROLE_ATTRIBUTE[w.get("role")], "object": int(w["object"])}
        for j, w in enumerate(words)
        if w.get("role") in ROLE_ATTRIBUTE and int(w.get("object", -1)) >= 0
    ]


def score_image(latent_map: np.ndarray, daam_map: np.ndarray, truth: np.ndarray, tau: float) -> dict[str, float]:
    """The three IoUs of one (latent, word, image): maps [h, w] and [H, W], truth bool [H, W]."""
    hw = tuple(truth.shape)
    sae = latent_mask(latent_map, hw, tau)
    daam = threshold_mask(daam_map, tau)
    return {"iou_sae_daam": iou(sae, daam), "iou_sae_true": iou(sae, truth), "iou_daam_true": iou(daam, truth),
            "active": bool(np.asarray(latent_map).max() > 0), "sae_area": float(sae.mean()), "daam_area": float(daam.mean())}


def summarise(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per (layer, timestep, latent, word): n images, share active, each IoU's mean and 95% bootstrap interval."""
    keys = ["layer", "timestep", "latent", "word", "attribute"]
    cols = keys + ["purity", "rank", "n", "active"] + [f"{m}{s}" for m in IOUS for s in ("", "_low", "_high")]
    out = []
    for key, g in rows.groupby(keys, sort=True):
        rec = dict(zip(keys, key))
        rec.update(purity=float(g["purity"].iloc[0]), rank=int(g["rank"].iloc[0]), n=len(g), active=float(g["active"].mean()))
        for m in IOUS:
            lo, hi = bootstrap_mean(g[m].to_numpy(), seed=seed)
            rec.update({m: float(g[m].mean()), f"{m}_low": lo, f"{m}_high": hi})
        out.append(rec)
    return pd.DataFrame(out, columns=cols)


def pooled(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per (layer, timestep, attribute): every labelled latent on every image, pooled.

    An image enters once per labelled latent (and DAAM's own IoU is the same for each), so the
    pairs are not independent: each IoU is averaged per image first, and the mean over images
    comes with a 95% bootstrap interval over images. ``n``: (latent, image) pairs; ``n_images``.
    """
    out = []
    for (layer, t, attr), g in rows.groupby(["layer", "timestep", "attribute"], sort=True):
        per_image = g.groupby("sample_id")[list(IOUS)].mean()
        rec = {"layer": layer, "timestep": int(t), "attribute": attr, "n": len(g), "n_images": len(per_image),
               "latents": int(g["latent"].nunique())}
        for m in IOUS:
            lo, hi = bootstrap_mean(per_image[m].to_numpy(), seed=seed)
            rec.update({m: float(per_image[m].mean()), f"{m}_low": lo, f"{m}_high": hi})
        out.append(rec)
    return pd.DataFrame(out)


def link_run(run_dir: str | os.PathLike, store_path: str | os.PathLike | None, daam_run: Any, meta: pd.DataFrame,
             masks: np.ndarray, tau: float, device: torch.device | str = "cpu", links: LinksConfig | None = None) -> pd.DataFrame:
    """Rows (one per labelled latent × DAAM image naming its word) of one SAE run.

    ``daam_run``: a loaded :class:`~diffatlas.daam.words.TracedRun` of real images;
    ``meta``/``masks``: the dataset's table and bool masks [N, K, H, W], rows by sample id.
    """
    from diffatlas.activations.store import ActivationStore
    from diffatlas.sae.model import TopKSAE
    from diffatlas.sae.spatial import latent_maps

    run_dir = Path(run_dir)
    sae, cfg = TopKSAE.load(run_dir, device=device)
    sae.eval()
    layer, timestep = cfg["layer"], int(cfg["timestep"])
    store = ActivationStore(store_path or cfg["store"])
    if not store.has_spatial(layer):
        raise UserError(f"layer {layer!r} in {store.path} has no spatial maps; the SAE-DAAM link needs extract.spatial: true for it")
    latents_path = run_dir / "latents.parquet"
    if not latents_path.exists():
        raise UserError(f"no {latents_path}; run train-sae first")
    latents = pd.read_parquet(latents_path)
    top_latents = int(cfg.get("sae_config", {}).get("top_latents", 100))
    ids = [int(it["sample_id"]) for it in daam_run.items]
    targets = {sid: caption_targets(meta, sid) for sid in ids}
    words = sorted({(t["word"], t["attribute"]) for ts in targets.values() for t in ts})
    links = links or LinksConfig()
    labelled = labelled_latents(latents, words, top_latents, links.min_purity, links.latents_per_word)
    if labelled.empty:
        log.warning("%s: no ranked latent is labelled with a caption word (purity >= %.2f)", run_dir, links.min_purity)
        return pd.DataFrame()
    # Every labelled latent encoded on every DAAM image (the spatial module's encoding).
    lat = labelled.drop_duplicates("latent")
    top = pd.DataFrame({"latent": lat["latent"].to_numpy(), "top_sample_ids": [ids] * len(lat)})
    maps, lat_ids, map_ids = latent_maps(sae, store, layer, timestep, top, len(ids), float(cfg["input_scale"]), device=device)
    at = {int(l): i for i, l in enumerate(lat_ids)}
    row_of = {int(s): r for r, s in enumerate(meta["sample_id"])}
    rows = []
    for k, sid in enumerate(ids):
        for t in targets[sid]:
            if not daam_run.maps[k].words[t["word_index"]].positions:
                continue  # cut off by the text window: DAAM has no map of it
            daam_map = daam_run.maps[k].word_map(t["word_index"])
            truth = np.asarray(masks[row_of[sid], t["object"]], dtype=bool)
            for lab in labelled[labelled["word"] == t["word"]].itertuples():
                i = at[int(lab.latent)]
                assert map_ids[i, k] == sid
                rows.append({"layer": layer, "timestep": timestep, "latent": int(lab.latent), "word": t["word"],
                             "attribute": t["attribute"], "purity": lab.purity, "rank": lab.rank, "sample_id": sid,
                             "object": t["object"], "tau": float(tau), **score_image(maps[i, k], daam_map, truth, tau)})
    log.info("%s: %d labelled latents, %d (latent, image) pairs", run_dir, len(lat), len(rows))
    return pd.DataFrame(rows)


def run(sae_runs: Sequence[str | os.PathLike], stores: Sequence[str | os.PathLike | None], daam_dir: str | os.PathLike,
        dataset_dir: str | os.PathLike, out_rows: str | os.PathLike, out_summary: str | os.PathLike,
        device: torch.device | str = "cpu", record: str | os.PathLike | None = None,
        cfg: LinksConfig | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Link every SAE run to the DAAM real-image run ``daam_dir``; write the rows and the summary
    (and, with ``record``, a JSON of the provenance and settings). ``cfg``: the links section.

    ``stores``: the activation store of each run (None: the one its cfg.json records).
    """
    from diffatlas.daam.words import TracedRun
    from diffatlas.data.dataset import load_dataset
    from diffatlas.io import atomic_file, read_json

    if len(stores) != len(sae_runs):
        raise UserError(f"{len(sae_runs)} SAE runs but {len(stores)} stores: give one store per run (or none)")
    daam_dir = Path(daam_dir)
    ev = daam_dir / "eval.json"
    if not ev.exists():
        raise UserError(f"{daam_dir} is not a scored DAAM real-image run (no eval.json); run daam-real first")
    evaluation = read_json(ev)
    if evaluation.get("mode") != "real":
        raise UserError(f"{daam_dir} is a DAAM {evaluation.get('mode')!r} run; the SAE link needs a real-image run (daam-real)")
    tau = float(evaluation["tau"])
    daam_run = TracedRun.load(daam_dir / "run")
    ds = load_dataset(dataset_dir)
    if ds.masks is None or "words" not in ds.meta.columns:
        raise UserError(f"dataset {dataset_dir} has no object masks or caption parse ('words'); the link needs ShapesWorld-like data")
    cfg = cfg or LinksConfig()
    frames = [link_run(r, s, daam_run, ds.meta, ds.masks, tau, device, cfg) for r, s in zip(sae_runs, stores)]
    cols = ["layer", "timestep", "latent", "word", "attribute", "purity", "rank", "sample_id", "object", "tau",
            *IOUS, "active", "sae_area", "daam_area"]
    rows = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else pd.DataFrame(columns=cols)
    summary = summarise(rows, seed=cfg.seed)
    with atomic_file(out_rows) as tmp:
        rows.to_parquet(tmp, index=False)
    with atomic_file(out_summary) as tmp:
        summary.to_csv(tmp, index=False)
    if record is not None:
        from diffatlas.io import write_json

        write_json(record, {
            "daam": str(daam_dir), "daam_model": daam_run.info.get("model"), "daam_mode": daam_run.info.get("mode"),
            "daam_t_start": daam_run.info.get("t_start"), "daam_seed": daam_run.info.get("seed"), "tau": tau,
            "dataset": str(dataset_dir), "n_images": len(daam_run.items), "sae_runs": [str(r) for r in sae_runs],
            "stores": [None if s is None else str(s) for s in stores], "device": str(device), "dtype": "float32",
            "min_purity": cfg.min_purity, "latents_per_word": cfg.latents_per_word, "role_attribute": ROLE_ATTRIBUTE,
            "links_config": cfg.to_dict(),
            "upsampling": "bicubic, clamp >= 0 (as DAAM's maps); threshold: min-max scaled > tau",
            "sae_encoding": "the run's SAE on each position of the stored spatial maps (sae.spatial.latent_maps); a "
                            "pooled-trained SAE reads positions less well (its per-position FVE: sae-spatial's spatial.json)",
            "n_rows": len(rows),
        })
    return rows, summary
