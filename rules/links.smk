# links stage: the methods tied together on the same images (issue 20, item 3).
#
#   results/links/{model}/{dataset}/
#       sae_daam.parquet          one row per (SAE run, labelled latent, DAAM real image naming its word):
#                                 IoU latent mask vs DAAM word mask, each vs the object's true mask
#       sae_daam_summary.csv      per (layer, timestep, latent, word): mean IoUs, 95% bootstrap intervals
#       directions.csv            per (SAE run, geometry timestep, pullback direction): the judge's factor,
#                                 the most-changed latents and their attributes, agreement
#       directions_agreement.csv  agreement per SAE run and pooled (95% Wilson), chance
#       sae_daam.json, directions.json   provenance and settings (model, runs, tau, device, ...)
#   results/figures/links/{model}/{dataset}/sae_daam.png, directions.png
#
# Settings: the links section (LinksConfig; recorded in sae_daam.json / directions.json).
# SAE-DAAM runs for models in both extract.models and daam.models, datasets in both
# extract.datasets and daam.datasets, over the SAE layers with spatial maps; directions for
# geometry.meaning_models (the judge's factors) among extract.models.

from diffatlas.links.config import LinksConfig

try:
    LinksConfig.from_dict(config["links"])
except UserError as _err:
    raise WorkflowError(str(_err)) from None
# Each job gets only the keys it reads (LinksConfig.JOBS): changing top_changed re-runs no SAE-DAAM link.
LINKS_CFG = {job: LinksConfig.job_json(config["links"], job) for job in LinksConfig.JOBS}

LINKS_DIR = str(Path(RESULTS, "links", "{model}", "{dataset}"))
LINKS_FIGURES = str(Path(RESULTS, "figures", "links", "{model}", "{dataset}"))
LINKS_DAAM_MODELS = [m for m in SAE_MODELS if m in config["daam"]["models"]]
LINKS_DAAM_DATASETS = [d for d in SAE_DATASETS if d in config["daam"]["datasets"]]
LINKS_DIRECTION_MODELS = [m for m in SAE_MODELS if m in GEO_MEANING]

# SAE runs of one model x dataset (all layers, or only those with stored spatial maps).
links_runs = lambda wc, spatial: [
    SAE_DIR.format(model=wc.model, dataset=wc.dataset, **g) for g in sae_grid(wc.model) if not spatial or g["layer"] in SAE_SPATIAL_LAYERS
]
links_run_files = lambda spatial, names: lambda wc: [str(Path(r, n)) for r in links_runs(wc, spatial) for n in names]

# Figures: seconds of CPU each, run on the submitting host (SLURM profile).
localrules:
    links_figure_sae_daam,
    links_figure_directions,


rule links_sae_daam:
    conda:
        "../envs/torch.yaml"
    input:
        runs=links_run_files(True, ("sae.safetensors", "cfg.json", "latents.parquet")),
        stores=lambda wc: [SAE_STORE.format(model=wc.model, dataset=wc.dataset, timestep=g["timestep"]) for g in sae_grid(wc.model) if g["layer"] in SAE_SPATIAL_LAYERS],
        daam=lambda wc: daam_dir(wc.model, "real", wc.dataset),
        dataset=lambda wc: dataset_input(wc.dataset),
    output:
        rows=str(Path(LINKS_DIR, "sae_daam.parquet")),
        summary=report(str(Path(LINKS_DIR, "sae_daam_summary.csv")), caption="../report/captions/links_sae_daam.rst", category="links", subcategory="{model}/{dataset}"),
        record=str(Path(LINKS_DIR, "sae_daam.json")),
    params:
        runs=lambda wc: " ".join(shlex.quote(r) for r in links_runs(wc, True)),
        stores=lambda wc: " ".join(shlex.quote(SAE_STORE.format(model=wc.model, dataset=wc.dataset, timestep=g["timestep"])) for g in sae_grid(wc.model) if g["layer"] in SAE_SPATIAL_LAYERS),
        cfg=lambda wc: LINKS_CFG["sae_daam"],
        device=config["device"],
    log:
        log_path("links_sae_daam", "{model}", "{dataset}"),
    benchmark:
        bench_path("links_sae_daam", "{model}", "{dataset}")
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    shell:
        "diffatlas links-sae-daam --runs {params.runs} --stores {params.stores} --daam {input.daam:q} --dataset {input.dataset:q}"
        " --rows {output.rows:q} --summary {output.summary:q} --record {output.record:q} --config-json {params.cfg:q}"
        " --device {params.device:q} --threads {threads} > {log:q} 2>&1"


rule links_directions:
    conda:
        "../envs/torch.yaml"
    input:
        model=lambda wc: model_input(wc.model),
        runs=links_run_files(False, ("sae.safetensors", "cfg.json", "latents.parquet", "metrics.json")),
        edits=lambda wc: [str(Path(d, "edits.safetensors")) for d in geo_runs(wc)],
        meaning=str(Path(GEO_ROOT, "meaning_summary.csv")),
    output:
        table=str(Path(LINKS_DIR, "directions.csv")),
        agreement=report(str(Path(LINKS_DIR, "directions_agreement.csv")), caption="../report/captions/links_directions.rst", category="links", subcategory="{model}/{dataset}"),
        record=str(Path(LINKS_DIR, "directions.json")),
    params:
        model_path=lambda wc: model_path(wc.model),
        model_args=model_args_arg,
        runs=lambda wc: " ".join(shlex.quote(r) for r in links_runs(wc, False)),
        geometry=lambda wc: " ".join(shlex.quote(d) for d in geo_runs(wc)),
        cfg=lambda wc: LINKS_CFG["directions"],
        device=config["device"],
    log:
        log_path("links_directions", "{model}", "{dataset}"),
    benchmark:
        bench_path("links_directions", "{model}", "{dataset}")
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    shell:
        "diffatlas links-directions --model {params.model_path:q} --model-name {wildcards.model} --runs {params.runs}"
        " --geometry {params.geometry} --meaning {input.meaning:q} --table {output.table:q} --agreement {output.agreement:q}"
        " --record {output.record:q} --config-json {params.cfg:q} --device {params.device:q} --threads {threads}"
        " {params.model_args:q} > {log:q} 2>&1"


rule links_figure_sae_daam:
    conda:
        "../envs/analysis.yaml"
    input:
        str(Path(LINKS_DIR, "sae_daam.parquet")),
    output:
        report(str(Path(LINKS_FIGURES, "sae_daam.png")), caption="../report/captions/links_sae_daam.rst", category="links", subcategory="{model}/{dataset}"),
    log:
        log_path("links_figure_sae_daam", "{model}", "{dataset}"),
    benchmark:
        bench_path("links_figure_sae_daam", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas links-figure sae-daam --rows {input:q} --out {output:q}"
        " --title 'SAE latents vs DAAM words: {wildcards.model}, {wildcards.dataset}' > {log:q} 2>&1"


rule links_figure_directions:
    conda:
        "../envs/analysis.yaml"
    input:
        str(Path(LINKS_DIR, "directions_agreement.csv")),
    output:
        report(str(Path(LINKS_FIGURES, "directions.png")), caption="../report/captions/links_directions.rst", category="links", subcategory="{model}/{dataset}"),
    log:
        log_path("links_figure_directions", "{model}", "{dataset}"),
    benchmark:
        bench_path("links_figure_directions", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas links-figure directions --agreement {input:q} --out {output:q}"
        " --title 'pullback directions vs SAE latents: {wildcards.model}, {wildcards.dataset}' > {log:q} 2>&1"


for _m in LINKS_DAAM_MODELS:
    for _d in LINKS_DAAM_DATASETS:
        if SAE_SPATIAL_LAYERS:
            ALL_TARGETS.append(str(Path(LINKS_DIR.format(model=_m, dataset=_d), "sae_daam_summary.csv")))
            ALL_TARGETS.append(str(Path(LINKS_FIGURES.format(model=_m, dataset=_d), "sae_daam.png")))
for _m in LINKS_DIRECTION_MODELS:
    for _d in SAE_DATASETS:
        ALL_TARGETS.append(str(Path(LINKS_DIR.format(model=_m, dataset=_d), "directions_agreement.csv")))
        ALL_TARGETS.append(str(Path(LINKS_FIGURES.format(model=_m, dataset=_d), "directions.png")))
