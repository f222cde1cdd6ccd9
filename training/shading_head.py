"""Training a model's learned shading head (`models.shading_head`): the TAESD shading correction, distilled.

Pairs come from the trained flow model itself, run as a user runs it (its node defaults, network and source
TAESD in `precision`, no correction), on random crops of the training photos:

    low  = encode(photo crop downscaled ×2)             the low-res latent
    src  = the model's source for it;  out = the flow's result (no correction)
    dz   = correct_shading(TAESD, low, out, 1 pass) − out   the TAESD correction's move (fp32 TAESD)

The head learns dz from (out, src) with a mean squared error in network space. The TAESD correction's move
also re-draws fine grain that no latent-space function of (out, src) can predict; the head learns its mean,
which is the large-scale part. Everything here runs on the CPU machine in minutes.

With the target `head_then_pass` the move is that of the model's current head followed by one pass,

    dz  = correct_shading(TAESD, low, head(out, src), 1) − out

so a second head learns to do alone what the node's default correction (head, then pass) does; measured in
bench/RESULTS.md (*A head fitted to the head and the pass*).
"""
from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..flow.pipeline import build_source, upscale
from ..flow.settings import resolve
from ..flow.shading import correct_shading
from ..models.shading_head import ShadingHead, ShadingHeadConfig
from .data import downscale2, load_rgb

PAIR_KEYS = ("low", "src", "out", "dz")
TARGETS = ("taesd_pass", "head_then_pass")   # what dz is the move of (see the module's doc)


def crop_at(img: torch.Tensor, crop: int, rng: random.Random) -> torch.Tensor:
    """A random crop (offsets on the 8 px latent grid, so the low-res crop lines up), flipped half the time."""
    _, h, w = img.shape
    y = rng.randrange(0, (h - crop) // 8 + 1) * 8
    x = rng.randrange(0, (w - crop) // 8 + 1) * 8
    out = img[None, :, y:y + crop, x:x + crop]
    return out.flip(-1) if rng.random() < 0.5 else out


def low_res_crops(paths: Sequence, vae, crop: int, crops_per_image: int, seed: int, log=print):
    """The low-res latents that pairs are made from: for each image, `crops_per_image` random crops
    (`crop_at`), each down-sampled ×2 and encoded by `vae` → (crop index, item, rng, low-res latent). The item
    (from `seed`, the image and the crop) seeds the crop's rng, which the caller goes on drawing from, and
    serves as its noise seed. Logs progress every 50 images."""
    started = time.time()
    for i, path in enumerate(paths):
        img = load_rgb(path)
        for c in range(crops_per_image):
            item = seed * 1_000_003 + i * 10 + c
            rng = random.Random(item)
            yield c, item, rng, vae.encode(downscale2(crop_at(img, crop, rng)))
        if log and (i % 50 == 0 or i == len(paths) - 1):
            log(f"pairs: {i + 1}/{len(paths)} images, {time.time() - started:.0f} s")


@torch.inference_mode()
def make_pairs(ckpt, network, vae_ref, vae_run, paths: list[Path], *, crop: int = 256, crops_per_image: int = 2,
               noise_steps=(200, 250, 300), seed: int = 0, target: str = "taesd_pass",
               log=print) -> dict[str, torch.Tensor]:
    """Training pairs for the head of `network` (a built `ckpt`). `vae_ref`: the fp32 TAESD for the low-res
    latents and the correction; `vae_run`: the TAESD that builds the sources, in the network's precision. The
    first crop of each image uses the model's own noise step, the others one of `noise_steps`, so the head
    also serves the "more detail" settings. `target` (TARGETS): the move of one TAESD pass, or of the
    network's own head followed by one pass."""
    if target not in TARGETS:
        raise ValueError(f"unknown head target {target!r}; one of {', '.join(TARGETS)}")
    if getattr(vae_ref, "change", None) is not None:
        raise ValueError("the head learns the exact TAESD pass: load vae_ref with change=False")
    head = getattr(network, "shading_head", None) if target == "head_then_pass" else None
    if target == "head_then_pass" and head is None:
        raise ValueError("target head_then_pass needs a model that has a shading head to start from")
    # shading_correction 0: no TAESD pass and no head (a network that has one keeps it unused here)
    base = resolve(ckpt.method, size_multiple=ckpt.net_config.size_multiple, have_vae=True,
                   shading_correction=0).settings
    rows: dict[str, list] = {k: [] for k in PAIR_KEYS}
    for c, item, rng, low in low_res_crops(paths, vae_ref, crop, crops_per_image, seed, log):
        step = base.noise_step if c == 0 else rng.choice(list(noise_steps))
        settings = replace(base, noise_step=step, seed=item)
        src = build_source(low, settings, vae_run)
        out = upscale(network, low, settings, source=src)
        start = out if head is None else head(out * base.scale_factor, src) / base.scale_factor
        dz = correct_shading(vae_ref, low, start, 1) - out
        for k, v in (("low", low), ("src", src), ("out", out * base.scale_factor), ("dz", dz * base.scale_factor)):
            rows[k].append(v[0].to(torch.float32).clone())
    return {k: torch.stack(v) for k, v in rows.items()}


def train_head(pairs: dict[str, torch.Tensor], config: ShadingHeadConfig, *, steps: int, batch: int = 32,
               lr: float = 2e-3, mean_weight: float = 10.0, seed: int = 0, precision: str = "bf16", log=print,
               head: ShadingHead | None = None) -> ShadingHead:
    """Fit a head to the pairs' moves (network-space MSE; a one-pixel border, where the convolutions see
    padding, is left out of the loss), plus `mean_weight` × the MSE of each crop's mean move: the per-pixel
    error is dominated by the unpredictable grain, and without this term the head under-corrects the overall
    colour (validation crops: colour error 1.83 without, 1.59 with weight 10; the TAESD pass 1.41). One-cycle
    learning rate, AdamW, random vertical flips."""
    torch.manual_seed(seed)
    head = head if head is not None else ShadingHead(config)
    head.train().requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    n = pairs["out"].shape[0]
    base = pairs["dz"].pow(2).mean().item()
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
    started, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, n, (batch,))
        out, src, dz = pairs["out"][idx], pairs["src"][idx], pairs["dz"][idx]
        if torch.rand(()) < 0.5:
            out, src, dz = out.flip(-2), src.flip(-2), dz.flip(-2)
        with autocast:
            pred = head.delta(out, src)
        pred = pred.float()
        loss = F.mse_loss(pred[..., 1:-1, 1:-1], dz[..., 1:-1, 1:-1])
        if mean_weight:
            loss = loss + mean_weight * F.mse_loss(pred.mean((-2, -1)), dz.mean((-2, -1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % 500 == 0 or step == steps - 1):
            log(f"head step {step}: loss {sum(losses) / len(losses):.5f} (no head: {base:.5f}), "
                f"{time.time() - started:.0f} s")
            losses = []
    return head.eval().requires_grad_(False)
