"""Fast checks of profiles/slurm that need no SLURM cluster.

The real test, on a real single-node cluster, is scripts/slurm_test.sh. These catch the
cheap mistakes early: a profile key Snakemake does not know, a profile setting silently
overridden by another profile, a partition/account/slurm_extra put in a rule, a GPU rule
that would not get ``--gpus=1`` from the plugin, and planning (``snakemake -n``) through
the SLURM profile.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm"

snakemake_cli = pytest.importorskip("snakemake.cli")
slurm_plugin = pytest.importorskip(
    "snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]' installs the SLURM plugin"
)
from snakemake_executor_plugin_slurm.submit_string import get_submit_command  # noqa: E402
from snakemake_executor_plugin_slurm.utils import set_gres_string  # noqa: E402
from snakemake_executor_plugin_slurm.validation import get_forbidden_slurm_options  # noqa: E402


def _effective_args(cwd: Path, *extra: str):
    """Parse ``snakemake --profile profiles/slurm`` exactly as the snakemake CLI does, run
    from ``cwd`` (including any workflow profile Snakemake adds on its own)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        _parser, args = snakemake_cli.parse_args(
            ["--profile", str(PROFILE), "--snakefile", str(ROOT / "Snakefile"), *extra]
        )
    finally:
        os.chdir(old)
    return args


def _values(resources) -> dict:
    """Snakemake's parsed Resources -> {name: plain value} (functions stay functions)."""
    out = {}
    for name, res in dict(resources or {}).items():
        evaluable = res.is_evaluable() if callable(getattr(res, "is_evaluable", None)) else False
        out[name] = "<function>" if evaluable else res.value
    return out


def test_profile_is_read_by_snakemakes_own_parser(tmp_path):
    # an unknown key would make the CLI parser fail here, as it would for a user
    args = _effective_args(tmp_path, "--workflow-profile", "none")
    assert args.executor == "slurm"
    defaults = _values(args.default_resources)
    # every job gets --mem and -t even from a rule that declares neither
    assert int(defaults["mem_mb"]) > 0 and int(defaults["runtime"]) > 0
    assert args.retries >= 1
    assert args.latency_wait >= 30
    assert args.rerun_incomplete and args.show_failed_logs
    # partitions and accounts are placeholders (comments) in the shipped profile
    assert "slurm_partition" not in defaults and "slurm_account" not in defaults


def test_profile_settings_are_not_overridden_by_a_workflow_profile():
    # Snakemake adds profiles/default/ next to the Snakefile as a *workflow profile* to every
    # run, and its keys override those of --profile. Run from the repository root, as the
    # README says, the SLURM profile's settings must be the ones in force.
    args = _effective_args(ROOT)
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert args.executor == "slurm"
    assert args.keep_going == profile["keep-going"]
    assert args.retries == profile["retries"]
    defaults = _values(args.default_resources)
    assert {k: defaults.get(k) for k in profile["default-resources"]} == profile["default-resources"]
    # a global `gpu` limit would let only that many GPU jobs run at once on the whole cluster
    assert "gpu" not in _values(args.resources), (
        f"a workflow profile caps the cluster at resources {args.resources}; "
        "keep cluster-wide settings such as a gpu limit out of the workflow profile profiles/default"
    )


def test_no_sbatch_option_that_the_plugin_manages_in_slurm_extra():
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    extras = [profile.get("default-resources", {}).get("slurm_extra", "")]
    extras += [r.get("slurm_extra", "") for r in (profile.get("set-resources") or {}).values()]
    forbidden = get_forbidden_slurm_options()
    for extra in filter(None, extras):
        for pattern, what in forbidden.items():
            assert not re.search(pattern, extra), f"slurm_extra {extra!r} sets the {what}"


def test_rules_leave_partitions_accounts_and_sbatch_options_to_profiles():
    offenders = []
    for smk in sorted([ROOT / "Snakefile", *(ROOT / "rules").glob("*.smk")]):
        for n, line in enumerate(smk.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\b(slurm_partition|slurm_account|slurm_extra|gres|constraint|qos)\s*=", code):
                offenders.append(f"{smk.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "site settings belong to profiles/slurm:\n" + "\n".join(offenders)


def _stub_job(resources: dict, threads: int):
    res = SimpleNamespace(**resources)
    res.get = lambda key, default=None: resources.get(key, default)
    return SimpleNamespace(resources=res, threads=threads, is_group=lambda: False)


@pytest.mark.parametrize(
    "resources, expected",
    [({"gpu": 1, "mem_mb": 4000, "runtime": 30}, " --gpus=1"), ({"mem_mb": 2000, "runtime": 10}, "")],
)
def test_plugin_turns_gpu_resource_into_gpus_option(resources, expected):
    # the mapping the cluster test observes end to end, checked on the installed plugin
    job = _stub_job(resources, threads=2)
    assert set_gres_string(job) == expected
    params = {"run_uuid": "u", "slurm_logfile": "x/%j.log", "comment_str": "rule_r",
              "account": "", "partition": "", "workdir": "/w"}
    call = get_submit_command(job, params)
    assert "--gres" not in call
    assert f"--mem {resources['mem_mb']}" in call and f"-t {resources['runtime']}" in call
    assert "--cpus-per-task=2" in call  # rule threads -> CPUs of the job


def _rules() -> dict[str, bool]:
    """Every rule of the workflow -> whether its resources ask for a GPU (``gpu=``)."""
    found = {}
    for smk in [ROOT / "Snakefile", *(ROOT / "rules").glob("*.smk")]:
        for block in re.split(r"^(?=(?:rule|checkpoint) \w+:)", smk.read_text(), flags=re.M):
            name = re.match(r"(?:rule|checkpoint) (\w+):", block)
            if name:
                found[name.group(1)] = bool(re.search(r"^\s+gpu\s*=", block.split("shell:")[0], re.M))
    return found


def test_every_gpu_rule_follows_the_gpu_partition_setting():
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    routed = {rule for rule, res in (profile.get("set-resources") or {}).items()
              if "DIFFATLAS_GPU_PARTITION" in str(res.get("slurm_partition", ""))}
    rules = _rules()
    gpu_rules = {name for name, gpu in rules.items() if gpu}
    assert {"extract", "train_sae"} <= gpu_rules and "make_dataset" in set(rules) - gpu_rules  # the scan works
    assert gpu_rules - routed == set(), (
        f"GPU rules missing from profiles/slurm/config.yaml set-resources (add `<rule>: *gpu`): {sorted(gpu_rules - routed)}")
    cpu_routed = {name for name in routed if name in rules and not rules[name]}
    assert not cpu_routed, f"CPU rules routed to the GPU partition: {sorted(cpu_routed)}"


@pytest.mark.parametrize("partition, model", [(None, None), ("", ""), ("gpu-nodes", "a100")])
def test_gpu_partition_and_type_come_from_the_environment(monkeypatch, partition, model):
    """The profile's expressions, evaluated by Snakemake as for a job: unset or empty leaves
    the resource unset (default partition, any GPU type); set, it names partition and type."""
    from snakemake.resources import Resource

    for var, value in (("DIFFATLAS_GPU_PARTITION", partition), ("DIFFATLAS_GPU_MODEL", model)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    res = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]["train_sae"]
    got = {name: Resource.cli_evaluator(name, res[name], wildcards=None, input=None, attempt=1, async_run=None)
           for name in ("slurm_partition", "gpu_model")}
    assert got == {"slurm_partition": partition or None, "gpu_model": model or None}
    # what the plugin then asks sbatch for
    job = _stub_job({"gpu": 1, "mem_mb": 1000, "runtime": 5, **{k: v for k, v in got.items() if v}}, threads=1)
    assert set_gres_string(job) == (f" --gpus={model}:1" if model else " --gpus=1")


_JOB = re.compile(r"^(?:local)?rule (\w+):\n((?:[ \t]+.*\n)+)", re.M)


@pytest.mark.workflow
@pytest.mark.parametrize("gpu_partition", [None, "gpu-nodes"])
def test_dry_run_through_the_slurm_profile(tmp_path, gpu_partition):
    """`snakemake -n --profile profiles/slurm` plans the tiny test config without SLURM; with
    DIFFATLAS_GPU_PARTITION set, the GPU rule (and only it) asks for that partition."""
    if shutil.which("snakemake") is None:
        pytest.skip("snakemake console script not on PATH")
    from diffatlas.models.tiny import make_tiny_model

    make_tiny_model("pixel", tmp_path / "tiny_model", seed=0)
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    targets = [
        "results/" + t.strip()
        for t in (ROOT / "tests" / "slurm" / "targets.txt").read_text().splitlines()
        if t.strip() and not t.startswith("#")
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DIFFATLAS_GPU_"))}
    if gpu_partition:
        env["DIFFATLAS_GPU_PARTITION"] = gpu_partition
    proc = subprocess.run(
        ["snakemake", "-n", *targets, "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
         "--profile", str(PROFILE), "--workflow-profile", "none",
         "--configfile", str(ROOT / "tests" / "slurm" / "tiny_config.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = {}
    for rule, body in _JOB.findall(out):
        res = re.search(r"^\s+resources: (.*)$", body, re.M)
        jobs[rule] = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
    # the tiny config shards its dataset: one data job and one extraction job per shard, a
    # gather, and an SAE on the gathered store
    assert set(jobs) >= {"make_dataset_shard", "dataset_index", "extract_shard", "gather_extract", "train_sae"}, out[-3000:]
    # extraction and SAE training run the model: GPU; rendering images and gathering: CPU
    assert jobs["extract_shard"].get("gpu") == "1" and jobs["train_sae"].get("gpu") == "1"
    assert "gpu" not in jobs["make_dataset_shard"] and "gpu" not in jobs["gather_extract"]
    planned = [rule for rule, _ in _JOB.findall(out)]
    assert planned.count("make_dataset_shard") == 3 and planned.count("extract_shard") == 3, planned
    for rule, res in jobs.items():
        want = gpu_partition if res.get("gpu") == "1" else None
        assert res.get("slurm_partition") == want and "slurm_account" not in res, (rule, res)
        assert "gpu_model" not in res, (rule, res)  # DIFFATLAS_GPU_MODEL is unset
        assert int(res["mem_mb"]) > 0 and int(res["runtime"]) > 0, rule


def _pip_lines(env_file: Path) -> list[str]:
    deps = yaml.safe_load(env_file.read_text())["dependencies"]
    return next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)


@pytest.mark.parametrize("env_file", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_conda_envs_agree_with_the_package(env_file):
    """Each env pins a torch the package accepts and installs this checkout with extras it has."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_spec = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch")
    lines = _pip_lines(env_file)
    pins = [Requirement(line) for line in lines if line.startswith("torch")]
    assert len(pins) == 1 and str(pins[0].specifier).startswith("=="), lines
    pinned = str(pins[0].specifier)[2:]
    assert pinned.split("+")[0] == "2.13.0"
    assert torch_spec.specifier.contains(pinned), f"{env_file.name} pins torch {pinned}, pyproject wants {torch_spec}"
    # pip expands ${DIFFATLAS_ROOT}; what it expands to must be an installable checkout
    editable = [line for line in lines if line.startswith("-e ")]
    assert len(editable) == 1, lines
    target = editable[0][3:].strip().replace("${DIFFATLAS_ROOT}", str(ROOT))
    path, _, extras = target.partition("[")
    assert (Path(path) / "pyproject.toml").exists()
    for extra in filter(None, extras.rstrip("]").split(",")):
        assert extra in project.get("optional-dependencies", {}), extra
