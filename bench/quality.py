#!/usr/bin/env python3
"""Quality benchmark: 2× upscaling on held-out photos, every method decoded with the same decoder (TAESD).

    .venv/bin/python bench/quality.py --model weights/cfm/fmboost-sd15-x2.safetensors --val ../shared/data/photos/val

For each val image: ground truth = centre crop of 2S pixels (long side), low-res = ground truth downscaled ×2
(antialiased) and encoded. Methods: (a) latent bilinear, (b) pixel-space up-sampling (decode → bilinear →
encode), (c) bicubic of the decoded low-res image, (d) city96 SD-Latent-Upscaler ×2, (e) the regression
baseline (when given), (f) CFM at several evaluation counts and noise-augmentation steps; plus the decoder's
own ceiling (the ground truth encoded and decoded). Metrics: PSNR and SSIM on luma, ColorVideoVDP (JOD), and
the detail ratio (high-frequency energy of the result / of the ground truth; 1.0 ideal, blur below).
Writes a section of bench/RESULTS.md and an image grid per size.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pack import REPO, load_pack  # noqa: E402

load_pack()
from fmboost.flow import MODES, SolverSettings, upscale  # noqa: E402
from fmboost.flow.settings import AUTO, HEAD_ONLY, MODEL_NOISE_STEP, MODEL_SHADING, resolve, shading_label  # noqa: E402
from fmboost.flow.source import make_source  # noqa: E402
from fmboost.models import load_checkpoint  # noqa: E402
from fmboost.models.taesd import TAESD  # noqa: E402
from fmboost.training import metrics  # noqa: E402
from fmboost.training.data import downscale2, load_rgb, scan_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import City96LatentUpscaler  # noqa: E402


def centre_crop(img, long_side, multiple=16):
    """Centre crop of at most `long_side` px whose sides are multiples of `multiple` (16: the ×½ image is whole
    latents; a 4× bench needs 32)."""
    _, h, w = img.shape
    ch = min(h, long_side) // multiple * multiple
    cw = min(w, long_side) // multiple * multiple
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[:, y:y + ch, x:x + cw]


class JOD:
    """ColorVideoVDP on a standard 4K display model; None when pycvvdp is not installed."""

    def __init__(self):
        try:
            import pycvvdp
            self.metric = pycvvdp.cvvdp(display_name="standard_4k", device=torch.device("cpu"))
        except Exception as e:  # noqa: BLE001 — reported in the table
            print(f"ColorVideoVDP unavailable: {e}", file=sys.stderr)
            self.metric = None

    def __call__(self, result, truth):
        if self.metric is None:
            return float("nan")
        to_u8 = lambda t: (t[0].clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # noqa: E731
        with torch.no_grad():
            q, _ = self.metric.predict(to_u8(result), to_u8(truth), dim_order="HWC")
        return float(q)


class SourceMemo:
    """The VAE as the pixel-space source sees it, remembering its last call of each kind: every CFM row of an
    image builds the same source (decode → resize → encode), so it is computed once per image. A remembered
    result is charged the time it first took (`charged`), so each row's s/image still includes its source."""

    def __init__(self, vae):
        self.vae, self.memo, self.charged = vae, {}, 0.0

    def forget(self):
        self.memo.clear()

    def _call(self, kind, x):
        seen = self.memo.get(kind)
        if seen is not None and seen[0].shape == x.shape and torch.equal(seen[0], x):
            self.charged += seen[2]
            return seen[1]
        started = time.perf_counter()
        y = getattr(self.vae, kind)(x)
        self.memo[kind] = (x.clone(), y, time.perf_counter() - started)
        return y

    def encode(self, x):
        return self._call("encode", x)

    def decode(self, z):
        return self._call("decode", z)

    def decode_fidelity(self, z):
        return self._call("decode_fidelity", z)

    def encode_change(self, latent, pixels, change):   # the shading pass's move: never the same twice
        return self.vae.encode_change(latent, pixels, change)


def exact_move(vae, fn):
    """`fn` run with the pack's TAESD moving the latent by two encodes in each shading pass, as without its
    learned encoder move (models.taesd.EncodeChange)."""
    def run(z):
        with vae.exact_move():
            return fn(z)
    return run


def methods(args, source_vae, cfm, cfm_ck, city96, regression):
    """name → function(raw low-res latent) → raw high-res latent; pixel-space sources go through `source_vae`."""
    s = 0.18215

    def cfm_settings(solver=None, step=MODEL_NOISE_STEP, upsampling=AUTO, shading=MODEL_SHADING):
        # flow.settings.resolve, as the node: the trained mode and step, the recommended solver, unless given
        return resolve(cfm_ck.method, size_multiple=cfm_ck.net_config.size_multiple, upsampling=upsampling,
                       noise_step=step, seed=0, solver=solver, have_vae=True, shading_correction=shading).settings

    def cfm_run(solver=None, step=MODEL_NOISE_STEP, upsampling=AUTO, shading=MODEL_SHADING, head=None):
        settings = cfm_settings(solver, step, upsampling, shading)
        if head is not None:  # the head switched off (no node setting does that alone: what the head is worth)
            settings = dataclasses.replace(settings, shading_head=head)
        return lambda z: upscale(cfm, z, settings, vae=source_vae)

    out = {
        "(a) latent bilinear": lambda z: F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False),
        "(b) pixel-space bilinear": lambda z: make_source(z * s, "pixel", s, source_vae) / s,
        "(c) bicubic of decoded": None,  # works in pixels, handled separately
        # the same from the image the shading correction compares with (models.taesd.TAESD.decode_fidelity)
        FIDELITY_BICUBIC: None,
        "(d) city96 ×2": city96,
    }
    if regression is not None:
        reg_net, reg_ck = regression

        def regress(z):
            src = make_source(z * s, reg_ck.method.upsampling_mode, s, source_vae,
                              back_projection=reg_ck.method.back_projection, decoder=reg_ck.method.source_decoder)
            return reg_net(src, torch.zeros(()), src) / s
        out["(e) regression baseline"] = regress
    default_step = cfm_ck.method.noise_step
    # What a user gets: the node's defaults (every widget untouched, no solver connected), and the same in each
    # up-sampling mode, so that a model/mode mismatch shows in the table.
    rec = f"{cfm_ck.method.solver} {cfm_ck.method.solver_steps}"
    bp = f", back-projected {cfm_ck.method.back_projection:g}" if cfm_ck.method.back_projection else ""
    bp += f", {cfm_ck.method.source_decoder} decoder" if cfm_ck.method.source_decoder != "vae" else ""
    sc = shading_label(cfm_settings())
    defaults = f"(f) CFM node defaults ({cfm_ck.method.upsampling_mode} mode{bp}, {rec}, k={default_step}{sc})"
    out[defaults] = cfm_run()
    if sc:  # what the model's correction is worth, and what its head and its TAESD passes are worth alone
        out[f"(f) CFM node defaults without shading correction (k={default_step})"] = cfm_run(shading=0)
        if cfm_ck.method.shading_head:
            out[f"(f) CFM node defaults, the head alone (shading_correction {HEAD_ONLY}, k={default_step})"] = \
                cfm_run(shading=HEAD_ONLY)
            passes = max(1, cfm_ck.method.shading_correction)
            out[f"(f) CFM node defaults, {passes} TAESD pass{'es' if passes > 1 else ''} without the head "
                f"(k={default_step})"] = cfm_run(shading=passes, head=False)
        if getattr(source_vae.vae, "change", None) is not None:
            out[f"(f) CFM node defaults, the exact encoder move (two TAESD encodes a pass, k={default_step})"] = \
                exact_move(source_vae.vae, cfm_run())
    for mode in MODES:
        out[f"(f) CFM {mode} mode ({rec}, k={default_step})"] = cfm_run(upsampling=mode)
    for evals in args.evals:
        out[f"(f) CFM euler {evals} eval{'s' if evals > 1 else ''}, k={default_step}"] = cfm_run(
            SolverSettings("euler", steps=evals), default_step)
    out[f"(f) CFM dopri5 adaptive, k={default_step}"] = cfm_run(
        SolverSettings("dopri5", atol=1e-3, rtol=1e-3, max_evals=200), default_step)
    for step in args.noise_steps:
        if step != default_step:
            out[f"(f) CFM euler {args.sweep_evals} evals, k={step}"] = cfm_run(
                SolverSettings("euler", steps=args.sweep_evals), step)
    return out


CEILING = "TAESD ceiling (GT encoded+decoded)"
FIDELITY_BICUBIC = "(c′) bicubic of the fidelity decoder's image (the luma of the shading correction's reference)"
METRICS = ("psnr", "ssim", "jod", "detail", "colour", "seconds")


class Records:
    """Per-image scores on disk (one JSON line per image and size), so a long CPU run resumes where it stopped
    and runs for different sizes can go side by side; grid rows are kept beside them as PNG files."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, size):
        return self.folder / f"scores_{size}.jsonl"

    def load(self, size) -> dict:
        out = {}
        if self._file(size).exists():
            for line in self._file(size).read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    out.setdefault(rec["image"], {}).update(rec["scores"])
        return out

    def add(self, size, image, scores):
        with self._file(size).open("a") as f:
            f.write(json.dumps({"image": image, "scores": scores}) + "\n")

    def grid_row(self, size, index):
        return self.folder / f"grid_{size}_{index}.png"


def run_size(args, low_side, images, vae, source_vae, table_methods, jod, grid_cfm, records):
    names = [CEILING] + list(table_methods)
    grid_names = ["(a)", "(d)", "(e)"]
    per_image = []
    grid_rows = []
    for i, path in enumerate(images):
        known = (records.load(low_side) if records else {}).get(path.name, {})  # other shards may have added
        grid_file = records.grid_row(low_side, i) if records else None
        want_grid = i < args.grid_images and not (grid_file and grid_file.exists())
        todo = [n for n in names if n not in known or (want_grid and (n == grid_cfm or n[:3] in grid_names))]
        truth = centre_crop(load_rgb(path), 2 * low_side)[None]
        low_px = downscale2(truth)
        outputs, scores = {}, {}
        source_vae.forget()
        with torch.inference_mode():
            z_lo = vae.encode(low_px)
            if CEILING in todo:
                outputs[CEILING] = vae.decode(vae.encode(truth))
            for name in todo:
                if name == CEILING:
                    continue
                fn = table_methods[name]
                charged, started = source_vae.charged, time.perf_counter()
                if fn is None:
                    low = vae.decode_fidelity(z_lo) if name == FIDELITY_BICUBIC else vae.decode(z_lo)
                    img = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False)
                else:
                    img = vae.decode(fn(z_lo))
                scores[name] = {"seconds": time.perf_counter() - started + source_vae.charged - charged}
                outputs[name] = img.clamp(0, 1)
        for name, img in outputs.items():
            scores.setdefault(name, {"seconds": float("nan")})
            scores[name].update(psnr=metrics.psnr(img, truth).item(), ssim=metrics.ssim(img, truth).item(),
                                detail=metrics.detail_ratio(img, truth).item(), jod=jod(img, truth),
                                colour=metrics.colour_error(img, truth).item())
        if records and scores:
            records.add(low_side, path.name, scores)
        per_image.append({**known, **scores})
        if i < args.grid_images:
            if want_grid:
                pick = [F.interpolate(low_px, scale_factor=2, mode="nearest")] + [
                    outputs[n] for n in names if n[:3] in grid_names] + [outputs[grid_cfm], truth]
                row = torch.cat(pick, dim=-1)
                if grid_file:
                    save_grid([row], grid_file)
            else:
                row = load_png(grid_file)
            grid_rows.append(row)
        print(f"{low_side}→{2 * low_side}: {i + 1}/{len(images)} {path.name} ({len(todo)} measured)",
              file=sys.stderr)
    mean = {}
    for n in names:
        values = {k: [r[n][k] for r in per_image if n in r and r[n].get(k, math.nan) == r[n].get(k)]
                  for k in METRICS}
        mean[n] = {k: (sum(v) / len(v) if v else float("nan")) for k, v in values.items()}
        mean[n]["n"] = len(values["psnr"])
        mean[n].update({f"{k}_se": standard_error(values[k]) for k in ("psnr", "jod")})
    # Paired with the regression baseline image by image: the row-to-row difference is far less noisy than
    # either mean, and (e) is the comparison that comes out close.
    reg = next((n for n in names if n.startswith("(e)")), None)
    for n in names:
        if reg and n.startswith("(f)"):
            pairs = [r[n]["jod"] - r[reg]["jod"] for r in per_image if n in r and reg in r]
            mean[n]["jod_vs_e"] = sum(pairs) / len(pairs) if pairs else float("nan")
            mean[n]["jod_vs_e_se"] = standard_error(pairs)
    return mean, grid_rows


def standard_error(values):
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def load_png(path):
    from PIL import Image
    import numpy as np
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def merge_rows(old: dict, new: dict) -> dict:
    """Rows of an earlier run updated with this run's, in table order: ceiling, (a), (b), … (f)."""
    merged = {**old, **new}
    order = lambda name: (0, "") if name.startswith("TAESD") else (1, name[:3])  # noqa: E731
    return dict(sorted(merged.items(), key=lambda kv: order(kv[0])))


def save_grid(rows, path):
    from PIL import Image
    if not rows:
        return
    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1])) for r in rows]
    grid = torch.cat(rows, dim=-2)[0]
    Image.fromarray((grid.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()).save(path, quality=88)


def markdown(results, args, model_info, n_images):
    lines = [f"## Quality: 2× upscaling on held-out photos ({datetime.date.today().isoformat()})", "",
             f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} "
             f"threads; torch {torch.__version__}, Python {platform.python_version()}",
             f"- model: `{Path(args.model).name}` ({model_info})",
             f"- data: {n_images} images per size from `{Path(args.val).name}/` (never trained on); all methods "
             "decoded with the TAESD decoder; seed 0",
             "- metrics: PSNR/SSIM on luma (higher is better), ColorVideoVDP JOD (standard_4k display, 10 = "
             "identical), detail = high-frequency energy / ground truth's (1.0 ideal, < 1 blurrier, > 1 noisier), "
             "colour error = mean over R, G, B of |channel mean − ground truth's| (0–255, lower is better)",
             *(["- s/image: measured by the process that scored each image (per-image records, possibly several "
                "processes side by side, one per core), so compare times within a table, not across machines"]
               if args.records else []),
             ""]
    lines += [("Image grids: `bench/quality_grid_256.jpg`, `bench/quality_grid_512.jpg` (columns: low-res, latent "
               "bilinear, city96, regression baseline when measured, CFM at the node defaults, ground truth). "
               if args.grid_images else
               "Images: this run measured only some rows (`--only`), so it made no grids; `bench/crops.py` writes "
               "`bench/quality_crops_256.jpg` and `_512.jpg` (bicubic | latent bilinear | CFM at the node "
               "defaults | ground truth). ") + "Reading: `weights/cfm/MODEL_CARD.md` (Measured quality).", ""]
    for size, mean in results.items():
        lines += [f"### {size}", "", "| method | PSNR dB | SSIM | JOD | detail | colour error | s/image |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in mean.items():
            secs = f"{m['seconds']:.2f}" if m["seconds"] == m["seconds"] else "–"
            colour = f"{m['colour']:.2f}" if m.get("colour", float("nan")) == m.get("colour") else "–"
            lines.append(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['jod']:.3f} | {m['detail']:.3f} | "
                         f"{colour} | {secs} |")
        lines.append("")
        se = {k: [m[f"{k}_se"] for m in mean.values() if m.get(f"{k}_se", float("nan")) == m.get(f"{k}_se")]
              for k in ("psnr", "jod")}
        if se["psnr"]:
            lines += [f"Standard error of each mean over the images: PSNR {min(se['psnr']):.2f}–{max(se['psnr']):.2f}"
                      f" dB, JOD {min(se['jod']):.3f}–{max(se['jod']):.3f}. The rows share their images, so "
                      "differences between rows vary much less than this.", ""]
        lines += user_targets(mean) + targets(mean)
    return "\n".join(lines)


def flat_field(cfm, cfm_ck, vae, side=64) -> float:
    """A flat input must stay flat: an empty 512² px latent (all zeros, as EmptyLatentImage makes) cascaded
    twice at the node defaults and decoded; returns the largest per-channel standard deviation (0–255)."""
    settings = resolve(cfm_ck.method, size_multiple=cfm_ck.net_config.size_multiple, have_vae=True).settings
    z = torch.zeros(1, 4, side, side)
    with torch.inference_mode():
        for _ in range(2):
            z = upscale(cfm, z, settings, vae=vae)
        img = vae.decode(z)
    return float(img.std(dim=(-2, -1)).max() * 255)


def user_targets(mean: dict) -> list[str]:
    """Issue 12's targets for what users get (the node-defaults row): PSNR, SSIM and JOD at least those of
    bicubic (c) and city96 (d), detail within 0.5–1.5, colour error no larger than bicubic's."""
    row = next(((n, m) for n, m in mean.items() if "node defaults" in n), None)
    c = next((m for n, m in mean.items() if n.startswith("(c)")), None)
    d = next((m for n, m in mean.items() if n.startswith("(d)")), None)
    if row is None or c is None or d is None:
        return []
    name, m = row
    ok = lambda v: "yes" if v else "**no**"  # noqa: E731
    out = ["| node defaults vs | PSNR | SSIM | JOD | detail in 0.5–1.5 | colour error ≤ (c) |", "|---|---|---|---|---|---|"]
    for label, b in (("(c) bicubic", c), ("(d) city96", d)):
        out.append(f"| {label} | {ok(m['psnr'] >= b['psnr'])} ({m['psnr'] - b['psnr']:+.2f} dB) | "
                   f"{ok(m['ssim'] >= b['ssim'])} ({m['ssim'] - b['ssim']:+.4f}) | "
                   f"{ok(m['jod'] >= b['jod']) if m['jod'] == m['jod'] else '–'} | {ok(0.5 <= m['detail'] <= 1.5)} | "
                   f"{ok(m.get('colour', math.nan) <= c.get('colour', math.nan))} |")
    return out + [""]


def targets(mean: dict) -> list[str]:
    """The issue's targets per CFM row: better than (a)–(d) on every metric; against (e), detail closer to 1.0
    and higher JOD with PSNR no more than 1 dB lower."""
    better = {"psnr": lambda a, b: a > b, "ssim": lambda a, b: a > b, "jod": lambda a, b: a > b,
              "detail": lambda a, b: abs(math.log(a)) < abs(math.log(b))}
    baselines = {n: m for n, m in mean.items() if n[:3] in ("(a)", "(b)", "(c)", "(d)")}
    regression = next((m for n, m in mean.items() if n.startswith("(e)")), None)
    out = ["| CFM row | wins against (a)–(d) (of " + str(4 * len(baselines)) + ") | all? | against (e): detail, "
           "JOD, PSNR ≥ (e) − 1 dB | JOD − (e), paired (± s.e.) |", "|---|---|---|---|---|"]
    for name, m in mean.items():
        if not name.startswith("(f)"):
            continue
        wins = sum(better[k](m[k], b[k]) for b in baselines.values() for k in better)
        if regression is None:
            vs_e = "not measured"
        else:
            checks = [better["detail"](m["detail"], regression["detail"]), m["jod"] > regression["jod"],
                      m["psnr"] >= regression["psnr"] - 1.0]
            vs_e = " / ".join("yes" if c else "no" for c in checks)
        paired = (f"{m['jod_vs_e']:+.3f} ± {m['jod_vs_e_se']:.3f}" if m.get("jod_vs_e_se", float("nan")) ==
                  m.get("jod_vs_e_se") else "–")
        out.append(f"| {name[4:]} | {wins} | {'yes' if wins == 4 * len(baselines) else 'no'} | {vs_e} | {paired} |")
    return out + [""]


def replace_section(path: Path, marker: str, text: str):
    """Put `text` in place of the section starting with `marker` (up to the next '## '), keeping the rest."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if marker in old:
        before, rest = old.split(marker, 1)
        after = rest[rest.find("\n## "):] if "\n## " in rest else ""
        new = before.rstrip() + "\n\n" + text.rstrip() + "\n" + after
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new)


def photo_inputs(ap: argparse.ArgumentParser):
    """The inputs every photo bench shares: the val folder, the TAESD folder, city96's upscaler."""
    ap.add_argument("--val", required=True)
    ap.add_argument("--vae", default=str(REPO / "weights" / "taesd"))
    ap.add_argument("--city96", default=str(REPO.parent / "shared" / "weights" / "sd-latent-upscaler-city96" /
                                            "latent-upscaler-v2.1_SDv1-x2.0.safetensors"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    default_regression = REPO / "bench" / "models" / "regression-sd15-x2.safetensors"
    ap.add_argument("--regression", default=str(default_regression) if default_regression.exists() else None,
                    help="a regression-baseline checkpoint (objective=regression); default: bench/models/")
    photo_inputs(ap)
    ap.add_argument("--sizes", default="256,512", help="low-res long sides in pixels (2× each)")
    ap.add_argument("--count", default="80,16", help="images per size")
    ap.add_argument("--evals", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--noise-steps", type=lambda s: [int(x) for x in s.split(",")], default=[0, 200, 400, 600])
    ap.add_argument("--sweep-evals", type=int, default=8)
    ap.add_argument("--grid-images", type=int, default=3)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--json", help="also write the raw means here")
    ap.add_argument("--only", help="measure only the methods whose name matches this regular expression "
                                   "(e.g. '^\\(e\\)'), and take the other rows from --merge")
    ap.add_argument("--merge", help="means written by an earlier run's --json (same images and seed)")
    ap.add_argument("--records", help="keep per-image scores in this folder and resume from them (a long run "
                                      "that stops goes on where it stopped; sizes can run in separate processes)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--flat", action="store_true", help="also cascade an empty 512² latent at the node defaults "
                                                         "and report how flat the result stays")
    ap.add_argument("--shard", help="K/N: measure only images K, K+N, K+2N, … into --records (one process per "
                                    "core); a run without --shard then reads them all and writes the table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    vae = TAESD.from_folder(args.vae)
    source_vae = SourceMemo(vae)
    cfm_ck = load_checkpoint(args.model)
    cfm = cfm_ck.build_network(torch.float32)
    city96 = City96LatentUpscaler(args.city96)
    regression = None
    if args.regression:
        reg_ck = load_checkpoint(args.regression)
        regression = (reg_ck.build_network(torch.float32), reg_ck)
    table_methods = methods(args, source_vae, cfm, cfm_ck, city96, regression)
    if args.only:
        table_methods = {k: v for k, v in table_methods.items() if re.search(args.only, k)}
    previous = json.loads(Path(args.merge).read_text()) if args.merge else {}
    jod = JOD()
    images = scan_images(args.val, 0).usable
    results, raw = {}, {}
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.count.split(",")]
    if args.only:
        args.grid_images = 0  # a partial run has not got the grid's columns
    if args.shard and not args.records:
        ap.error("--shard needs --records")
    for size, count in zip(sizes, counts):
        grid_cfm = next(n for n in table_methods if "node defaults" in n)  # what users get
        chosen = images[:count]
        if args.shard:
            k, n = (int(v) for v in args.shard.split("/"))
            chosen = chosen[k::n]
            args.grid_images = 0  # grid rows are by position in the whole list: the run over all shards makes them
        mean, grid = run_size(args, size, chosen, vae, source_vae, table_methods, jod, grid_cfm,
                              Records(args.records) if args.records else None)
        if args.shard:
            continue  # the table comes from a run over all shards
        label = f"{size} → {2 * size} px (long side), {min(count, len(images))} images"
        mean = merge_rows(previous.get(label, {}), mean)
        results[label] = mean
        raw[label] = mean
        if grid:
            save_grid(grid, Path(args.results).parent / f"quality_grid_{size}.jpg")
    if args.shard:
        print(f"shard {args.shard} measured into {args.records}", file=sys.stderr)
        return
    params = sum(v.numel() for v in cfm_ck.state_dict.values())
    info = (f"{params / 1e6:.2f} M parameters, {cfm_ck.method.upsampling_mode} mode, default noise step "
            f"{cfm_ck.method.noise_step}")
    if sc := shading_label(resolve(cfm_ck.method, have_vae=True).settings):
        info += (f"; every other CFM row with the model's own correction ({sc[2:]}: `models.shading_head`, "
                 "`flow.shading`)")
        if vae.fidelity_decoder is not None:
            info += ("; the TAESD passes' reference: its luma decoded by the pack's fidelity decoder "
                     "(`TAESD.decode_fidelity`), its colour by TAESD's decoder (`flow.shading.reference_image`)")
        if vae.change is not None:
            info += ("; each pass's move by the pack's learned encoder move (`TAESD.encode_change`), except in the "
                     "row that says *exact*")
    text = markdown(results, args, info, ", ".join(str(min(c, len(images))) for c in counts))
    if args.flat:
        flat = flat_field(cfm, cfm_ck, vae)
        text += (f"\nFlat input (an empty 512² px latent cascaded to 2048² px at the node defaults, TAESD decode): "
                 f"largest per-channel standard deviation {flat:.1f} (0–255; a flat field stays near 0).\n")
    replace_section(Path(args.results), "## Quality:", text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    print(text)


if __name__ == "__main__":
    main()
