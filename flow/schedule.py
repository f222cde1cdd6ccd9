"""Noise augmentation with the authors' forward diffusion (their `ForwardDiffusion()` defaults).

Not a linear-beta schedule: ᾱ_i = sigmoid(-2·ln(tan(π·τ_i/2) + 1e-5)), τ_i = i/999, computed in float64
and stored as float32 (ᾱ[400] = 0.65390396).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

NUM_STEPS = 1000


@lru_cache(maxsize=1)
def _alpha_bar_f64() -> torch.Tensor:
    tau = torch.linspace(0, 1, NUM_STEPS, dtype=torch.float64)
    log_snr = -2.0 * torch.log(torch.tan(math.pi * tau / 2) + 1e-5)  # + 2·ln(64/64) = 0
    return torch.sigmoid(log_snr)


def alpha_bar() -> torch.Tensor:
    """ᾱ table, float32, shape (1000,)."""
    return _alpha_bar_f64().to(torch.float32)


def check_step(step: int) -> int:
    if not 0 <= int(step) < NUM_STEPS:
        raise ValueError(f"noise augmentation step must be in 0..{NUM_STEPS - 1}, got {step}")
    return int(step)


def q_sample(z: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
    """x = √ᾱ[step]·z + √(1−ᾱ[step])·noise, in float32 like the authors."""
    a = alpha_bar()[check_step(step)]
    return a.sqrt().to(z.device, z.dtype) * z + (1 - a).sqrt().to(z.device, z.dtype) * noise
