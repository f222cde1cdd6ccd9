"""Shading correction: after the flow, pull the upscaled image's large-scale shading and colour back to the
low-res image's, and leave its detail alone.

A small CFM network shifts the large-scale shading it is given (it colours and darkens broad areas), while a
bicubic resize keeps the low-res image's shading exactly; most of the gap between the two is there (bench/
RESULTS.md, *Where the error is*). One pass:

    d   = decode(z)                                       the upscaled image
    e   = blur(reference) − blur(d)                       its large-scale error (Gaussian of SHADING_SIGMA px)
    z  += encode(d + e) − encode(d)

The reference is bicubic ×2 of the low-res image, its brightness (BT.601 luma) decoded by the pack's fidelity
decoder, which is closer to the image than TAESD's decoder, and its colour (Cb, Cr) by the VAE's own decoder:
the fidelity decoder was fitted on luma and is paler, and each pass pulled the colour to it (a cascade's
colours came out about an eighth paler than a bicubic resize's; `bench/RESULTS.md`, *A reference with the
decoder's colour*). A VAE without a fidelity decoder gives both.

The difference of two encodes moves the latent by what the pixel change means to the encoder, and cancels the
encoder's own bias (encoding d + e directly would add the VAE's round-trip error: its reds and greens, its
blur). The pack's TAESD predicts that difference with a small learned network instead of two encodes at full
resolution (`models.taesd.EncodeChange`; `encode_change` below). Everything is per item, so batches and seeds
behave as without it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .source import PixelVAE, pixel_decoder

SHADING_SIGMA = 2.0   # output pixels: one pixel of the low-res image. Measured against 1 and 1.5 (bench/RESULTS.md)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of `sigma` px over the last two dims of (B, C, H, W), reflected at the borders."""
    radius = max(1, int(3 * sigma + 0.5))
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-k ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


_YCBCR = torch.tensor([[0.299, 0.587, 0.114],          # BT.601 full range: Y, Cb, Cr from R, G, B
                        [-0.168736, -0.331264, 0.5],
                        [0.5, -0.418688, -0.081312]])


def to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB → Y, Cb, Cr (BT.601, full range; Cb and Cr centred on 0)."""
    return _mix(_YCBCR, rgb)


def from_ycbcr(ycc: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_ycbcr`."""
    return _mix(torch.linalg.inv(_YCBCR.double()), ycc)


def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """3×3 `matrix` applied to each pixel's channels of (B, 3, H, W)."""
    m = matrix.to(x.device, x.dtype)
    return torch.stack([m[i, 0] * x[:, 0] + m[i, 1] * x[:, 1] + m[i, 2] * x[:, 2] for i in range(3)], 1)


def reference_image(vae: PixelVAE, low: torch.Tensor) -> torch.Tensor:
    """Raw low-res latent (B, C, h, w) → the image a pass pulls the result's large scales to, before the blur:
    bicubic ×2 of its decode, float32 in [0, 1]; its luma from the fidelity decoder (the pack's TAESD:
    models.taesd.TAESD.decode_fidelity) and its chroma from the VAE's `decode` (other VAEs: both)."""
    def bicubic(decode):
        pixels = decode(low).to(low.device, torch.float32)
        return F.interpolate(pixels, size=(pixels.shape[-2] * 2, pixels.shape[-1] * 2), mode="bicubic",
                             align_corners=False).clamp(0, 1)
    fidelity = pixel_decoder(vae, "fidelity")
    luma = bicubic(fidelity)
    if fidelity == vae.decode:
        return luma
    ycc = to_ycbcr(bicubic(vae.decode))
    return from_ycbcr(torch.cat([to_ycbcr(luma)[:, :1], ycc[:, 1:]], 1)).clamp(0, 1)


def shading_reference(vae: PixelVAE, low: torch.Tensor, sigma: float = SHADING_SIGMA) -> torch.Tensor:
    """Raw low-res latent (B, C, h, w) → what a pass pulls the result's large scales to: the blur (`sigma`
    output px) of `reference_image`, float32."""
    return gaussian_blur(reference_image(vae, low), sigma)


def shading_change(vae: PixelVAE, z: torch.Tensor, reference: torch.Tensor,
                   sigma: float = SHADING_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw upscaled latent → (d, e): its decoded pixels and the change that gives them the reference's large
    scales, e = clamp(d + reference − blur(d), 0, 1) − d (float32)."""
    d = vae.decode(z).to(reference.device, torch.float32)
    if d.shape != reference.shape:
        raise ValueError(f"the VAE decoded {tuple(d.shape)} pixels from the upscaled latent, expected "
                         f"{tuple(reference.shape)}")
    return d, (d + reference - gaussian_blur(d, sigma)).clamp(0, 1) - d


def encode_change(vae: PixelVAE, z: torch.Tensor, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """How the raw latent z (which decodes to d) moves when e is added to d: the VAE's own `encode_change` (the
    pack's TAESD: learned, fast on a CPU), else encode(d + e) − encode(d)."""
    change = getattr(vae, "encode_change", None)
    move = change(z, d, e) if change is not None else vae.encode(d + e) - vae.encode(d)
    return move.to(z.device, torch.float32)


def correct_shading(vae: PixelVAE, low: torch.Tensor, out: torch.Tensor, passes: int,
                    sigma: float = SHADING_SIGMA, before_pass=lambda: None) -> torch.Tensor:
    """Raw low-res latent (B, C, h, w) and the raw upscaled latent (B, C, 2h, 2w) → the upscaled latent with its
    shading (blur of `sigma` output px) pulled to that of the low-res image, bicubic ×2, after `passes`
    passes (0: `out` unchanged). Pixels are compared in float32; `before_pass` runs before each (Cancel)."""
    if passes <= 0:
        return out
    reference = shading_reference(vae, low.to(out.device), sigma)
    z = out
    for _ in range(passes):
        before_pass()
        d, e = shading_change(vae, z, reference, sigma)
        z = z + encode_change(vae, z, d, e)
    return z
