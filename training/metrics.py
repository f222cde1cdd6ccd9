"""Image-quality metrics for validation and the benchmark. Images are (B, 3, H, W) in [0, 1]."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def luma(img: torch.Tensor) -> torch.Tensor:
    """BT.601 luma in [0, 1], (B, 1, H, W)."""
    r, g, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) on luma."""
    mse = ((luma(a) - luma(b)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def _gaussian_window(size=11, sigma=1.5, device=None):
    x = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM on luma (Wang et al. 2004: 11×11 Gaussian, σ=1.5, K1=0.01, K2=0.03, range 1)."""
    x, y = luma(a).double(), luma(b).double()
    w = _gaussian_window(device=x.device).double()
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x ** 2
    syy = F.conv2d(y * y, w) - mu_y ** 2
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def high_frequency_energy(img: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Spectral energy of luma above `cutoff` cycles/pixel (the band a 2× upscale must invent), per image."""
    y = luma(img)[:, 0].double()
    y = y - y.mean(dim=(-2, -1), keepdim=True)
    h, w = y.shape[-2:]
    win = torch.outer(torch.hann_window(h, dtype=torch.float64), torch.hann_window(w, dtype=torch.float64))
    spec = torch.fft.fft2(y * win.to(y.device)).abs() ** 2
    fy = torch.fft.fftfreq(h, device=y.device).abs()[:, None]
    fx = torch.fft.fftfreq(w, device=y.device).abs()[None, :]
    mask = torch.sqrt(fy ** 2 + fx ** 2) > cutoff
    return (spec * mask).flatten(1).sum(1).float()


def edge_mask(img: torch.Tensor, threshold: float, radius: int = 3) -> torch.Tensor:
    """(B, 1, H, W): 1 within `radius` px of the image's strong edges, where the gradient magnitude of its luma
    (blurred by 1 px; luma units per pixel) exceeds `threshold`, 0 elsewhere."""
    from ..flow.shading import gaussian_blur
    y = gaussian_blur(luma(img).float(), 1.0)
    gy, gx = torch.zeros_like(y), torch.zeros_like(y)
    gy[..., 1:-1, :] = (y[..., 2:, :] - y[..., :-2, :]) / 2
    gx[..., :, 1:-1] = (y[..., :, 2:] - y[..., :, :-2]) / 2
    edges = ((gy ** 2 + gx ** 2).sqrt() > threshold).float()
    return F.max_pool2d(edges, 2 * radius + 1, stride=1, padding=radius)


def high_pass_map(img: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): the energy of luma minus its 1 px Gaussian blur at each pixel (about the band above 0.2
    cycles/pixel)."""
    from ..flow.shading import gaussian_blur
    y = luma(img).float()
    return (y - gaussian_blur(y, 1.0)) ** 2


def high_pass_energy(img: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """`high_pass_map` summed per image over the pixels where `keep` (B, 1, H, W) is 1 (all without it)."""
    e = high_pass_map(img)
    return (e if keep is None else e * keep).flatten(1).sum(1)


def excess_detail(result: torch.Tensor, target: torch.Tensor, ratio: float, block: int = 16) -> torch.Tensor:
    """How far the result's high-pass energy rises above `ratio` × the target's, block by block (`block` px):
    the mean over blocks of log((E_result + f) / (E_target + f)) − log(ratio), where positive, squared. f, a tenth
    of the target's mean block energy, keeps flat blocks from dividing by nothing: grain drawn on a flat surface
    counts against its neighbours' texture, not as infinite. 0 when the result has no more texture anywhere."""
    er = F.avg_pool2d(high_pass_map(result), block)
    et = F.avg_pool2d(high_pass_map(target), block)
    f = 0.1 * et.mean().clamp_min(1e-8)
    return (F.relu(torch.log((er + f) / (et + f)) - math.log(ratio)) ** 2).mean()


def detail_ratio(result: torch.Tensor, truth: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """High-frequency energy of the result over that of the ground truth: 1.0 is ideal, blur falls below."""
    return high_frequency_energy(result, cutoff) / high_frequency_energy(truth, cutoff).clamp_min(1e-12)


def colour_error(result: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Colour cast, per image: the mean over R, G, B of |channel mean of result − of truth|, in 0–255 units."""
    return ((result.mean(dim=(-2, -1)) - truth.mean(dim=(-2, -1))).abs().mean(-1) * 255)


def chroma_ratio(result: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """How colourful the result is next to the ground truth, per image: the RMS deviation of its chroma (BT.601
    Cb and Cr, about their means) over the truth's. 1.0 is ideal, a paler image falls below. A uniform cast
    leaves it unchanged (colour_error sees that)."""
    from ..flow.shading import to_ycbcr

    def spread(img):
        c = to_ycbcr(img.float())[:, 1:]
        return (c - c.mean(dim=(-2, -1), keepdim=True)).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return spread(result) / spread(truth).clamp_min(1e-12)
