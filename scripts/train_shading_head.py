#!/usr/bin/env python3
"""Train a model's learned shading head (training/shading_head.py) and write the model with it.

    .venv/bin/python scripts/train_shading_head.py --config training/recipes/heads/shading-head.json \\
        --model weights/cfm/fmboost-sd15-x2.safetensors --out OUT.safetensors --work-dir ../fmboost-runs/head

The pairs (the model's own results on training crops and the TAESD correction's moves) are saved in
--work-dir and reused when the command runs again with the same model and recipe. The written model carries
the head (`shading_head.*` tensors, `fmboost.shading_head` config; a head the model had is replaced) and keeps
the TAESD passes the model recommends: the node's −1 then runs the head, then those passes (head + 1 pass is
the shipped model's default, bench/RESULTS.md); `scripts/set_model_defaults.py --shading-correction` changes them.
A recipe with `"target": "head_then_pass"` fits the new head to the move of the model's current head and one
pass (`training/recipes/heads/shading-head-composite.json`), for a head that does alone what both do.
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from _pack import load_pack, read_recipe, recipe_photos, repo_path


def main(argv=None) -> int:
    load_pack()
    import torch
    from fmboost.models import load_checkpoint
    from fmboost.models.checkpoint import HEAD_PREFIX, rewrite_checkpoint
    from fmboost.models.shading_head import ShadingHeadConfig
    from fmboost.models.taesd import TAESD
    from fmboost.training.data import scan_images
    from fmboost.training.shading_head import make_pairs, train_head
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a recipe (JSON)")
    ap.add_argument("--model", required=True, help="the FMBoost .safetensors whose head to train")
    ap.add_argument("--out", required=True, help="where to write the model with its head (may be --model)")
    ap.add_argument("--work-dir", required=True, help="keeps the training pairs between runs")
    ap.add_argument("--max-images", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = read_recipe(args, ("max_images", "steps"))
    ckpt = load_checkpoint(args.model)
    precision = torch.bfloat16 if recipe.get("precision", "bf16") == "bf16" else torch.float32
    network = ckpt.build_network(precision)
    vae_ref = TAESD.from_folder(repo_path(recipe["vae"]), change=False)   # the exact pass is the target
    vae_run = TAESD.from_folder(repo_path(recipe["vae"])).set_precision(precision)
    paths = recipe_photos(recipe, scan_images)
    weights = hashlib.sha256(Path(args.model).read_bytes()).hexdigest()[:12]
    target = recipe.get("target", "taesd_pass")
    key_items = [weights, [p.name for p in paths], recipe["crop"], recipe["crops_per_image"], recipe["noise_steps"],
                 recipe.get("precision"), recipe.get("seed", 0), recipe.get("shuffle_seed", 0)]
    if target != "taesd_pass":   # the default keeps the pairs files of earlier runs valid
        key_items.append(target)
    if vae_ref.fidelity_decoder is not None:   # the pass's reference (flow.shading) changes the moves
        key_items.append(hashlib.sha256(b"".join(
            t.numpy().tobytes() for t in vae_ref.fidelity_decoder.state_dict().values())).hexdigest()[:12])
    key = hashlib.sha256(json.dumps(key_items).encode()).hexdigest()[:16]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pairs_file = work / f"pairs-{key}.pt"
    started = time.time()
    if pairs_file.exists():
        pairs = torch.load(pairs_file, weights_only=True)
        print(f"pairs: {pairs['out'].shape[0]} from {pairs_file.name}")
    else:
        pairs = make_pairs(ckpt, network, vae_ref, vae_run, paths, crop=recipe["crop"],
                           crops_per_image=recipe["crops_per_image"], noise_steps=tuple(recipe["noise_steps"]),
                           seed=recipe.get("seed", 0), target=target)
        torch.save(pairs, pairs_file)
    pair_seconds = time.time() - started
    config = ShadingHeadConfig(channels=recipe["channels"], depth=recipe["depth"], pool=recipe.get("pool", 0))
    started = time.time()
    head = train_head(pairs, config, steps=recipe["steps"], batch=recipe["batch"], lr=recipe["lr"],
                      mean_weight=recipe.get("mean_weight", 0.0), seed=recipe.get("seed", 0),
                      precision=recipe.get("precision", "bf16"))
    train_seconds = time.time() - started
    head_tensors = {HEAD_PREFIX + k: v.to(torch.float16) for k, v in head.state_dict().items()}
    record = {"recipe": Path(args.config).name, "images": len(paths), "pairs": int(pairs["out"].shape[0]),
              "target": target, "steps": recipe["steps"], "pair_seconds": round(pair_seconds),
              "train_seconds": round(train_seconds), "threads": torch.get_num_threads()}
    rewrite_checkpoint(
        args.model, args.out,
        tensors=lambda t: {**{k: v for k, v in t.items() if not k.startswith(HEAD_PREFIX)}, **head_tensors},
        metadata=lambda m: {**m, "fmboost.shading_head": json.dumps(config.to_dict()),
                            "fmboost.shading_head_training": json.dumps(record)})
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
