"""The CFM velocity network: the authors' `EfficientUNet`, same module tree and parameter names.

Their checkpoints load into it without renaming. Conventions that differ from the usual diffusion UNet
(see the reference fixtures' README): t in [0, 1] is not scaled, the sinusoid is cos-first and always
float32, the flow state x comes before the context in the channel concat, the scale-shift norm applies
scale first, and attention splits heads by a plain reshape with no permute.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 8
    model_channels: int = 128
    out_channels: int = 4
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (8, 16)
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    dim_head: int = 64
    num_heads: int = 4
    use_scale_shift_norm: bool = True
    conv_resample: bool = True
    dropout: float = 0.0
    # Accepted so the authors' configs load as they are; only the values they ship are supported.
    use_linear_attn: bool = False
    pool_factor: int = -1
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, params: dict) -> "UNetConfig":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs = {k: v for k, v in params.items() if k in known}
        for key in ("attention_resolutions", "channel_mult"):
            if key in kwargs:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        unknown = {k: v for k, v in params.items() if k not in known}
        cfg = cls(**kwargs, extra=unknown)
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["attention_resolutions"] = list(self.attention_resolutions)
        d["channel_mult"] = list(self.channel_mult)
        return d

    def check(self) -> None:
        if self.use_linear_attn:
            raise ValueError("linear attention (use_linear_attn=True) is not supported")
        if self.pool_factor not in (-1, None):
            raise ValueError(f"pool_factor={self.pool_factor} is not supported (only -1)")
        if self.in_channels != 2 * self.out_channels:
            raise ValueError(
                f"in_channels={self.in_channels} must be twice out_channels={self.out_channels} "
                "(flow state and context are concatenated)")
        if self.model_channels % 32:
            raise ValueError(f"model_channels={self.model_channels} must be a multiple of 32 (GroupNorm(32))")

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    @property
    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this (one stride-2 downsample per extra level)."""
        return 2 ** (len(self.channel_mult) - 1)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


class TimestepBlock(nn.Module):
    """Marker: blocks whose forward takes the time embedding."""


class TimestepSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.scale_shift:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)  # scale first, as the authors
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, dim_head: int):
        super().__init__()
        self.num_heads = num_heads
        self.dim_head = dim_head
        inner = num_heads * dim_head
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * inner, 1)
        self.proj_out = nn.Conv1d(inner, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        length = x_flat.shape[-1]
        qkv = self.qkv(self.norm(x_flat))
        # The authors reinterpret (B, 3I, L) as (B, heads, L, 3I/heads) without a permute; weights trained
        # that way only work with the same split.
        qkv = qkv.reshape(b, self.num_heads, length, 3 * self.dim_head)
        q, k, v = qkv.split(self.dim_head, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.dim_head))
        out = out.reshape(b, self.num_heads * self.dim_head, length)
        return (x_flat + self.proj_out(out)).reshape(b, c, *spatial)


class CFMUNet(nn.Module):
    """Velocity network v(x, t | context). Parameter names follow the authors' `EfficientUNet`."""

    grad_checkpointing = False  # training: recompute block activations in backward to save memory
    channels_last = False       # feed activations in NHWC (set with the weights' layout by flow.runtime)

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.check()
        self.config = config
        self.shading_head = None   # a `models.shading_head.ShadingHead` when the checkpoint has one
        mc = config.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in, ch_out):
            return ResBlock(ch_in, emb_dim, ch_out, config.dropout, config.use_scale_shift_norm)

        def attn(ch):
            return AttentionBlock(ch, config.num_heads, config.dim_head)

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch, config.conv_resample)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(config.channel_mult))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch, config.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the body (the time embedding may be kept in fp32, see `set_precision`)."""
        return self.out[-1].weight.dtype

    def set_precision(self, dtype: torch.dtype) -> "CFMUNet":
        """Weights in `dtype`, except the time-embedding MLP, which stays fp32: its sinusoid inputs span
        several orders of magnitude that half precision would round together."""
        self.to(dtype)
        self.time_embed.float()
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x, context: (B, C, H, W); t: scalar or (B,) in [0, 1]. Returns the velocity in x's dtype."""
        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(x.shape[0])
        dtype = self.dtype
        emb_dtype = self.time_embed[0].weight.dtype
        # fp32 under autocast too (training), as `set_precision` keeps it at inference
        with torch.autocast(x.device.type, enabled=False):
            emb = self.time_embed(timestep_sinusoid(t, self.config.model_channels).to(emb_dtype)).to(dtype)
        h = torch.cat([x, context], dim=1).to(dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)

    def _run(self, block, h, emb):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)
