# diffatlas: an atlas of what a diffusion model knows, layer by layer and timestep by timestep.
#
# Data flows one way: data -> model -> activations -> {SAE, Diff-C} -> figures, and
# model -> {DAAM maps, geometry} -> figures. Every rule calls the diffatlas package through
# its CLI; no analysis logic lives here. The results/ path grammar is in README.md.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


# `snakemake --report results/report.zip`: every figure and summary table is marked with
# report(...) in its rule, with a caption under report/captions/.
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/world_model.smk"
include: "rules/extract.smk"
include: "rules/sae.smk"
include: "rules/diffc.smk"
include: "rules/daam.smk"
include: "rules/geometry.smk"
include: "rules/intervene.smk"
include: "rules/links.smk"
include: "rules/atlas.smk"  # last: the atlas reads every other target


rule all:
    default_target: True
    input:
        REPORTABLE_TARGETS if REPORT_MODE else ALL_TARGETS,


# The end of a run says what was made: stages, key numbers with their intervals, the files to
# open and the time per stage (diffatlas.run_summary reads existing files only). A failure
# here is reported and never fails the finished run.
onsuccess:
    import subprocess

    _summary = ["diffatlas", "summary", "--results", RESULTS, "--rules", str(Path(workflow.basedir) / "rules")]
    if WORLD_FIDELITY_RECORD is not None:
        _summary += ["--fidelity-record", WORLD_FIDELITY_RECORD[0]]
    try:
        subprocess.run(_summary, check=False)
    except OSError as _err:
        print(f"end-of-run summary not printed ({_err}); run: {' '.join(_summary)}")
