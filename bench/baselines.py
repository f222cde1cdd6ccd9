"""Peer baseline for the quality benchmark: city96's SD-Latent-Upscaler (Apache-2.0), a plain conv stack.

Layout of its safetensors: `sequential.0` conv 4→64, ReLU, nearest upsample ×factor, ReLU, 16 × (conv 64→64,
ReLU) at indices 4…34, `sequential.36` conv 64→4. It works on unscaled (raw) SD latents.
"""
from __future__ import annotations

import torch
from torch import nn


class City96LatentUpscaler(nn.Module):
    def __init__(self, path, factor: float = 2.0):
        super().__init__()
        from safetensors.torch import load_file
        layers = [nn.Conv2d(4, 64, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=factor, mode="nearest"),
                  nn.ReLU()]
        for _ in range(16):
            layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(64, 4, 3, padding=1))
        self.sequential = nn.Sequential(*layers)
        self.load_state_dict(load_file(path))
        self.eval().requires_grad_(False)

    def forward(self, raw_latent: torch.Tensor) -> torch.Tensor:
        return self.sequential(raw_latent)
