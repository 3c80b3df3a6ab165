"""``diffatlas geometry-measures``: PSD of directions and tangent-space distances across timesteps.

Reads the ``basis.safetensors`` of every ``--runs`` directory (one per timestep of one
model) and writes the radially averaged power spectrum of the directions per timestep
(``--psd``) and the geodesic (principal-angle) distances between tangent spaces, between
samples at one timestep and for one sample across adjacent timesteps (``--distances``),
and the trends as t -> 0 (spectral flatness, PSD centroid) per sample (``--samples``) and per
timestep with 95% bootstrap intervals (``--trend``). No model is loaded.

Example::

    diffatlas geometry-measures --runs results/geometry/shapesworld/t999 results/geometry/shapesworld/t500 \\
        --psd results/geometry/shapesworld/psd.csv --distances results/geometry/shapesworld/tangent_distances.csv
"""

from __future__ import annotations

import argparse
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("geometry-measures", __doc__)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="geometry output directories (one per timestep)")
    ap.add_argument("--psd", required=True, help="output CSV of power spectra")
    ap.add_argument("--distances", required=True, help="output CSV of tangent-space distances")
    ap.add_argument("--samples", default=None, help="output CSV of per-sample spectral measures "
                    "(default spectra_samples.csv beside --psd)")
    ap.add_argument("--trend", default=None, help="output CSV of the per-timestep trend with 95%% intervals "
                    "(default spectra_trend.csv beside --psd)")
    args = ap.parse_args(argv)

    from diffatlas.geometry.run import run_measures

    out = run_measures(args.runs, args.psd, args.distances, args.samples, args.trend)
    for row in out["mean_distance"]:
        result(f"{row['kind']} t={row['timestep_a']}/{row['timestep_b']}: mean geodesic distance {row['distance']:.3f}")
    return 0
