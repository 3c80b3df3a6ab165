"""Diff-C: a light convolutional classifier on one layer's spatial activation maps.

Architecture (after Revelio's Diff-C, written from its description): the input map is
standardised per channel with statistics of the training split, then ``n_convs`` blocks of
``Conv3x3 -> BatchNorm -> ReLU -> MaxPool2x2`` each halve the map. Pooling applies only
along axes still longer than 1, so an 8x8 UNet map, a 64x64 SD map, a 16x16 DiT token grid
and a 1x1 map all work with the same code: once an axis reaches 1 it stops shrinking, and
the kernel along it becomes 1 (a 3-wide kernel on a 1-long axis would only see padding).
Channel widths double block by block up to ``feature_dim``; global average pooling gives a
``feature_dim`` vector and one fully connected layer gives the class logits.

Why convolution + max-pool rather than stride-2 convolutions: on ShapesWorld-like 16x16
maps with 400 training samples, a stride-2 3x3 stack reached 0.44-0.60 test accuracy on the
shape (it samples every other position, so small objects alias), the same widths with
stride 1 + max-pool 0.91-0.98, at about twice the compute of the first block.

Shapes: input [B, C, H, W] float32 -> logits [B, n_classes].
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DiffCArch:
    """Everything needed to rebuild a trained Diff-C from its safetensors file."""

    in_channels: int
    height: int
    width: int
    n_classes: int
    n_convs: int = 4
    feature_dim: int = 1024
    dropout: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DiffCArch":
        return cls(**json.loads(text))


def conv_widths(n_convs: int, feature_dim: int) -> list[int]:
    """Output channels of each block: doubling up to ``feature_dim`` (e.g. 128, 256, 512, 1024).

    The narrowest block keeps at least min(16, feature_dim) channels so small feature dims
    do not collapse to a handful of channels.
    """
    floor = min(16, feature_dim)
    return [max(feature_dim >> (n_convs - 1 - i), floor) for i in range(n_convs)]


def _block(c_in: int, c_out: int, h: int, w: int) -> tuple[nn.Sequential, int, int]:
    """One shrinking block and the map size it produces (each axis longer than 1 halves, rounding up)."""
    kh, kw = (3 if h > 1 else 1), (3 if w > 1 else 1)
    ph, pw = (2 if h > 1 else 1), (2 if w > 1 else 1)
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=(kh, kw), padding=(kh // 2, kw // 2), bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if ph > 1 or pw > 1:
        # ceil_mode keeps the last row/column of odd-sized maps (e.g. 7x7 -> 4x4).
        layers.append(nn.MaxPool2d(kernel_size=(ph, pw), stride=(ph, pw), ceil_mode=True))
    return nn.Sequential(*layers), -(-h // ph), -(-w // pw)


class DiffC(nn.Module):
    """Diff-C classifier sized for one layer (its channels and map size); see the module doc."""

    def __init__(self, arch: DiffCArch) -> None:
        super().__init__()
        self.arch = arch
        # Standardisation of the input (per channel); set from the training split.
        self.register_buffer("input_mean", torch.zeros(arch.in_channels))
        self.register_buffer("input_std", torch.ones(arch.in_channels))
        blocks = []
        c, h, w = arch.in_channels, arch.height, arch.width
        for width in conv_widths(arch.n_convs, arch.feature_dim):
            block, h, w = _block(c, width, h, w)
            blocks.append(block)
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.out_size = (h, w)  # map size before pooling, for the logs
        self.dropout = nn.Dropout(arch.dropout)
        self.head = nn.Linear(c, arch.n_classes)

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel mean and std [C] of the training maps (std floored to avoid /0)."""
        self.input_mean.copy_(mean)
        self.input_std.copy_(torch.clamp(std, min=1e-6))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> pooled features [B, feature_dim]."""
        x = (x - self.input_mean[None, :, None, None]) / self.input_std[None, :, None, None]
        return self.blocks(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> logits [B, n_classes]."""
        return self.head(self.dropout(self.features(x)))


def save_diffc(path: str, models: dict[str, DiffC], classes: dict[str, list[str]], metadata: dict[str, str]) -> None:
    """Write one Diff-C per granularity to a safetensors file (keys ``{granularity}.{param}``).

    The metadata holds each classifier's architecture and class names, so
    :func:`load_diffc` rebuilds it without any pickled object.
    """
    from safetensors.torch import save_file

    tensors = {}
    meta = dict(metadata)
    for gran, model in models.items():
        for name, value in model.state_dict().items():
            tensors[f"{gran}.{name}"] = value.detach().cpu().contiguous()
        meta[f"{gran}.arch"] = model.arch.to_json()
        meta[f"{gran}.classes"] = json.dumps(classes[gran])
    save_file(tensors, path, metadata=meta)


def load_diffc(path: str, granularity: str) -> tuple[DiffC, list[str]]:
    """Rebuild the ``granularity`` classifier saved by :func:`save_diffc` (eval mode, CPU)."""
    from safetensors import safe_open

    from diffatlas.errors import UserError

    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        if f"{granularity}.arch" not in meta:
            raise UserError(f"{path} holds no {granularity!r} Diff-C; it has: {sorted(k[:-5] for k in meta if k.endswith('.arch'))}")
        prefix = f"{granularity}."
        state = {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}
    model = DiffC(DiffCArch.from_json(meta[f"{granularity}.arch"]))
    model.load_state_dict(state)
    return model.eval(), json.loads(meta[f"{granularity}.classes"])
