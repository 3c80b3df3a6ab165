"""Device correctness without a GPU: every tensor a stage makes lives on its inputs' device.

CI has no GPU, so the CUDA failure mode ("Expected all tensors to be on the same device":
a tensor built on the default device inside code that receives tensors on another one) is
reproduced the other way round: the model and its inputs live on the CPU while the *default*
device is ``meta``. A factory call without ``device=`` (``torch.linspace(...)``,
``torch.ones(...)``) then makes a meta tensor, and the first op that mixes it with the CPU
tensors raises, exactly where it would have raised on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)

CFG = {
    "n_samples": 2, "n_directions": 2, "oversample": 1, "tol": 0.05, "ddim_steps": 2,
    "edit_strengths": [-3.0, 3.0], "edit_directions": 1, "edit_samples": 1,
    "iterative_substeps": 1, "iterative_directions": 1, "iterative_timesteps": [999],
    "global_samples": 2, "path_pairs": 1, "path_segments": 3, "max_iters": 3,
}


def _geometry_under_the_trap(root: Path) -> None:
    from diffatlas.geometry.config import GeometryConfig
    from diffatlas.geometry.run import run_global, run_measures, run_paths, run_timestep
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    torch.set_num_threads(1)
    model = make_tiny_model("pixel", root / "model")
    handle = load_model(model, device="cpu")
    cfg = GeometryConfig.from_dict(CFG)
    tokenize = handle._tokenize

    def host_tokenize(*args, **kwargs):  # the tokenizer makes host tensors by design (then moved)
        with torch.device("cpu"):
            return tokenize(*args, **kwargs)

    handle._tokenize = host_tokenize
    torch.set_default_device("meta")  # the trap works: a stray factory call gives a tensor without data
    stray = torch.ones(3)
    torch.set_default_device(None)
    assert stray.device.type == "meta", stray.device
    try:
        stray.cpu()
        copied = True
    except NotImplementedError:
        copied = False
    assert not copied, "a meta tensor was copied to the CPU: the trap would not catch stray tensors"
    torch.set_default_device("meta")  # any tensor created without device= lands here and clashes
    try:
        meta = run_timestep(handle, cfg, 999, root / "t999", "tiny")
        run_global(handle, cfg, root / "t999", root / "global", "tiny")
        paths = run_paths(handle, cfg, root / "path_lengths.csv", "tiny")
        run_measures([str(root / "t999")], root / "psd.csv", root / "dist.csv")
    finally:
        torch.set_default_device(None)
    (root / "result.json").write_text(json.dumps({"meta": meta, "paths": paths}))


def test_geometry_stage_makes_no_tensor_on_the_default_device(tmp_path):
    # A fresh interpreter: the default-device mode must not depend on what ran before in this one.
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "result.json").read_text())
    meta, paths = out["meta"], out["paths"]
    assert load_file(str(tmp_path / "t999" / "basis.safetensors"))["v"].device.type == "cpu"
    # Artifacts say where and in what precision they were computed.
    assert (meta["device"], meta["dtype"]) == ("cpu", "float32")
    assert meta["precision"] == {"weights": "float32", "denoise": "float32", "jacobian": "float32"}
    assert json.loads((tmp_path / "t999" / "meta.json").read_text())["device"] == "cpu"
    assert (paths["device"], paths["dtype"]) == ("cpu", "float32")


if __name__ == "__main__":
    _geometry_under_the_trap(Path(sys.argv[1]))
