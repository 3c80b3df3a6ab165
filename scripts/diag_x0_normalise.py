"""Why x0-normalised edits saturate: the forms of the update side by side on one model (issue 18).

For the first two samples, the top three directions and γ = ±8 at each timestep, prints per
edit and as means over edits:

* ``|dx|``: ‖x' − x_t‖ of the final point;
* the per-channel std of x0(x') over that of the unedited x0(x_t) (1 = the normalisation's target);
* ``err``: ‖x0(x') − x0'‖ / ‖x0'‖, how far the update lands from the target it solves for;
* ``sat``: share of RGB values at 0 or 255 in the image after DDIM to the clean sample.

Modes: ``plain`` (x_t + γv), ``paper`` (the library's :func:`x0_normalise`, Park et al.'s
x_t + gain (x0' − x0(x_t))), ``edited`` (the dropped edited-point form x + gain (x0' − x0(x)),
by hand) and ``secant`` (a diagnostic only: the paper's direction x0' − x0(x_t), with the
step length set by one secant step on the measured slope of x0 along it instead of κ).
Also prints the measured slope of x0 along the correction against the 1/gain the update assumes.

    PYTHONPATH=src python scripts/diag_x0_normalise.py [--model resources/models/shapesworld] [--timesteps 999 500 100]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffatlas.geometry.config import GeometryConfig
from diffatlas.geometry.editing import channel_stats, normalise_to, x0_normalise, x0_update_gain
from diffatlas.geometry.jacobian import top_singular
from diffatlas.geometry.run import _basis_kwargs, _denoise_images, _denoiser, _pullback, sample_points
from diffatlas.geometry.sampling import alpha_at
from diffatlas.models.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resources/models/shapesworld")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[999, 500, 100])
    ap.add_argument("--gamma", type=float, default=8.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    h = load_model(args.model)
    cfg = GeometryConfig()
    den = _denoiser(h, cfg)
    for t in args.timesteps:
        fmap = _pullback(h, cfg, t)
        _, x_t = sample_points(h, den, cfg, t)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t)
        b = top_singular(fmap, x_t, cfg.n_directions, generator=gen, **_basis_kwargs(cfg))
        a = alpha_at(h, t)
        gain = x0_update_gain(a**0.5, (1 - a) ** 0.5, cfg.kappa)
        _, x0r = den.eps_x0(x_t, t, clip=False)
        sd_r = channel_stats(x0r)[1]
        print(f"\n=== t={t}  alpha_bar={a:.4e}  gain={gain:.4f} (assumed slope of x0: {1 / gain:.3f}; "
              f"with J_eps = I: {(1 - (1 - a) ** 0.5) / a**0.5:.4f}, with J_eps = 0: {1 / a**0.5:.2f})")
        print(f"    min per-channel std of x0(x_t): {float(sd_r.min()):.3f}")
        modes = ("plain", "paper", "edited", "secant")
        pts: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
        keys, targets, slopes = [], [], []
        for i in range(2):
            ref, x0i = x_t[i:i + 1], x0r[i:i + 1]
            for d in range(3):
                for g in (-args.gamma, args.gamma):
                    xe = ref + g * b.v[i, d][None]
                    _, x0e = den.eps_x0(xe, t, clip=False)
                    x0p = normalise_to(x0e, x0i)
                    delta = x0p - x0i
                    dh = delta / delta.norm()
                    _, x0s = den.eps_x0(ref + 0.1 * dh, t, clip=False)
                    slopes.append(float(((x0s - x0i) * dh).sum()) / 0.1)
                    eta0 = gain * float(delta.norm())
                    _, x0s = den.eps_x0(ref + eta0 * dh, t, clip=False)
                    eta1 = eta0 * float(delta.norm()) / max(float(((x0s - x0i) * dh).sum()), 1e-6)
                    pts["plain"].append(xe)
                    pts["paper"].append(x0_normalise(den, ref, xe, t, cfg.kappa))
                    pts["edited"].append(xe + gain * (x0p - x0e))
                    pts["secant"].append(ref + eta1 * dh)
                    keys.append((i, d, g))
                    targets.append(x0p)
        imgs = {m: _denoise_images(h, den, torch.cat(v), t, cfg) for m, v in pts.items()}
        print(f"    slope of x0 along x0' - x0(x_t) (small step): {np.round(slopes, 2).tolist()}")
        print(f"    {'s':>2} {'v':>2} {'γ':>5} {'mode':7} {'|dx|':>8} {'std ratio R,G,B':>20} {'err':>8} {'sat':>6}")
        agg: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in modes}
        for j, (i, d, g) in enumerate(keys):
            for m in modes:
                xp = pts[m][j]
                _, x0n = den.eps_x0(xp, t, clip=False)
                ratio = (channel_stats(x0n)[1] / sd_r[i:i + 1])[0, :, 0, 0].numpy()
                err = float((x0n - targets[j]).norm() / targets[j].norm())
                sat = float(((imgs[m][j] == 0) | (imgs[m][j] == 255)).mean())
                dx = float((xp - x_t[i:i + 1]).norm())
                agg[m].append((dx, float(ratio.mean()), err, sat))
                print(f"    {i:>2} {d:>2} {g:>5.0f} {m:7} {dx:8.2f} {str(np.round(ratio, 2).tolist()):>20} {err:8.3f} {sat:6.3f}")
        for m, rows in agg.items():
            r = np.array(rows)
            print(f"t={t} {m:7}: mean |dx| {r[:, 0].mean():7.2f}  std ratio {r[:, 1].mean():6.2f}  "
                  f"err {r[:, 2].mean():7.3f}  sat {r[:, 3].mean():.3f}   (n = {len(r)} edits)")


if __name__ == "__main__":
    main()
