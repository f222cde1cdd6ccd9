#!/usr/bin/env python3
"""Thumbnails for the template browser: workflows/<name>.jpg shows what each example workflow's CFM stage makes.

Each workflow's CFM configuration (Load CFM Model, its solver and every CFM Latent Upscale, exactly as saved)
runs through a real ComfyUI server with the shipped model on the pack's example photo (CC0), VAE Encode
standing in for the KSampler. The thumbnail is one crop at the result's scale: the input on the left (its pixels magnified by
nearest neighbour), the workflow's result on the right. Needs the provisioned environment (scripts/provision.sh).

    .venv/bin/python scripts/build_workflow_previews.py [PART_OF_A_NAME ...]   # all, or only the matching ones
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import register_pack  # noqa: E402

register_pack()
from comfy_support import cfm_stage  # noqa: E402
from comfyui_server import ComfyServer, execution_error  # noqa: E402

THUMB = (512, 384)   # what the template cards show, 4:3


def thumbnail(low, result, size=THUMB):
    """Left: the input, right: the result, the same centre crop of the picture at the result's own scale (one
    result pixel per thumbnail pixel, the input's pixels magnified by nearest neighbour), each half the
    thumbnail."""
    from PIL import Image
    half_w, h = size[0] // 2, size[1]
    crop_w, crop_h = min(half_w, result.width), min(h, result.height)
    left, top = (result.width - crop_w) // 2, (result.height - crop_h) // 2
    box = (left, top, left + crop_w, top + crop_h)
    ours = result.crop(box).resize((half_w, h), Image.LANCZOS)
    theirs = low.resize(result.size, Image.NEAREST).crop(box).resize((half_w, h), Image.NEAREST)
    out = Image.new("RGB", size)
    out.paste(theirs, (0, 0))
    out.paste(ours, (half_w, 0))
    return out


def main(only=()):
    from PIL import Image
    base = Path(tempfile.mkdtemp(prefix="fmboost-previews-"))
    server = ComfyServer(base)
    for part in ("encoder", "decoder"):
        shutil.copy(REPO / "weights" / "taesd" / f"taesd_{part}.safetensors", base / "models" / "vae_approx")
    photo = Image.open(REPO / "assets" / "fmboost_example.png").convert("RGB")
    server.start()
    try:
        for path in sorted((REPO / "workflows" / "api").glob("*.json")):
            if only and not any(part in path.stem for part in only):
                continue
            workflow = json.loads(path.read_text())
            _, stages = cfm_stage(workflow, "")
            # the input the stage sees: the photo at 1/2 (1/4 for a cascade) of its size, a multiple of 8
            f = 2 ** (stages - 1)
            low = photo.resize((photo.width // f // 8 * 8, photo.height // f // 8 * 8), Image.LANCZOS)
            low.save(base / "input" / f"{path.stem}.png")
            prompt, _ = cfm_stage(workflow, f"{path.stem}.png")
            entry = server.run(prompt, timeout=1200)
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"{path.stem}: {execution_error(entry)}")
            result = Image.open(server.output_file(entry, "save", "images")).convert("RGB")
            out = REPO / "workflows" / f"{path.stem}.jpg"
            thumbnail(low, result).save(out, quality=88)
            print(f"wrote {out.relative_to(REPO)} ({low.width}×{low.height} → {result.width}×{result.height})")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
