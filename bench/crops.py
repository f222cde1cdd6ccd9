#!/usr/bin/env python3
"""Look at the images, not only the numbers: the same crop of bicubic, latent bilinear, the shipped model at the
node defaults and the ground truth, side by side, for held-out photos at both bench sizes.

    .venv/bin/python bench/crops.py --val ../shared/data/photos/val [--images 3] [--crop 192]

Writes bench/quality_crops_<size>.jpg: one row per photo; columns bicubic of the decoded low-res image, core
latent bilinear ×2, CFM (node defaults: flow.settings.resolve, the pack's TAESD builds the pixel source), ground
truth. Everything is decoded with TAESD, as in bench/quality.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pack import REPO, load_pack  # noqa: E402

load_pack()
from fmboost.flow import upscale  # noqa: E402
from fmboost.flow.settings import resolve  # noqa: E402
from fmboost.models import load_checkpoint  # noqa: E402
from fmboost.models.taesd import TAESD  # noqa: E402
from fmboost.training.data import downscale2, load_rgb, scan_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import centre_crop, save_grid  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors"))
    ap.add_argument("--val", required=True)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--crop", type=int, default=192, help="crop side in output pixels")
    args = ap.parse_args(argv)
    vae = TAESD.from_folder(REPO / "weights" / "taesd")
    ck = load_checkpoint(args.model)
    net = ck.build_network(torch.float32)
    settings = resolve(ck.method, size_multiple=ck.net_config.size_multiple).settings
    for size in (int(s) for s in args.sizes.split(",")):
        rows = []
        for path in scan_images(args.val, 0).usable[:args.images]:
            truth = centre_crop(load_rgb(path), 2 * size)[None]
            with torch.inference_mode():
                z = vae.encode(downscale2(truth))
                cols = [F.interpolate(vae.decode(z), scale_factor=2, mode="bicubic", align_corners=False),
                        vae.decode(F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)),
                        vae.decode(upscale(net, z, settings, vae=vae)), truth]
            h, w = truth.shape[-2:]
            c = min(args.crop, h, w)
            y, x = (h - c) // 2, (w - c) // 2
            rows.append(torch.cat([im.clamp(0, 1)[..., y:y + c, x:x + c] for im in cols], dim=-1))
        out = REPO / "bench" / f"quality_crops_{size}.jpg"
        save_grid(rows, out)
        print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
