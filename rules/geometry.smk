# geometry stage: pullback geometry of the U-Net's h-space (Park et al., NeurIPS 2023), per
# (model, timestep), then measures across timesteps.
#
#   results/geometry/{model}/t{timestep}/
#       basis.safetensors   v [N, n, C, h, w], u [N, n, d], s [N, n], residuals, x_t, x_T
#       edits.safetensors   one-step / x0-normalised / iterative edits, denoised (uint8)
#       meta.json           model, layer, module path, timestep, ᾱ_t, seed, pooling, prompt, config
#   results/geometry/{model}/global/{global.safetensors, meta.json}     global directions (t = T-1)
#   results/geometry/{model}/path_lengths.{csv,json}, path_segments.csv semantic path length (Σ D_geo) of lerp, slerp, geodesic
#   results/geometry/{model}/psd.csv, tangent_distances.csv             across timesteps
#   results/geometry/{model}/spectra_samples.csv, spectra_trend.csv     flatness, PSD centroid vs t (95% CIs)
#   results/geometry/{model}/meaning.csv, meaning_summary.csv           ShapesWorld factors per direction
#   results/geometry/{model}/meaning_random.csv      semantic vs random directions (Wilson 95%)
#   results/geometry/{model}/edit_quality.csv, edit_quality_summary.csv  plain vs x0-normalised vs random:
#                                                    objects found, background blobs, saturation (95%)
#   results/geometry/{model}/global_agreement.csv    judge agreement of global directions across samples
#   results/geometry/{model}/claims.{csv,md}         Park et al.'s claims: value, 95% interval, n, verdict
#   results/figures/geometry/{model}/spectra.png
#   results/figures/geometry/{model}/edits_t{timestep}.png
#   results/figures/geometry/{model}/global_direction.png
#   results/figures/geometry/{model}/psd.png
#   results/figures/geometry/{model}/meaning.png
#   results/figures/geometry/{model}/path_lengths.png   D_geo per segment along lerp / slerp / geodesic, totals
#
# The grid is geometry.models x (the model's times + global_timestep); a model's times are its
# own models.<name>.timesteps, else geometry.timesteps. A flow-matching model (SD3, Flux) runs at
# sigmas (its own list, plus global_sigma); its directories are named by sigma * T (t500 for
# s0.500), as extraction names its stores, and each job gets the sigma (time_arg).

import shlex

from snakemake.exceptions import WorkflowError

GEO_MODELS = config["geometry"]["models"]
GEO_MEANING = [m for m in config["geometry"]["meaning_models"] if m in GEO_MODELS]

_geo_unknown = [m for m in GEO_MODELS if m not in config["models"]]
if _geo_unknown:
    raise WorkflowError(f"config geometry.models = {_geo_unknown} are not defined; allowed: names under models {list(config['models'])}")
# A name that is no configured model is a typo, not a model to skip quietly.
for _i, _name in enumerate(config["geometry"]["meaning_models"]):
    if _name not in config["models"]:
        raise WorkflowError(
            f"config geometry.meaning_models[{_i}] = {_name!r} is not a configured model; "
            f"allowed: names under models {list(config['models'])}"
        )

GEO_ROOT = str(Path(RESULTS, "geometry", "{model}"))

# Summaries and figures: seconds of CPU each, run on the submitting host (SLURM profile).
localrules:
    geometry_measures,
    geometry_meaning,
    geometry_claims,
    geometry_figure_spectra,
    geometry_figure_edits,
    geometry_figure_global,
    geometry_figure_psd,
    geometry_figure_meaning,
    geometry_figure_paths,

GEO_DIR = str(Path(GEO_ROOT, "t{timestep}"))
GEO_GLOBAL = str(Path(GEO_ROOT, "global"))
GEO_FIGURES = str(Path(RESULTS, "figures", "geometry", "{model}"))
# Each job's settings carry only the keys it reads (GeometryConfig.JOBS); a basis job's
# iterative_timesteps is cut to its own timestep, so adding a timestep re-runs no finished job.
geo_cfg = lambda job: lambda wc: GeometryConfig.job_json(geometry_section(wc.model), job)
geo_basis_cfg = lambda wc: GeometryConfig.job_json(
    geometry_section(wc.model),
    "basis",
    iterative_timesteps=GeometryConfig.iterative_slice(config["geometry"]["iterative_timesteps"], time_arg(wc)),
)
GEO_TIMESTEPS = {_m: geometry_times(_m) for _m in GEO_MODELS}  # checked at parse time



# Every timestep directory of the job's model.
geo_runs = lambda wc: [GEO_DIR.format(model=wc.model, timestep=t) for t in geometry_times(wc.model)]


rule geometry_basis:
    conda:
        "../envs/torch.yaml"
    input:
        lambda wc: model_input(wc.model),
    output:
        basis=str(Path(GEO_DIR, "basis.safetensors")),
        edits=str(Path(GEO_DIR, "edits.safetensors")),
        meta=str(Path(GEO_DIR, "meta.json")),
    params:
        model=lambda wc: model_path(wc.model),
        out=lambda wc: GEO_DIR.format(**wc),
        time=time_arg,
        model_args=model_args_arg,
        cfg=geo_basis_cfg,
        device=config["device"],
    log:
        log_path("geometry_basis", "{model}", "t{timestep}"),
    benchmark:
        bench_path("geometry_basis", "{model}", "t{timestep}")
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    shell:
        "diffatlas geometry --model {params.model:q} --model-name {wildcards.model} --timestep {params.time}"
        " --out {params.out:q} --config-json {params.cfg:q} --device {params.device:q} --threads {threads}"
        " {params.model_args:q} > {log:q} 2>&1"


rule geometry_global:
    conda:
        "../envs/torch.yaml"
    input:
        lambda wc: model_input(wc.model),
        # the global time's directory: global_timestep, or a flow model's global_sigma * T
        basis=lambda wc: str(Path(GEO_DIR, "basis.safetensors")).format(model=wc.model, timestep=geometry_global_name(wc.model)),
    output:
        tensors=str(Path(GEO_GLOBAL, "global.safetensors")),
        meta=str(Path(GEO_GLOBAL, "meta.json")),
    params:
        model=lambda wc: model_path(wc.model),
        basis=lambda wc, input: str(Path(input.basis).parent),
        out=lambda wc: GEO_GLOBAL.format(**wc),
        model_args=model_args_arg,
        cfg=geo_cfg("global"),
        device=config["device"],
    log:
        log_path("geometry_global", "{model}"),
    benchmark:
        bench_path("geometry_global", "{model}")
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 20 * attempt,
    shell:
        "diffatlas geometry-global --model {params.model:q} --model-name {wildcards.model} --basis {params.basis:q}"
        " --out {params.out:q} --config-json {params.cfg:q} --device {params.device:q} --threads {threads}"
        " {params.model_args:q} > {log:q} 2>&1"


rule geometry_paths:
    conda:
        "../envs/torch.yaml"
    input:
        lambda wc: model_input(wc.model),
    output:
        table=report(str(Path(GEO_ROOT, "path_lengths.csv")), caption="../report/captions/geometry_table.rst", category="geometry", subcategory="{model} tables"),
        segments=str(Path(GEO_ROOT, "path_segments.csv")),
        summary=str(Path(GEO_ROOT, "path_lengths.json")),
    params:
        model=lambda wc: model_path(wc.model),
        model_args=model_args_arg,
        cfg=geo_cfg("paths"),
        device=config["device"],
    log:
        log_path("geometry_paths", "{model}"),
    benchmark:
        bench_path("geometry_paths", "{model}")
    threads: 1
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 3000 * attempt,
        runtime=lambda wc, attempt: 20 * attempt,
    shell:
        "diffatlas geometry-paths --model {params.model:q} --model-name {wildcards.model} --out {output.table:q}"
        " --segments {output.segments:q} --config-json {params.cfg:q} --device {params.device:q} --threads {threads} {params.model_args:q} > {log:q} 2>&1"


rule geometry_measures:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [str(Path(_d, "basis.safetensors")) for _d in geo_runs(wc)],
    output:
        psd=report(str(Path(GEO_ROOT, "psd.csv")), caption="../report/captions/geometry_table.rst", category="geometry", subcategory="{model} tables"),
        distances=str(Path(GEO_ROOT, "tangent_distances.csv")),
        samples=str(Path(GEO_ROOT, "spectra_samples.csv")),
        trend=report(str(Path(GEO_ROOT, "spectra_trend.csv")), caption="../report/captions/geometry_table.rst", category="geometry", subcategory="{model} tables"),
    params:
        runs=lambda wc: " ".join(shlex.quote(d) for d in geo_runs(wc)),
    log:
        log_path("geometry_measures", "{model}"),
    benchmark:
        bench_path("geometry_measures", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-measures --runs {params.runs} --psd {output.psd:q} --distances {output.distances:q}"
        " --samples {output.samples:q} --trend {output.trend:q} > {log:q} 2>&1"


rule geometry_meaning:
    conda:
        "../envs/analysis.yaml"
    input:
        edits=lambda wc: [str(Path(_d, "edits.safetensors")) for _d in geo_runs(wc)],
        global_=str(Path(GEO_GLOBAL, "global.safetensors")),
    output:
        table=str(Path(GEO_ROOT, "meaning.csv")),
        summary=report(str(Path(GEO_ROOT, "meaning_summary.csv")), caption="../report/captions/geometry_table.rst", category="geometry", subcategory="{model} tables"),
        ablation=report(str(Path(GEO_ROOT, "meaning_random.csv")), caption="../report/captions/geometry_table.rst", category="geometry", subcategory="{model} tables"),
        quality=str(Path(GEO_ROOT, "edit_quality.csv")),
        quality_summary=report(str(Path(GEO_ROOT, "edit_quality_summary.csv")), caption="../report/captions/geometry_table.rst", category="geometry", subcategory="{model} tables"),
        agreement=report(str(Path(GEO_ROOT, "global_agreement.csv")), caption="../report/captions/geometry_table.rst", category="geometry", subcategory="{model} tables"),
    params:
        runs=lambda wc: " ".join(shlex.quote(d) for d in geo_runs(wc)),
        global_dir=lambda wc: GEO_GLOBAL.format(**wc),
    log:
        log_path("geometry_meaning", "{model}"),
    benchmark:
        bench_path("geometry_meaning", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-meaning --runs {params.runs} --out {output.table:q} --summary {output.summary:q} --ablation {output.ablation:q}"
        " --quality {output.quality:q} --quality-summary {output.quality_summary:q} --global-dir {params.global_dir:q}"
        " --agreement {output.agreement:q} > {log:q} 2>&1"


# The claims need the judge's tables, so they exist for the meaning models (ShapesWorld).
rule geometry_claims:
    conda:
        "../envs/analysis.yaml"
    input:
        meaning=str(Path(GEO_ROOT, "meaning.csv")),
        quality=str(Path(GEO_ROOT, "edit_quality.csv")),
        agreement=str(Path(GEO_ROOT, "global_agreement.csv")),
        lengths=str(Path(GEO_ROOT, "path_lengths.csv")),
        segments=str(Path(GEO_ROOT, "path_segments.csv")),
        samples=str(Path(GEO_ROOT, "spectra_samples.csv")),
    output:
        table=report(str(Path(GEO_ROOT, "claims.csv")), caption="../report/captions/geometry_table.rst", category="geometry", subcategory="{model} tables"),
        md=str(Path(GEO_ROOT, "claims.md")),
    log:
        log_path("geometry_claims", "{model}"),
    benchmark:
        bench_path("geometry_claims", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-claims --meaning {input.meaning:q} --quality {input.quality:q} --agreement {input.agreement:q}"
        " --lengths {input.lengths:q} --segments {input.segments:q} --samples {input.samples:q}"
        " --out {output.table:q} --md {output.md:q} > {log:q} 2>&1"


rule geometry_figure_spectra:
    conda:
        "../envs/analysis.yaml"
    input:
        lambda wc: [str(Path(_d, "basis.safetensors")) for _d in geo_runs(wc)],
    output:
        report(str(Path(GEO_FIGURES, "spectra.png")), caption="../report/captions/geometry_spectra.rst", category="geometry", subcategory="{model}"),
    params:
        runs=lambda wc: " ".join(shlex.quote(d) for d in geo_runs(wc)),
    log:
        log_path("geometry_figure_spectra", "{model}"),
    benchmark:
        bench_path("geometry_figure_spectra", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-figures spectra --runs {params.runs} --out {output:q} > {log:q} 2>&1"


rule geometry_figure_edits:
    conda:
        "../envs/analysis.yaml"
    input:
        edits=str(Path(GEO_DIR, "edits.safetensors")),
        meta=str(Path(GEO_DIR, "meta.json")),
    output:
        report(str(Path(GEO_FIGURES, "edits_t{timestep}.png")), caption="../report/captions/geometry_edits.rst", category="geometry", subcategory="{model}"),
    params:
        run=lambda wc: GEO_DIR.format(**wc),
    log:
        log_path("geometry_figure_edits", "{model}", "t{timestep}"),
    benchmark:
        bench_path("geometry_figure_edits", "{model}", "t{timestep}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-figures edits --run {params.run:q} --out {output:q} > {log:q} 2>&1"


rule geometry_figure_global:
    conda:
        "../envs/analysis.yaml"
    input:
        str(Path(GEO_GLOBAL, "global.safetensors")),
    output:
        report(str(Path(GEO_FIGURES, "global_direction.png")), caption="../report/captions/geometry_global.rst", category="geometry", subcategory="{model}"),
    params:
        run=lambda wc: GEO_GLOBAL.format(**wc),
        direction=config["geometry"]["global_direction"],
    log:
        log_path("geometry_figure_global", "{model}"),
    benchmark:
        bench_path("geometry_figure_global", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-figures global --global-dir {params.run:q} --direction {params.direction}"
        " --out {output:q} > {log:q} 2>&1"


rule geometry_figure_psd:
    conda:
        "../envs/analysis.yaml"
    input:
        psd=str(Path(GEO_ROOT, "psd.csv")),
        distances=str(Path(GEO_ROOT, "tangent_distances.csv")),
    output:
        report(str(Path(GEO_FIGURES, "psd.png")), caption="../report/captions/geometry_psd.rst", category="geometry", subcategory="{model}"),
    log:
        log_path("geometry_figure_psd", "{model}"),
    benchmark:
        bench_path("geometry_figure_psd", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-figures psd --psd {input.psd:q} --distances {input.distances:q} --out {output:q} > {log:q} 2>&1"


rule geometry_figure_meaning:
    conda:
        "../envs/analysis.yaml"
    input:
        str(Path(GEO_ROOT, "meaning_summary.csv")),
    output:
        report(str(Path(GEO_FIGURES, "meaning.png")), caption="../report/captions/geometry_meaning.rst", category="geometry", subcategory="{model}"),
    log:
        log_path("geometry_figure_meaning", "{model}"),
    benchmark:
        bench_path("geometry_figure_meaning", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-figures meaning --summary {input:q} --out {output:q} > {log:q} 2>&1"


rule geometry_figure_paths:
    conda:
        "../envs/analysis.yaml"
    input:
        segments=str(Path(GEO_ROOT, "path_segments.csv")),
        summary=str(Path(GEO_ROOT, "path_lengths.json")),
    output:
        report(str(Path(GEO_FIGURES, "path_lengths.png")), caption="../report/captions/geometry_paths.rst", category="geometry", subcategory="{model}"),
    log:
        log_path("geometry_figure_paths", "{model}"),
    benchmark:
        bench_path("geometry_figure_paths", "{model}")
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    shell:
        "diffatlas geometry-figures paths --segments {input.segments:q} --summary {input.summary:q} --out {output:q} > {log:q} 2>&1"


for _m in GEO_MODELS:
    _root = GEO_ROOT.format(model=_m)
    _figs = GEO_FIGURES.format(model=_m)
    ALL_TARGETS.extend(
        [
            str(Path(_root, "global", "meta.json")),
            str(Path(_root, "path_lengths.csv")),
            str(Path(_root, "psd.csv")),
            str(Path(_figs, "spectra.png")),
            str(Path(_figs, "global_direction.png")),
            str(Path(_figs, "psd.png")),
            str(Path(_figs, "path_lengths.png")),
        ]
    )
    ALL_TARGETS.extend(str(Path(_figs, f"edits_t{_t}.png")) for _t in GEO_TIMESTEPS[_m])
    if _m in GEO_MEANING:
        ALL_TARGETS.extend([str(Path(_root, "meaning_summary.csv")), str(Path(_figs, "meaning.png")),
                            str(Path(_root, "claims.md"))])
