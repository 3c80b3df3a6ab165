"""What the atlas reads from results/: one function per kind of file, each returning plain
Python values (or None when the file is absent, so the page can say what is missing).

Paths follow README.md's results/ path grammar; nothing here computes an analysis.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd


def read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not (isinstance(v, float) and math.isnan(v))


def sae_pairs(results: Path) -> list[tuple[str, str]]:
    """(model, dataset) with an SAE summary or a Diff-C row, sorted."""
    pairs = {(p.parent.parent.name, p.parent.name) for p in (results / "sae").glob("*/*/summary.csv")}
    pairs |= {(p.parents[3].name, p.parents[2].name) for p in (results / "sae").glob("*/*/*/t*/latents.parquet")}
    diffc = read_csv(results / "diffc" / "summary.csv")
    if diffc is not None:
        pairs |= set(zip(diffc["model"].astype(str), diffc["dataset"].astype(str)))
    return sorted(pairs)


def grid_cells(results: Path, model: str, dataset: str) -> tuple[list[str], list[int], dict[tuple[str, int], dict[str, Any]]]:
    """Layers, timesteps and per (layer, timestep) the measured numbers of every analysis.

    A cell's dict holds ``diffc_{fine,coarse}``, ``probe_{fine,coarse}`` (test accuracy),
    ``fve``, ``purity_fine``, ``purity_coarse``, ``dead_fraction`` (k-SAE) where measured,
    and ``sae`` (True when the run directory exists, so the cell links to its page).
    """
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    sae = read_csv(results / "sae" / model / dataset / "summary.csv")
    if sae is not None:
        for r in sae.to_dict("records"):
            cell = cells.setdefault((str(r["layer"]), int(r["timestep"])), {})
            for key in ("fve", "purity_fine", "purity_coarse", "dead_fraction"):
                cell[key] = r.get(key)
    diffc = read_csv(results / "diffc" / "summary.csv")
    if diffc is not None:
        rows = diffc[(diffc["model"].astype(str) == model) & (diffc["dataset"].astype(str) == dataset)]
        for r in rows.to_dict("records"):
            cell = cells.setdefault((str(r["layer"]), int(r["timestep"])), {})
            cell[f"{r['method']}_{r['granularity']}"] = r["accuracy"]
    # SAE runs without a summary row yet (a partial run) still get a cell and a page
    for run in sorted((results / "sae" / model / dataset).glob("*/t*/latents.parquet")):
        if run.parent.name[1:].isdigit():
            cells.setdefault((run.parent.parent.name, int(run.parent.name[1:])), {})
    for (layer, t), cell in cells.items():
        cell["sae"] = (results / "sae" / model / dataset / layer / f"t{t}" / "latents.parquet").exists()
    layers = list(dict.fromkeys(l for l, _ in cells))
    times = sorted({t for _, t in cells})
    return layers, times, cells


def ranked_latents(run_dir: Path, n: int) -> pd.DataFrame:
    """The ``n`` best-ranked latents of a run's latents.parquet, rank 0 first."""
    table = pd.read_parquet(run_dir / "latents.parquet")
    return table[table["rank"] >= 0].sort_values("rank").head(n)


def spatial_maps(run_dir: Path) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
    """{latent: (maps [top_n, h, w], sample_ids [top_n])} from spatial_maps.safetensors, or None."""
    path = run_dir / "spatial_maps.safetensors"
    if not path.exists():
        return None
    from safetensors.numpy import load_file

    arrays = load_file(str(path))
    return {int(l): (arrays["maps"][i], arrays["sample_ids"][i]) for i, l in enumerate(arrays["latents"])}


class DatasetImages:
    """Images of a dataset (results/data/{dataset}/images.npy), read through a memory map."""

    def __init__(self, results: Path, dataset: str) -> None:
        folder = results / "data" / dataset
        self.images = np.load(folder / "images.npy", mmap_mode="r") if (folder / "images.npy").exists() else None
        self.masks = np.load(folder / "masks.npy", mmap_mode="r") if (folder / "masks.npy").exists() else None
        ids = None
        if (folder / "metadata.parquet").exists():
            meta = pd.read_parquet(folder / "metadata.parquet")
            if "sample_id" in meta:
                ids = meta["sample_id"].to_numpy()
        self.row_of = {int(s): i for i, s in enumerate(ids)} if ids is not None else None

    def row(self, sample_id: int) -> int:
        return self.row_of.get(int(sample_id), int(sample_id)) if self.row_of else int(sample_id)

    def image(self, sample_id: int) -> np.ndarray | None:
        return None if self.images is None else np.asarray(self.images[self.row(sample_id)])

    def mask(self, sample_id: int, obj: int) -> np.ndarray | None:
        if self.masks is None or sample_id < 0:
            return None
        m = np.asarray(self.masks[self.row(sample_id)])
        if m.ndim == 3:  # [objects, H, W]
            return m[obj] if 0 <= obj < m.shape[0] else None
        return m == obj + 1  # [H, W] label map: 0 background, object i = i + 1


def daam_runs(results: Path, model: str) -> Iterator[tuple[str, str, Path]]:
    """(kind, name, folder) of every finished DAAM run of ``model`` (kind: prompts or real)."""
    for kind in ("real", "prompts"):
        for folder in sorted((results / "daam" / model / kind).glob("*")):
            if (folder / "run" / "info.json").exists():
                yield kind, folder.name, folder


def models_with(results: Path, stage: str) -> list[str]:
    return sorted(p.name for p in (results / stage).glob("*") if p.is_dir())


def figures(results: Path, *parts: str) -> list[Path]:
    """PNG figures under results/figures/{parts...}, sorted."""
    return sorted((results / "figures" / Path(*parts)).rglob("*.png")) if (results / "figures" / Path(*parts)).exists() else []


def fidelity(results: Path, record: os.PathLike | None) -> tuple[dict[str, Any] | None, Path | None, Path | None]:
    """(fidelity JSON, its JSON path, its samples .npy) of this run, else of the model's record, else Nones."""
    for json_path in [results / "world_model" / "fidelity.json", *([Path(record)] if record else [])]:
        if json_path.exists():
            samples = json_path.with_name("fidelity_samples.npy")
            return json.loads(json_path.read_text()), json_path, samples if samples.exists() else None
    return None, None, None


def read_table(path: Path) -> pd.DataFrame | None:
    """A results CSV whose text cells stay text ("none" is a word, not a missing value), or None."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.exists() else None


#: The judged interventions experiment's files per (model, layer, timestep) directory
#: (diffatlas.interventions.experiment) that the atlas shows.
INTERVENE_FILES = ("verdicts.csv", "rates.csv", "selection.csv", "record.json")


def intervene_runs(results: Path, model: str) -> list[tuple[str, int, Path]]:
    """(layer, timestep, experiment directory) of every finished experiment of ``model``: layer, then time."""
    runs = []
    for folder in (results / "intervene" / model / "experiment").glob("*/t*"):
        if folder.name[1:].isdigit() and (folder / "verdicts.csv").exists():
            runs.append((folder.parent.name, int(folder.name[1:]), folder))
    return sorted(runs, key=lambda r: (r[0], r[1]))


def intervene_models(results: Path) -> list[str]:
    """Models with an intervene summary or at least one finished experiment directory."""
    root = results / "intervene"
    return sorted(p.name for p in root.glob("*") if p.is_dir() and ((p / "summary.csv").exists() or intervene_runs(results, p.name)))


#: The links stage's files per (model, dataset) (diffatlas.links): SAE latent ↔ DAAM word and
#: pullback direction ↔ SAE latents, each a table, its summary and its provenance record.
LINKS_FILES = ("sae_daam_summary.csv", "sae_daam.json", "directions.csv", "directions_agreement.csv", "directions.json")


def links_pairs(results: Path) -> list[tuple[str, str]]:
    """(model, dataset) with any links table, sorted."""
    return sorted({(p.parent.parent.name, p.parent.name) for name in LINKS_FILES for p in (results / "links").glob(f"*/*/{name}")})


def latent_list(text: Any) -> list[int]:
    """The latents of a comma-separated cell of directions.csv ("12,3,40"); [] when empty."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return []
    return [int(float(s)) for s in str(text).split(",") if s.strip()]
