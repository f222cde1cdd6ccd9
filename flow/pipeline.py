"""One CFM upscale, from a raw VAE latent to a raw VAE latent with twice the height and width.

    raw latent ──×scale──▶ z ──source──▶ z_up ──q_sample(step, ε)──▶ x0 ──ODE v([x, z_up], t)──▶ x1 ──÷scale──▶ raw
    ──shading correction (optional: large-scale shading pulled to the low-res image's)──▶ raw

Everything ComfyUI-specific stays out: the nodes pass plain tensors, a velocity network, an optional VAE
(`source.PixelVAE`) and a progress callback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .schedule import check_step, q_sample
from .shading import correct_shading
from .solvers import EvalInfo, SolverSettings, integrate
from .source import DecodeOnce, PixelVAE, make_source
from .tiling import TiledNetwork

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, context) → v


class InputError(ValueError):
    """The input latent cannot be upscaled by this model; the message says why."""


@dataclass
class Progress:
    nfe: int                  # network evaluations done so far in this upscale
    planned: int              # evaluations planned (for adaptive solvers: the cap)
    info: EvalInfo = field(repr=False)
    rows: slice = field(repr=False)   # batch rows this evaluation covered
    crop: tuple[int, int] = (0, 0)

    def preview(self, rows: int = 1) -> torch.Tensor:
        """Predicted result (scaled latent, cropped to the output size) of the first `rows` rows being
        integrated: one Euler jump to t=1 from the current state."""
        h, w = self.crop
        x, v = self.info.x[:rows, :, :h, :w], self.info.v[:rows, :, :h, :w]
        return x + (1.0 - self.info.t) * v


@dataclass(frozen=True)
class UpscaleSettings:
    scale_factor: float = 0.18215
    mode: str = "latent"
    noise_step: int = 400
    seed: int = 0
    solver: SolverSettings = SolverSettings()
    size_multiple: int = 1
    back_projection: float = 0.0   # pixel mode: `source.back_project` strength, from the model
    source_decoder: str = "vae"    # pixel mode: the decoder of the source's pixels (`source.SOURCE_DECODERS`), from the model
    shading_correction: int = 0    # passes of `shading.correct_shading` after the flow (0: none)
    shading_head: bool = False     # run the model's learned shading head (`models.shading_head`) after the flow


def item_noise(shape: Sequence[int], seed: int, batch_index: Sequence[int]) -> torch.Tensor:
    """ε for each batch item from (seed, its batch index), on the CPU like ComfyUI's own noise, so one item
    gets the same noise whatever batch it travels in, and on any device."""
    out = torch.empty((len(batch_index), *shape), dtype=torch.float32)
    for row, index in enumerate(batch_index):
        gen = torch.Generator(device="cpu").manual_seed((int(seed) + int(index)) % (2 ** 64))
        out[row] = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return out


def check_latent(latent: torch.Tensor, channels: int) -> None:
    if not isinstance(latent, torch.Tensor):
        raise InputError(f"expected a latent tensor, got {type(latent).__name__}")
    if latent.ndim != 4:
        raise InputError(f"expected a 4-D image latent (batch, channels, height, width), got shape "
                         f"{tuple(latent.shape)}" + (" (a video latent?)" if latent.ndim == 5 else ""))
    b, c, h, w = latent.shape
    if b == 0:
        raise InputError("the latent batch is empty")
    if c != channels:
        raise InputError(f"this CFM model works on {channels}-channel latents (SD1.x), but the input has {c} "
                         "channels: it comes from another model family (SD3/Flux use 16)")
    if h < 2 or w < 2:
        raise InputError(f"the latent is too small to upscale ({h}×{w}); it needs at least 2×2")
    if not torch.isfinite(latent).all():
        raise InputError("the input latent contains NaN or Inf values; check the sampler that produced it")


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    # Mirror padding keeps image statistics at the border; the padded band is cropped off afterwards.
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def build_source(latent: torch.Tensor, settings: UpscaleSettings, vae: Optional[PixelVAE] = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Raw latent (B, C, h, w) → the scaled source (B, C, 2h, 2w) on `device` (`source.make_source`). A caller
    that manages device memory builds it before loading the network: in pixel mode the VAE's own load could
    otherwise unload the network in the middle of an upscale."""
    device = torch.device(device) if device is not None else latent.device
    z = latent.to(device, torch.float32) * settings.scale_factor
    return make_source(z, settings.mode, settings.scale_factor, vae, back_projection=settings.back_projection,
                       decoder=settings.source_decoder)


def upscale(network: Network, latent: torch.Tensor, settings: UpscaleSettings, *,
            vae: Optional[PixelVAE] = None, source: Optional[torch.Tensor] = None,
            batch_index: Optional[Sequence[int]] = None,
            noise: Optional[torch.Tensor] = None, latent_channels: int = 4,
            on_progress: Optional[Callable[[Progress], None]] = None,
            device: torch.device | str | None = None, max_batch: Optional[int] = None,
            tile: Optional[int] = None, overlap: Optional[int] = None,
            before_window: Callable[[], None] = lambda: None,
            shading_vae: Optional[PixelVAE] = None,
            shading_head: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Raw VAE latent (B, C, h, w) → raw VAE latent (B, C, 2h, 2w), float32 on `device`.

    `max_batch` caps how many items are integrated together (memory); items are independent either way.
    `tile` (output latent pixels) runs the network on overlapping windows of that size (`tiling.TiledNetwork`);
    `before_window` is called before each window (cancellation inside a long tiled evaluation) and before each
    shading pass. `source`: the output of `build_source` for these arguments when the caller built it already
    (then `vae` is not used for it). With `settings.shading_head`, the learned head (`shading_head`, else the
    network's own `shading_head`) corrects the result; then `settings.shading_correction` passes
    (`shading.correct_shading`) run on it with `shading_vae`, else `vae`."""
    check_latent(latent, latent_channels)
    step = check_step(settings.noise_step)
    device = torch.device(device) if device is not None else latent.device
    if shading_vae is None and source is None and vae is not None and settings.shading_correction:
        vae = DecodeOnce(vae)   # the source and the correction's reference both decode the low-res latent
    shading_vae = shading_vae if shading_vae is not None else vae
    if settings.shading_correction and shading_vae is None:
        raise InputError("shading correction needs a VAE to compare the shading with: pass one, or set "
                         "shading_correction to 0")
    if shading_head is None:
        shading_head = getattr(network, "shading_head", None)
    if settings.shading_head and shading_head is None:
        raise InputError("this model has no shading head: set shading_correction to 0, or to a number of "
                         "TAESD passes")
    b = latent.shape[0]
    if batch_index is None:
        batch_index = list(range(b))
    if len(batch_index) != b:
        raise InputError(f"batch_index has {len(batch_index)} entries for a batch of {b}")

    if source is None:
        z_up = build_source(latent, settings, vae, device)
    else:
        z_up = source.to(device, torch.float32)
        b, c, h, w = latent.shape
        if tuple(z_up.shape) != (b, c, 2 * h, 2 * w):
            raise InputError(f"the source {tuple(z_up.shape)} does not fit the latent {tuple(latent.shape)}")
    out_h, out_w = z_up.shape[-2:]
    if noise is None:
        noise = item_noise(z_up.shape[1:], settings.seed, batch_index)
    if tuple(noise.shape) != tuple(z_up.shape):
        raise InputError(f"noise of shape {tuple(noise.shape)} does not match the source {tuple(z_up.shape)}")
    x0 = q_sample(z_up, step, noise.to(device, torch.float32))

    multiple = max(1, int(settings.size_multiple))
    x0, context = _pad_to_multiple(x0, multiple), _pad_to_multiple(z_up, multiple)

    solver = settings.solver
    if tile:
        network = TiledNetwork(network, tile, overlap, multiple, before_window)
    # Adaptive step control measures the error over the whole tensor, so items would steer each other's
    # steps; run them one at a time to keep every item independent of its batch.
    size = 1 if solver.adaptive else max(1, min(b, max_batch or b))
    chunks = [slice(i, min(i + size, b)) for i in range(0, b, size)]
    planned = solver.planned_evals() * len(chunks)  # progress counts evaluations of each chunk
    done = 0
    results = []
    for rows in chunks:
        ctx = context[rows]

        def velocity(x, t, ctx=ctx):
            return network(x, t, ctx)

        def on_eval(info: EvalInfo, rows=rows):
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(Progress(done, planned, info, rows, (out_h, out_w)))

        results.append(integrate(velocity, x0[rows], solver, on_eval))
    x1 = torch.cat(results, dim=0)[..., :out_h, :out_w]
    if settings.shading_head:  # item by item: its activations are 24× the latent's
        before_window()
        x1 = torch.cat([shading_head(x1[i:i + 1], z_up[i:i + 1]).float() for i in range(b)])
    return correct_shading(shading_vae, latent.to(device, torch.float32), x1 / settings.scale_factor,
                           settings.shading_correction, before_pass=before_window)
