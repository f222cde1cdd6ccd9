"""A learned shading head: a small latent-space network that does, in milliseconds, what the TAESD shading
correction (`flow.shading`) does in seconds on a CPU.

It sees the flow's result and the source it started from (both scaled latents on the high-res grid; the source
carries the low-res image's shading) and adds a correction to the result:

    x1 ← x1 + head(x1, source)

A few 3×3 convolutions at latent resolution (a receptive field of 2·depth + 1 latent pixels), so it is local:
it tiles, batches and runs on any size. The last layer starts at zero, so an untrained head changes nothing.
Stored in the model's file (`shading_head.*` tensors, its config in the metadata) and trained after the flow
network (`training/shading_head.py`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ShadingHeadConfig:
    channels: int = 96
    depth: int = 5                 # 3×3 convolutions before the 1×1 output
    latent_channels: int = 4

    @classmethod
    def from_dict(cls, d: dict) -> "ShadingHeadConfig":
        cfg = cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})
        if cfg.channels < 1 or cfg.depth < 1 or cfg.latent_channels < 1:
            raise ValueError(f"shading head config out of range: {d}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


class ShadingHead(nn.Module):
    def __init__(self, config: ShadingHeadConfig = ShadingHeadConfig()):
        super().__init__()
        self.config = config
        c, lc = config.channels, config.latent_channels
        layers: list[nn.Module] = [nn.Conv2d(2 * lc, c, 3, padding=1), nn.SiLU()]
        for _ in range(config.depth - 1):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(c, lc, 1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def delta(self, x1: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The correction, in the weights' dtype (for training)."""
        dtype = self.net[0].weight.dtype
        return self.net(torch.cat([x1, source], dim=1).to(dtype))

    def forward(self, x1: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Scaled result and source (B, C, H, W) → the corrected result, float32."""
        return x1.float() + self.delta(x1, source).float()
