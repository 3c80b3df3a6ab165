# data stage: every dataset in config["datasets"] becomes results/data/{dataset}/
# (images.npy, masks.npy for ShapesWorld, metadata.parquet, info.json), rendered
# (kind shapesworld) or ingested from an image folder or a CSV/Parquet manifest. The
# directory appears only when complete. One preview figure per dataset:
# results/figures/data/{dataset}_preview.png.

import json


rule make_dataset:
    conda:
        "../envs/analysis.yaml"
    input:
        # real datasets depend on their folder or manifest (a missing one is reported by
        # make-dataset itself, naming the config key)
        lambda wc: [
            p
            for p in [config["datasets"][wc.dataset].get("path")]
            if p and Path(p).exists()
        ],
    output:
        directory(dataset_dir("{dataset}")),
    params:
        cfg=lambda wc: json.dumps(config["datasets"][wc.dataset], sort_keys=True),
    log:
        log_path("make_dataset", "{dataset}"),
    benchmark:
        bench_path("make_dataset", "{dataset}")
    wildcard_constraints:
        # only configured datasets, so a typo'd target is "no rule" rather than a KeyError
        dataset="|".join(config["datasets"]),
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    shell:
        "diffatlas make-dataset --name {wildcards.dataset} --config-json {params.cfg:q}"
        " --out {output:q} --threads {threads} > {log:q} 2>&1"


localrules:
    dataset_preview,  # one small figure: runs on the submitting host (SLURM profile)


rule dataset_preview:
    conda:
        "../envs/analysis.yaml"
    input:
        dataset_dir("{dataset}"),
    output:
        report(str(Path(RESULTS, "figures", "data", "{dataset}_preview.png")), caption="../report/captions/dataset_preview.rst", category="data", subcategory="{dataset}"),
    log:
        log_path("dataset_preview", "{dataset}"),
    benchmark:
        bench_path("dataset_preview", "{dataset}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas preview-dataset --data {input:q} --out {output:q} > {log:q} 2>&1"


for _name in config["datasets"]:
    ALL_TARGETS.append(dataset_dir(_name))
    ALL_TARGETS.append(str(Path(RESULTS, "figures", "data", f"{_name}_preview.png")))
