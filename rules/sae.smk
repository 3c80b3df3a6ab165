# sae stage: one TopK sparse autoencoder per (model, dataset, layer, timestep), trained on the
# activation store, then what its latents mean.
#
#   results/sae/{model}/{dataset}/{layer}/t{timestep}.check.json   (check_sae: the architecture,
#       checked against the store's layer width before train_sae is submitted)
#   results/sae/{model}/{dataset}/{layer}/t{timestep}/
#       sae.safetensors  cfg.json (architecture, input_scale, split, provenance)
#       metrics.json     (validation metrics on post-TopK codes, label statistics, how training stopped)
#       curve.csv        (training curve: step, train loss, validation FVE, dead fraction)
#       latents.parquet  (per latent: activity, top-10 samples, their labels, σ_label/purity/entropy)
#       spatial_maps.safetensors, spatial.json  (sae_spatial: each top latent's activation map on
#                        its top images, the SAE applied position by position; its FVE on spatial vectors)
#   results/sae/{model}/{dataset}/summary.csv                  one row per layer x timestep
#   results/figures/sae/{model}/{dataset}/label_stats_vs_layer.png
#   results/figures/sae/{model}/{dataset}/label_stats_vs_timestep.png
#   results/figures/sae/{model}/{dataset}/label_curves.png
#   results/figures/sae/{model}/{dataset}/training_curves.png
#   results/figures/sae/{model}/{dataset}/gallery/{layer}/t{timestep}.png
#   results/figures/sae/{dataset}/label_stats_across_models.png
#
# The grid is extract.models x extract.datasets x sae.layers (default: the model's own
# models.<name>.layers, else extract.layers) x sae.timesteps (default: the model's own
# models.<name>.timesteps, else extract.timesteps). A flow-matching model (SD3, Flux) trains
# at its sigmas: its runs are named like its stores, by the scheduler's timestep sigma * T
# (t250 for s0.250), and metrics.json, cfg.json and spatial.json record sigma beside it.

import shlex

from snakemake.exceptions import WorkflowError

SAE_MODELS = config["extract"]["models"]
SAE_DATASETS = config["extract"]["datasets"]
SAE_LAYERS = {m: trained_layers(m, "sae") for m in SAE_MODELS}
SAE_TIMESTEPS = {m: trained_times(m, "sae") for m in SAE_MODELS}


# Path templates of the stage (filled by Snakemake wildcards or str.format).
SAE_STORE = EXTRACT_STORE  # the per-time store of the job's timestep (rules/extract.smk)
SAE_DIR = str(Path(RESULTS, "sae", "{model}", "{dataset}", "{layer}", "t{timestep}"))
SAE_SUMMARY = str(Path(RESULTS, "sae", "{model}", "{dataset}", "summary.csv"))
SAE_FIGURES = str(Path(RESULTS, "figures", "sae"))
SAE_GALLERY = str(Path(SAE_FIGURES, "{model}", "{dataset}", "gallery", "{layer}", "t{timestep}.png"))
# The architecture check_sae found valid for the layer's width in the store (beside SAE_DIR).
SAE_CHECK = str(Path(RESULTS, "sae", "{model}", "{dataset}", "{layer}", "t{timestep}.check.json"))
# The check, summaries and figures: seconds of CPU each, run on the submitting host (SLURM profile).
localrules:
    check_sae,
    sae_summary,
    sae_figure_vs_layer,
    sae_figure_vs_timestep,
    sae_figure_curves,
    sae_figure_training,
    sae_figure_across_models,
    sae_gallery,


# Layers whose spatial maps are stored (extract.spatial, extract.spatial_layers; no text-token
# stream): they get sae_spatial. By name across the models (a layer's maps depend on its name only).
SAE_SPATIAL_LAYERS = sorted({l for m in SAE_MODELS for l in SAE_LAYERS[m] if l in layers_with_maps(m)})


# Every (layer, timestep) of one model x dataset, as wildcards for SAE_DIR (the model's layers and times).
sae_grid = lambda model: [dict(layer=l, timestep=t) for l in SAE_LAYERS[model] for t in SAE_TIMESTEPS[model]]


# Seconds on the submitting host, reading only the store's metadata: a setting that cannot
# work for this layer (sae.k >= expansion x channels, ...) fails here, before the GPU job is
# queued, not inside it, where a retry would resubmit it with twice the time and memory.
rule check_sae:
    conda:
        "../envs/analysis.yaml"
    input:
        store=SAE_STORE,
    output:
        SAE_CHECK,
    params:
        cfg=lambda wc: SAEConfig.job_json(config["sae"]),
    log:
        log_path("check_sae", "{model}", "{dataset}", "{layer}", "t{timestep}"),
    benchmark:
        bench_path("check_sae", "{model}", "{dataset}", "{layer}", "t{timestep}")
    threads: 1
    # what fails here is a setting: running it again cannot help
    retries: 0
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "diffatlas check-sae --store {input.store:q} --layer {wildcards.layer:q} --timestep {wildcards.timestep}"
        " --config-json {params.cfg:q} --out {output:q} > {log:q} 2>&1"


rule train_sae:
    conda:
        "../envs/torch.yaml"
    input:
        store=SAE_STORE,
        checked=SAE_CHECK,
    output:
        weights=str(Path(SAE_DIR, "sae.safetensors")),
        cfg=str(Path(SAE_DIR, "cfg.json")),
        metrics=str(Path(SAE_DIR, "metrics.json")),
        curve=str(Path(SAE_DIR, "curve.csv")),
        latents=str(Path(SAE_DIR, "latents.parquet")),
    params:
        out=lambda wc: SAE_DIR.format(**wc),
        # only the keys the job reads (no grid, no gallery settings): adding a layer or a
        # timestep re-runs no finished job. A function: the JSON holds {braces}.
        cfg=lambda wc: SAEConfig.job_json(config["sae"]),
        device=config["device"],
    log:
        log_path("train_sae", "{model}", "{dataset}", "{layer}", "t{timestep}"),
    benchmark:
        bench_path("train_sae", "{model}", "{dataset}", "{layer}", "t{timestep}")
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 20 * attempt,
    shell:
        "diffatlas train-sae --store {input.store:q} --layer {wildcards.layer:q} --timestep {wildcards.timestep}"
        " --out {params.out:q} --model-name {wildcards.model} --dataset-name {wildcards.dataset}"
        " --config-json {params.cfg:q} --device {params.device:q} --threads {threads} > {log:q} 2>&1"


rule sae_spatial:
    conda:
        "../envs/torch.yaml"
    input:
        store=SAE_STORE,
        weights=str(Path(SAE_DIR, "sae.safetensors")),
        latents=str(Path(SAE_DIR, "latents.parquet")),
    output:
        maps=str(Path(SAE_DIR, "spatial_maps.safetensors")),
        record=str(Path(SAE_DIR, "spatial.json")),
    params:
        run=lambda wc: SAE_DIR.format(**wc),
        device=config["device"],
    log:
        log_path("sae_spatial", "{model}", "{dataset}", "{layer}", "t{timestep}"),
    benchmark:
        bench_path("sae_spatial", "{model}", "{dataset}", "{layer}", "t{timestep}")
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    shell:
        "diffatlas sae-spatial --run {params.run:q} --store {input.store:q} --device {params.device:q}"
        " --threads {threads} > {log:q} 2>&1"


rule sae_summary:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [str(Path(SAE_DIR.format(**wc, **g), "metrics.json")) for g in sae_grid(wc.model)],
    output:
        report(SAE_SUMMARY, caption="../report/captions/sae_summary.rst", category="k-SAE", subcategory="{model}/{dataset}"),
    params:
        runs=lambda wc: " ".join(shlex.quote(SAE_DIR.format(**wc, **g)) for g in sae_grid(wc.model)),
    log:
        log_path("sae_summary", "{model}", "{dataset}"),
    benchmark:
        bench_path("sae_summary", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas sae-summary --out {output:q} {params.runs} > {log:q} 2>&1"


rule sae_figure_vs_layer:
    conda:
        "../envs/analysis.yaml"
    input:
        SAE_SUMMARY,
    output:
        report(str(Path(SAE_FIGURES, "{model}", "{dataset}", "label_stats_vs_layer.png")), caption="../report/captions/sae_vs_layer.rst", category="k-SAE", subcategory="{model}/{dataset}"),
    log:
        log_path("sae_figure_vs_layer", "{model}", "{dataset}"),
    benchmark:
        bench_path("sae_figure_vs_layer", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas sae-figures vs-layer --summary {input:q} --out {output:q} > {log:q} 2>&1"


rule sae_figure_vs_timestep:
    conda:
        "../envs/analysis.yaml"
    input:
        SAE_SUMMARY,
    output:
        report(str(Path(SAE_FIGURES, "{model}", "{dataset}", "label_stats_vs_timestep.png")), caption="../report/captions/sae_vs_timestep.rst", category="k-SAE", subcategory="{model}/{dataset}"),
    log:
        log_path("sae_figure_vs_timestep", "{model}", "{dataset}"),
    benchmark:
        bench_path("sae_figure_vs_timestep", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas sae-figures vs-timestep --summary {input:q} --out {output:q} > {log:q} 2>&1"


rule sae_figure_curves:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [str(Path(SAE_DIR.format(**wc, **g), "latents.parquet")) for g in sae_grid(wc.model)],
    output:
        report(str(Path(SAE_FIGURES, "{model}", "{dataset}", "label_curves.png")), caption="../report/captions/sae_curves.rst", category="k-SAE", subcategory="{model}/{dataset}"),
    params:
        runs=lambda wc: " ".join(shlex.quote(SAE_DIR.format(**wc, **g)) for g in sae_grid(wc.model)),
    log:
        log_path("sae_figure_curves", "{model}", "{dataset}"),
    benchmark:
        bench_path("sae_figure_curves", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas sae-figures curves --runs {params.runs} --out {output:q} > {log:q} 2>&1"


rule sae_figure_training:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [str(Path(SAE_DIR.format(**wc, **g), f)) for g in sae_grid(wc.model) for f in ("curve.csv", "metrics.json")],
    output:
        report(str(Path(SAE_FIGURES, "{model}", "{dataset}", "training_curves.png")), caption="../report/captions/sae_training.rst", category="k-SAE", subcategory="{model}/{dataset}"),
    params:
        runs=lambda wc: " ".join(shlex.quote(SAE_DIR.format(**wc, **g)) for g in sae_grid(wc.model)),
    log:
        log_path("sae_figure_training", "{model}", "{dataset}"),
    benchmark:
        bench_path("sae_figure_training", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas sae-figures training --runs {params.runs} --out {output:q} > {log:q} 2>&1"


rule sae_figure_across_models:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [SAE_SUMMARY.format(model=m, dataset=wc.dataset) for m in SAE_MODELS],
    output:
        report(str(Path(SAE_FIGURES, "{dataset}", "label_stats_across_models.png")), caption="../report/captions/sae_across_models.rst", category="k-SAE", subcategory="all models/{dataset}"),
    log:
        log_path("sae_figure_across_models", "{dataset}"),
    benchmark:
        bench_path("sae_figure_across_models", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas sae-figures across-models --summary {input:q} --out {output:q} > {log:q} 2>&1"


rule sae_gallery:
    conda:
        "../envs/analysis.yaml"
    input:
        latents=str(Path(SAE_DIR, "latents.parquet")),
        dataset=lambda wc: dataset_input(wc.dataset),
    output:
        report(SAE_GALLERY, caption="../report/captions/sae_gallery.rst", category="k-SAE", subcategory="{model}/{dataset} {layer}", labels={"layer": "{layer}", "timestep": "{timestep}"}),
    params:
        run=lambda wc: SAE_DIR.format(**wc),
        latents=config["sae"]["gallery_latents"],
    log:
        log_path("sae_gallery", "{model}", "{dataset}", "{layer}", "t{timestep}"),
    benchmark:
        bench_path("sae_gallery", "{model}", "{dataset}", "{layer}", "t{timestep}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas sae-figures gallery --run {params.run:q} --dataset {input.dataset:q}"
        " --latents {params.latents} --out {output:q} > {log:q} 2>&1"


for _m in SAE_MODELS:
    for _d in SAE_DATASETS:
        ALL_TARGETS.append(SAE_SUMMARY.format(model=_m, dataset=_d))
        for _name in ("label_stats_vs_layer", "label_stats_vs_timestep", "label_curves", "training_curves"):
            ALL_TARGETS.append(str(Path(SAE_FIGURES, _m, _d, f"{_name}.png")))
        if config["sae"]["gallery"]:
            ALL_TARGETS.extend(SAE_GALLERY.format(model=_m, dataset=_d, **g) for g in sae_grid(_m))
        ALL_TARGETS.extend(
            str(Path(SAE_DIR.format(model=_m, dataset=_d, **g), "spatial.json"))
            for g in sae_grid(_m)
            if g["layer"] in SAE_SPATIAL_LAYERS
        )
for _d in SAE_DATASETS:
    ALL_TARGETS.append(str(Path(SAE_FIGURES, _d, "label_stats_across_models.png")))
