#!/usr/bin/env python3
"""Training throughput on this machine: samples/s of one training step of the shipped network (forward,
backward, AdamW, EMA), before and after the changes to the trainer, measured in the same run.

    .venv/bin/python bench/train_speed.py [--threads 2] [--steps 20]

Rows: the old recipe (fp32, 16² latents: 128 px crops) and the new one (bf16 autocast, 32² latents: 256 px
crops, fresh crops from the latent store), plus fp32 at 32² to separate the two changes. Prints a markdown table
with machine, versions and date; the numbers go into the model card.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pack import REPO, load_pack  # noqa: E402

load_pack()
from fmboost.flow import q_sample  # noqa: E402
from fmboost.models import load_checkpoint  # noqa: E402
from fmboost.models.unet import CFMUNet  # noqa: E402
from fmboost.training.train import EMA  # noqa: E402


def samples_per_second(size: int, precision: str, batch: int, steps: int) -> float:
    ck = load_checkpoint(REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors")
    net = CFMUNet(ck.net_config)
    net.load_state_dict({k: v.float() for k, v in ck.state_dict.items()})
    net.train()
    ema = EMA(net, 0.999)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(batch, 4, size, size, generator=gen)
    src = torch.randn(batch, 4, size, size, generator=gen)

    def step(i):
        x0 = q_sample(src, 250, torch.randn(z1.shape, generator=gen))
        t = torch.rand(batch, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = net(t[:, None, None, None] * z1 + (1 - t[:, None, None, None]) * x0, t, src)
            loss = F.mse_loss(pred.float(), z1 - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net, i)

    for i in range(3):  # warm-up
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    return batch * steps / (time.perf_counter() - started)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [("before: fp32, 16² latents (128 px crops)", 16, "fp32"),
            ("fp32, 32² latents (256 px crops)", 32, "fp32"),
            ("after: bf16 autocast, 32² latents (256 px crops)", 32, "bf16")]
    lines = [f"Training step of the shipped network ({datetime.date.today().isoformat()}; {platform.processor() or 'cpu'}"
             f", {args.threads} threads; torch {torch.__version__}; batch {args.batch}, {args.steps} steps after 3 "
             "of warm-up; `bench/train_speed.py`):", "", "| recipe | samples/s | latent pixels/s |", "|---|---|---|"]
    for name, size, precision in rows:
        rate = samples_per_second(size, precision, args.batch, args.steps)
        lines.append(f"| {name} | {rate:.1f} | {rate * size * size / 1e3:.1f} K |")
        print(lines[-1], file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
