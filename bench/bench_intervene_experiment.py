"""Cost of one judged steering cell, with the sampler prefix shared and without, side by side.

    python bench/bench_intervene_experiment.py      # the demo's SAE (snakemake results/intervene/shapesworld/summary.csv first)
    python bench/bench_intervene_experiment.py --sae results/intervene/shapesworld/sae/mid/t500 --layer mid --timestep 500

Runs :func:`diffatlas.interventions.experiment.run_experiment` with the workflow's ``intervene``
settings (config.yaml, or ``--config``) twice per repeat, alternating: every edited run started
from x_T, and the steps before the window computed once per experiment and shared. Prints the
ratio of medians (wall clock and process CPU) and checks that both wrote the same verdicts for
every image (judged.csv equal): the shortcut changes the cost, not the result.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "resources" / "models" / "shapesworld"))
    ap.add_argument("--sae", default=str(ROOT / "results" / "intervene" / "shapesworld" / "sae" / "mid" / "t500"))
    ap.add_argument("--model-name", default="shapesworld", help="the name the SAE records for the model")
    ap.add_argument("--layer", default="mid")
    ap.add_argument("--timestep", type=int, default=500)
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import pandas as pd
    import torch

    from diffatlas.config import load_config
    from diffatlas.interventions.config import InterventionConfig
    from diffatlas.interventions.experiment import JUDGED, run_experiment
    from diffatlas.models.loader import load_model

    logging.disable(logging.WARNING)
    if not (Path(args.sae) / "latents.parquet").is_file():
        raise SystemExit(f"no SAE at {args.sae}: run  snakemake --cores all results/intervene/shapesworld/summary.csv  first")
    torch.set_num_threads(args.threads)
    cfg = InterventionConfig.from_dict(load_config(args.config).get("intervene", {}))
    handle = load_model(args.model, device="cpu")
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for share in (False, True):
                w, c = time.perf_counter(), time.process_time()
                run_experiment(handle, args.sae, args.layer, args.timestep, cfg, Path(tmp) / f"{share}{r}", model=args.model_name,
                               share_prefix=share)
                times[share].append((time.perf_counter() - w, time.process_time() - c))
        same = pd.read_csv(Path(tmp) / "True0" / JUDGED).equals(pd.read_csv(Path(tmp) / "False0" / JUDGED))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    print(f"settings: alphas {cfg.alphas}, n_prompts {cfg.n_prompts}, steps {cfg.steps}, window t{args.timestep} ± {cfg.window}, "
          f"{args.repeats} repeats, {args.threads} thread(s)")
    print(f"each run from x_T : wall {med[False][0]:.2f} s  cpu {med[False][1]:.2f} s")
    print(f"shared prefix     : wall {med[True][0]:.2f} s  cpu {med[True][1]:.2f} s")
    print(f"ratio shared / not: wall {med[True][0] / med[False][0]:.2f}  cpu {med[True][1] / med[False][1]:.2f}")
    print(f"judged.csv identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
