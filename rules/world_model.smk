# world_model stage: the ShapesWorld text-to-image model.
#
# - train_world_model (only when world_model.source == "trained"): trains the model into
#   results/world_model/model (diffusers layout) with the denoiser of
#   world_model.train.architecture: unet (ShapesWorldPipeline, the shipped model's) or sd3
#   (StableDiffusion3Pipeline on pixels, rectified flow; resources/models/shapesworld-sd3). Its resumable checkpoint lives in
#   results/world_model/checkpoints, outside the declared output, so an interrupted or
#   failed job resumes instead of starting over (Snakemake removes a failed job's outputs).
# - world_fidelity: measures the caption fidelity of whichever model models.shapesworld
#   resolves to: results/world_model/fidelity.json + the samples (minutes of sampling);
#   a flow-matching (sd3) model is sampled with the core's flow Euler step.
# - world_samples_figure: results/figures/world_model/samples.png from the fidelity record.
#
# A model that carries its own fidelity record (fidelity.json + fidelity_samples.npy beside its
# weights, measured with the world_model.fidelity settings now asked for; the shipped checkpoint
# does) is not measured again by default: the figure and the end-of-run summary read the record.
# A trained model, a model without a record, or other fidelity settings are measured by the
# default target; `snakemake --cores all world_fidelity` measures on request.

import json

from diffatlas.world.record import recorded_fidelity

WORLD_DIR = str(Path(RESULTS, "world_model"))
WORLD_FIDELITY_JSON = str(Path(WORLD_DIR, "fidelity.json"))
WORLD_FIDELITY_SAMPLES = str(Path(WORLD_DIR, "fidelity_samples.npy"))
WORLD_SAMPLES_FIGURE = str(Path(RESULTS, "figures", "world_model", "samples.png"))
# (json, samples) of the record shipped with the model, or None: then the workflow measures.
WORLD_FIDELITY_RECORD = (
    None
    if config["world_model"]["source"] == "trained"
    else recorded_fidelity(model_path("shapesworld"), config["world_model"]["fidelity"])
)
WORLD_FIDELITY_FILES = WORLD_FIDELITY_RECORD or (WORLD_FIDELITY_JSON, WORLD_FIDELITY_SAMPLES)


rule train_world_model:
    conda:
        "../envs/torch.yaml"
    output:
        directory(world_model_trained_dir()),
    params:
        cfg=json.dumps(config["world_model"]["train"], sort_keys=True),
        checkpoints=str(Path(WORLD_DIR, "checkpoints")),
        device=config["device"],
    log:
        log_path("train_world_model"),
    benchmark:
        bench_path("train_world_model")
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 180 * attempt,
    shell:
        "diffatlas train-world-model --config-json {params.cfg:q} --out {output:q}"
        " --checkpoint-dir {params.checkpoints:q} --device {params.device:q} --threads {threads}"
        " > {log:q} 2>&1"


rule world_fidelity:
    conda:
        "../envs/torch.yaml"
    input:
        model=model_input("shapesworld"),
    output:
        json=WORLD_FIDELITY_JSON,
        samples=WORLD_FIDELITY_SAMPLES,
    params:
        # the model's path or hub id: a function, so the linter does not read it as a file prefix
        model_path=lambda wc: model_path("shapesworld"),
        model_args=model_args("shapesworld"),
        cfg=FidelityConfig.job_json(config["world_model"]["fidelity"], "sample"),
        device=config["device"],
    log:
        log_path("world_fidelity"),
    benchmark:
        bench_path("world_fidelity")
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 15 * attempt,
    shell:
        "diffatlas world-fidelity --model {params.model_path:q} --config-json {params.cfg:q} {params.model_args:q}"
        " --out-json {output.json:q} --out-samples {output.samples:q}"
        " --device {params.device:q} --threads {threads} > {log:q} 2>&1"


localrules:
    world_samples_figure,  # one small figure: runs on the submitting host (SLURM profile)


rule world_samples_figure:
    conda:
        "../envs/analysis.yaml"
    input:
        json=WORLD_FIDELITY_FILES[0],
        samples=WORLD_FIDELITY_FILES[1],
    output:
        report(WORLD_SAMPLES_FIGURE, caption="../report/captions/world_samples.rst", category="world model", subcategory="shapesworld"),
    params:
        cfg=FidelityConfig.job_json(config["world_model"]["fidelity"], "figure"),
    log:
        log_path("world_samples_figure"),
    benchmark:
        bench_path("world_samples_figure")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas world-fidelity --figure {output:q} --fidelity-json {input.json:q}"
        " --samples {input.samples:q} --config-json {params.cfg:q} > {log:q} 2>&1"


ALL_TARGETS.append(WORLD_SAMPLES_FIGURE)
if WORLD_FIDELITY_RECORD is None:
    ALL_TARGETS.append(WORLD_FIDELITY_JSON)
