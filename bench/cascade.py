#!/usr/bin/env python3
"""Cascade benchmark: 4× upscaling on held-out photos, the way the 2048 px workflow runs (two CFM Latent Upscale
nodes), against what a user would otherwise do for 4×.

    .venv/bin/python bench/cascade.py --val ../shared/data/photos/val [--sizes 128,256] [--count 40,16]

For each val image: ground truth = centre crop of 4S pixels (long side), low-res = ground truth downscaled ×2
twice (antialiased) and encoded with TAESD. Methods, every result decoded with TAESD as in bench/quality.py:
(a) core latent bilinear ×4, (c) bicubic ×4 of the decoded low-res image, (c′) the same from the pack's
fidelity decoder, (d) city96's ×2 upscaler twice, the shipped model at the node's defaults twice, the two CFM
nodes of `workflows/api/SD1.5 at 512 px, then two CFM upscales to 2048 px.json` with their widget values, and
the model once followed by a bicubic ×2 of its decoded image. Metrics as in bench/quality.py and chroma (how
colourful, `metrics.chroma_ratio`), and each row paired against bicubic image by image (mean difference ±
standard error, and on how many photos it is higher).
Writes the section "Cascade" of bench/RESULTS.md and `bench/cascade_crops_<size>.jpg` (bicubic | latent
bilinear | the 2048 px workflow | ground truth, a centre crop of the first photos). Per-image scores go to
--records, so a run that stops resumes there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pack import REPO, load_pack  # noqa: E402

load_pack()
from fmboost.flow import upscale  # noqa: E402
from fmboost.flow.settings import MODEL_NOISE_STEP, MODEL_SHADING, resolve  # noqa: E402
from fmboost.models import load_checkpoint  # noqa: E402
from fmboost.models.taesd import TAESD  # noqa: E402
from fmboost.training import metrics  # noqa: E402
from fmboost.training.data import downscale2, load_rgb, scan_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import City96LatentUpscaler  # noqa: E402
from quality import CEILING, JOD, centre_crop, photo_inputs, replace_section, save_grid, standard_error  # noqa: E402

BICUBIC = "(c) bicubic ×4 of decoded"
CASCADE = "(f) CFM node defaults, twice"
WORKFLOW = REPO / "workflows" / "api" / "SD1.5 at 512 px, then two CFM upscales to 2048 px.json"


def workflow_stages(path: Path) -> list[dict]:
    """The inputs of the workflow's CFM Latent Upscale nodes that are widgets (noise step, seed, shading
    correction, …), first stage first: what the 2048 px workflow runs."""
    ups = {k: v["inputs"] for k, v in json.loads(path.read_text()).items()
           if v["class_type"] == "FMBoostLatentUpscale"}
    chain = [next(k for k, v in ups.items() if v["samples"][0] not in ups)]
    while nxt := next((k for k, v in ups.items() if v["samples"][0] == chain[-1]), None):
        chain.append(nxt)
    return [{k: v for k, v in ups[key].items() if not isinstance(v, list)} for key in chain]
METRICS = ("psnr", "ssim", "jod", "detail", "colour", "chroma")


def bicubic(img: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(img, scale_factor=factor, mode="bicubic", align_corners=False)


def methods(vae, net, ck, city96, stages):
    """name → function(raw low-res latent) → 4× image (B, 3, H, W), unclamped. `stages`: the workflow's CFM
    nodes' widget values (`workflow_stages`)."""
    def node(**widgets):  # CFM Latent Upscale with these widget values, the others at their defaults
        settings = resolve(ck.method, size_multiple=ck.net_config.size_multiple,
                           noise_step=widgets.get("noise_augmentation", MODEL_NOISE_STEP),
                           seed=widgets.get("seed", 0),
                           shading_correction=widgets.get("shading_correction", MODEL_SHADING)).settings
        return lambda z: upscale(net, z, settings, vae=vae)
    cfm = node()
    workflow = [node(**widgets) for widgets in stages]
    steps = " then ".join("the model's" if w.get("noise_augmentation", MODEL_NOISE_STEP) == MODEL_NOISE_STEP
                          else str(w["noise_augmentation"]) for w in stages)
    return {
        "(a) latent bilinear ×4": lambda z: vae.decode(F.interpolate(z, scale_factor=4, mode="bilinear",
                                                                     align_corners=False)),
        BICUBIC: lambda z: bicubic(vae.decode(z), 4),
        "(c′) bicubic ×4 of the fidelity decoder's image": lambda z: bicubic(vae.decode_fidelity(z), 4),
        "(d) city96 ×2, twice": lambda z: vae.decode(city96(city96(z))),
        CASCADE: lambda z: vae.decode(cfm(cfm(z))),
        f"(f) the 2048 px workflow's CFM nodes (noise step {steps})": lambda z: vae.decode(
            workflow[1](workflow[0](z))),
        "(f) CFM node defaults once, then bicubic ×2": lambda z: bicubic(vae.decode(cfm(z)), 2),
    }


def workflow_row(table) -> str:
    return next(n for n in table if n.startswith("(f) the 2048 px workflow"))


def score(img, truth, jod) -> dict:
    img = img.clamp(0, 1)
    return dict(psnr=metrics.psnr(img, truth).item(), ssim=metrics.ssim(img, truth).item(), jod=jod(img, truth),
                detail=metrics.detail_ratio(img, truth).item(), colour=metrics.colour_error(img, truth).item(),
                chroma=metrics.chroma_ratio(img, truth).item())


def run_size(low_side, images, vae, table, jod, records: Path, crops: int):
    """Scores per image (resumed from `records`) and the crop rows of the first `crops` photos."""
    done = {}
    if records.exists():
        for line in records.read_text().splitlines():
            rec = json.loads(line)
            done.setdefault(rec["image"], {}).update(rec["scores"])
    rows = []
    for i, path in enumerate(images):
        truth = centre_crop(load_rgb(path), 4 * low_side, multiple=32)[None]  # ÷4: whole latents
        with torch.inference_mode():
            z = vae.encode(downscale2(downscale2(truth)))
            todo = [n for n in [CEILING, *table] if n not in done.get(path.name, {})]
            want = i < crops
            shown = (BICUBIC, "(a) latent bilinear ×4", workflow_row(table))
            outputs = {n: (vae.decode(vae.encode(truth)) if n == CEILING else table[n](z))
                       for n in [CEILING, *table] if n in todo or (want and n in shown)}
        scores = {n: score(outputs[n], truth, jod) for n in todo}
        if scores:
            with records.open("a") as f:
                f.write(json.dumps({"image": path.name, "scores": scores}) + "\n")
            done.setdefault(path.name, {}).update(scores)
        if want:
            h, w = truth.shape[-2:]
            c = min(h, w, low_side)
            y, x = (h - c) // 2, (w - c) // 2
            rows.append(torch.cat([outputs[n].clamp(0, 1)[..., y:y + c, x:x + c] for n in shown] +
                                  [truth[..., y:y + c, x:x + c]], dim=-1))
        print(f"{low_side}→{4 * low_side}: {i + 1}/{len(images)} {path.name}", file=sys.stderr)
    return [done[p.name] for p in images], rows


def table_text(low_side, per_image, names) -> list[str]:
    n = len(per_image)
    lines = [f"### {low_side} → {4 * low_side} px (long side), {n} images", "",
             "| method | PSNR dB | SSIM | JOD | detail | colour error | chroma | − (c) bicubic, paired: PSNR / SSIM / JOD "
             "(± s.e.) | higher than (c) on (PSNR / SSIM / JOD) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        mean = {k: sum(r[name][k] for r in per_image) / n for k in METRICS}
        if name in (CEILING, BICUBIC):
            paired, wins = "–", "–"
        else:
            diff = {k: [r[name][k] - r[BICUBIC][k] for r in per_image] for k in ("psnr", "ssim", "jod")}
            paired = " / ".join(f"{sum(v) / n:+.{d}f} ± {standard_error(v):.{d}f}"
                                for v, d in ((diff["psnr"], 2), (diff["ssim"], 4), (diff["jod"], 3)))
            wins = " / ".join(str(sum(x > 0 for x in diff[k])) for k in ("psnr", "ssim", "jod"))
        lines.append(f"| {name} | {mean['psnr']:.2f} | {mean['ssim']:.4f} | {mean['jod']:.3f} | "
                     f"{mean['detail']:.3f} | {mean['colour']:.2f} | {mean['chroma']:.3f} | {paired} | {wins} |")
    return lines + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors"))
    photo_inputs(ap)
    ap.add_argument("--sizes", default="128,256", help="low-res long sides in pixels (4× each)")
    ap.add_argument("--count", default="40,16", help="images per size")
    ap.add_argument("--crops", type=int, default=3, help="photos per size in the crop image")
    ap.add_argument("--records", default="runs/cascade", help="per-image scores; a rerun resumes from them")
    ap.add_argument("--only-size", type=int, help="measure this size only into --records, write nothing else "
                                                  "(one process per size, side by side)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = TAESD.from_folder(args.vae)
    ck = load_checkpoint(args.model)
    net = ck.build_network(torch.float32)
    table = methods(vae, net, ck, City96LatentUpscaler(args.city96), workflow_stages(WORKFLOW))
    jod = JOD()
    images = scan_images(args.val, 0).usable
    records = Path(args.records)
    records.mkdir(parents=True, exist_ok=True)
    text = [f"## Cascade: 4× upscaling on held-out photos ({datetime.date.today().isoformat()})", "",
            f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads; "
            f"torch {torch.__version__}, Python {platform.python_version()}",
            f"- model: `{Path(args.model).name}` at the node's defaults (`flow.settings.resolve`: "
            f"{ck.method.upsampling_mode} mode, {ck.method.solver} {ck.method.solver_steps}, noise step "
            f"{ck.method.noise_step}, the model's shading correction), fp32; the pack's TAESD builds the sources",
            f"- data: the first photos of `{Path(args.val).name}/` (never trained on), centre crops, low-res = ×½ "
            "twice (antialiased); every result decoded with TAESD; seed 0; `bench/cascade.py`",
            "- metrics as in *Quality*, and chroma: how colourful the result is, the RMS deviation of its Cb and Cr "
            "over the ground truth's (`metrics.chroma_ratio`; 1.0 ideal, paler below); paired columns: each row "
            "minus bicubic ×4 (c), photo by photo", ""]
    for size, count in zip((int(s) for s in args.sizes.split(",")), (int(c) for c in args.count.split(","))):
        if args.only_size and size != args.only_size:
            continue
        chosen = images[:count]
        per_image, rows = run_size(size, chosen, vae, table, jod, records / f"scores_{size}.jsonl", args.crops)
        if args.only_size:
            continue
        text += table_text(size, per_image, [CEILING, *table])
        save_grid(rows, Path(args.results).parent / f"cascade_crops_{size}.jpg")
    if args.only_size:
        return
    text.append("Crops: `bench/cascade_crops_<size>.jpg` (bicubic ×4 | latent bilinear ×4 | the 2048 px workflow | "
                "ground truth; a centre crop a quarter of the result's long side, of the first photos, at full size).")
    replace_section(Path(args.results), "## Cascade:", "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
