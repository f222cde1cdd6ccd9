"""TAESD (madebyollin, MIT): a tiny SD1.x-latent autoencoder, in pure torch, reading ComfyUI's
`taesd_encoder.safetensors` / `taesd_decoder.safetensors` key layout.

Its latents are SD-UNet-space (already × 0.18215); `encode` takes RGB in [0, 1], `decode` returns RGB in [0, 1].
"""
from __future__ import annotations

import os

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


class TAESD(nn.Module):
    """Implements the core's PixelVAE protocol on raw (unscaled) latents, like ComfyUI's VAE objects."""

    scale_factor = 0.18215
    downscale = 8
    dtype, memory_format = torch.float32, torch.contiguous_format   # set_precision changes them

    def __init__(self, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike):
        super().__init__()
        from safetensors.torch import load_file
        self.encoder, self.decoder = taesd_encoder(), taesd_decoder()
        self.encoder.load_state_dict({k: v.float() for k, v in load_file(encoder_path).items()})
        self.decoder.load_state_dict({k: v.float() for k, v in load_file(decoder_path).items()})
        self.eval().requires_grad_(False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "TAESD":
        return cls(os.path.join(folder, "taesd_encoder.safetensors"), os.path.join(folder, "taesd_decoder.safetensors"))

    def set_precision(self, dtype: torch.dtype, channels_last: bool = True) -> "TAESD":
        """Weights in `dtype` and, by default, NHWC layout (1.2-1.3× faster convolutions on a CPU). Inputs are
        cast to the weights' dtype and outputs come back as float32, so callers see no difference but speed."""
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return self.to(dtype=dtype, memory_format=self.memory_format)

    def _run(self, net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        return net(x.to(self.dtype).contiguous(memory_format=self.memory_format)).float()

    def encode_scaled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(self.encoder, pixels)

    def decode_scaled(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(self.decoder, z).clamp(0, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_scaled(pixels) / self.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decode_scaled(latent * self.scale_factor)
