"""Wait per step of a chain of small SLURM jobs, under profiles/slurm, for status-check settings.

A chain of ``--steps`` one-rule jobs (each needs the previous one's output and sleeps
``--sleep`` seconds) is run through ``snakemake --profile profiles/slurm`` once per value of
the SLURM plugin's ``init_seconds_before_status_checks`` (``--init``: the interval of status
checks right after a submission or a finished job; without finished jobs the plugin adds 10 s
per check, up to 180 s). Printed per value: the run's wall time, the SLURM jobs' own elapsed
time (``sacct``), and the overhead per step, wall minus elapsed over the steps: submission,
waiting for the status check that notices the job ended, and Snakemake's own bookkeeping.
The runs of the values go side by side, so a drift in machine load hits them alike.

Needs a SLURM cluster that ``sbatch``/``sacct`` reach (a login node, or the private test
cluster of scripts/slurm_test.sh held open):

    sudo DIFFATLAS_SLURM_HOLD=1 bash scripts/slurm_test.sh      # prints an `export ...` line
    export SLURM_CONF=... PATH=...                                # that line, in another shell
    python bench/bench_slurm_chain.py --steps 4 --init 40 5
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm"

CHAIN = """
rule all:
    default_target: True
    input: "step{last}.txt"

rule step:
    output: "step{{i}}.txt"
    input: lambda wc: [] if int(wc.i) == 0 else [f"step{{int(wc.i) - 1}}.txt"]
    resources: mem_mb=200, runtime=5
    shell: "sleep {sleep}; date +%s.%N > {{output}}"
"""

SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+)")


def _elapsed_seconds(ids: list[str]) -> float:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobIDRaw,ElapsedRaw"],
                         check=True, capture_output=True, text=True).stdout
    return float(sum(int(line.split("|")[1]) for line in out.splitlines() if line.strip()))


def run_chain(init: int, steps: int, sleep: float, workdir: Path, timeout: int) -> dict:
    workdir.mkdir(parents=True)
    (workdir / "chain.smk").write_text(CHAIN.format(last=steps - 1, sleep=sleep))
    cmd = ["snakemake", "-s", "chain.smk", "-d", str(workdir), "--profile", str(PROFILE),
           "--workflow-profile", "none", "--slurm-init-seconds-before-status-checks", str(init)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (workdir / "snakemake.log").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"init={init}: snakemake failed (exit {proc.returncode}); log: {workdir / 'snakemake.log'}\n"
                         + log[-2000:])
    ids = sorted(set(SUBMITTED.findall(log)))
    if len(ids) != steps:
        raise SystemExit(f"init={init}: found {len(ids)} SLURM job ids in the log, expected {steps}: {ids}")
    elapsed = _elapsed_seconds(ids)
    return {"init": init, "wall": wall, "elapsed": elapsed, "per_step": (wall - elapsed) / steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="jobs in the chain")
    ap.add_argument("--sleep", type=float, default=2.0, help="seconds each job sleeps")
    ap.add_argument("--init", type=int, nargs="+", default=[40, 5],
                    help="values of init_seconds_before_status_checks (40: the plugin's default)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per snakemake run")
    args = ap.parse_args(argv)
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        raise SystemExit("sbatch/sacct not found: run on a SLURM login node or inside the test cluster (see --help)")
    tmp = Path(tempfile.mkdtemp(prefix="slurm-chain-"))
    print(f"chain of {args.steps} jobs, each sleeping {args.sleep:g} s, through {PROFILE.relative_to(ROOT)} "
          f"(work in {tmp})")
    with ThreadPoolExecutor(len(args.init)) as pool:
        futures = [pool.submit(run_chain, init, args.steps, args.sleep, tmp / f"init{init}", args.timeout)
                   for init in args.init]
        rows = [f.result() for f in futures]
    print(f"{'init_seconds_before_status_checks':>34} {'wall s':>8} {'jobs elapsed s':>15} {'overhead per step s':>20}")
    for r in rows:
        print(f"{r['init']:>34} {r['wall']:8.1f} {r['elapsed']:15.0f} {r['per_step']:20.1f}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
