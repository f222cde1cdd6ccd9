#!/usr/bin/env python3
"""Train a CFM upscaler on a folder of images; writes an FMBoost .safetensors that Load CFM Model reads as is.

    python scripts/train_cfm.py --images photos/train --val-images photos/val --vae weights/taesd \\
        --out models/cfm/my-cfm.safetensors --run-dir runs/my-cfm --steps 20000

Resume after a crash by running the same command again (same --run-dir). Multi-GPU:
    torchrun --nproc_per_node=4 scripts/train_cfm.py ...
"""
import argparse
import json
import sys

from _pack import load_pack


def main(argv=None) -> int:
    load_pack()
    from fmboost.flow.source import SOURCE_DECODERS
    from fmboost.training.train import TrainConfig, train
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a recipe: JSON of training settings (keys as the options, with _); "
                                     "options given on the command line override it")
    ap.add_argument("--images", help="folder of training images (searched recursively)")
    ap.add_argument("--out", help="output .safetensors (EMA weights, rewritten at every save)")
    ap.add_argument("--run-dir", help="latent store, resumable state, validation grids")
    ap.add_argument("--vae", help="TAESD folder (taesd_encoder/decoder.safetensors) or an SD1.x VAE")
    ap.add_argument("--init", help="warm start from this FMBoost .safetensors (same network)")
    ap.add_argument("--val-images", help="held-out images for periodic validation")
    ap.add_argument("--store", help="a folder of latent-store chunks made by an earlier run (e.g. carried to a GPU "
                                    "machine): used as it is, without the training images")
    ap.add_argument("--net", type=json.loads, help="network params as JSON")
    for name in ("crop", "max_side", "noise_step", "batch", "warmup", "steps", "val_every", "val_count",
                 "save_every", "seed", "solver_steps", "max_images", "decay_from", "pixel_items", "pixel_crop",
                 "pixel_lowpass"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("lr", "weight_decay", "ema", "grad_clip", "max_minutes", "t_mean", "pixel_loss",
                 "back_projection", "sampled_ssim", "sampled_mse", "sampled_detail", "detail_edge_threshold",
                 "detail_ceiling", "detail_ceiling_ratio"):
        ap.add_argument("--" + name.replace("_", "-"), type=float)
    ap.add_argument("--mode", choices=("pixel", "latent"))
    ap.add_argument("--source-decoder", choices=SOURCE_DECODERS,
                    help="pixel mode: decoder of the source's pixels (fidelity: the pack's TAESD fidelity decoder)")
    ap.add_argument("--t-dist", choices=("uniform", "logit_normal"))
    ap.add_argument("--solver", choices=("euler", "midpoint", "heun", "rk4"))
    ap.add_argument("--objective", choices=("cfm", "regression"))
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--grad-checkpointing", action="store_true", default=None)
    args = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    recipe = json.loads(open(args.pop("config")).read()) if "config" in args else {}
    recipe.pop("comment", None)
    settings = {**recipe, **args}
    missing = [k for k in ("images", "out", "run_dir", "vae") if not settings.get(k)]
    if missing:
        ap.error("missing " + ", ".join("--" + k.replace("_", "-") for k in missing))
    unknown = set(settings) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        ap.error(f"unknown settings in the recipe: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**settings)
    try:
        result = train(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
