#!/usr/bin/env python3
"""Which precision `auto` should pick on this device: the shipped model at the node's defaults (network and the
pack's TAESD source in that precision, the ODE state in fp32) in fp32 and in bf16, on held-out photos.

    .venv/bin/python bench/precision.py --val ../shared/data/photos/val [--images 16] [--sizes 128,256]

For each size: seconds per image, luma PSNR/SSIM/detail/colour error against the ground truth (decoded with an
fp32 TAESD, as bench/quality.py), and the PSNR between the bf16 and the fp32 image. Writes the *CPU precision*
section of bench/RESULTS.md. fp16 is not timed on a CPU: it has no fp16 matrix instructions and runs a 64²→128²
upscale in minutes (issue 13's measurement: 391 s against 1.7 s in fp32).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pack import REPO, load_pack  # noqa: E402

load_pack()
from fmboost.flow import upscale  # noqa: E402
from fmboost.flow.runtime import cpu_dtype  # noqa: E402
from fmboost.flow.settings import resolve  # noqa: E402
from fmboost.models import load_checkpoint  # noqa: E402
from fmboost.models.taesd import TAESD  # noqa: E402
from fmboost.training import metrics  # noqa: E402
from fmboost.training.data import downscale2, load_rgb, scan_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import centre_crop, replace_section  # noqa: E402
from speed import cpu_name  # noqa: E402


def measure(net, vae, ref, settings, truth: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(1, 3, H, W) truth → the image at the node defaults with `net` and the source `vae` (one precision),
    decoded by the fp32 `ref`, and the seconds the upscale took (best of 2)."""
    with torch.inference_mode():
        low = ref.encode(downscale2(truth))
        times = []
        for _ in range(2):
            started = time.perf_counter()
            z = upscale(net, low, settings, vae=vae)
            times.append(time.perf_counter() - started)
        return ref.decode(z), min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors"))
    ap.add_argument("--val", required=True)
    ap.add_argument("--sizes", default="128,256", help="low-res long sides in pixels (2× each)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.model)
    dtypes = (torch.float32, torch.bfloat16)
    settings = resolve(ck.method, size_multiple=ck.net_config.size_multiple, have_vae=True).settings
    ref = TAESD.from_folder(REPO / "weights" / "taesd")
    runs = {d: (ck.build_network(d), TAESD.from_folder(REPO / "weights" / "taesd").set_precision(d)) for d in dtypes}
    lines = [f"## CPU precision ({datetime.date.today().isoformat()})", "",
             f"- machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
             f"Python {platform.python_version()}; `auto` picks {str(cpu_dtype()).split('.')[-1]} here "
             "(`flow.runtime.cpu_dtype`)",
             f"- {Path(args.model).name} at the node defaults; the network and the pack's TAESD (channels-last) in "
             "each precision, the ODE state in fp32; decoded with an fp32 TAESD; centre crops of the first "
             f"{args.images} val photos; `bench/precision.py`", "",
             "| size (long side) | precision | s/image | PSNR dB | SSIM | detail | colour error | "
             "PSNR vs the fp32 image (mean / min) |", "|---|---|---|---|---|---|---|---|"]
    for size in (int(s) for s in args.sizes.split(",")):
        paths = scan_images(args.val, 2 * size).usable[: args.images]
        if not paths:
            raise SystemExit(f"precision.py: no photo in {args.val} is large enough for {size} → {2 * size} px")
        scores = {d: [] for d in dtypes}
        same = []
        for path in paths:
            truth = centre_crop(load_rgb(path), 2 * size)[None]
            images = {}
            for d in dtypes:
                img, sec = measure(*runs[d], ref, settings, truth)
                images[d] = img
                scores[d].append((sec, metrics.psnr(img, truth).item(), metrics.ssim(img, truth).item(),
                                  metrics.detail_ratio(img, truth).item(), metrics.colour_error(img, truth).item()))
            same.append(metrics.psnr(images[torch.bfloat16], images[torch.float32]).item())
            print(size, path.name, f"bf16 vs fp32 {same[-1]:.1f} dB", flush=True)
        for d in dtypes:
            m = torch.tensor(scores[d]).mean(0).tolist()
            vs = "–" if d == torch.float32 else f"{sum(same) / len(same):.1f} / {min(same):.1f}"
            lines.append(f"| {size} → {2 * size} | {str(d).split('.')[-1]} | {m[0]:.2f} | {m[1]:.3f} | "
                         f"{m[2]:.4f} | {m[3]:.3f} | {m[4]:.2f} | {vs} |")
    text = "\n".join(lines) + "\n"
    replace_section(Path(args.results), "## CPU precision", text)
    print(text)


if __name__ == "__main__":
    main()
