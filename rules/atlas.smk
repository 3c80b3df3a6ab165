# atlas stage: the static HTML atlas of everything the other stages made.
#
#   results/atlas/index.html     a self-contained folder (relative links, no server, no network):
#       per (model, dataset) the layer x timestep grid (Diff-C, probe, SAE FVE, purity, dead
#       fraction), per layer x timestep the ranked SAE latents with their top images and spatial
#       activation maps, DAAM word maps and masks, geometry edit strips and global directions,
#       and the world model's fidelity and samples.
#
# The atlas only reads results/ (diffatlas.atlas); it runs after every other target of the
# default run. Included last, so ATLAS_INPUTS is every target the other stages added.

ATLAS_DIR = str(Path(RESULTS, "atlas"))
ATLAS_INPUTS = list(ALL_TARGETS)
# The files the interventions and links pages read beyond the stages' targets (experiment
# directories, the links tables and records), named so the DAG orders them before the atlas;
# empty lists where a stage does not run in this config.
ATLAS_INTERVENE = [INTERVENE_RUN.format(model=m, **g) for m in INTERVENE.models for g in intervene_grid(m)]
ATLAS_INTERVENE += [str(Path(INTERVENE_SAE.format(model=m, **g), "latents.parquet")) for m in INTERVENE.models for g in intervene_grid(m)]
ATLAS_INTERVENE += [INTERVENE_SUMMARY.format(model=m) for m in INTERVENE.models]
ATLAS_LINKS = [
    str(Path(LINKS_DIR.format(model=m, dataset=d), name))
    for m in LINKS_DAAM_MODELS
    for d in LINKS_DAAM_DATASETS
    if SAE_SPATIAL_LAYERS
    for name in ("sae_daam_summary.csv", "sae_daam.json")
]
ATLAS_LINKS += [
    str(Path(LINKS_DIR.format(model=m, dataset=d), name))
    for m in LINKS_DIRECTION_MODELS
    for d in SAE_DATASETS
    for name in ("directions.csv", "directions_agreement.csv", "directions.json")
]

localrules:
    atlas,  # reads files and writes small PNGs: seconds on the submitting host


rule atlas:
    conda:
        "../envs/analysis.yaml"
    input:
        ATLAS_INPUTS,
        intervene=ATLAS_INTERVENE,
        links=ATLAS_LINKS,
        fidelity=WORLD_FIDELITY_FILES[0],
    output:
        directory(ATLAS_DIR),
    params:
        # the results folder the atlas reads: the one its own output sits in
        results=lambda wc, output: str(Path(output[0]).parent),
    log:
        log_path("atlas", "atlas"),
    benchmark:
        bench_path("atlas", "atlas")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    shell:
        "diffatlas atlas --results {params.results:q} --out {output:q} --fidelity-record {input.fidelity:q} > {log:q} 2>&1"


ALL_TARGETS.append(ATLAS_DIR)
