# intervene stage: the judged steering experiment (issue 20). Do SAE latents *cause* what their
# label statistics say? Per (model, layer, timestep) an SAE is trained on activations taken as
# generation takes them, and each colour/shape word's latent steers and ablates generations that
# the ShapesWorld judge reads.
#
#   results/intervene/{model}/store/t{timestep}.zarr           (intervene_store: `diffatlas extract`
#       of intervene.dataset with intervene.conditioning (caption), the intervene.layers, full-size
#       spatial maps; the rest of the extraction as in the extract section)
#   results/intervene/{model}/sae/{layer}/t{timestep}/         (intervene_sae: `diffatlas train-sae`
#       with the sae section overridden by intervene.sae: spatial samples, latents mined on train)
#   results/intervene/{model}/experiment/{layer}/t{timestep}/  (intervene_experiment: rates.csv,
#       verdicts.csv, selection.csv, judged.csv, images.safetensors, record.json)
#   results/intervene/{model}/summary.csv                      (per layer x timestep x attribute:
#       how many words' latents steer / are removed by ablation, and which)
#   results/figures/intervene/{model}/dose_response.png        (dose-response curves, Wilson bands)
#
# The grid is intervene.models x intervene.layers x intervene.timesteps; the demo runs one cell
# (configs/paper-intervene.yaml: the full grid). Each job gets only the keys it reads
# (InterventionConfig.JOBS): changing alphas re-runs the experiments, not the store or the SAEs.

from diffatlas.interventions.config import InterventionConfig

import re

try:
    INTERVENE = InterventionConfig.from_dict(config["intervene"])
except UserError as _err:
    raise WorkflowError(str(_err)) from None
for _l in INTERVENE.layers:
    # the {layer} wildcard's character set (common.smk), so a name that validates is never a MissingInputException
    if not re.fullmatch(LAYER_WILDCARD, _l):
        raise WorkflowError(
            f"config intervene.layers: {_l!r} is not a layer name; allowed: aliases (mid, up_ft1, block3, ...) or module "
            "paths of letters, digits and _ . - * ? [ ]"
        )
for _m in INTERVENE.models:
    if _m not in config["models"]:
        raise WorkflowError(f"config intervene.models: {_m!r} is not a configured model; allowed: {', '.join(config['models'])}")
if INTERVENE.dataset not in config["datasets"]:
    raise WorkflowError(
        f"config intervene.dataset = {INTERVENE.dataset!r} is not a configured dataset; allowed: {', '.join(config['datasets'])}"
    )
INTERVENE_TIMES = {m: INTERVENE.timesteps for m in INTERVENE.models}

INTERVENE_ROOT = str(Path(RESULTS, "intervene", "{model}"))
INTERVENE_STORE = str(Path(INTERVENE_ROOT, "store", "t{timestep}.zarr"))
INTERVENE_SAE = str(Path(INTERVENE_ROOT, "sae", "{layer}", "t{timestep}"))
INTERVENE_RUN = str(Path(INTERVENE_ROOT, "experiment", "{layer}", "t{timestep}"))
INTERVENE_SUMMARY = str(Path(INTERVENE_ROOT, "summary.csv"))
INTERVENE_FIGURE = str(Path(RESULTS, "figures", "intervene", "{model}", "dose_response.png"))
# Functions, so the JSON's braces are no wildcards.
try:
    INTERVENE_STORE_CFG = INTERVENE.store_json(config["extract"])
    INTERVENE_SAE_CFG = INTERVENE.sae_json(config["sae"])
except UserError as _err:
    raise WorkflowError(str(_err)) from None
INTERVENE_RUN_CFG = InterventionConfig.job_json(config["intervene"], "experiment")

intervene_grid = lambda model: [dict(layer=l, timestep=t) for l in INTERVENE.layers for t in INTERVENE_TIMES[model]]


localrules:
    intervene_summary,  # reads CSVs, draws one figure: seconds on the submitting host


rule intervene_store:
    conda:
        "../envs/torch.yaml"
    input:
        dataset=lambda wc: dataset_input(INTERVENE.dataset),
        model=lambda wc: model_input(wc.model),
    output:
        directory(INTERVENE_STORE),
    params:
        model_path=lambda wc: model_path(wc.model),
        model_args=model_args_arg,
        cfg=lambda wc: INTERVENE_STORE_CFG,
        dataset=INTERVENE.dataset,
        device=config["device"],
    log:
        log_path("intervene_store", "{model}", "t{timestep}"),
    benchmark:
        bench_path("intervene_store", "{model}", "t{timestep}")
    wildcard_constraints:
        model="|".join(INTERVENE.models),
    threads: 1  # one torch thread: two jobs share the 2 demo cores (2 threads ran 2x slower here)
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    shell:
        "diffatlas extract --model {params.model_path:q} --dataset {input.dataset:q} --out {output:q}"
        " --timestep {wildcards.timestep} --config-json {params.cfg:q} --device {params.device:q} --threads {threads}"
        " --model-name {wildcards.model} --dataset-name {params.dataset:q} {params.model_args:q}"
        " > {log:q} 2>&1"


rule intervene_sae:
    conda:
        "../envs/torch.yaml"
    input:
        store=INTERVENE_STORE,
    output:
        weights=str(Path(INTERVENE_SAE, "sae.safetensors")),
        cfg=str(Path(INTERVENE_SAE, "cfg.json")),
        metrics=str(Path(INTERVENE_SAE, "metrics.json")),
        latents=str(Path(INTERVENE_SAE, "latents.parquet")),
    params:
        out=lambda wc: INTERVENE_SAE.format(**wc),
        cfg=lambda wc: INTERVENE_SAE_CFG,
        dataset=INTERVENE.dataset,
        device=config["device"],
    log:
        log_path("intervene_sae", "{model}", "{layer}", "t{timestep}"),
    benchmark:
        bench_path("intervene_sae", "{model}", "{layer}", "t{timestep}")
    wildcard_constraints:
        model="|".join(INTERVENE.models),
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 20 * attempt,
    shell:
        "diffatlas train-sae --store {input.store:q} --layer {wildcards.layer:q} --timestep {wildcards.timestep}"
        " --out {params.out:q} --model-name {wildcards.model} --dataset-name {params.dataset:q}"
        " --config-json {params.cfg:q} --device {params.device:q} --threads {threads} > {log:q} 2>&1"


rule intervene_experiment:
    conda:
        "../envs/torch.yaml"
    input:
        weights=str(Path(INTERVENE_SAE, "sae.safetensors")),
        latents=str(Path(INTERVENE_SAE, "latents.parquet")),
        metrics=str(Path(INTERVENE_SAE, "metrics.json")),
        model=lambda wc: model_input(wc.model),
    output:
        directory(INTERVENE_RUN),
    params:
        sae=lambda wc: INTERVENE_SAE.format(**wc),
        model_path=lambda wc: model_path(wc.model),
        model_args=model_args_arg,
        cfg=lambda wc: INTERVENE_RUN_CFG,
        device=config["device"],
    log:
        log_path("intervene_experiment", "{model}", "{layer}", "t{timestep}"),
    benchmark:
        bench_path("intervene_experiment", "{model}", "{layer}", "t{timestep}")
    wildcard_constraints:
        model="|".join(INTERVENE.models),
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    shell:
        "diffatlas intervene-experiment --model {params.model_path:q} --model-name {wildcards.model} {params.model_args:q}"
        " --sae {params.sae:q} --layer {wildcards.layer:q} --timestep {wildcards.timestep} --config-json {params.cfg:q}"
        " --device {params.device:q} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule intervene_summary:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [INTERVENE_RUN.format(model=wc.model, **g) for g in intervene_grid(wc.model)],
    output:
        table=report(INTERVENE_SUMMARY, caption="../report/captions/intervene_summary.rst", category="Interventions", subcategory="{model}"),
        figure=report(INTERVENE_FIGURE, caption="../report/captions/intervene_dose_response.rst", category="Interventions", subcategory="{model}"),
    log:
        log_path("intervene_summary", "{model}"),
    benchmark:
        bench_path("intervene_summary", "{model}")
    wildcard_constraints:
        model="|".join(INTERVENE.models),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas intervene-summary --table {output.table:q} --figure {output.figure:q} {input:q} > {log:q} 2>&1"


for _m in INTERVENE.models:
    ALL_TARGETS.extend([INTERVENE_SUMMARY.format(model=_m), INTERVENE_FIGURE.format(model=_m)])
