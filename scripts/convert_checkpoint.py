#!/usr/bin/env python3
"""Convert a CFM checkpoint (the authors' Lightning .ckpt, or a bare state dict) to FMBoost's .safetensors.

    python scripts/convert_checkpoint.py last.ckpt models/cfm/fmboost-64-128.safetensors [--weights online]

Keeps only the velocity network (drops the VAE, the FID network and optimizer state), stores the network
config and the method settings in the file's metadata, and writes fp16 by default (a 5 GB training
checkpoint becomes ~0.6 GB). The pickle is read with a restricted unpickler: no code from it runs.
"""
import argparse
import os
import sys

from _pack import load_pack


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="input checkpoint (.ckpt, .pt, .safetensors)")
    ap.add_argument("dst", help="output .safetensors")
    ap.add_argument("--weights", choices=("ema", "online"), default="ema",
                    help="which weights of an authors' checkpoint to keep (default: ema)")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--config", help="JSON with the network params, for bare state dicts")
    args = ap.parse_args(argv)
    load_pack()
    import json

    import torch
    from fmboost.models import CheckpointError, convert

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.dtype]
    net_config = None
    if args.config:
        data = json.load(open(args.config))
        net_config = data.get("net_params", data.get("net", data))
    try:
        ck = convert(args.src, args.dst, weights=args.weights, dtype=dtype, net_config=net_config)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_params = sum(v.numel() for v in ck.state_dict.values())
    print(f"wrote {args.dst}: {len(ck.state_dict)} tensors, {n_params / 1e6:.1f} M parameters, {args.dtype}, "
          f"{ck.weights} weights, {os.path.getsize(args.dst) / 2**20:.1f} MiB "
          f"(from {os.path.getsize(args.src) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
