#!/usr/bin/env python3
"""Tiling fidelity: how far a tiled upscale lands from the untiled one, on held-out photos where both fit.

    .venv/bin/python bench/tiling.py [--count 4]

Each photo is resized to 512×384 px (the ground truth), downscaled ×2 and TAESD-encoded (latent 24×32 → 48×64).
The shipped model upscales it once whole and once per window size; everything is decoded with TAESD.
Reports the PSNR of each tiled image against the untiled one (identical images = ∞), the PSNR of both against
the ground truth, and the seam ratio: the largest per-column (or per-row) mean squared difference over the
median one (≈1 when the differences are spread evenly, large when they pile up on window edges).
Writes the "## Tiling" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pack import REPO, load_pack  # noqa: E402

load_pack()
from fmboost.flow import SolverSettings, UpscaleSettings, upscale  # noqa: E402
from fmboost.models import load_checkpoint  # noqa: E402
from fmboost.models.taesd import TAESD  # noqa: E402
from quality import replace_section  # noqa: E402

SHARED = Path(os.environ.get("FMBOOST_SHARED") or REPO.parent / "shared")


def psnr(a, b) -> float:
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def seam_ratio(a, b) -> float:
    err = (a - b).pow(2).mean(dim=(0, 1))
    cols, rows = err.mean(0), err.mean(1)
    return max(float(cols.max() / cols.median().clamp_min(1e-12)), float(rows.max() / rows.median().clamp_min(1e-12)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors"))
    ap.add_argument("--val", default=str(SHARED / "data" / "photos" / "val"))
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--size", default="512,384", help="ground-truth width,height in pixels")
    ap.add_argument("--tiles", default="48,32,24")
    ap.add_argument("--evals", type=int, default=4)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.split(","))
    tiles = [int(t) for t in args.tiles.split(",")]
    ck = load_checkpoint(args.model)
    net = ck.build_network(torch.float32)
    vae = TAESD.from_folder(REPO / "weights" / "taesd")
    settings = UpscaleSettings(scale_factor=ck.method.scale_factor, mode=ck.method.upsampling_mode,
                               noise_step=ck.method.noise_step, seed=0,
                               solver=SolverSettings("euler", steps=args.evals),
                               size_multiple=ck.net_config.size_multiple)
    photos = sorted(p for p in Path(args.val).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    scores = {t: {"vs_whole": [], "vs_truth": [], "seam": []} for t in tiles}
    whole_truth = []
    for path in photos[:args.count]:
        truth = torch.from_numpy(np.array(Image.open(path).convert("RGB").resize((width, height))))
        truth = truth.float().div(255).permute(2, 0, 1)[None]
        with torch.inference_mode():
            low = vae.encode(F.interpolate(truth, scale_factor=0.5, mode="area"))
            whole = vae.decode(upscale(net, low, settings, vae=vae)).clamp(0, 1)
            whole_truth.append(psnr(whole, truth))
            for tile in tiles:
                tiled = vae.decode(upscale(net, low, settings, vae=vae, tile=tile)).clamp(0, 1)
                scores[tile]["vs_whole"].append(psnr(tiled, whole))
                scores[tile]["vs_truth"].append(psnr(tiled, truth))
                scores[tile]["seam"].append(seam_ratio(tiled, whole))
        print(f"{path.name} done", file=sys.stderr)
    out_h, out_w = height // 8, width // 8
    lines = [f"## Tiling ({datetime.date.today().isoformat()})", "",
             f"- `{Path(args.model).name}`, Euler {args.evals} evaluations, {min(args.count, len(photos))} held-out "
             f"photos at {width}×{height} px (output latent {out_h}×{out_w}; the whole latent fits in one window of 64), TAESD decoder; torch {torch.__version__}",
             f"- untiled against the ground truth: {np.mean(whole_truth):.2f} dB", "",
             "| window (latent px) | PSNR vs untiled dB | PSNR vs ground truth dB | seam ratio |", "|---|---|---|---|"]
    for tile in tiles:
        s = scores[tile]
        lines.append(f"| {tile} | {np.mean(s['vs_whole']):.2f} | {np.mean(s['vs_truth']):.2f} | "
                     f"{np.mean(s['seam']):.1f} |")
    lines += ["", "seam ratio: the largest per-column (or per-row) mean squared difference to the untiled image over "
              "the median one; about 1 when differences are spread evenly, larger when they gather on window edges."]
    text = "\n".join(lines) + "\n"
    replace_section(Path(args.results), "## Tiling", text)
    print(text)


if __name__ == "__main__":
    main()
