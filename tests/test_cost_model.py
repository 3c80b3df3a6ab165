"""bench/cost_model.py (README "Scaling up"): its byte counts and job arithmetic by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cost_model", ROOT / "bench" / "cost_model.py")
cost_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cost_model)

# SD1.5 at 512 px (64x64 latents): mid is 1280 channels at 8x8, up_ft1 1280 at 32x32.
SHAPES = {"mid": ("mid_block", 1280, 8, 8), "up_ft1": ("up_blocks.1", 1280, 32, 32)}


def test_bytes_per_image_are_float32_vectors_and_float16_capped_maps():
    rows = cost_model.bytes_per_image(SHAPES, spatial=True, spatial_max_size=16)
    assert rows["mid"]["pooled_B"] == 1280 * 4 and rows["mid"]["spatial_B"] == 1280 * 8 * 8 * 2
    assert rows["up_ft1"]["stored"] == (16, 16) and rows["up_ft1"]["spatial_B"] == 1280 * 16 * 16 * 2
    pooled_only = cost_model.bytes_per_image(SHAPES, spatial=False, spatial_max_size=16)
    assert [r["spatial_B"] for r in pooled_only.values()] == [0, 0]


def test_plan_counts_jobs_hours_and_disk():
    # 1000 images, 2 layers, 3 timesteps, shards of 300 -> 4 shards, 12 extraction jobs
    p = cost_model.plan(1000, 2, 3, 300, per_image_timestep_B=1e6, rate=10.0, fixed_s=6.0)
    assert (p["shards"], p["extract_jobs"], p["gather_jobs"], p["sae_jobs"]) == (4, 12, 3, 6)
    assert p["gpu_hours"] == pytest.approx((1000 * 3 / 10.0 + 12 * 6.0) / 3600)
    assert p["job_minutes"] == pytest.approx((300 / 10.0 + 6.0) / 60)
    assert p["disk_TB"] == pytest.approx(1000 * 3 * 1e6 / 1e12)
    one = cost_model.plan(1000, 2, 3, None, per_image_timestep_B=1e6, rate=10.0, fixed_s=6.0)
    assert (one["shards"], one["extract_jobs"], one["gather_jobs"]) == (1, 3, 0)
