# extract stage: one job per (model, dataset, timestep) captures every selected layer in one
# forward pass per batch into results/activations/{model}/{dataset}/t{timestep}.zarr. The
# directory results/activations/{model}/{dataset}/ reads as one store over the times
# (diffatlas.activations.store.ActivationStore, open_dataset for xarray). A job gets the
# section without the grid (models, datasets, timesteps), so adding a timestep plans one new
# extraction job and re-runs none. Noise is seeded per (sample, timestep); with noise:
# inversion each job runs its own DDIM inversion path to its timestep (the path depends on
# the timestep alone, so values equal those of a joint run). The store is written under a
# temporary name and renamed into place when complete, so a killed job leaves nothing a
# later job would trust.
#
# A dataset written in shards (extract.shard_size, rules/data.smk) is extracted one job per
# (model, dataset, timestep, shard), a GPU job under the SLURM profile, each writing a complete
# store over its shard's samples (chunked (1, batch_size, ...), so a shard_size that is a
# multiple of batch_size makes every shard whole chunks):
#
#   results/activations/{model}/{dataset}/shards/t{timestep}/{shard}.zarr
#
# and a light local job gathers them into the same t{timestep}.zarr an unsharded run writes
# (diffatlas.activations.gather: a zarr v3 store whose chunk files are hard links to the
# shards'), so SAE, Diff-C and xarray read it as one, samples in dataset order. A failed or
# deleted shard store re-runs alone; a new shard adds one job per (model, timestep) and a
# re-gather, and the finished shards stay as they are.

from diffatlas.activations.config import ExtractConfig

EXTRACT_STORE = str(Path(RESULTS, "activations", "{model}", "{dataset}", "t{timestep}.zarr"))
EXTRACT_SHARD_STORE = str(Path(RESULTS, "activations", "{model}", "{dataset}", "shards", "t{timestep}", "{shard}.zarr"))
# The section less the job grid (ExtractConfig.JOB_FREE_KEYS), per model: a model's own
# layers (models.<name>.layers) replace extract.layers for it (extract_section); the job's
# timestep comes as --timestep. Used through a function, so "{label}" in prompt_template is
# no wildcard.
EXTRACT_CFGS = {m: ExtractConfig.job_json(extract_section(m)) for m in config["models"]}


rule extract:
    conda:
        "../envs/torch.yaml"
    input:
        dataset=lambda wc: dataset_dir(wc.dataset),
        model=lambda wc: model_input(wc.model),
    output:
        directory(EXTRACT_STORE),
    params:
        model_path=lambda wc: model_path(wc.model),
        # --revision REV / --allow-pickle-weights as separate arguments, each quoted (:q)
        model_args=model_args_arg,
        cfg=lambda wc: EXTRACT_CFGS[wc.model],
        time=time_arg,  # the step, or a flow model's sigma (its store is named t{sigma * T})
        device=config["device"],
    log:
        log_path("extract", "{model}", "{dataset}", "t{timestep}"),
    benchmark:
        bench_path("extract", "{model}", "{dataset}", "t{timestep}")
    wildcard_constraints:
        # only configured names, so a typo'd target is "no rule" rather than a KeyError
        model="|".join(config["models"]),
        dataset=PLAIN_DATASETS,
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    shell:
        "diffatlas extract --model {params.model_path:q} --dataset {input.dataset:q} --out {output:q}"
        " --timestep {params.time} --config-json {params.cfg:q} --device {params.device:q} --threads {threads}"
        " --model-name {wildcards.model} --dataset-name {wildcards.dataset} {params.model_args:q}"
        " > {log:q} 2>&1"


rule extract_shard:
    conda:
        "../envs/torch.yaml"
    input:
        dataset=str(Path(RESULTS, "data", "{dataset}", DATASET_SHARDS_DIR, "{shard}")),
        model=lambda wc: model_input(wc.model),
    output:
        directory(EXTRACT_SHARD_STORE),
    params:
        model_path=lambda wc: model_path(wc.model),
        model_args=model_args_arg,
        cfg=lambda wc: EXTRACT_CFGS[wc.model],
        time=time_arg,  # the step, or a flow model's sigma (its store is named t{sigma * T})
        device=config["device"],
    log:
        log_path("extract", "{model}", "{dataset}", "t{timestep}", "{shard}"),
    benchmark:
        bench_path("extract", "{model}", "{dataset}", "t{timestep}", "{shard}")
    wildcard_constraints:
        model="|".join(config["models"]),
        dataset=SHARDED_DATASETS,
        shard="[0-9]+",
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    shell:
        "diffatlas extract --model {params.model_path:q} --dataset {input.dataset:q} --out {output:q}"
        " --timestep {params.time} --config-json {params.cfg:q} --device {params.device:q} --threads {threads}"
        " --model-name {wildcards.model} --dataset-name {wildcards.dataset} {params.model_args:q}"
        " > {log:q} 2>&1"


localrules:
    gather_extract,  # links chunk files: seconds, on the submitting host (SLURM profile)


rule gather_extract:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [EXTRACT_SHARD_STORE.format(shard=p.name, **wc) for p in DATASET_SHARDS[wc.dataset]],
    output:
        directory(EXTRACT_STORE),
    params:
        dataset=lambda wc: dataset_dir(wc.dataset),
    log:
        log_path("gather_extract", "{model}", "{dataset}", "t{timestep}"),
    benchmark:
        bench_path("gather_extract", "{model}", "{dataset}", "t{timestep}")
    wildcard_constraints:
        model="|".join(config["models"]),
        dataset=SHARDED_DATASETS,
    threads: 1
    shell:
        "diffatlas gather-activations --out {output:q} --parts {input:q} --dataset {params.dataset:q} > {log:q} 2>&1"


# A model's own lists (models.<name>.layers, models.<name>.timesteps) replace extract.layers
# and extract.timesteps for it (extract_section, EXTRACT_CFGS). Stores
# are named by training step (t{timestep}); a flow-matching model's sigmas are named by its
# scheduler's timestep sigma * T (s0.500 -> t500) and passed to the job as sigmas (time_arg).
for _m in config["extract"]["models"]:
    _times = step_times(_m, "extract", "extraction", "extract.models")
    ALL_TARGETS.extend(EXTRACT_STORE.format(model=_m, dataset=d, timestep=t) for d in config["extract"]["datasets"] for t in _times)
