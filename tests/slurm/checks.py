"""Checks of scripts/slurm_test.sh, run after the workflow went through a real SLURM cluster.

    python tests/slurm/checks.py submissions SNAKEMAKE_LOG [PARTITIONS_YAML]
    python tests/slurm/checks.py compare SLURM_RESULTS LOCAL_RESULTS
    python tests/slurm/checks.py failure SNAKEMAKE_LOG EXIT_STATUS
    python tests/slurm/checks.py presubmit SNAKEMAKE_LOG EXIT_STATUS

``submissions`` reads the main snakemake log of a ``--verbose`` run through profiles/slurm:
for every job, the rule's resources as Snakemake printed them, the literal ``sbatch`` call
the plugin made and the SLURM job id; then asks SLURM's accounting (``sacct``) what each
job requested. A job whose rule has ``gpu=1`` must have been submitted with ``--gpus=1``
and hold ``gres/gpu=1``; every other job neither, and no job may carry ``--gres``. Given the
partition file the run used, GPU jobs must have run in a partition with ``max_gpu > 0`` and
CPU jobs in one without.

``compare`` checks that two results trees hold the same files with the same contents:
arrays (npy, zarr, safetensors) and tables (Parquet, CSV) by value, floats within a small
tolerance (SLURM may give a job more threads than the local run had, which reorders float
sums); JSON recursively, with the runs' working directories read as one and provenance
that differs by nature (time, host, duration) left out; figures by pixels. Logs and
benchmarks differ by nature and are skipped, and so is Snakemake's ``.snakemake_timestamp``.

``failure`` checks the run of tests/slurm/failing.smk: it failed (not by timeout), the
rule's log was printed in the main output, and the job was retried once with its runtime
scaled by ``attempt`` (2 then 4 minutes, as sacct's Timelimit shows).

``presubmit`` checks the run with tests/slurm/bad_sae.yaml (an SAE ``k`` no layer holds): it
failed in the local check_sae job, once, naming ``sae.k``, and submitted nothing to SLURM.

Exit status 0 when every check passes, 1 otherwise; each check prints what it saw.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

# ----------------------------------------------------------------------------- submissions

_JOB_BLOCK = re.compile(r"^(?:local)?rule (?P<rule>[A-Za-z_][\w]*):\n(?P<body>(?:[ \t]+.*\n)+)", re.M)
_SUBMITTED = re.compile(r"Job (?P<jobid>\d+) has been submitted with SLURM jobid (?P<slurm>\d+) \(log: (?P<log>[^)]+)\)")
_SBATCH = re.compile(r"^sbatch call: (?P<call>sbatch .*)$", re.M)


def parse_submissions(text: str) -> list[dict]:
    """One dict per submitted job: rule, snakemake jobid, resources, sbatch args, SLURM id."""
    resources = {}
    for m in _JOB_BLOCK.finditer(text):
        body = m.group("body")
        jid = re.search(r"^\s+jobid: (\d+)$", body, re.M)
        res = re.search(r"^\s+resources: (.*)$", body, re.M)
        if jid:
            resources[int(jid.group(1))] = (m.group("rule"), res.group(1) if res else "")
    calls = {}
    for m in _SBATCH.finditer(text):
        # everything before --wrap is the plugin's own sbatch options
        args = shlex.split(m.group("call").split(" --wrap=", 1)[0])
        out = args[args.index("--output") + 1]
        calls[out] = args
    jobs = []
    for m in _SUBMITTED.finditer(text):
        jid, slurm_id, log = int(m.group("jobid")), m.group("slurm"), m.group("log")
        rule, res = resources.get(jid, (None, ""))
        template = str(Path(log).with_name("%j.log"))
        gpu = re.search(r"(?:^|,\s*)gpu=(\d+)", res)
        jobs.append(
            {
                "rule": rule,
                "jobid": jid,
                "slurm_id": slurm_id,
                "gpu_resource": int(gpu.group(1)) if gpu else 0,
                "sbatch": calls.get(template),
            }
        )
    return jobs


def sacct(ids: list[str], fields: str) -> dict[str, list[str]]:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", fields],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: r for r in rows}


def check_submissions(log_path: str, partitions_yaml: str | None = None) -> bool:
    jobs = parse_submissions(Path(log_path).read_text(errors="replace"))
    ok = True
    if not jobs:
        print("no SLURM submissions found in the log")
        return False
    gpu_partitions = None
    if partitions_yaml:
        import yaml

        parts = yaml.safe_load(Path(partitions_yaml).read_text())["partitions"]
        gpu_partitions = {name for name, lim in parts.items() if (lim or {}).get("max_gpu", 0) > 0}
    acct = sacct([j["slurm_id"] for j in jobs], "JobIDRaw,ReqTRES,State,Partition")
    print(f"{'rule':22} {'slurm id':>8} {'gpu=':>4}  {'sbatch GPU option':17} {'partition':9} "
          f"{'SLURM ReqTRES':44} state")
    for j in jobs:
        args = j["sbatch"]
        row = acct.get(j["slurm_id"], [j["slurm_id"], "?", "?", "?"])
        gpu_flags = [a for a in (args or []) if a.startswith(("--gpus", "--gres", "-G"))]
        print(f"{j['rule'] or '?':22} {j['slurm_id']:>8} {j['gpu_resource']:>4}  "
              f"{' '.join(gpu_flags) or '-':17} {row[3]:9} {row[1]:44} {row[2]}")
        problems = []
        if j["rule"] is None:
            problems.append("its rule's resources were not found in the log")
        if args is None:
            problems.append("its sbatch call was not found in the log (run with --verbose)")
        want_gpu = j["gpu_resource"] > 0
        if args is not None:
            if want_gpu and f"--gpus={j['gpu_resource']}" not in args:
                problems.append(f"GPU rule submitted without --gpus={j['gpu_resource']}")
            if not want_gpu and gpu_flags:
                problems.append(f"CPU rule submitted with {gpu_flags}")
            if any(a.startswith("--gres") for a in args):
                problems.append("submitted with --gres")
            if not any(a.startswith("rule_") for a in args):
                problems.append("no rule_<name> comment on the submission")
        tres = row[1]
        if want_gpu and f"gres/gpu={j['gpu_resource']}" not in tres.split(","):
            problems.append(f"SLURM did not record gres/gpu={j['gpu_resource']} (ReqTRES {tres!r})")
        if not want_gpu and "gres/gpu" in tres:
            problems.append(f"SLURM recorded a GPU for a CPU rule (ReqTRES {tres!r})")
        if row[2] != "COMPLETED":
            problems.append(f"SLURM state {row[2]!r}, not COMPLETED")
        if gpu_partitions is not None and (row[3] in gpu_partitions) != want_gpu:
            problems.append(f"ran in partition {row[3]!r}; GPU partitions: {sorted(gpu_partitions)}")
        for p in problems:
            print(f"  -> {j['rule']} (SLURM job {j['slurm_id']}): {p}")
        ok &= not problems
    n_gpu = sum(j["gpu_resource"] > 0 for j in jobs)
    n_cpu = len(jobs) - n_gpu
    print(f"{len(jobs)} jobs through SLURM: {n_gpu} GPU, {n_cpu} CPU")
    if n_gpu == 0 or n_cpu == 0:
        print("  -> the targets must include at least one GPU rule and one CPU rule")
        ok = False
    return ok


# ----------------------------------------------------------------------------- compare

RTOL, ATOL = 1e-4, 1e-6
SKIP_DIRS = {"logs", "benchmarks"}
SKIP_FILES = {".snakemake_timestamp"}
# Provenance that differs between any two runs by nature (when, where, how long).
VOLATILE_KEYS = {"created", "created_at", "timestamp", "date", "hostname", "host",
                 "elapsed_s", "duration_s", "wall_time_s", "runtime_s"}
# The two runs' working directories; a path under either reads the same after this.
WORKDIRS: list[str] = []


def _norm(x):
    if isinstance(x, str):
        for w in WORKDIRS:
            x = x.replace(w, "<workdir>")
    return x


def _close(a, b, path: str, diffs: list[str]) -> None:
    """Recursive comparison of JSON-like values; floats within RTOL/ATOL."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            diffs.append(f"{path}: keys differ: {sorted(set(a) ^ set(b))}")
        # durations and rates (train_seconds, analysis.seconds, samples_per_second) differ by nature too
        timing = {k for k in a.keys() & b.keys() if k == "seconds" or k.endswith(("_seconds", "per_second"))}
        for k in (a.keys() & b.keys()) - timing - VOLATILE_KEYS:
            _close(a[k], b[k], f"{path}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", diffs)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or not (
            math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL) or (math.isnan(a) and math.isnan(b))
        ):
            diffs.append(f"{path}: {a!r} != {b!r}")
    elif _norm(a) != _norm(b):
        diffs.append(f"{path}: {a!r} != {b!r}")


def _arrays_close(a, b) -> tuple[bool, str]:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False, f"shape/dtype {a.shape} {a.dtype} != {b.shape} {b.dtype}"
    if a.dtype.kind in "fc":
        if np.array_equal(a, b, equal_nan=True):
            return True, "equal"
        ok = np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True)
        err = float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        return ok, f"max |diff| {err:.3g}"
    return bool(np.array_equal(a, b)), "equal" if np.array_equal(a, b) else "values differ"


def _compare_zarr(a: Path, b: Path) -> tuple[bool, str]:
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    diffs: list[str] = []
    _close(dict(ga.attrs), dict(gb.attrs), "attrs", diffs)
    names_a = sorted(k for k, _ in ga.arrays())
    names_b = sorted(k for k, _ in gb.arrays())
    if names_a != names_b:
        return False, f"arrays differ: {names_a} vs {names_b}"
    notes = []
    for name in names_a:
        xa, xb = ga[name], gb[name]
        _close(dict(xa.attrs), dict(xb.attrs), f"{name}.attrs", diffs)
        if getattr(xa.metadata, "dimension_names", None) != getattr(xb.metadata, "dimension_names", None):
            diffs.append(f"{name}: dimension_names differ")
        ok, note = _arrays_close(xa[...], xb[...])
        if not ok:
            diffs.append(f"{name}: {note}")
        elif note != "equal":
            notes.append(f"{name} {note}")
    for name, _ in ga.groups():
        ok, note = _compare_zarr(a / name, b / name)
        if not ok:
            diffs.append(f"{name}/: {note}")
    if diffs:
        return False, "; ".join(diffs[:5])
    return True, "equal" if not notes else "close (" + ", ".join(notes[:3]) + ")"


def _compare_file(a: Path, b: Path) -> tuple[bool, str]:
    suffix = a.suffix.lower()
    if suffix == ".json":
        diffs: list[str] = []
        _close(json.loads(a.read_text()), json.loads(b.read_text()), "", diffs)
        return not diffs, "; ".join(diffs[:5]) or "equal"
    if suffix == ".npy":
        import numpy as np

        return _arrays_close(np.load(a, allow_pickle=False), np.load(b, allow_pickle=False))
    if suffix in {".parquet", ".csv", ".tsv"}:
        import pandas as pd

        read = pd.read_parquet if suffix == ".parquet" else (
            lambda p: pd.read_csv(p, sep="\t" if suffix == ".tsv" else ","))
        try:
            pd.testing.assert_frame_equal(read(a), read(b), check_exact=False, rtol=RTOL, atol=ATOL)
        except AssertionError as e:
            return False, str(e).splitlines()[0]
        return True, "equal"
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        ta, tb = load_file(str(a)), load_file(str(b))
        if ta.keys() != tb.keys():
            return False, "tensor names differ"
        for k in ta:
            ok, note = _arrays_close(ta[k], tb[k])
            if not ok:
                return False, f"{k}: {note}"
        return True, "close"
    if suffix == ".png":
        import numpy as np
        from PIL import Image

        pa, pb = np.asarray(Image.open(a)), np.asarray(Image.open(b))
        if pa.shape != pb.shape:
            return False, f"image sizes {pa.shape} != {pb.shape}"
        frac = float(np.mean(np.any(pa != pb, axis=-1) if pa.ndim == 3 else pa != pb))
        # a float a hair apart may flip a pixel's colour; a different figure flips many
        return frac <= 0.005, f"{frac:.2%} pixels differ"
    same = a.read_bytes() == b.read_bytes()
    return same, "bytes equal" if same else "bytes differ"


def _walk(root: Path) -> tuple[set[str], set[str]]:
    """Relative paths of plain files and of zarr stores (compared as units) under root."""
    files, stores = set(), set()
    stack = [root]
    while stack:
        d = stack.pop()
        for p in sorted(d.iterdir()):
            rel = str(p.relative_to(root))
            if p.is_dir():
                if p.parent == root and p.name in SKIP_DIRS:
                    continue
                if p.suffix == ".zarr":
                    stores.add(rel)
                else:
                    stack.append(p)
            elif p.name not in SKIP_FILES:
                files.add(rel)
    return files, stores


def check_compare(a_root: str, b_root: str) -> bool:
    a, b = Path(a_root), Path(b_root)
    WORKDIRS[:] = [str(a.resolve().parent), str(b.resolve().parent)]
    fa, sa = _walk(a)
    fb, sb = _walk(b)
    ok = True
    for only, where in (((fa | sa) - (fb | sb), a), ((fb | sb) - (fa | sa), b)):
        for rel in sorted(only):
            print(f"only in {where}: {rel}")
            ok = False
    n_equal = 0
    for rel in sorted((fa & fb) | (sa & sb)):
        try:
            same, note = (_compare_zarr if rel in sa else _compare_file)(a / rel, b / rel)
        except Exception as e:  # an unreadable output is a failure, reported with its path
            same, note = False, f"could not compare: {type(e).__name__}: {e}"
        n_equal += note in {"equal", "bytes equal", "0.00% pixels differ"}
        print(f"{'ok  ' if same else 'DIFF'} {rel}: {note}")
        ok &= same
    n = len((fa & fb) | (sa & sb))
    print(f"{n} outputs compared ({n_equal} identical, the rest within rtol={RTOL}, atol={ATOL})")
    if n == 0:
        print("nothing to compare")
        ok = False
    return ok


# ----------------------------------------------------------------------------- failure

MARKER = re.compile(r"^DIFFATLAS-SLURM-TEST runtime=(\d+)\s*$", re.M)


def check_failure(log_path: str, status: str) -> bool:
    text = Path(log_path).read_text(errors="replace")
    ok = True
    status = int(status)
    print(f"exit status of the failing run: {status}")
    if status == 0:
        print("  -> a workflow whose rule fails exited 0")
        ok = False
    if status in (124, 137):
        print("  -> it was stopped by the timeout instead of failing by itself")
        ok = False
    if "Error in rule fail_on_purpose" not in text:
        print("  -> no 'Error in rule fail_on_purpose' in the output")
        ok = False
    # The rule's log holds only the marker line; the shell command that writes it (also
    # printed) does not match, so a match means the log's content was shown.
    shown = [int(m) for m in MARKER.findall(text)]
    print(f"rule log shown in the output for runtime(s): {sorted(set(shown))}")
    if not shown:
        print("  -> the failing rule's log was not shown")
        ok = False
    subs = [m.group("slurm") for m in _SUBMITTED.finditer(text)]
    if subs:
        acct = sacct(subs, "JobIDRaw,Timelimit,State")
        limits = [acct.get(s, [s, "?", "?"])[1] for s in subs]
        states = [acct.get(s, [s, "?", "?"])[2] for s in subs]
        print(f"SLURM jobs {subs}: Timelimit {limits}, State {states}")
        if limits != ["00:02:00", "00:04:00"]:
            print("  -> expected two attempts with -t 2 then -t 4 (runtime = 2 * attempt, retries: 1)")
            ok = False
        if any(s != "FAILED" for s in states):
            print("  -> expected every attempt FAILED in SLURM's accounting")
            ok = False
    else:
        print("  -> no SLURM submission found in the output")
        ok = False
    return ok


# ----------------------------------------------------------------------------- presubmit


def check_presubmit(log_path: str, status: str) -> bool:
    """An SAE setting that cannot work (tests/slurm/bad_sae.yaml) fails in the local check_sae
    job, once, with the setting named, and no train_sae job reaches SLURM."""
    text = Path(log_path).read_text(errors="replace")
    status = int(status)
    ok = True
    print(f"exit status of the bad-setting run: {status}")
    if status == 0 or status in (124, 137):
        print("  -> expected the run to fail by itself")
        ok = False
    n_failed = text.count("Error in rule check_sae")
    print(f"check_sae failures reported: {n_failed}")
    if n_failed != 1:
        print("  -> expected exactly one failed check_sae (retries: 0: a bad setting is not retried)")
        ok = False
    if not re.search(r"config sae\.k = 100000 is not allowed", text):
        print("  -> the check's message naming sae.k was not shown")
        ok = False
    subs = _SUBMITTED.findall(text)
    print(f"SLURM submissions: {len(subs)}")
    if subs or re.search(r"^rule train_sae:", text, re.M):
        print("  -> train_sae (or another job) was submitted although its setting cannot work")
        ok = False
    return ok


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "submissions":
        return 0 if check_submissions(argv[1], argv[2] if len(argv) > 2 else None) else 1
    if len(argv) >= 3 and argv[0] == "compare":
        return 0 if check_compare(argv[1], argv[2]) else 1
    if len(argv) >= 3 and argv[0] == "failure":
        return 0 if check_failure(argv[1], argv[2]) else 1
    if len(argv) >= 3 and argv[0] == "presubmit":
        return 0 if check_presubmit(argv[1], argv[2]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
