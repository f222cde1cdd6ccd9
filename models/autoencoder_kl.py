"""The SD1.x KL autoencoder (the "SD VAE") in pure torch, for building training pairs without ComfyUI.

Reads VAE `.safetensors` files in the original (ldm: `encoder.down.0.block.0.norm1.weight`) layout, with or
without a `first_stage_model.` prefix (full SD checkpoints), and in the diffusers layout
(`encoder.down_blocks.0.resnets.0.norm1.weight`). `encode` returns the posterior mode.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


def _norm(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class _ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class _Attn(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the ldm asymmetric padding


class _Up(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = _ResBlock(ch, ch), _Attn(ch), _ResBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Encoder(nn.Module):
    def __init__(self, ch, mult, n_res, z):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList([_ResBlock(cin if j == 0 else ch * m, ch * m) for j in range(n_res)])
            cin = ch * m
            if i != len(mult) - 1:
                level.downsample = _Down(cin)
            self.down.append(level)
        self.mid = _Mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class _Decoder(nn.Module):
    def __init__(self, ch, mult, n_res, z):
        super().__init__()
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.mid = _Mid(cin)
        self.up = nn.ModuleList([None] * len(mult))
        for i in reversed(range(len(mult))):  # ldm indexes up-levels from the finest; they run coarsest first
            level = nn.Module()
            level.block = nn.ModuleList([_ResBlock(cin if j == 0 else ch * mult[i], ch * mult[i])
                                         for j in range(n_res + 1)])
            cin = ch * mult[i]
            if i != 0:
                level.upsample = _Up(cin)
            self.up[i] = level
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD1.x VAE. Implements the core's PixelVAE protocol on raw latents (pixels in [0, 1])."""

    scale_factor = 0.18215

    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4):
        super().__init__()
        self.encoder = _Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = _Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, pixels):
        moments = self.quant_conv(self.encoder(pixels * 2 - 1))
        return moments.chunk(2, dim=1)[0]  # posterior mode

    def decode(self, latent):
        return ((self.decoder(self.post_quant_conv(latent)) + 1) / 2).clamp(0, 1)

    @classmethod
    def from_state_dict(cls, sd: dict, name: str = "VAE") -> "AutoencoderKL":
        sd = ldm_layout(sd)
        if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
            raise ValueError(f"{name}: not a KL VAE (found keys like {', '.join(list(sd)[:3])})")
        z = sd["post_quant_conv.weight"].shape[0]
        if z != 4:
            raise ValueError(f"{name}: a {z}-channel VAE (SD3/Flux family); FMBoost models work in the 4-channel "
                             "SD1.x latent space")
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
        n_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        vae = cls(ch, mult, n_res, z)
        vae.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return vae.eval().requires_grad_(False)


def ldm_layout(sd: dict) -> dict:
    """Any supported VAE layout → the ldm one (prefix stripped, diffusers names mapped, attention as 1×1 convs)."""
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    if not any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        return dict(sd)
    n_up = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        nk = k
        nk = re.sub(r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3.", nk)
        nk = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", nk)
        nk = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                    lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", nk)
        nk = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                    lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", nk)
        nk = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", nk)
        nk = re.sub(r"\.mid_block\.attentions\.0\.", ".mid.attn_1.", nk)
        nk = nk.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                         ("to_out.0", "proj_out"), ("query", "q"), ("key", "k"), ("value", "v"),
                         ("proj_attn", "proj_out")):
            nk = nk.replace(f".attn_1.{old}.", f".attn_1.{new}.")
        if ".attn_1." in nk and nk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # diffusers stores the attention projections as Linear
        out[nk] = v
    return out
