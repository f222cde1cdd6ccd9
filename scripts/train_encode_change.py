#!/usr/bin/env python3
"""Train the pack's learned TAESD encoder move (training/encode_change.py): the shading correction's pass, fast.

    .venv/bin/python scripts/train_encode_change.py --config training/recipes/encoders/encode-change.json \\
        --model weights/cfm/fmboost-sd15-x2.safetensors --out weights/taesd/taesd_encode_change.safetensors \\
        --work-dir ../fmboost-runs/encode-change

The pairs (the model's results on training crops, their decodes, the pass's pixel changes and the exact moves)
are saved in --work-dir and reused when the command runs again with the same model, TAESD and recipe. Writes
the network in float16 with its config and the run in the metadata (`fmboost.encode_change`).
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from _pack import load_pack, read_recipe, readable_by_all, recipe_photos, repo_path


def main(argv=None) -> int:
    load_pack()
    import torch
    from safetensors.torch import save_file
    from fmboost.models import load_checkpoint
    from fmboost.models.taesd import ENCODE_CHANGE_KEY, TAESD, EncodeChangeConfig
    from fmboost.training.data import scan_images
    from fmboost.training.encode_change import RECIPE_KEYS, fit, make_pairs
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a recipe (JSON)")
    ap.add_argument("--model", required=True, help="the FMBoost .safetensors whose results to learn from")
    ap.add_argument("--out", required=True, help="the .safetensors to write")
    ap.add_argument("--work-dir", required=True, help="keeps the training pairs between runs")
    ap.add_argument("--max-images", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = read_recipe(args, ("max_images", "steps"), RECIPE_KEYS)
    ckpt = load_checkpoint(args.model)
    precision = torch.bfloat16 if recipe.get("precision", "bf16") == "bf16" else torch.float32
    network = ckpt.build_network(precision)
    vae_dir = repo_path(recipe["vae"])
    vae_ref = TAESD.from_folder(vae_dir, change=False)
    vae_run = TAESD.from_folder(vae_dir, change=False).set_precision(precision)
    paths = recipe_photos(recipe, scan_images)
    digest = lambda blobs: hashlib.sha256(b"".join(blobs)).hexdigest()[:12]  # noqa: E731
    key_items = [digest([Path(args.model).read_bytes()]),
                 digest(t.numpy().tobytes() for t in vae_ref.state_dict().values()),
                 [p.name for p in paths], recipe["crop"], recipe["crops_per_image"], recipe["noise_steps"],
                 recipe.get("precision"), recipe.get("seed", 0)]
    key = hashlib.sha256(json.dumps(key_items).encode()).hexdigest()[:16]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pairs_file = work / f"change-pairs-{key}.pt"
    started = time.time()
    if pairs_file.exists():
        pairs = torch.load(pairs_file, weights_only=True)
        print(f"pairs: {pairs['z'].shape[0]} from {pairs_file.name}")
    else:
        pairs = make_pairs(ckpt, network, vae_ref, vae_run, paths, crop=recipe["crop"],
                           crops_per_image=recipe["crops_per_image"], noise_steps=tuple(recipe["noise_steps"]),
                           seed=recipe.get("seed", 0))
        torch.save(pairs, pairs_file)
    pair_seconds = time.time() - started
    config = EncodeChangeConfig(channels=recipe["channels"], depth=recipe["depth"])
    started = time.time()
    net, unexplained = fit(pairs, config, steps=recipe["steps"], batch=recipe["batch"], lr=recipe["lr"],
                           mean_weight=recipe.get("mean_weight", 0.0), seed=recipe.get("seed", 0),
                           precision=recipe.get("precision", "bf16"))
    record = {"recipe": Path(args.config).name, "model": Path(args.model).name, "images": len(paths),
              "pairs": int(pairs["z"].shape[0]), "steps": recipe["steps"], "unexplained": round(unexplained, 4),
              "pair_seconds": round(pair_seconds), "train_seconds": round(time.time() - started),
              "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in net.state_dict().items()}, args.out,
              metadata={ENCODE_CHANGE_KEY: json.dumps({"config": config.to_dict(), "training": record})})
    readable_by_all(args.out)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
