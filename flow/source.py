"""Building the ODE's source: the low-res latent brought to the high-res grid.

- latent mode: bilinear ×2 of the (scaled) latent;
- pixel mode: decode → bilinear ×2 in pixels → encode (posterior mode), as the authors' "psu"; optionally with
  a back-projection step before the encode (`back_project`), so that the source decodes closer to those pixels,
  and optionally decoded by the VAE's fidelity decoder (`SOURCE_DECODERS`).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

MODES = ("latent", "pixel")
# Which decoder makes pixel mode's pixels: "vae", the VAE's own; "fidelity", the VAE's `decode_fidelity` where it
# has one (the pack's TAESD: a decoder fine-tuned to give back the encoded image, smoother and about 0.85 dB
# closer to it than TAESD's own), its own decoder otherwise (a connected SD VAE decodes faithfully itself).
SOURCE_DECODERS = ("vae", "fidelity")


class PixelVAE(Protocol):
    """What pixel mode needs from a VAE. Latents are raw (unscaled) VAE latents."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) raw latent → (B, 3, H, W) pixels in [0, 1]."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] → (B, C, h, w) raw latent (posterior mode, not a sample)."""


class DecodeOnce:
    """A PixelVAE that decodes the same latent once: it keeps its last `decode` and gives it back when asked to
    decode that latent again (equal to within float rounding: a latent scaled and unscaled again). One upscale
    decodes the low-res latent twice with the same VAE, for the pixel-mode source and for the shading
    correction's reference; this makes the second free. Every other attribute is the VAE's. Make one per
    upscale: it holds its last result until it goes."""

    def __init__(self, vae: PixelVAE):
        self.vae, self._last = vae, None

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        last = self._last
        if (last is not None and last[0].shape == latent.shape and last[0].device == latent.device
                and last[0].dtype == latent.dtype and torch.allclose(last[0], latent, rtol=1e-5, atol=1e-6)):
            return last[1]
        pixels = self.vae.decode(latent)
        self._last = (latent.clone(), pixels)
        return pixels

    def __getattr__(self, name):   # only for names DecodeOnce has not got itself
        if name == "vae":
            raise AttributeError(name)
        return getattr(self.vae, name)


def bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # align_corners=False, no antialias: the authors' F.interpolate call.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pixel_decoder(vae: PixelVAE, decoder: str = "vae"):
    """The function that decodes pixel mode's pixels (`SOURCE_DECODERS`): "fidelity" is the VAE's
    `decode_fidelity` where it has one (the pack's TAESD), its own `decode` otherwise; "vae" its own `decode`."""
    if decoder not in SOURCE_DECODERS:
        raise ValueError(f"unknown source decoder {decoder!r}; choose one of {', '.join(SOURCE_DECODERS)}")
    return getattr(vae, "decode_fidelity", vae.decode) if decoder == "fidelity" else vae.decode


def back_project(vae: PixelVAE, pixels: torch.Tensor, strength: float) -> torch.Tensor:
    """Pixels x → pixels whose encoding decodes closer to x: one back-projection step,
    clamp(x + strength · (x − decode(encode(x))), 0, 1); strength 0 gives x back. A VAE's round trip does not give
    back a smooth image: the TAESD encoder brightens its reds and greens (about +4 of 255) and softens it. On
    the pixel-mode sources of held-out crops, strength 0.75 brings the round trip from 31.4 to 33.3 dB of the
    pixels it was given and its colour error from 2.5 to 0.8 (1.0 overshoots: 31.9 dB). It costs one encode and
    one decode at full size."""
    if not strength:
        return pixels
    round_trip = vae.decode(vae.encode(pixels)).to(pixels.device, pixels.dtype)
    return (pixels + strength * (pixels - round_trip)).clamp(0, 1)


def make_source(z_scaled: torch.Tensor, mode: str, scale_factor: float, vae: PixelVAE | None = None,
                factor: int = 2, back_projection: float = 0.0, decoder: str = "vae") -> torch.Tensor:
    """Scaled low-res latent (B, C, h, w) → scaled source on the high-res grid (B, C, factor·h, factor·w).
    `back_projection`: pixel mode's `back_project` strength (the model's; 0 for models trained without).
    `decoder`: pixel mode's decoder (`SOURCE_DECODERS`; the model's)."""
    b, c, h, w = z_scaled.shape
    out_size = (h * factor, w * factor)
    if mode == "latent":
        return bilinear(z_scaled, out_size)
    if mode != "pixel":
        raise ValueError(f"unknown up-sampling mode {mode!r}; choose one of {', '.join(MODES)}")
    if vae is None:
        raise ValueError("pixel-space up-sampling needs a VAE: connect one, or use latent up-sampling")
    pixels = pixel_decoder(vae, decoder)(z_scaled / scale_factor)
    if pixels.ndim != 4 or pixels.shape[0] != b:
        raise ValueError(f"the VAE decoded a {tuple(pixels.shape)} tensor from a {tuple(z_scaled.shape)} latent")
    pixels = bilinear(pixels.to(torch.float32), (pixels.shape[-2] * factor, pixels.shape[-1] * factor))
    pixels = back_project(vae, pixels, back_projection)
    z_up = vae.encode(pixels).to(z_scaled.device, torch.float32) * scale_factor
    if tuple(z_up.shape) != (b, c, *out_size):
        raise ValueError(
            f"the VAE does not fit this model: it encoded {tuple(pixels.shape)} pixels to a latent of "
            f"{tuple(z_up.shape)}, expected {(b, c, *out_size)}")
    return z_up


def upsample_mask(mask: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """A LATENT's noise_mask, (H, W), (B, H, W) or (B, 1, H, W), with its last two dims scaled by factor."""
    shape = mask.shape
    m = bilinear(mask.reshape(-1, 1, *shape[-2:]).float(), (shape[-2] * factor, shape[-1] * factor))
    return m.reshape(*shape[:-2], *m.shape[-2:])
