#!/usr/bin/env python3
"""The recipe comparison: the validation records of training runs side by side, written into bench/RESULTS.md.

    .venv/bin/python bench/recipes.py ../fmboost-runs/k250 ../fmboost-runs/k100 ../fmboost-runs/k0

Each run directory holds the trainer's `val_<step>.json` (held-out centre crops, EMA weights, the node's
defaults for that model) and the recipe in `last.pt`'s config. Rows: every run at every validated step, with
the same crops' bicubic, latent-bilinear and source scores once for reference.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import replace_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = ("psnr", "ssim", "detail", "colour")


def recipe_of(run: Path) -> dict:
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    return json.loads(state["config"])


def row(cells):
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args(argv)
    lines = [f"## Recipes ({datetime.date.today().isoformat()})", "",
             "Short training runs from the same start (the previous default model), judged on the trainer's "
             "validation: centre crops of held-out photos (256 px ground truth, 128 px low-res), EMA weights, each "
             "model at its own node defaults, TAESD decoder. PSNR/SSIM on luma, detail = high-frequency energy / "
             "ground truth's, colour = mean |channel-mean error| (0–255). Runs shared the 2-core CPU, so compare "
             "them at equal steps.", ""]
    header = ["run", "source", "noise step", "t", "solver", "images", "step", "samples seen",
              "PSNR dB", "SSIM", "detail", "colour"]
    lines += [row(header), row(["---"] * len(header))]
    reference = None
    for run in args.runs:
        cfg = recipe_of(run)
        for path in sorted(run.glob("val_*.json")):
            val = json.loads(path.read_text())
            m = val["model"]
            t = cfg.get("t_dist", "uniform") + (f" ({cfg['t_mean']:+g})" if cfg.get("t_dist") == "logit_normal" else "")
            lines.append(row([run.name, cfg["mode"], str(cfg["noise_step"]), t,
                              f"{cfg.get('solver', 'euler')} {cfg.get('solver_steps', 4)}",
                              str(cfg.get("max_images") or "all"), str(val["step"]),
                              f"{val['step'] * cfg['batch']:,}",
                              f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['detail']:.2f}",
                              f"{m.get('colour', float('nan')):.2f}"]))
            reference = reference or {k: v for k, v in val.items() if k not in ("step", "model")}
    if reference:
        lines += ["", "The same crops without a model:", "", row(["method", "PSNR dB", "SSIM", "detail", "colour"]),
                  row(["---"] * 5)]
        names = {"bicubic": "bicubic of the decoded low-res image",
                 "source": "the pixel-mode source (decode → bilinear ×2 → encode), decoded",
                 "latent_bilinear": "latent bilinear ×2"}
        for key, label in names.items():
            if key in reference:
                m = reference[key]
                lines.append(row([label, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['detail']:.2f}",
                                  f"{m.get('colour', float('nan')):.2f}"]))
    text = "\n".join(lines) + "\n"
    replace_section(Path(args.results), "## Recipes", text)
    print(text)


if __name__ == "__main__":
    main()
