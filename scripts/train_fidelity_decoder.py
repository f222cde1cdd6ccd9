#!/usr/bin/env python3
"""Train the pack's TAESD fidelity decoder (training/fidelity_decoder.py): the shading correction's reference.

    .venv/bin/python scripts/train_fidelity_decoder.py --config training/recipes/decoders/fidelity-decoder.json \\
        --out weights/taesd/taesd_fidelity_decoder.safetensors

Fine-tunes a copy of the recipe's TAESD decoder on low-res crops of the recipe's photos and writes it in bf16,
the TAESD files' own format, with the recipe and the run in its metadata (`fmboost.fidelity_decoder`).
"""
import argparse
import json
import sys
import time
from pathlib import Path

from _pack import load_pack, read_recipe, readable_by_all, recipe_photos, repo_path


def main(argv=None) -> int:
    load_pack()
    import torch
    from safetensors.torch import save_file
    from fmboost.models.taesd import TAESD
    from fmboost.training.data import load_rgb, scan_images
    from fmboost.training.fidelity_decoder import RECIPE_KEYS, fit, photo_store
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a recipe (JSON)")
    ap.add_argument("--out", required=True, help="the .safetensors to write")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--max-images", type=int)
    ap.add_argument("--max-minutes", type=float)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = read_recipe(args, ("steps", "max_images", "max_minutes"), RECIPE_KEYS)
    vae = TAESD.from_folder(repo_path(recipe["vae"]), fidelity=False)
    paths = recipe_photos(recipe, scan_images)
    photos = photo_store(paths, load_rgb, recipe.get("max_side", 768))
    started = time.time()
    minutes = recipe.get("max_minutes")
    state, steps = fit(vae, photos, steps=recipe["steps"], batch=recipe["batch"], crop=recipe["crop"],
                       lr=recipe["lr"], seed=recipe.get("seed", 0), precision=recipe.get("precision", "bf16"),
                       max_seconds=60 * minutes if minutes else None)
    record = {"recipe": Path(args.config).name, "images": len(paths), "steps": steps, "batch": recipe["batch"],
              "crop": recipe["crop"], "lr": recipe["lr"], "seconds": round(time.time() - started),
              "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, args.out,
              metadata={"fmboost.fidelity_decoder": json.dumps(record)})
    readable_by_all(args.out)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
