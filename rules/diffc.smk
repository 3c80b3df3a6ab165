# diffc stage: Diff-C classifiers and linear probes per (model, dataset, layer, timestep),
# trained on the activation store, then a summary across the grid and its figures.
#
#   results/diffc/{model}/{dataset}/{layer}/t{timestep}/
#       metrics.json        per granularity (coarse, fine) and method (diffc, probe): accuracy with
#                           its 95% Wilson interval, every seed's accuracy and their spread, macro-F1, per-class accuracy, confusion matrix, warnings; model, layer,
#                           timestep, alpha_bar, seed, prompt, pooling, split sizes
#       diffc.safetensors   Diff-C weights, one classifier per granularity (arch in metadata)
#       probe.safetensors   logistic-regression probe weights per granularity (no pickle)
#       predictions.csv     sample_id, split, granularity, true, diffc, probe
#   results/diffc/summary.csv                                   one row per job x granularity x method
#   results/figures/diffc/{model}/{dataset}/accuracy_vs_layer.png
#   results/figures/diffc/{model}/{dataset}/accuracy_vs_timestep.png
#   results/figures/diffc/{dataset}/models_accuracy_vs_timestep.png   (when several models)
#
# The grid is extract.models x extract.datasets x diffc.layers (default: the model's own
# models.<name>.layers, else extract.layers, those with spatial maps) x diffc.timesteps
# (default: the model's own models.<name>.timesteps, else extract.timesteps). A flow-matching
# model (SD3, Flux) is classified at its sigmas: results are named like its stores, by the
# scheduler's timestep sigma * T (t250 for s0.250), and metrics.json records sigma beside it.
# One job trains both label granularities: they share the expensive part (reading the maps)
# and the split, so coarse and fine are scored on the same test samples, and the job count
# stays at one per (layer, timestep).

from snakemake.exceptions import WorkflowError

DIFFC = config["diffc"]
DIFFC_MODELS = config["extract"]["models"]
DIFFC_DATASETS = config["extract"]["datasets"]

if not config["extract"].get("spatial", True):
    raise WorkflowError(
        "config extract.spatial = false, but Diff-C trains on spatial maps; set extract.spatial: true"
    )


DIFFC_LAYERS = {m: diffc_layers(m) for m in DIFFC_MODELS}
DIFFC_TIMESTEPS = {m: trained_times(m, "diffc") for m in DIFFC_MODELS}

# Path templates of the stage (filled by Snakemake wildcards or str.format).
DIFFC_STORE = EXTRACT_STORE  # the per-time store of the job's timestep (rules/extract.smk)
DIFFC_DIR = str(Path(RESULTS, "diffc", "{model}", "{dataset}", "{layer}", "t{timestep}"))
DIFFC_SUMMARY = str(Path(RESULTS, "diffc", "summary.csv"))
DIFFC_FIGURES = str(Path(RESULTS, "figures", "diffc"))
DIFFC_METRICS = [
    str(Path(DIFFC_DIR, "metrics.json")).format(model=m, dataset=d, layer=l, timestep=t)
    for m in DIFFC_MODELS
    for d in DIFFC_DATASETS
    for l in DIFFC_LAYERS[m]
    for t in DIFFC_TIMESTEPS[m]
]
# Summary and figures: seconds of CPU each, run on the submitting host (SLURM profile).
localrules:
    diffc_summary,
    diffc_figure_layer,
    diffc_figure_timestep,
    diffc_figure_models,


# The training settings without the grid keys, so growing the grid re-runs no finished job.
DIFFC_TRAIN_CFG = DiffCConfig.job_json(DIFFC)


rule train_diffc:
    conda:
        "../envs/torch.yaml"
    input:
        store=DIFFC_STORE,
    output:
        metrics=str(Path(DIFFC_DIR, "metrics.json")),
        diffc=str(Path(DIFFC_DIR, "diffc.safetensors")),
        probe=str(Path(DIFFC_DIR, "probe.safetensors")),
        predictions=str(Path(DIFFC_DIR, "predictions.csv")),
    params:
        out=lambda wc: DIFFC_DIR.format(**wc),
        cfg=lambda wc: DIFFC_TRAIN_CFG,  # a function: the JSON holds {braces}
        device=config["device"],
    log:
        log_path("train_diffc", "{model}", "{dataset}", "{layer}", "t{timestep}"),
    benchmark:
        bench_path("train_diffc", "{model}", "{dataset}", "{layer}", "t{timestep}")
    threads: DIFFC["threads"]
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 15 * attempt * DIFFC["seeds"],  # diffc.seeds trains each job that many times
    shell:
        "diffatlas train-diffc --store {input.store:q} --layer {wildcards.layer:q} --timestep {wildcards.timestep}"
        " --out {params.out:q} --model-name {wildcards.model} --dataset-name {wildcards.dataset}"
        " --config-json {params.cfg:q} --device {params.device:q} --threads {threads} > {log:q} 2>&1"


rule diffc_summary:
    conda:
        "../envs/analysis.yaml"
    input:
        DIFFC_METRICS,
    output:
        report(DIFFC_SUMMARY, caption="../report/captions/diffc_summary.rst", category="Diff-C", subcategory="all models"),
    log:
        log_path("diffc_summary", "summary"),
    benchmark:
        bench_path("diffc_summary", "summary")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas diffc-summary --out {output:q} {input:q} > {log:q} 2>&1"


rule diffc_figure_layer:
    conda:
        "../envs/analysis.yaml"
    input:
        DIFFC_SUMMARY,
    output:
        report(str(Path(DIFFC_FIGURES, "{model}", "{dataset}", "accuracy_vs_layer.png")), caption="../report/captions/diffc_vs_layer.rst", category="Diff-C", subcategory="{model}/{dataset}"),
    log:
        log_path("diffc_figure_layer", "{model}", "{dataset}"),
    benchmark:
        bench_path("diffc_figure_layer", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas diffc-figure --summary {input:q} --kind layer --model {wildcards.model}"
        " --dataset {wildcards.dataset} --out {output:q} > {log:q} 2>&1"


rule diffc_figure_timestep:
    conda:
        "../envs/analysis.yaml"
    input:
        DIFFC_SUMMARY,
    output:
        report(str(Path(DIFFC_FIGURES, "{model}", "{dataset}", "accuracy_vs_timestep.png")), caption="../report/captions/diffc_vs_timestep.rst", category="Diff-C", subcategory="{model}/{dataset}"),
    log:
        log_path("diffc_figure_timestep", "{model}", "{dataset}"),
    benchmark:
        bench_path("diffc_figure_timestep", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas diffc-figure --summary {input:q} --kind timestep --model {wildcards.model}"
        " --dataset {wildcards.dataset} --out {output:q} > {log:q} 2>&1"


rule diffc_figure_models:
    conda:
        "../envs/analysis.yaml"
    input:
        DIFFC_SUMMARY,
    output:
        report(str(Path(DIFFC_FIGURES, "{dataset}", "models_accuracy_vs_timestep.png")), caption="../report/captions/diffc_models.rst", category="Diff-C", subcategory="all models/{dataset}"),
    params:
        models=DIFFC_MODELS,  # a list: :q quotes each name
    log:
        log_path("diffc_figure_models", "{dataset}"),
    benchmark:
        bench_path("diffc_figure_models", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas diffc-figure --summary {input:q} --kind models --dataset {wildcards.dataset}"
        " --models {params.models:q} --out {output:q} > {log:q} 2>&1"


ALL_TARGETS.append(DIFFC_SUMMARY)
ALL_TARGETS.extend(
    str(Path(DIFFC_FIGURES, m, d, f"accuracy_vs_{kind}.png"))
    for m in DIFFC_MODELS
    for d in DIFFC_DATASETS
    for kind in ("layer", "timestep")
)
if len(DIFFC_MODELS) > 1:
    ALL_TARGETS.extend(str(Path(DIFFC_FIGURES, d, "models_accuracy_vs_timestep.png")) for d in DIFFC_DATASETS)
