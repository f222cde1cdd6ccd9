"""A learned shading head: a small latent-space network that does, in milliseconds, what the TAESD shading
correction (`flow.shading`) does in seconds on a CPU.

It sees the flow's result and the source it started from (both scaled latents on the high-res grid; the source
carries the low-res image's shading) and adds a correction to the result:

    x1 ← x1 + head(x1, source)

A few 3×3 convolutions at latent resolution (a receptive field of 2·depth + 1 latent pixels), so it is local:
it batches and runs on any size. With `pool` > 0 a second branch works at 1/pool of the resolution (average
pooling, `depth` convolutions, bilinear back), which sees about pool× farther: large-scale shading. The last
layer starts at zero, so an untrained head changes nothing.
Stored in the model's file (`shading_head.*` tensors, its config in the metadata) and trained after the flow
network (`training/shading_head.py`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ShadingHeadConfig:
    channels: int = 96
    depth: int = 5                 # 3×3 convolutions before the 1×1 output
    latent_channels: int = 4
    pool: int = 0                  # > 0: add a branch at 1/pool resolution (see the module's doc)

    @classmethod
    def from_dict(cls, d: dict) -> "ShadingHeadConfig":
        cfg = cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})
        if cfg.channels < 1 or cfg.depth < 1 or cfg.latent_channels < 1 or cfg.pool < 0 or cfg.pool == 1:
            raise ValueError(f"shading head config out of range: {d}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


class ShadingHead(nn.Module):
    def __init__(self, config: ShadingHeadConfig = ShadingHeadConfig()):
        super().__init__()
        self.config = config
        c, lc, d = config.channels, config.latent_channels, config.depth
        if not config.pool:
            layers: list[nn.Module] = [nn.Conv2d(2 * lc, c, 3, padding=1), nn.SiLU()]
            for _ in range(d - 1):
                layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            layers.append(nn.Conv2d(c, lc, 1))
            self.net = nn.Sequential(*layers)
            last = self.net[-1]
        else:
            # input conv; a full-resolution branch of depth − 1 convolutions; a pooled branch of depth; both
            # joined by one 3×3 convolution and the 1×1 output
            self.inp = nn.Conv2d(2 * lc, c, 3, padding=1)
            self.full = nn.Sequential(*[m for _ in range(d - 1) for m in (nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))])
            pooled: list[nn.Module] = [nn.AvgPool2d(config.pool, ceil_mode=True)]
            for i in range(d):
                pooled += ([nn.SiLU()] if i else []) + [nn.Conv2d(c, c, 3, padding=1)]
            self.pooled = nn.Sequential(*pooled)
            self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(2 * c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, lc, 1))
            last = self.out[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def delta(self, x1: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The correction, in the weights' dtype (for training)."""
        first = self.inp if self.config.pool else self.net[0]
        x = torch.cat([x1, source], dim=1).to(first.weight.dtype)
        if not self.config.pool:
            return self.net(x)
        h = self.inp(x)
        wide = F.interpolate(self.pooled(h), size=h.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(torch.cat([self.full(h), wide], dim=1))

    def forward(self, x1: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Scaled result and source (B, C, H, W) → the corrected result, float32."""
        return x1.float() + self.delta(x1, source).float()
