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
    intervene/{model}.html                      the judged steering experiment: layer × timestep
                                                table, verdicts, rates with intervals, figure
    intervene/{model}/sae/{layer}/t{t}/latent{j}.html   a steering SAE's chosen latent
    links/{model}/{dataset}.html                SAE latent ↔ DAAM word IoUs; pullback direction
                                                ↔ most-changed latents, agreement and chance
    world.html                                  the world model's fidelity and samples

Latents named by the links tables get their latent page even when they are not among the
ranked ones shown on the SAE run's page, so every latent a table names links somewhere.

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

from diffatlas.atlas import images, sources, tables
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
        self._latent_pages: set[str] = set()  # atlas-relative paths of the latent pages written
        self._geometry_anchors: set[str] = set()  # "geometry/{model}.html#t{t}-{mode}-d{d}" written
        self._daam_pages: set[str] = set()
        # latents the links tables name, per SAE run (model, dataset, layer, t): they get a page too
        self._wanted: dict[tuple[str, str, str, int], set[int]] = {}

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

    def latent_href(self, base: str, latent: Any) -> str | None:
        """Atlas-relative path of latent ``latent``'s page under ``base`` if it was written, else None."""
        if latent is None or not sources.finite(latent) or int(latent) < 0:
            return None
        rel = f"{base}/latent{int(latent)}.html"
        return rel if rel in self._latent_pages else None

    # ------------------------------------------------------------------ sections
    def build(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEMPLATES / "atlas.css", self.out / "atlas.css")
        self.want_linked_latents()
        grids = list(self.sae_section())
        daam = list(self.daam_section())
        geometry = list(self.geometry_section())
        # after the SAE, DAAM and geometry pages: these pages link into them
        intervene = list(self.intervene_section())
        links = list(self.links_section())
        world = self.world_section()
        data_figs = [self.figure(p) for p in sources.figures(self.results, "data")]
        if not grids:
            self.note_missing("k-SAE and Diff-C", self.results / "sae", "run the sae and diffc stages")
        if not daam:
            self.note_missing("DAAM", self.results / "daam", "run the daam stage")
        if not geometry:
            self.note_missing("geometry", self.results / "geometry", "run the geometry stage")
        if not intervene:
            self.note_missing("judged interventions", self.results / "intervene",
                              "not run: the intervene stage runs for the models in config intervene.models")
        if not links:
            self.note_missing("cross-method links", self.results / "links",
                              "not run: the links stage needs SAE runs with DAAM real-image runs or judged geometry")
        self.page("index.html", "index.html", grids=grids, daam=daam, geometry=geometry, world=world,
                  intervene=intervene, links=links,
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
        ctx = {"model": model, "dataset": dataset, "layer": layer, "timestep": t,
               "crumbs": [(f"sae/{model}/{dataset}/grid.html", f"{model} / {dataset}"), (f"{base}/index.html", f"{layer} t={t}")],
               "source": None}

        def rows() -> Iterator[dict[str, Any]]:
            for r in top.to_dict("records"):
                yield {**r, "href": f"latent{int(r['latent'])}.html"}

        self.page("sae_run.html", f"{base}/index.html", metrics=metrics, spatial=spatial, latents=rows(), **ctx)
        for r in top.to_dict("records"):
            self.latent_page(base, r, maps.get(int(r["latent"])) if maps else None, ctx)
        # latents a links table names that are not among the ranked ones shown
        extra = sorted(self._wanted.get((model, dataset, layer, t), set()) - {int(j) for j in top["latent"]})
        if extra:
            import pandas as pd

            table = pd.read_parquet(run / "latents.parquet")
            for r in table[table["latent"].isin(extra)].to_dict("records"):
                self.latent_page(base, r, maps.get(int(r["latent"])) if maps else None, ctx)

    def want_linked_latents(self) -> None:
        """Collect the latents the links tables name (SAE-DAAM summary, directions' top latents)."""
        for model, dataset in sources.links_pairs(self.results):
            folder = self.results / "links" / model / dataset
            for name, column in (("sae_daam_summary.csv", "latent"), ("directions.csv", "top_latents")):
                table = sources.read_table(folder / name)
                if table is None or not {"layer", "timestep", column} <= set(table.columns):
                    continue
                for r in table[["layer", "timestep", column]].to_dict("records"):
                    if sources.finite(r["timestep"]):
                        self._wanted.setdefault((model, dataset, str(r["layer"]), int(r["timestep"])), set()).update(
                            sources.latent_list(r[column]))

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
        self._latent_pages.add(f"{base}/latent{latent}.html")

    def daam_section(self) -> Iterator[dict[str, Any]]:
        for model in sources.models_with(self.results, "daam"):
            figs = [self.figure(p) for p in sources.figures(self.results, "daam", model)]
            for kind, name, folder in sources.daam_runs(self.results, model):
                rel = f"daam/{model}/{kind}_{name}.html"
                self.daam_page(model, kind, name, folder, rel, figs)
                self._daam_pages.add(rel)
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
                            # the first sample's strip of a direction is its anchor (links' direction table points here)
                            anchor = f"t{t}-{mode}-d{d}" if s == 0 else None
                            if anchor:
                                self._geometry_anchors.add(f"{rel}#{anchor}")
                            yield {"timestep": t, "alpha_bar": meta.get("alpha_bar"), "mode": mode, "sample": s, "direction": d,
                                   "factor": judged.get((t, mode, d)), "cells": cells, "anchor": anchor}

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

    # ------------------------------------------------------------------ interventions
    def intervene_section(self) -> Iterator[dict[str, Any]]:
        for model in sources.intervene_models(self.results):
            rel = f"intervene/{model}.html"
            self.intervene_page(model, rel)
            yield {"model": model, "href": rel}

    def intervene_page(self, model: str, rel: str) -> None:
        """The judged steering experiment of ``model``: the layer × timestep table (summary.csv),
        then per experiment directory its verdicts beside the rates they rest on, and the rates."""
        root = self.results / "intervene" / model
        summary = sources.read_table(root / "summary.csv")
        cells = []
        for layer, t, folder in sources.intervene_runs(self.results, model):
            verdicts = sources.read_table(folder / "verdicts.csv")
            rates = sources.read_table(folder / "rates.csv")
            selection = sources.read_table(folder / "selection.csv")
            record = sources.read_json(folder / "record.json") or {}
            base = f"intervene/{model}/sae/{layer}/t{t}"
            self.steering_latent_pages(model, layer, t, base, verdicts, record)
            cells.append({
                "layer": layer, "timestep": t, "anchor": f"{layer}-t{t}", "record": record,
                "verdicts": list(verdict_rows(verdicts, rates, selection, lambda j: self.latent_href(base, j))),
                "rates": None if rates is None else tables.table(
                    rates, keys=rate_keys(rates), hide=CELL_COLUMNS, intervals={"rate": ("ci_low", "ci_high")},
                    links={"latent": lambda r: self.latent_href(base, r.get("latent"))}),
            })
        layers = list(dict.fromkeys([c["layer"] for c in cells] + ([] if summary is None else [str(v) for v in summary["layer"]])))
        times = sorted({c["timestep"] for c in cells} | (set() if summary is None else {int(v) for v in summary["timestep"]}))
        grid: dict[tuple[str, int], list[dict[str, Any]]] = {}
        if summary is not None:
            for r in summary.to_dict("records"):
                grid.setdefault((str(r["layer"]), int(r["timestep"])), []).append(r)
        ran = {(c["layer"], c["timestep"]) for c in cells}
        figs = [self.figure(p) for p in sources.figures(self.results, "intervene", model)]
        self.page("intervene.html", rel, model=model, layers=layers, times=times, grid=grid, ran=ran, cells=cells,
                  summary=None if summary is None else tables.table(summary, keys=("layer", "timestep", "attribute"),
                                                                   hide=("model",)),
                  figures=figs)

    def steering_latent_pages(self, model: str, layer: str, t: int, base: str, verdicts: Any, record: dict[str, Any]) -> None:
        """A latent page for each latent the experiment chose, from the steering SAE's latents.parquet."""
        import pandas as pd

        sae_dir = self.results / "intervene" / model / "sae" / layer / f"t{t}"
        if verdicts is None or "latent" not in verdicts:
            return
        chosen = sorted({int(j) for j in verdicts["latent"] if sources.finite(j) and int(j) >= 0})
        if not chosen:
            return
        if not (sae_dir / "latents.parquet").exists():
            self.note_missing(f"steering SAE of {model} {layer} t={t}", sae_dir / "latents.parquet", "run the intervene_sae rule")
            return
        sae = record.get("sae") or {}
        dataset = str(sae.get("dataset") or (sources.read_json(sae_dir / "cfg.json") or {}).get("dataset", ""))
        table = pd.read_parquet(sae_dir / "latents.parquet")
        ctx = {"model": model, "dataset": dataset, "layer": layer, "timestep": t,
               "crumbs": [(f"intervene/{model}.html", f"interventions of {model}")],
               "source": f"A latent of the interventions experiment's steering SAE ({sae_dir}; "
                         f"{sae.get('samples', '?')} samples, conditioning {sae.get('conditioning', '?')}), "
                         "not of the SAE of the layer × timestep grid."}
        for r in table[table["latent"].isin(chosen)].to_dict("records"):
            self.latent_page(base, r, None, ctx)

    # ------------------------------------------------------------------ links
    def links_section(self) -> Iterator[dict[str, Any]]:
        for model, dataset in sources.links_pairs(self.results):
            rel = f"links/{model}/{dataset}.html"
            self.links_page(model, dataset, rel)
            yield {"model": model, "dataset": dataset, "href": rel}

    def links_page(self, model: str, dataset: str, rel: str) -> None:
        folder = self.results / "links" / model / dataset
        sae_base = lambda r: f"sae/{model}/{dataset}/{r['layer']}/t{int(r['timestep'])}"  # noqa: E731
        sae_daam = sources.read_table(folder / "sae_daam_summary.csv")
        agreement = sources.read_table(folder / "directions_agreement.csv")
        directions = sources.read_table(folder / "directions.csv")
        geometry = f"geometry/{model}.html"

        def direction_href(r: dict[str, Any]) -> str | None:
            href = f"{geometry}#t{r.get('geo_timestep')}-{r.get('mode')}-d{r.get('direction')}"
            return href if href in self._geometry_anchors else None

        daam_rel = f"daam/{model}/real_{dataset}.html"
        figs = [self.figure(p) for p in sources.figures(self.results, "links", model, dataset)]
        self.page(
            "links.html", rel, model=model, dataset=dataset, figures=figs,
            daam_href=daam_rel if daam_rel in self._daam_pages else None,
            geometry_href=geometry if (self.out / geometry).exists() else None,
            sae_daam_record=sources.read_json(folder / "sae_daam.json"),
            directions_record=sources.read_json(folder / "directions.json"),
            sae_daam=None if sae_daam is None else tables.table(
                sae_daam, keys=("layer", "timestep", "latent", "word"),
                links={"latent": lambda r: self.latent_href(sae_base(r), r.get("latent"))}),
            agreement=None if agreement is None else tables.table(
                agreement, keys=("measure", "layer", "timestep"), intervals={"agreement": ("low", "high")}),
            directions=None if directions is None else tables.table(
                directions, keys=("measure", "layer", "timestep", "geo_timestep", "direction"),
                links={"direction": direction_href},
                latent_lists={"top_latents": lambda r, j: self.latent_href(sae_base(r), j)}),
        )

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


#: Columns of an experiment's tables that name its (model, layer, timestep) cell: the page's section says them.
CELL_COLUMNS = ("model", "layer", "timestep")
#: Columns of rates.csv that name a row (with any column a stage adds to both rates and verdicts).
RATE_KEYS = ("attribute", "value", "experiment", "condition", "alpha")
#: Columns of verdicts.csv the verdict table lays out itself; any other is shown as it comes.
VERDICT_SHOWN = ("attribute", "value", "latent", "status", "steers", "best_alpha", "rate_best", "ci_low_best",
                 "ci_high_best", "baseline_rate", "control_rate_best", "removes", "ablated_absent_rate",
                 "baseline_absent_rate", "control_absent_rate")


def rate_keys(rates: Any) -> list[str]:
    """The columns naming a row of rates.csv: :data:`RATE_KEYS` and any column it has beyond the known ones."""
    from diffatlas.interventions.judged import RATE_COLUMNS

    mode = ["where"] if "where" in rates.columns else []
    return [*RATE_KEYS, *mode, *[c for c in rates.columns if c not in RATE_COLUMNS and c not in CELL_COLUMNS]]


def verdict_rows(verdicts: Any, rates: Any, selection: Any, latent_href: Any) -> Iterator[dict[str, Any]]:
    """Per word of verdicts.csv: the verdicts, and from rates.csv the rows they rest on (with their
    intervals and n): the latent at its best α, the baseline, both controls at that α, and the three
    ablation rates. Rows of rates.csv match on attribute, value and any column both tables share
    beyond the known ones (a mode column a later experiment adds)."""
    if verdicts is None:
        return
    from diffatlas.interventions.judged import RATE_COLUMNS, SELECTION_COLUMNS

    known = set(VERDICT_SHOWN) | set(CELL_COLUMNS) | set(RATE_COLUMNS) | set(SELECTION_COLUMNS)
    shared = [] if rates is None else [c for c in verdicts.columns if c in rates.columns and c not in known]
    match = ["attribute", "value", *shared]
    extra = [c for c in verdicts.columns if c not in VERDICT_SHOWN and c not in CELL_COLUMNS]
    # The steering mode (intervene.where): a verdict of mode m rests on the steering rates of mode
    # m, the baseline (where = none) and the ablations (where = active, whatever the mode).
    by_mode = rates is not None and "where" in verdicts.columns and "where" in rates.columns
    for v in verdicts.to_dict("records"):
        mine = None if rates is None else rates[(rates[match] == pd_series(v, match)).all(axis=1)]
        if by_mode:
            mine = mine[(mine["where"] == v["where"]) | (mine["condition"] == "baseline") | (mine["experiment"] == "ablate")]

        def rate(experiment: str, condition: str, alpha: Any = None) -> dict[str, Any] | None:
            if mine is None:
                return None
            r = mine[(mine["experiment"] == experiment) & (mine["condition"] == condition)]
            if alpha is not None:
                r = r[np.isclose(r["alpha"].astype(float), float(alpha))] if sources.finite(alpha) else r.iloc[:0]
            return r.iloc[0].to_dict() if len(r) else None

        best = v.get("best_alpha")
        sel = None
        if selection is not None:
            s = selection[(selection["attribute"] == v["attribute"]) & (selection["value"] == v["value"])]
            sel = s.iloc[0].to_dict() if len(s) else None
        yield {
            "attrs": tables.row_attrs(v, [*match, *(["where"] if by_mode else [])]), "attribute": v["attribute"], "value": v["value"],
            "latent": v.get("latent"), "latent_href": latent_href(v.get("latent")), "status": v.get("status"),
            "purity": None if sel is None else sel.get("purity"), "candidates": None if sel is None else sel.get("n_candidates"),
            "steers": tables.truth(v.get("steers")), "removes": tables.truth(v.get("removes")), "best_alpha": best,
            "latent_rate": rate("steer", "latent", best), "baseline": rate("steer", "baseline"),
            "random_latent": rate("steer", "random_latent", best), "random_direction": rate("steer", "random_direction", best),
            "ablated": rate("ablate", "latent"), "ablate_baseline": rate("ablate", "baseline"),
            "ablate_random": rate("ablate", "random_latent"),
            "extra": [tables.scalar(c, v[c]) for c in extra],
        }


def pd_series(record: dict[str, Any], keys: list[str]) -> Any:
    """The ``keys`` of one table row as a Series, to compare with another table's rows."""
    import pandas as pd

    return pd.Series({k: record[k] for k in keys})


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
