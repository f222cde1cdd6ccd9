"""Training the pack's learned encoder move (`models.taesd.EncodeChange`): what one shading-correction pass
asks of the TAESD encoder, distilled.

A pass (`flow.shading`) moves the upscaled latent z by encode(d + e) − encode(d), where d is z decoded and e the
smooth change that gives d the low-res image's large scales: two TAESD encodes at full resolution, most of a
CPU's time at the node defaults. Pairs come from the CFM model run as a user runs it (its node defaults up to
the pass, network and source TAESD in `precision`), on random crops of training photos:

    z = the flow's result (with the model's shading head), d, e = shading_change(z)     (float32 TAESD)
    dz = encode(d + e) − encode(d)                                                   the exact move

and the network learns dz from (z, d, e), with a network-space MSE plus `mean_weight` × the MSE of each crop's
mean move (the overall colour, which the per-pixel error would leave under-corrected). A part of dz is TAESD
re-drawing its finest grain, which the network does not reproduce; the large-scale part it does (bench/
RESULTS.md, *A learned encoder move*).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..flow.pipeline import build_source, upscale
from ..flow.settings import resolve
from ..flow.shading import encode_change, shading_change, shading_reference
from ..models.taesd import EncodeChange, EncodeChangeConfig
from .shading_head import low_res_crops

PAIR_KEYS = ("z", "d", "e", "dz")
# What a recipe for scripts/train_encode_change.py may hold (training/recipes/encoders/*.json)
RECIPE_KEYS = {"comment", "images", "vae", "max_images", "crop", "crops_per_image", "noise_steps", "precision",
               "channels", "depth", "steps", "batch", "lr", "mean_weight", "shuffle_seed", "seed"}


@torch.inference_mode()
def make_pairs(ckpt, network, vae_ref, vae_run, paths: Sequence, *, crop: int = 256, crops_per_image: int = 1,
               noise_steps=(250, 275, 300), seed: int = 0,
               log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Pairs for the encoder move (see the module's doc). `vae_ref`: a float32 TAESD without a learned move
    (the exact one is the target), with the fidelity decoder the node uses for the reference; `vae_run`: the
    TAESD that builds the sources, in the network's precision. Half the crops use the model's own noise step,
    the others one of `noise_steps` (the "more detail" settings). d and e are kept in float16."""
    if getattr(vae_ref, "change", None) is not None:
        raise ValueError("make_pairs needs the exact encoder move: load vae_ref with change=False")
    # the node defaults up to the pass: the model's head (if it has one), no TAESD pass
    base = replace(resolve(ckpt.method, size_multiple=ckpt.net_config.size_multiple, have_vae=True).settings,
                   shading_correction=0)
    scale = base.scale_factor
    rows: dict[str, list] = {k: [] for k in PAIR_KEYS}
    for _, item, rng, low in low_res_crops(paths, vae_ref, crop, crops_per_image, seed, log):
        step = base.noise_step if rng.random() < 0.5 else rng.choice(list(noise_steps))
        settings = replace(base, noise_step=step, seed=item)
        z = upscale(network, low, settings, source=build_source(low, settings, vae_run))
        d, e = shading_change(vae_ref, z, shading_reference(vae_ref, low))
        dz = encode_change(vae_ref, z, d, e)
        for k, v in (("z", z * scale), ("d", d.half()), ("e", e.half()), ("dz", dz * scale)):
            rows[k].append(v[0].clone())
    return {k: torch.stack(v) for k, v in rows.items()}


def fit(pairs: dict[str, torch.Tensor], config: EncodeChangeConfig, *, steps: int, batch: int = 16,
        lr: float = 1e-3, mean_weight: float = 10.0, seed: int = 0, precision: str = "bf16",
        log: Callable[[str], None] = print) -> tuple[EncodeChange, float]:
    """Fit an `EncodeChange` to the pairs' moves → (the network, the share of the moves' energy it leaves
    unexplained over the last 10 % of steps, a border latent pixel left out). AdamW, one-cycle learning rate,
    random horizontal flips, bf16 autocast on the CPU (`precision`)."""
    torch.manual_seed(seed)
    net = EncodeChange(config).train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    n = pairs["z"].shape[0]
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
    started, recent, residual, energy = time.time(), [], 0.0, 0.0
    for step in range(steps):
        idx = torch.randint(0, n, (batch,))
        z, d, e, dz = (pairs[k][idx].float() for k in PAIR_KEYS)
        if torch.rand(()) < 0.5:
            z, d, e, dz = (x.flip(-1) for x in (z, d, e, dz))
        with autocast:
            pred = net(z, d, e)
        pred = pred.float()
        err = (pred - dz)[..., 1:-1, 1:-1].pow(2)
        loss = err.mean() + mean_weight * F.mse_loss(pred.mean((-2, -1)), dz.mean((-2, -1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent.append(loss.item())
        if step >= steps - max(1, steps // 10):
            residual += err.sum().item()
            energy += dz[..., 1:-1, 1:-1].pow(2).sum().item()
        if log and (step % 500 == 0 or step == steps - 1):
            log(f"step {step}: loss {sum(recent) / len(recent):.5f}, {time.time() - started:.0f} s")
            recent = []
    return net.eval().requires_grad_(False), residual / max(energy, 1e-12)
