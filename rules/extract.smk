# extract stage: one job per (model, dataset) runs every selected layer x timestep into
# results/activations/{model}/{dataset}.zarr (one forward pass per batch and timestep
# captures every layer). The store is written under a temporary name and renamed into place
# when complete, so a killed job leaves nothing a later job would trust.

import json


rule extract:
    conda:
        "../envs/torch.yaml"
    input:
        dataset=lambda wc: dataset_dir(wc.dataset),
        model=lambda wc: model_input(wc.model),
    output:
        directory(str(Path(RESULTS, "activations", "{model}", "{dataset}.zarr"))),
    params:
        model_path=lambda wc: model_path(wc.model),
        # --revision REV / --allow-pickle-weights as separate arguments, each quoted (:q)
        model_args=model_args_arg,
        # The section without the job grid (models, datasets), so adding a model does not
        # re-run the others. A function, so "{label}" in prompt_template is no wildcard.
        cfg=lambda wc: json.dumps(
            {k: v for k, v in config["extract"].items() if k not in ("models", "datasets")},
            sort_keys=True,
        ),
        device=config["device"],
    log:
        log_path("extract", "{model}", "{dataset}"),
    benchmark:
        bench_path("extract", "{model}", "{dataset}")
    wildcard_constraints:
        # only configured names, so a typo'd target is "no rule" rather than a KeyError
        model="|".join(config["models"]),
        dataset="|".join(config["datasets"]),
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    shell:
        "diffatlas extract --model {params.model_path:q} --dataset {input.dataset:q} --out {output:q}"
        " --config-json {params.cfg:q} --device {params.device:q} --threads {threads}"
        " --model-name {wildcards.model} --dataset-name {wildcards.dataset} {params.model_args:q}"
        " > {log:q} 2>&1"


ALL_TARGETS.extend(
    str(Path(RESULTS, "activations", m, f"{d}.zarr"))
    for m in config["extract"]["models"]
    for d in config["extract"]["datasets"]
)
