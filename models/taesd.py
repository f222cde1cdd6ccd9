"""TAESD (madebyollin, MIT): a tiny SD1.x-latent autoencoder, in pure torch, reading ComfyUI's
`taesd_encoder.safetensors` / `taesd_decoder.safetensors` key layout.

Its latents are SD-UNet-space (already × 0.18215); `encode` takes RGB in [0, 1], `decode` returns RGB in [0, 1].

On a CPU, inference runs each convolution with its ReLU (and a block's last convolution with its skip addition
and ReLU) as one oneDNN call (`torch.ops.mkldnn._convolution_pointwise`, what torch.compile emits for these
layers), where this torch has it: the separate ReLUs and additions over 64 channels of a 1024² image took half of
an encode's time (bench/RESULTS.md, *Node defaults speed*). The same weights and arithmetic, and no compilation;
it checks itself once against the plain layers and falls back to them on any difference or error.

`encode_change` says how the latent moves when a smooth change is added to a decoded image: exactly (two
encodes), or, where the pack has one, by a small learned network (`EncodeChange`) that does it in a fraction of
an encode (the shading correction's pass, `flow.shading`, on a CPU).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn


def _conv(n_in, n_out, **kw):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels=4) -> nn.Sequential:
    b = _Block
    return nn.Sequential(
        _conv(3, 64), b(64, 64),
        _conv(64, 64, stride=2, bias=False), b(64, 64), b(64, 64), b(64, 64),
        _conv(64, 64, stride=2, bias=False), b(64, 64), b(64, 64), b(64, 64),
        _conv(64, 64, stride=2, bias=False), b(64, 64), b(64, 64), b(64, 64),
        _conv(64, latent_channels))


def taesd_decoder(latent_channels=4) -> nn.Sequential:
    b = _Block
    up = lambda: nn.Upsample(scale_factor=2)  # noqa: E731
    return nn.Sequential(
        _Clamp(), _conv(latent_channels, 64), nn.ReLU(),
        b(64, 64), b(64, 64), b(64, 64), up(), _conv(64, 64, bias=False),
        b(64, 64), b(64, 64), b(64, 64), up(), _conv(64, 64, bias=False),
        b(64, 64), b(64, 64), b(64, 64), up(), _conv(64, 64, bias=False),
        b(64, 64), _conv(64, 3))


def _pointwise_convolution():
    """oneDNN's fused convolution op where this torch build has it, else None."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


def _conv_args(conv: nn.Conv2d):
    return conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def run_fused(net: nn.Sequential, x: torch.Tensor, op) -> torch.Tensor:
    """`net(x)` for a TAESD encoder or decoder, with Conv2d → ReLU pairs and each block's last convolution +
    skip + ReLU as single `op` calls (`_pointwise_convolution`); other layers run as they are."""
    layers, i = list(net), 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv2d):
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            x = op(x, *_conv_args(layer), "relu" if relu else "none", [], "")
            i += 2 if relu else 1
            continue
        if isinstance(layer, _Block):
            first, _, second, _, last = layer.conv
            y = op(x, *_conv_args(first), "relu", [], "")
            y = op(y, *_conv_args(second), "relu", [], "")
            x = op.binary(y, layer.skip(x), *_conv_args(last), "add", None, "relu", [], "")
        else:
            x = layer(x)
        i += 1
    return x


@dataclass(frozen=True)
class EncodeChangeConfig:
    channels: int = 96
    depth: int = 3                 # 3×3 convolutions at latent resolution
    latent_channels: int = 4

    @classmethod
    def from_dict(cls, d: dict) -> "EncodeChangeConfig":
        cfg = cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})
        if cfg.channels < 1 or cfg.depth < 1 or cfg.latent_channels < 1:
            raise ValueError(f"encode-change config out of range: {d}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


class EncodeChange(nn.Module):
    """TAESD's encoder response to a smooth pixel change, learned (training/encode_change.py):

        (z, d, e) → encode(d + e) − encode(d)        scaled latents; d = decode(z) in [0, 1], e smooth

    Each latent pixel sees its own 8×8 block of d and e (pixel unshuffle) and its neighbours' through the
    3×3 convolutions, beside a linear map of e alone. The network's part is taken as its output for e less its
    output for no change, so no change moves nothing, exactly. The exact move costs two encodes at full
    resolution; this costs about what two 3×3 convolutions of 96 channels at the latent's resolution do
    (bench/RESULTS.md, *A learned encoder move*)."""

    factor = 8   # TAESD's pixels per latent pixel

    def __init__(self, config: EncodeChangeConfig = EncodeChangeConfig()):
        super().__init__()
        self.config = config
        c, lc, block = config.channels, config.latent_channels, 3 * self.factor ** 2
        self.inp = nn.Conv2d(lc + 2 * block, c, 1)
        self.body = nn.Sequential(*[m for _ in range(config.depth) for m in (nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))])
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(c, lc, 1))
        self.lin = nn.Conv2d(block, lc, 3, padding=1, bias=False)
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z: torch.Tensor, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        e = nn.functional.pixel_unshuffle(e, self.factor) * 8          # the change is a few % of the range
        d = nn.functional.pixel_unshuffle(d, self.factor) * 2 - 1
        x = torch.cat([torch.cat([z, e, d], dim=1), torch.cat([z, torch.zeros_like(e), d], dim=1)])
        moved, still = self.out(self.body(self.inp(x))).chunk(2)
        return self.lin(e) + moved - still


# A copy of the decoder fine-tuned for fidelity to low-res images (training/fidelity_decoder.py): the shading
# correction's reference, never the picture (`decode_fidelity`).
FIDELITY_DECODER = "taesd_fidelity_decoder.safetensors"
# The learned encoder move (`EncodeChange`), its config and training record in the metadata (`fmboost.encode_change`)
ENCODE_CHANGE = "taesd_encode_change.safetensors"
ENCODE_CHANGE_KEY = "fmboost.encode_change"


def load_encode_change(path: str | os.PathLike) -> EncodeChange:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(ENCODE_CHANGE_KEY, "{}"))
    net = EncodeChange(EncodeChangeConfig.from_dict(meta.get("config", {})))
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net


class TAESD(nn.Module):
    """Implements the core's PixelVAE protocol on raw (unscaled) latents, like ComfyUI's VAE objects."""

    scale_factor = 0.18215
    downscale = 8
    dtype, memory_format = torch.float32, torch.contiguous_format   # set_precision changes them

    def __init__(self, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike,
                 fidelity_decoder_path: str | os.PathLike | None = None,
                 encode_change_path: str | os.PathLike | None = None):
        super().__init__()
        from safetensors.torch import load_file
        self.encoder, self.decoder = taesd_encoder(), taesd_decoder()
        self.encoder.load_state_dict({k: v.float() for k, v in load_file(encoder_path).items()})
        self.decoder.load_state_dict({k: v.float() for k, v in load_file(decoder_path).items()})
        self.fidelity_decoder = None
        if fidelity_decoder_path is not None:
            self.fidelity_decoder = taesd_decoder()
            self.fidelity_decoder.load_state_dict({k: v.float() for k, v in load_file(fidelity_decoder_path).items()})
        self.change = load_encode_change(encode_change_path) if encode_change_path is not None else None
        self.eval().requires_grad_(False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, fidelity: bool = True, change: bool = True) -> "TAESD":
        """The folder's encoder and decoder; its fidelity decoder (FIDELITY_DECODER) if it has one and
        `fidelity` is set; its learned encoder move (ENCODE_CHANGE) if it has one and `change` is set."""
        optional = lambda name, wanted: (os.path.join(folder, name) if wanted and  # noqa: E731
                                         os.path.exists(os.path.join(folder, name)) else None)
        return cls(os.path.join(folder, "taesd_encoder.safetensors"), os.path.join(folder, "taesd_decoder.safetensors"),
                   optional(FIDELITY_DECODER, fidelity), optional(ENCODE_CHANGE, change))

    def set_precision(self, dtype: torch.dtype, channels_last: bool = True) -> "TAESD":
        """Weights in `dtype` and, by default, NHWC layout (1.2-1.3× faster convolutions on a CPU). Inputs are
        cast to the weights' dtype and outputs come back as float32, so callers see no difference but speed."""
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if self.fused is not False:
            self.fused = None   # checked again at the new precision
        return self.to(dtype=dtype, memory_format=self.memory_format)

    # None: not checked yet for the current precision; False: plain layers (set it to measure them, as the bench does)
    fused: bool | None = None

    def _run(self, net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        op = self._fused_op(x)
        return (net(x) if op is None else run_fused(net, x, op)).float()

    def _fused_op(self, x: torch.Tensor):
        """The fused op for this input, or None for the plain layers."""
        if self.fused is False or x.device.type != "cpu":
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None   # training through the decoder: the fused op has no backward
        if torch.is_autocast_enabled("cpu"):
            return None   # autocast would not cast the fused op: keep its precision what the caller asked for
        if self.fused is None:
            self.fused = self._check_fused()
        return _pointwise_convolution() if self.fused else None   # None also if oneDNN was switched off since

    @torch.no_grad()
    def _check_fused(self) -> bool:
        """Once per precision: do the fused layers give the plain layers' result on a small input?"""
        op = _pointwise_convolution()
        if op is None:
            return False
        gen = torch.Generator().manual_seed(0)
        image = nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=(64, 64), mode="bilinear")
        latent = torch.rand(1, 4, 8, 8, generator=gen) * 4 - 2
        for net, x in ((self.encoder, image), (self.decoder, latent)):
            x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
            try:
                got, want = run_fused(net, x, op).float(), net(x).float()
            except Exception as error:   # an op this torch build lacks or refuses for this dtype
                logging.info("TAESD: fused CPU convolutions unavailable (%s); using plain layers", error)
                return False
            # relative mean difference; bf16 rounds differently once the ReLU is fused (about 0.5 % here)
            error = ((got - want).abs().mean() / want.abs().mean().clamp_min(1e-6)).item()
            if not error <= (1e-5 if self.dtype == torch.float32 else 0.02):
                logging.warning("TAESD: fused CPU convolutions disagree with the plain layers (relative "
                                "difference %.3g); using plain layers", error)
                return False
        return True

    def encode_scaled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(self.encoder, pixels)

    def decode_scaled(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(self.decoder, z).clamp(0, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_scaled(pixels) / self.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decode_scaled(latent * self.scale_factor)

    def decode_fidelity(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent → the pixels it most likely came from, by the fidelity decoder (closer to the encoded image
        than `decode`, and smoother): what the shading correction compares with. `decode` without one."""
        if self.fidelity_decoder is None:
            return self.decode(latent)
        return self._run(self.fidelity_decoder, latent * self.scale_factor).clamp(0, 1)

    @contextlib.contextmanager
    def exact_move(self):
        """Within it, `encode_change` is exact (two encodes), as without the learned move: for the benches that
        measure the move against the encoder's own."""
        saved, self.change = self.change, None
        try:
            yield self
        finally:
            self.change = saved

    def encode_change(self, latent: torch.Tensor, pixels: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """Raw latent (B, 4, h, w), its decoded pixels (B, 3, 8h, 8w) and a smooth change of them → how the raw
        latent moves: encode(pixels + change) − encode(pixels), by the learned `EncodeChange` when this TAESD
        has one (a fraction of an encode), else exactly (two encodes)."""
        if self.change is None:
            return self.encode(pixels + change) - self.encode(pixels)
        cast = lambda x: x.to(self.dtype).contiguous(memory_format=self.memory_format)  # noqa: E731
        move = self.change(cast(latent * self.scale_factor), cast(pixels), cast(change))
        return move.float() / self.scale_factor
