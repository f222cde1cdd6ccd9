"""Training data as the authors build it, encoded once per image so that every step sees fresh crops.

For each image (long side at most `max_side`):
    hi     = image                      → encode   (the target, x1)
    lo     = image downscaled ×2        → encode   (what a diffusion model would have made)
    latent = bilinear ×2 of lo                     (latent-mode source)
    pixel  = decode(lo) → bilinear ×2 in pixels → encode   (pixel-mode source, as at inference)
Training crops are then taken in latent space. All latents are network-space (× scale).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..flow.source import MODES, make_source

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


def downscale2(pixels: torch.Tensor) -> torch.Tensor:
    # Antialiased, like a real low-resolution image rather than a decimated one.
    return F.interpolate(pixels, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)


# ------------------------------------------------------------------------------------ per-image latent store
#
# Each training image is encoded once, whole, instead of as a few fixed crops: every step then draws fresh
# random crops in latent space, and the sources are built on the whole image as the node builds them at
# inference (no crop borders inside the source). Per image (network-space latents, bf16):
#     hi     encode(image)                                              (H/8)   the target
#     lo     encode(image downscaled ×2)                                (H/16)  what a diffusion model makes
#     latent, pixel  the source on the high-res grid in each up-sampling mode                    (H/8)
# A store is built for one back-projection strength of the pixel source (`flow.source.back_project`) and one
# decoder of its pixels (`flow.source.SOURCE_DECODERS`).

SOURCES = MODES   # one stored source per up-sampling mode
STORE_CHUNK = 64


def prepare_image(img: torch.Tensor, max_side: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] → long side at most `max_side` (antialiased), both sides cropped to a multiple of 16."""
    _, h, w = img.shape
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        img = F.interpolate(img[None], size=(round(h * s), round(w * s)), mode="bilinear", antialias=True,
                            align_corners=False)[0].clamp(0, 1)
    _, h, w = img.shape
    h16, w16 = h - h % 16, w - w % 16
    y, x = (h - h16) // 2, (w - w16) // 2
    return img[:, y:y + h16, x:x + w16]


@dataclass(frozen=True)
class SourceRecipe:
    """How a store's pixel-mode sources are made: the model's `back_projection` strength and `source_decoder`
    (`flow.source.make_source`). A store holds sources of one recipe; its chunks say which."""
    back_projection: float = 0.0
    decoder: str = "vae"

    def key_parts(self) -> list:
        # each joins a store's key only when used, so the stores built before it keep their names
        return ([self.back_projection] if self.back_projection else []) + (
            [self.decoder] if self.decoder != "vae" else [])

    def metadata(self) -> dict[str, str]:
        return {"back_projection": str(float(self.back_projection)), "source_decoder": self.decoder}

    def check(self, name: str, meta: dict[str, str]):
        """Refuse a chunk (its safetensors metadata) made with another recipe."""
        made_with = float(meta.get("back_projection", "0"))
        if made_with != self.back_projection:
            raise ValueError(f"{name} holds pixel sources back-projected with strength {made_with}, not "
                             f"this run's {float(self.back_projection)}")
        decoded_by = meta.get("source_decoder", "vae")
        if decoded_by != self.decoder:
            raise ValueError(f"{name} holds pixel sources decoded by the {decoded_by!r} decoder, not this "
                             f"run's {self.decoder!r}")


@torch.inference_mode()
def encode_image(vae, img: torch.Tensor, recipe: SourceRecipe = SourceRecipe()) -> dict[str, torch.Tensor]:
    """One prepared image (3, H, W) → its target, low-res latent and every source, network space."""
    s = vae.scale_factor
    device = next(vae.parameters()).device
    pixels = img[None].to(device)
    out = {"hi": vae.encode(pixels) * s}
    lo = vae.encode(downscale2(pixels)) * s
    out["lo"] = lo
    for mode in SOURCES:
        out[mode] = make_source(lo, mode, s, vae, back_projection=recipe.back_projection, decoder=recipe.decoder)
    return {k: v[0].to("cpu", torch.bfloat16) for k, v in out.items()}


def store_key(images: list[Path], max_side: int, vae_id: str, recipe: SourceRecipe = SourceRecipe()) -> str:
    return hashlib.sha1(json.dumps([[p.name, p.stat().st_size] for p in images] + [max_side, vae_id,
                                                                                   list(SOURCES)]
                                   + recipe.key_parts()).encode()).hexdigest()[:16]


def build_store(images: list[Path], vae, vae_id: str, cache_dir: str | os.PathLike, max_side: int = 768,
                count: int | None = None, progress=None, recipe: SourceRecipe = SourceRecipe()) -> list[Path]:
    """Encode the first `count` images (all by default; whole chunks of STORE_CHUNK) once each, into chunk files
    of a store folder keyed by the whole image list, so a run on fewer images shares the chunks of a run on all
    of them. A stopped build resumes at its first missing chunk. Returns the chunk files."""
    from safetensors.torch import save_file
    folder = Path(cache_dir) / f"store-{store_key(images, max_side, vae_id, recipe)}"
    folder.mkdir(parents=True, exist_ok=True)
    count = len(images) if count is None else min(count, len(images))
    paths = []
    for start in range(0, count, STORE_CHUNK):
        path = folder / f"chunk-{start // STORE_CHUNK:05d}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        tensors = {}
        for i, p in enumerate(images[start:start + STORE_CHUNK], start):
            for k, v in encode_image(vae, prepare_image(load_rgb(p), max_side), recipe).items():
                tensors[f"{i}.{k}"] = v.contiguous()
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, tmp, metadata={"vae": vae_id, "max_side": str(max_side)} | recipe.metadata())
        os.replace(tmp, path)
        if progress:
            progress(min(start + STORE_CHUNK, count), count)
    return paths


def stored_chunks(folder, vae_id: str, max_images: int | None = None,
                  recipe: SourceRecipe = SourceRecipe()) -> list[Path]:
    """The chunk files of a latent store built earlier (`build_store`), e.g. carried to a GPU machine without
    the photos: checked to come from the same VAE and source recipe; the first `max_images` worth of them when
    given."""
    from safetensors import safe_open
    chunks = sorted(Path(folder).glob("chunk-*.safetensors"))
    if not chunks:
        raise ValueError(f"no latent-store chunks (chunk-*.safetensors) in {folder}")
    if max_images:
        chunks = chunks[:max(1, -(-max_images // STORE_CHUNK))]
    for path in chunks:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        made_by = meta.get("vae")
        if made_by != vae_id:
            raise ValueError(f"{path.name} was encoded with {made_by!r}, not this run's VAE {vae_id!r}")
        recipe.check(path.name, meta)
    return chunks


class LatentStore:
    """Random latent crops of the stored images: `size`² target latents, their (size/2)² low-res latents and
    the source, taken at even latent offsets so that the low-res crop lines up exactly, randomly flipped."""

    def __init__(self, chunks: list[Path], source: str, min_size: int = 0):
        from safetensors.torch import load_file
        if source not in SOURCES:
            raise ValueError(f"unknown up-sampling mode {source!r}; choose one of {', '.join(SOURCES)}")
        self.source = source
        self.hi, self.src = [], []
        for path in chunks:
            data = load_file(path)
            for i in sorted({int(k.split(".")[0]) for k in data}):
                if min(data[f"{i}.hi"].shape[-2:]) >= min_size:
                    self.hi.append(data[f"{i}.hi"])
                    self.src.append(data[f"{i}.{source}"])
        if not self.hi:
            raise ValueError(f"no stored image is at least {min_size} latent pixels on its short side")

    def __len__(self):
        return len(self.hi)

    def batch(self, n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(target z1, source) crops, (n, C, size, size) float32."""
        z1, src = [], []
        picks = torch.randint(len(self.hi), (n,), generator=gen).tolist()
        for i in picks:
            hi, s = self.hi[i], self.src[i]
            h, w = hi.shape[-2:]
            y = 2 * int(torch.randint((h - size) // 2 + 1, (), generator=gen))
            x = 2 * int(torch.randint((w - size) // 2 + 1, (), generator=gen))
            a, b = hi[:, y:y + size, x:x + size], s[:, y:y + size, x:x + size]
            if torch.rand((), generator=gen) < 0.5:
                a, b = a.flip(-1), b.flip(-1)
            z1.append(a)
            src.append(b)
        return torch.stack(z1).float(), torch.stack(src).float()
