"""Training pairs as the authors build them, cached as latents so that epochs are cheap.

For each image, a few random crops (with random flips) of `crop` pixels:
    high  = crop                     → encode → z_hi   (the target, x1)
    low   = crop downscaled ×2       → encode → z_lo   (what a diffusion model would have made)
    z_up  = decode(z_lo) → bilinear ×2 in pixels → encode   (pixel-mode source, as at inference)
Latent-mode sources are bilinear(z_lo), computed on the fly. All latents are network-space (× scale).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class ScanReport:
    usable: list[Path]
    unreadable: list[str]
    too_small: list[str]

    def summary(self) -> str:
        s = f"{len(self.usable)} usable images"
        if self.unreadable:
            s += f", {len(self.unreadable)} unreadable skipped (e.g. {self.unreadable[0]})"
        if self.too_small:
            s += f", {len(self.too_small)} smaller than the crop skipped (e.g. {self.too_small[0]})"
        return s


def scan_images(folder: str | os.PathLike, crop: int) -> ScanReport:
    from PIL import Image, UnidentifiedImageError
    usable, unreadable, too_small = [], [], []
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() not in IMAGE_EXT or not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            unreadable.append(path.name)
            continue
        (usable if min(w, h) >= crop else too_small).append(path if min(w, h) >= crop else path.name)
    return ScanReport(usable, unreadable, too_small)


def load_rgb(path: Path) -> torch.Tensor:
    from PIL import Image
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def random_crops(img: torch.Tensor, crop: int, count: int, rng: random.Random) -> torch.Tensor:
    _, h, w = img.shape
    out = []
    for _ in range(count):
        y, x = rng.randint(0, h - crop), rng.randint(0, w - crop)
        c = img[:, y:y + crop, x:x + crop]
        if rng.random() < 0.5:
            c = c.flip(-1)
        out.append(c)
    return torch.stack(out)


def downscale2(pixels: torch.Tensor) -> torch.Tensor:
    # Antialiased, like a real low-resolution image rather than a decimated one.
    return F.interpolate(pixels, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)


@torch.inference_mode()
def encode_pairs(vae, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """pixels (N, 3, S, S) in [0, 1] → network-space latents z_hi (S/8), z_lo (S/16), z_up (S/8)."""
    s = vae.scale_factor
    pixels = pixels.to(next(vae.parameters()).device)
    z_hi = vae.encode(pixels) * s
    z_lo = vae.encode(downscale2(pixels)) * s
    lo_pixels = vae.decode(z_lo / s)
    up = F.interpolate(lo_pixels, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    z_up = vae.encode(up) * s
    return {"z_hi": z_hi.cpu(), "z_lo": z_lo.cpu(), "z_up": z_up.cpu()}


def cache_key(images: list[Path], crop: int, per_image: int, seed: int, vae_id: str) -> str:
    h = hashlib.sha1(json.dumps([[str(p.name), p.stat().st_size] for p in images] + [crop, per_image, seed, vae_id])
                     .encode()).hexdigest()
    return h[:16]


def build_cache(images: list[Path], vae, vae_id: str, cache_dir: str | os.PathLike, crop: int, per_image: int,
                seed: int = 0, batch: int = 8, progress=None) -> Path:
    """Encode all pairs once; returns the cache file (reused when images and settings are unchanged)."""
    from safetensors.torch import load_file, save_file
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"pairs-{cache_key(images, crop, per_image, seed, vae_id)}.safetensors"
    if path.exists():
        return path
    partial = path.with_suffix(".partial.safetensors")
    parts: dict[str, list[torch.Tensor]] = {"z_hi": [], "z_lo": [], "z_up": []}
    done = 0
    if partial.exists():  # resume an interrupted cache build
        old = load_file(partial)
        parts = {k: [old[k]] for k in parts}
        done = int(old["done"].item())
    rng = random.Random(seed)
    pending = []
    for i, p in enumerate(images):
        crops = random_crops(load_rgb(p), crop, per_image, rng)  # always drawn, so resuming keeps the rng in step
        if i < done:
            continue
        pending.append(crops)
        if len(pending) * per_image >= batch or i == len(images) - 1:
            pairs = encode_pairs(vae, torch.cat(pending))
            for k in parts:
                parts[k].append(pairs[k].half())
            pending = []
            if progress:
                progress(i + 1, len(images))
            if (i + 1) % 64 == 0:
                save_file({k: torch.cat(v) for k, v in parts.items()} | {"done": torch.tensor(i + 1)}, partial)
    save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, path,
              metadata={"crop": str(crop), "per_image": str(per_image), "images": str(len(images)),
                        "vae": vae_id})
    partial.unlink(missing_ok=True)
    return path


class PairCache:
    def __init__(self, path: str | os.PathLike):
        from safetensors.torch import load_file
        data = load_file(path)
        self.z_hi, self.z_lo, self.z_up = data["z_hi"], data["z_lo"], data["z_up"]

    def __len__(self):
        return self.z_hi.shape[0]

    def batch(self, idx: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(target z1, source z_up) for the indices, float32."""
        z1 = self.z_hi[idx].float()
        if mode == "pixel":
            src = self.z_up[idx].float()
        else:
            src = F.interpolate(self.z_lo[idx].float(), size=z1.shape[-2:], mode="bilinear", align_corners=False)
        # a horizontal flip of the latent pair ≈ the flipped crop: two views per cached crop
        if torch.rand(()) < 0.5:
            z1, src = z1.flip(-1), src.flip(-1)
        return z1, src
