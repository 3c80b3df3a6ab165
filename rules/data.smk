# data stage: every dataset in config["datasets"] becomes results/data/{dataset}/
# (images.npy, masks.npy for ShapesWorld, metadata.parquet, info.json), rendered
# (kind shapesworld) or ingested from an image folder or a CSV/Parquet manifest. The
# directory appears only when complete. One preview figure per dataset:
# results/figures/data/{dataset}_preview.png.
#
# A dataset with more candidates than extract.shard_size is written in shards instead
# (diffatlas.data.shards):
#
#   results/data/{dataset}/shards/{shard}/   one plain dataset directory per shard (00000, ...),
#                                            candidates shard*shard_size .. +shard_size, one job each
#   results/data/{dataset}/index.json        the shards in sample order, counts, sample ids (atomic)
#
# A shard job gets only its own rows and a digest of its candidates (not n_samples, not the
# source's path as an input whose mtime changes with every added file), so adding images
# adds shard jobs and leaves finished shards, and everything extracted from them, untouched.

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
        # only configured datasets with one shard, so a typo'd target is "no rule" rather than a KeyError
        dataset=PLAIN_DATASETS,
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    shell:
        "diffatlas make-dataset --name {wildcards.dataset} --config-json {params.cfg:q}"
        " --out {output:q} --threads {threads} > {log:q} 2>&1"


rule make_dataset_shard:
    conda:
        "../envs/analysis.yaml"
    output:
        directory(str(Path(RESULTS, "data", "{dataset}", DATASET_SHARDS_DIR, "{shard}"))),
    params:
        cfg=lambda wc: json.dumps(shard_section(config["datasets"][wc.dataset]), sort_keys=True),
        rows=lambda wc: f"{SHARD_PLAN[wc.dataset, wc.shard].start}:{SHARD_PLAN[wc.dataset, wc.shard].stop}",
        digest=lambda wc: SHARD_PLAN[wc.dataset, wc.shard].digest,
    log:
        log_path("make_dataset", "{dataset}", "{shard}"),
    benchmark:
        bench_path("make_dataset", "{dataset}", "{shard}")
    wildcard_constraints:
        dataset=SHARDED_DATASETS,
        shard="[0-9]+",
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    shell:
        "diffatlas make-dataset --name {wildcards.dataset} --config-json {params.cfg:q} --rows {params.rows}"
        " --digest {params.digest} --out {output:q} --threads {threads} > {log:q} 2>&1"


localrules:
    dataset_preview,  # one small figure: runs on the submitting host (SLURM profile)
    dataset_index,  # reads the shards' info.json files: seconds


rule dataset_index:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [str(Path(RESULTS, "data", wc.dataset, DATASET_SHARDS_DIR, p.name)) for p in DATASET_SHARDS[wc.dataset]],
    output:
        str(Path(RESULTS, "data", "{dataset}", DATASET_INDEX)),
    params:
        cfg=lambda wc: json.dumps(config["datasets"][wc.dataset], sort_keys=True),
        shards=lambda wc: [p.name for p in DATASET_SHARDS[wc.dataset]],
        dir=lambda wc: dataset_dir(wc.dataset),
        shard_size=SHARD_SIZE,
    log:
        log_path("dataset_index", "{dataset}"),
    wildcard_constraints:
        dataset=SHARDED_DATASETS,
    threads: 1
    shell:
        "diffatlas index-dataset --name {wildcards.dataset} --dataset {params.dir:q} --shards {params.shards}"
        " --config-json {params.cfg:q} --shard-size {params.shard_size} > {log:q} 2>&1"


rule dataset_preview:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: dataset_input(wc.dataset),
    output:
        report(str(Path(RESULTS, "figures", "data", "{dataset}_preview.png")), caption="../report/captions/dataset_preview.rst", category="data", subcategory="{dataset}"),
    log:
        log_path("dataset_preview", "{dataset}"),
    benchmark:
        bench_path("dataset_preview", "{dataset}")
    wildcard_constraints:
        dataset="|".join(config["datasets"]),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas preview-dataset --data {input:q} --out {output:q} > {log:q} 2>&1"


for _name in config["datasets"]:
    ALL_TARGETS.append(dataset_input(_name))
    ALL_TARGETS.append(str(Path(RESULTS, "figures", "data", f"{_name}_preview.png")))
