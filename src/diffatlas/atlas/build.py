"""Build the static atlas: pages rendered from templates, one at a time, from results/ files.

Layout of the atlas folder (every link is relative, so it opens from the file system)::

    index.html                                  what exists, what is missing, links below
    atlas.css
    figures/...                                 copies of results/figures/**.png
    img/data/{dataset}/{sample_id}.png          image thumbnails (written once each)
    sae/{model}/{dataset}/grid.html             layer × timestep grid of every analysis
    sae/{model}/{dataset}/{layer}/t{t}/index.html         ranked latents of one SAE
    sae/{model}/{dataset}/{layer}/t{t}/latent{j}.html     one latent: images, maps, labels
    daam/{model}/{kind}_{name}.html             word maps, masks, IoU; per-role table
    geometry/{model}.html                       spectra, edit strips, global directions
    world.html                                  the world model's fidelity and samples

Each page is rendered with :meth:`jinja2.Template.stream` straight to its file, and the
latents of an SAE are handed to the templates as generators, so memory holds one page's rows.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from markupsafe import Markup, escape

from diffatlas.atlas import images, sources
from diffatlas.errors import UserError

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"


def fmt_num(value: Any, digits: int = 3) -> Markup:
    """A number as shown on a page, with its full value in ``data-value`` (what tests compare)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Markup('<span class="num na" data-value="nan">–</span>')
    v = float(value)
    shown = f"{v:.{digits}f}" if not float(v).is_integer() or digits == 0 else f"{v:.{digits}f}"
    return Markup(f'<span class="num" data-value="{escape(repr(v))}">{shown}</span>')


class Atlas:
    """One build of the atlas from ``results`` into ``out``."""

    def __init__(self, results: str | os.PathLike, out: str | os.PathLike, fidelity_record: str | os.PathLike | None = None,
                 max_latents: int | None = None) -> None:
        import jinja2

        self.results = Path(results)
        self.out = Path(out)
        self.fidelity_record = fidelity_record
        self.max_latents = max_latents
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["num"] = fmt_num
        self.missing: list[str] = []
        self.pages = 0
        self._thumbs: set[str] = set()
        self._datasets: dict[str, sources.DatasetImages] = {}

    # ------------------------------------------------------------------ helpers
    def page(self, template: str, rel: str, **ctx: Any) -> None:
        """Render ``template`` to ``out/rel``, streamed; ``root`` is the way back to the atlas root."""
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        root = "../" * (len(Path(rel).parts) - 1)
        self.env.get_template(template).stream(root=root, here=rel, **ctx).dump(str(path), encoding="utf-8")
        self.pages += 1

    def data(self, dataset: str) -> sources.DatasetImages:
        if dataset not in self._datasets:
            self._datasets[dataset] = sources.DatasetImages(self.results, dataset)
        return self._datasets[dataset]

    def thumb(self, dataset: str, sample_id: int) -> str | None:
        """Atlas-relative path of a dataset image's thumbnail (written on first use), or None."""
        rel = f"img/data/{dataset}/{int(sample_id)}.png"
        if rel not in self._thumbs:
            image = self.data(dataset).image(int(sample_id))
            if image is None:
                return None
            images.thumbnail(image, self.out / rel)
            self._thumbs.add(rel)
        return rel

    def figure(self, path: Path) -> str:
        """Copy a results figure into the atlas; its atlas-relative path."""
        rel = Path("figures") / path.relative_to(self.results / "figures")
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.out / rel)
        return rel.as_posix()

    def note_missing(self, what: str, path: Path, how: str) -> None:
        self.missing.append(f"{what}: {path} not found ({how})")

    # ------------------------------------------------------------------ sections
    def build(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEMPLATES / "atlas.css", self.out / "atlas.css")
        grids = list(self.sae_section())
        daam = list(self.daam_section())
        geometry = list(self.geometry_section())
        world = self.world_section()
        data_figs = [self.figure(p) for p in sources.figures(self.results, "data")]
        if not grids:
            self.note_missing("k-SAE and Diff-C", self.results / "sae", "run the sae and diffc stages")
        if not daam:
            self.note_missing("DAAM", self.results / "daam", "run the daam stage")
        if not geometry:
            self.note_missing("geometry", self.results / "geometry", "run the geometry stage")
        self.page("index.html", "index.html", grids=grids, daam=daam, geometry=geometry, world=world,
                  data_figures=data_figs, missing=self.missing, results=str(self.results))
        log.info("atlas: %d pages, %d thumbnails in %s", self.pages, len(self._thumbs), self.out)
        return self.out / "index.html"

    def sae_section(self) -> Iterator[dict[str, Any]]:
        for model, dataset in sources.sae_pairs(self.results):
            layers, times, cells = sources.grid_cells(self.results, model, dataset)
            rel = f"sae/{model}/{dataset}/grid.html"
            for (layer, t), cell in cells.items():
                if cell["sae"]:
                    cell["href"] = f"{layer}/t{t}/index.html"
                    self.sae_run_pages(model, dataset, layer, t)
            figs = [self.figure(p) for p in sources.figures(self.results, "diffc", model, dataset)]
            figs += [self.figure(p) for p in sources.figures(self.results, "sae", model, dataset) if "gallery" not in p.parts]
            self.page("grid.html", rel, model=model, dataset=dataset, layers=layers, times=times, cells=cells, figures=figs)
            yield {"model": model, "dataset": dataset, "href": rel}

    def sae_run_pages(self, model: str, dataset: str, layer: str, t: int) -> None:
        run = self.results / "sae" / model / dataset / layer / f"t{t}"
        base = f"sae/{model}/{dataset}/{layer}/t{t}"
        metrics = sources.read_json(run / "metrics.json") or {}
        spatial = sources.read_json(run / "spatial.json")
        n = self.max_latents or int(metrics.get("labels", {}).get("n_top_latents") or metrics.get("sae_config", {}).get("top_latents", 100))
        top = sources.ranked_latents(run, n)
        maps = sources.spatial_maps(run)
        if maps is None:
            self.note_missing(f"spatial maps of {model}/{dataset} {layer} t={t}", run / "spatial_maps.safetensors",
                              "run the sae_spatial rule")
        ctx = {"model": model, "dataset": dataset, "layer": layer, "timestep": t}

        def rows() -> Iterator[dict[str, Any]]:
            for r in top.to_dict("records"):
                yield {**r, "href": f"latent{int(r['latent'])}.html"}

        self.page("sae_run.html", f"{base}/index.html", metrics=metrics, spatial=spatial, latents=rows(), **ctx)
        for r in top.to_dict("records"):
            self.latent_page(base, r, maps.get(int(r["latent"])) if maps else None, ctx)

    def latent_page(self, base: str, row: dict[str, Any], latent_maps: tuple[np.ndarray, np.ndarray] | None,
                    ctx: dict[str, Any]) -> None:
        latent = int(row["latent"])
        dataset = ctx["dataset"]
        tiles = []
        labels = list(row["top_labels_fine"])
        values = list(row["top_values"])
        peak = float(np.max(latent_maps[0])) if latent_maps is not None and latent_maps[0].size else 0.0
        for j, sid in enumerate(row["top_sample_ids"]):
            tile = {"sample_id": int(sid), "label": labels[j] if j < len(labels) else "",
                    "value": values[j] if j < len(values) else None, "image": self.thumb(dataset, int(sid)), "overlay": None}
            if latent_maps is not None and j < len(latent_maps[1]) and int(latent_maps[1][j]) == int(sid) and tile["image"]:
                heat = latent_maps[0][j] / peak if peak > 0 else latent_maps[0][j]
                rel = f"{base}/img/l{latent}_{j}.png"
                images.overlay(self.data(dataset).image(int(sid)), heat, self.out / rel)
                tile["overlay"] = rel
            tiles.append(tile)
        hist = Counter(labels).most_common()
        # per-attribute statistics (colour, shape, size, position on ShapesWorld): the latents
        # table's majority_{a} / purity_{a} / entropy_{a} / purity_active_{a} columns
        attrs = [k[len("majority_"):] for k in row if k.startswith("majority_") and not k.startswith("majority_active_")
                 and k[len("majority_"):] not in ("fine", "coarse")]
        attributes = [{"name": a, "majority": row.get(f"majority_{a}"), "purity": row.get(f"purity_{a}"),
                       "entropy": row.get(f"entropy_{a}"), "purity_active": row.get(f"purity_active_{a}")} for a in attrs]
        self.page("latent.html", f"{base}/latent{latent}.html", row=row, tiles=tiles, hist=hist, attributes=attributes,
                  hist_max=max((c for _, c in hist), default=1), has_maps=latent_maps is not None, **ctx)

    def daam_section(self) -> Iterator[dict[str, Any]]:
        for model in sources.models_with(self.results, "daam"):
            figs = [self.figure(p) for p in sources.figures(self.results, "daam", model)]
            for kind, name, folder in sources.daam_runs(self.results, model):
                rel = f"daam/{model}/{kind}_{name}.html"
                self.daam_page(model, kind, name, folder, rel, figs)
                yield {"model": model, "kind": kind, "name": name, "href": rel}

    def daam_page(self, model: str, kind: str, name: str, folder: Path, rel: str, figs: list[str]) -> None:
        import pandas as pd

        from diffatlas.daam.words import TracedRun, minmax

        run = TracedRun.load(folder / "run")
        evaluation = sources.read_json(folder / "eval.json") or {}
        tau = float(evaluation.get("tau", 0.4))
        summary = sources.read_csv(folder / "summary.csv")
        by_role = sources.read_csv(folder / "summary_by_role.csv")
        iou = pd.read_parquet(folder / "iou_rows.parquet") if (folder / "iou_rows.parquet").exists() else None
        if iou is not None:
            iou = iou[(iou["method"] == "daam") & np.isclose(iou["tau"], tau)]
        data = self.data(name) if kind == "real" else None
        img_dir = f"daam/{model}/{kind}_{name}"

        def items() -> Iterator[dict[str, Any]]:
            for i in range(len(run)):
                maps, image = run.maps[i], run.images[i]
                sample_id = int(run.items.iloc[i]["sample_id"]) if "sample_id" in run.items else -1
                image_rel = f"{img_dir}/i{i}.png"
                images.thumbnail(image, self.out / image_rel)
                words = []
                for word in maps.words:
                    w = {"text": word.text, "cut": not word.positions, "map": None, "mask": None, "true": None, "iou": None, "role": ""}
                    if word.positions:
                        heat = minmax(maps.word_map(word.index))
                        w["map"] = f"{img_dir}/i{i}_w{word.index}.png"
                        images.overlay(image, heat, self.out / w["map"], outline=heat > tau)
                        w["mask"] = f"{img_dir}/i{i}_w{word.index}_mask.png"
                        images.mask_image(heat > tau, self.out / w["mask"])
                    if iou is not None:
                        hit = iou[(iou["item"] == i) & (iou["word_index"] == word.index)]
                        if len(hit):
                            w["iou"], w["role"] = float(hit["iou"].iloc[0]), str(hit["role"].iloc[0])
                            obj = int(hit["object"].iloc[0])
                            true = data.mask(sample_id, obj) if data is not None else None
                            if true is not None:
                                w["true"] = f"{img_dir}/i{i}_w{word.index}_true.png"
                                images.mask_image(true, self.out / w["true"])
                    words.append(w)
                yield {"index": i, "prompt": maps.prompt, "image": image_rel, "words": words}

        self.page("daam.html", rel, model=model, kind=kind, name=name, tau=tau, items=items(),
                  summary=None if summary is None else summary.to_dict("records"),
                  by_role=None if by_role is None else by_role.to_dict("records"), figures=figs)

    def geometry_section(self) -> Iterator[dict[str, Any]]:
        for model in sources.models_with(self.results, "geometry"):
            rel = f"geometry/{model}.html"
            self.geometry_page(model, rel)
            yield {"model": model, "href": rel}

    def geometry_page(self, model: str, rel: str) -> None:
        from safetensors.numpy import load_file

        root = self.results / "geometry" / model
        meaning = sources.read_csv(root / "meaning_summary.csv")
        judged: dict[tuple[int, str, int], str] = {}
        if meaning is not None:
            for r in meaning.to_dict("records"):
                judged[(int(r["timestep"]), str(r["mode"]), int(r["direction"]))] = str(r["dominant"])
        times = sorted((int(p.name[1:]) for p in root.glob("t*") if p.name[1:].isdigit() and (p / "edits.safetensors").exists()), reverse=True)
        img_dir = f"geometry/{model}"

        def strips() -> Iterator[dict[str, Any]]:
            for t in times:
                edits = load_file(str(root / f"t{t}" / "edits.safetensors"))
                meta = sources.read_json(root / f"t{t}" / "meta.json") or {}
                strengths = [float(s) for s in edits["strengths"]]
                for mode in ("linear", "normalised", "random", "iterative"):
                    if mode not in edits:
                        continue
                    arr = edits[mode]  # [samples, directions, strengths, H, W, 3]
                    if mode == "iterative":  # geodesic shooting: [directions, strengths, H, W, 3], sample 0
                        arr, strengths = arr[None], [float(g) for g in edits["iterative_strengths"]]
                    for s in range(arr.shape[0]):
                        for d in range(arr.shape[1]):
                            cells = []
                            for k, g in enumerate(strengths):
                                path = f"{img_dir}/t{t}_{mode}_s{s}_d{d}_{k}.png"
                                images.thumbnail(arr[s, d, k], self.out / path, side=64)
                                cells.append({"strength": g, "image": path})
                            yield {"timestep": t, "alpha_bar": meta.get("alpha_bar"), "mode": mode, "sample": s, "direction": d,
                                   "factor": judged.get((t, mode, d)), "cells": cells}

        global_rows = []
        gpath = root / "global" / "global.safetensors"
        if gpath.exists():
            g = load_file(str(gpath))
            for d in range(g["images"].shape[0]):
                for s in range(g["images"].shape[1]):
                    cells = []
                    for k, gamma in enumerate(g["strengths"]):
                        path = f"{img_dir}/global_d{d}_s{s}_{k}.png"
                        images.thumbnail(g["images"][d, s, k], self.out / path, side=64)
                        cells.append({"strength": float(gamma), "image": path})
                    global_rows.append({"direction": d, "sample": s, "cells": cells})
        else:
            self.note_missing(f"global directions of {model}", gpath, "run the geometry_global rule")
        figs = [self.figure(p) for p in sources.figures(self.results, "geometry", model)]
        self.page("geometry.html", rel, model=model, strips=strips(), global_rows=global_rows, figures=figs,
                  meaning=None if meaning is None else meaning.to_dict("records"),
                  paths=sources.read_json(root / "path_lengths.json"), claims=self.claims(root / "claims.csv"))

    @staticmethod
    def claims(path: Path) -> list[dict[str, Any]] | None:
        """Park et al.'s claims as measured (geometry_claims): the columns a reader needs."""
        table = sources.read_csv(path)
        if table is None:
            return None
        cols = ["claim", "measure", "value", "low", "high", "n", "verdict", "direction", "detail"]
        return table[[c for c in cols if c in table.columns]].to_dict("records")

    def world_section(self) -> dict[str, Any] | None:
        record, json_path, samples_path = sources.fidelity(self.results, self.fidelity_record)
        if record is None:
            self.note_missing("world model fidelity", self.results / "world_model" / "fidelity.json",
                              "run world_fidelity, or pass the model's record with --fidelity-record")
            return None
        samples = np.load(samples_path, mmap_mode="r") if samples_path is not None else None
        tiles = []
        for i, s in enumerate(record.get("samples", [])):
            image = None
            if samples is not None and i < len(samples):
                image = f"world/s{i}.png"
                images.thumbnail(np.asarray(samples[i]), self.out / image)
            tiles.append({"caption": s.get("caption", ""), "found": s.get("found", []), "image": image})
        rates = {k: v for k, v in record.items() if isinstance(v, dict) and "rate" in v}
        figs = [self.figure(p) for p in sources.figures(self.results, "world_model")]
        self.page("world.html", "world.html", record=record, rates=rates, tiles=tiles, source=str(json_path), figures=figs)
        return {"href": "world.html", "gate": record.get("gate", {}).get("passed")}


def build_atlas(results: str | os.PathLike, out: str | os.PathLike, fidelity_record: str | os.PathLike | None = None,
                max_latents: int | None = None) -> Path:
    """Build the atlas of ``results`` into ``out`` (replaced atomically); -> path of index.html."""
    results, out = Path(results), Path(out)
    if not results.is_dir():
        raise UserError(f"--results {results} is not a directory; run the workflow first (snakemake --cores all)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        Atlas(results, tmp, fidelity_record, max_latents).build()
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"
