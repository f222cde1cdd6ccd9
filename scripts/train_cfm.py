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
    from fmboost.training.train import TrainConfig, train
    defaults = TrainConfig(images="", out="", run_dir="", vae="")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="folder of training images (searched recursively)")
    ap.add_argument("--out", required=True, help="output .safetensors (EMA weights, rewritten at every save)")
    ap.add_argument("--run-dir", required=True, help="latent cache, resumable state, validation grids")
    ap.add_argument("--vae", required=True, help="TAESD folder (taesd_encoder/decoder.safetensors)")
    ap.add_argument("--val-images", help="held-out images for periodic validation")
    ap.add_argument("--net", type=json.loads, default=defaults.net, help="network params as JSON")
    for name in ("crop", "crops_per_image", "noise_step", "batch", "warmup", "steps", "val_every", "val_count",
                 "save_every", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "ema", "grad_clip", "max_minutes"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    ap.add_argument("--mode", choices=("pixel", "latent"), default=defaults.mode)
    ap.add_argument("--objective", choices=("cfm", "regression"), default=defaults.objective)
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=defaults.precision)
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = vars(ap.parse_args(argv))
    cfg = TrainConfig(**{k: v for k, v in args.items()})
    try:
        result = train(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
