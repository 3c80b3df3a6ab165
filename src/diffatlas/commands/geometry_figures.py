"""``diffatlas geometry-figures <kind>``: the geometry stage's figures, one per call.

Kinds::

    spectra  --runs DIR... --out PNG            singular values vs t (flattening as t -> 0)
    edits    --run DIR --out PNG                edit grid of one timestep (with / without x0 normalisation, iterative)
    global   --global-dir DIR --out PNG [--direction I]   one global direction on several samples
    psd      --psd CSV [--distances CSV] --out PNG        power spectra of directions across timesteps
    meaning  --summary CSV --out PNG            which ShapesWorld factor each direction changes
    paths    --segments CSV [--summary JSON] --out PNG   D_geo per segment along lerp / slerp / geodesic, totals
"""

from __future__ import annotations

import argparse
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("geometry-figures", __doc__)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("spectra")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("edits")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("global")
    p.add_argument("--global-dir", required=True)
    p.add_argument("--direction", type=int, default=0, help="global direction (rank, 0 = top)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("psd")
    p.add_argument("--psd", required=True)
    p.add_argument("--distances", default=None)
    p.add_argument("--out", required=True)
    p = sub.add_parser("meaning")
    p.add_argument("--summary", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("paths")
    p.add_argument("--segments", required=True, help="path_segments.csv of geometry-paths")
    p.add_argument("--summary", default=None, help="path_lengths.json of geometry-paths (intervals, noise floor)")
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from diffatlas.geometry import figures

    if args.kind == "spectra":
        path = figures.spectra_figure(args.runs, args.out)
    elif args.kind == "edits":
        path = figures.edits_figure(args.run, args.out)
    elif args.kind == "global":
        path = figures.global_figure(args.global_dir, args.out, direction=args.direction)
    elif args.kind == "psd":
        path = figures.psd_figure(args.psd, args.out, args.distances)
    elif args.kind == "paths":
        path = figures.path_lengths_figure(args.segments, args.out, args.summary)
    else:
        path = figures.meaning_figure(args.summary, args.out)
    result(path)
    return 0
