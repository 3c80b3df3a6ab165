# daam stage: DAAM word maps from cross-attention, scored against known masks.
#
#   results/daam/{model}/prompts/{prompt_set}/   generation with tracing (daam-generate):
#       run/ (maps.zarr: images, token maps [, steps__HxW]; items/words.parquet; info.json),
#       summary.csv, threshold_curve.csv, relations.csv, detections.csv
#       (+ cohyponym.csv, adjective_swaps.csv for entanglement sets)
#   results/daam/{model}/real/{dataset}/          real images noised/inverted and denoised with
#       their captions (daam-real): run/, summary.csv (vs true masks), threshold_curve.csv, relations.csv
#       The start time is the model's own convention: daam.real_t (training step) for DDPM-family
#       models, daam.real_sigma for flow-matching ones (SD3, Flux); the job picks by the model's
#       scheduler (DAAMConfig.real_start), so one daam_real rule serves both and gets both keys.
#   results/figures/daam/{model}/overlays_prompts_{prompt_set}.png, overlays_real_{dataset}.png,
#       miou.png (table + threshold curve), relations.png (mIoH vs mIoD),
#       entanglement_{prompt_set}.png (entanglement sets only)

DAAM = config["daam"]

for _i, _name in enumerate(DAAM["datasets"]):
    if _name not in config["datasets"]:
        raise WorkflowError(
            f"config daam.datasets[{_i}] = {_name!r} is not a configured dataset; "
            f"allowed: {', '.join(sorted(config['datasets']))}"
        )


# Path helpers (lambdas: the linter wants functions in common.smk, which this stage does not own).
daam_dir = lambda model, *parts: str(Path(RESULTS, "daam", model, *parts))
daam_figure = lambda model, name: str(Path(RESULTS, "figures", "daam", model, f"{name}.png"))
daam_sets = lambda kinds: [n for n, s in DAAM["prompt_sets"].items() if s["kind"] in kinds]
# Runs whose words are scored against objects: every real dataset and every caption/list set.
daam_scored_dirs = lambda wc: [daam_dir(wc.model, "real", d) for d in DAAM["datasets"]] + [
    daam_dir(wc.model, "prompts", p) for p in daam_sets(("shapesworld_captions", "list"))
]
# Each job gets only the keys it reads (DAAMConfig.JOBS): a generation job its own prompt set,
# a real-image job none, so adding a model, dataset or prompt set re-runs no other job.
# Functions, so that "{adjective} {noun}" in the JSON is no wildcard.
daam_generate_cfg = lambda wc: DAAMConfig.job_json(
    DAAM, "generate", prompt_sets={wc.prompt_set: DAAM["prompt_sets"][wc.prompt_set]}
)
daam_real_cfg = lambda wc: DAAMConfig.job_json(DAAM, "real")

# Figures: seconds of CPU each, run on the submitting host (SLURM profile).
localrules:
    daam_overlays_prompts,
    daam_overlays_real,
    daam_miou_figure,
    daam_relations_figure,
    daam_entanglement_figure,


rule daam_generate:
    conda:
        "../envs/torch.yaml"
    input:
        model=lambda wc: model_input(wc.model),
    output:
        directory(daam_dir("{model}", "prompts", "{prompt_set}")),
    params:
        model_path=lambda wc: model_path(wc.model),
        model_args=model_args_arg,
        cfg=daam_generate_cfg,
        device=config["device"],
    log:
        log_path("daam_generate", "{model}", "{prompt_set}"),
    benchmark:
        bench_path("daam_generate", "{model}", "{prompt_set}")
    wildcard_constraints:
        prompt_set="|".join(DAAM["prompt_sets"]) or "no-prompt-sets",
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 20 * attempt,
    shell:
        "diffatlas daam-generate --model {params.model_path:q} --model-name {wildcards.model}"
        " --prompt-set {wildcards.prompt_set} --out {output:q} --config-json {params.cfg:q}"
        " --device {params.device:q} --threads {threads} {params.model_args:q} > {log:q} 2>&1"


rule daam_real:
    conda:
        "../envs/torch.yaml"
    input:
        model=lambda wc: model_input(wc.model),
        dataset=lambda wc: dataset_input(wc.dataset),
    output:
        directory(daam_dir("{model}", "real", "{dataset}")),
    params:
        model_path=lambda wc: model_path(wc.model),
        model_args=model_args_arg,
        cfg=daam_real_cfg,
        device=config["device"],
    log:
        log_path("daam_real", "{model}", "{dataset}"),
    benchmark:
        bench_path("daam_real", "{model}", "{dataset}")
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 20 * attempt,
    shell:
        "diffatlas daam-real --model {params.model_path:q} --model-name {wildcards.model}"
        " --dataset {input.dataset:q} --dataset-name {wildcards.dataset} --out {output:q}"
        " --config-json {params.cfg:q} --device {params.device:q} --threads {threads} {params.model_args:q}"
        " > {log:q} 2>&1"


rule daam_overlays_prompts:
    conda:
        "../envs/analysis.yaml"
    input:
        daam_dir("{model}", "prompts", "{prompt_set}"),
    output:
        report(daam_figure("{model}", "overlays_prompts_{prompt_set}"), caption="../report/captions/daam_overlays.rst", category="DAAM", subcategory="{model} prompts/{prompt_set}"),
    params:
        n_items=DAAM["overlay_items"],
    log:
        log_path("daam_overlays_prompts", "{model}", "{prompt_set}"),
    benchmark:
        bench_path("daam_overlays_prompts", "{model}", "{prompt_set}")
    wildcard_constraints:
        prompt_set="|".join(DAAM["prompt_sets"]) or "no-prompt-sets",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas daam-figure overlays --inputs {input:q} --out {output:q} --items {params.n_items}"
        " --title 'DAAM word maps: {wildcards.model}, prompt set {wildcards.prompt_set}' > {log:q} 2>&1"


rule daam_overlays_real:
    conda:
        "../envs/analysis.yaml"
    input:
        daam_dir("{model}", "real", "{dataset}"),
    output:
        report(daam_figure("{model}", "overlays_real_{dataset}"), caption="../report/captions/daam_overlays.rst", category="DAAM", subcategory="{model} real/{dataset}"),
    params:
        n_items=DAAM["overlay_items"],
    log:
        log_path("daam_overlays_real", "{model}", "{dataset}"),
    benchmark:
        bench_path("daam_overlays_real", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas daam-figure overlays --inputs {input:q} --out {output:q} --items {params.n_items}"
        " --title 'DAAM word maps: {wildcards.model}, real images of {wildcards.dataset}' > {log:q} 2>&1"


rule daam_miou_figure:
    conda:
        "../envs/analysis.yaml"
    input:
        daam_scored_dirs,
    output:
        report(daam_figure("{model}", "miou"), caption="../report/captions/daam_miou.rst", category="DAAM", subcategory="{model}"),
    log:
        log_path("daam_miou_figure", "{model}"),
    benchmark:
        bench_path("daam_miou_figure", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas daam-figure miou --inputs {input:q} --out {output:q}"
        " --title 'DAAM noun masks vs objects: {wildcards.model}' > {log:q} 2>&1"


rule daam_relations_figure:
    conda:
        "../envs/analysis.yaml"
    input:
        daam_scored_dirs,
    output:
        report(daam_figure("{model}", "relations"), caption="../report/captions/daam_relations.rst", category="DAAM", subcategory="{model}"),
    log:
        log_path("daam_relations_figure", "{model}"),
    benchmark:
        bench_path("daam_relations_figure", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas daam-figure relations --inputs {input:q} --out {output:q}"
        " --title 'head vs dependent maps: {wildcards.model}' > {log:q} 2>&1"


rule daam_entanglement_figure:
    conda:
        "../envs/analysis.yaml"
    input:
        daam_dir("{model}", "prompts", "{prompt_set}"),
    output:
        report(daam_figure("{model}", "entanglement_{prompt_set}"), caption="../report/captions/daam_entanglement.rst", category="DAAM", subcategory="{model} prompts/{prompt_set}"),
    log:
        log_path("daam_entanglement_figure", "{model}", "{prompt_set}"),
    benchmark:
        bench_path("daam_entanglement_figure", "{model}", "{prompt_set}")
    wildcard_constraints:
        prompt_set="|".join(daam_sets(("entanglement",))) or "no-entanglement-sets",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas daam-figure entanglement --inputs {input:q} --out {output:q}"
        " --title 'entanglement: {wildcards.model}, {wildcards.prompt_set}' > {log:q} 2>&1"


for _m in DAAM["models"]:
    for _p in DAAM["prompt_sets"]:
        ALL_TARGETS.append(daam_dir(_m, "prompts", _p))
        ALL_TARGETS.append(daam_figure(_m, f"overlays_prompts_{_p}"))
    for _d in DAAM["datasets"]:
        ALL_TARGETS.append(daam_dir(_m, "real", _d))
        ALL_TARGETS.append(daam_figure(_m, f"overlays_real_{_d}"))
    if DAAM["datasets"] or daam_sets(("shapesworld_captions", "list")):
        ALL_TARGETS.append(daam_figure(_m, "miou"))
        ALL_TARGETS.append(daam_figure(_m, "relations"))
    for _p in daam_sets(("entanglement",)):
        ALL_TARGETS.append(daam_figure(_m, f"entanglement_{_p}"))
