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

localrules:
    atlas,  # reads files and writes small PNGs: seconds on the submitting host


rule atlas:
    conda:
        "../envs/analysis.yaml"
    input:
        ATLAS_INPUTS,
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
