"""A fidelity decoder: TAESD's decoder fine-tuned to reproduce low-res images as closely as it can (MSE),
for the shading correction's reference (`flow.shading`), not for the picture a user sees.

TAESD's own decoder draws sharp, plausible images; it is only about 25.5 dB from the low-res photo it decodes
(bench/RESULTS.md, *What limits the shading correction's reference*), and the correction pulls every result's
large scales towards that image. Fine-tuning a copy of it on the training photos' own low-res crops (each
encoded with the TAESD encoder, decoded and compared in pixels) brings it closer, and the correction with it.
"""
from __future__ import annotations

import copy
import random
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import downscale2

# What a recipe for scripts/train_fidelity_decoder.py may hold (training/recipes/decoders/*.json)
RECIPE_KEYS = {"comment", "images", "vae", "max_images", "max_side", "crop", "batch", "lr", "steps", "max_minutes",
               "precision", "shuffle_seed", "seed"}


def photo_store(paths: Sequence, load: Callable, max_side: int = 768) -> list[torch.Tensor]:
    """Photos as uint8 (3, H, W), the long side at most `max_side` (area down-sampling), kept in memory."""
    photos = []
    for path in paths:
        img = load(path)
        scale = max_side / max(img.shape[-2:])
        if scale < 1:
            img = F.interpolate(img[None], scale_factor=scale, mode="area")[0]
        photos.append((img * 255).round().to(torch.uint8))
    return photos


def low_res_batch(photos: Sequence[torch.Tensor], rng: random.Random, batch: int, crop: int) -> torch.Tensor:
    """`batch` low-res images (B, 3, crop/2, crop/2) in [0, 1]: random `crop` px crops of random photos, randomly
    flipped, down-sampled ×2 as the bench makes its low-res inputs (`downscale2`)."""
    items = []
    for _ in range(batch):
        photo = photos[rng.randrange(len(photos))]
        h, w = photo.shape[-2:]
        y, x = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
        item = photo[:, y:y + crop, x:x + crop].float() / 255
        items.append(item.flip(-1) if rng.random() < 0.5 else item)
    return downscale2(torch.stack(items))


def fit(vae, photos: Sequence[torch.Tensor], steps: int, batch: int = 8, crop: int = 256, lr: float = 1e-4,
        seed: int = 0, precision: str = "bf16", max_seconds: Optional[float] = None,
        log: Callable[[str], None] = print) -> tuple[dict, int]:
    """Fine-tune a copy of `vae`'s decoder (a float32 `models.taesd.TAESD`) → (its state dict, steps run).
    Adam on the pixel MSE between the decoded TAESD latent of each low-res crop and the crop itself; bf16
    autocast on the CPU (`precision`). Stops after `steps` or `max_seconds`."""
    decoder = copy.deepcopy(vae.decoder).float().train().requires_grad_(True)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    rng = random.Random(seed)
    started, recent, step = time.perf_counter(), [], 0
    while step < steps and (max_seconds is None or time.perf_counter() - started < max_seconds):
        low = low_res_batch(photos, rng, batch, crop)
        with torch.no_grad():
            z = vae.encode_scaled(low)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            y = decoder(z)
        loss = F.mse_loss(y.float(), low)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        recent.append(loss.item())
        if step % 100 == 0:
            log(f"step {step}: mse {sum(recent) / len(recent):.5f} ({time.perf_counter() - started:.0f} s)")
            recent = []
    return {k: v.detach().clone() for k, v in decoder.state_dict().items()}, step
