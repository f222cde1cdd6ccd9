"""Tiled evaluation of the velocity network, for latents whose activations do not fit in memory.

The ODE state stays whole (it is small: 4 channels); only the network is run window by window. Every
evaluation blends the windows' velocities with weights that ramp linearly across the overlaps, so the
integrated latent has no edges where windows meet (the same idea as MultiDiffusion, applied to the velocity).
Windows keep the network's size multiple, so each one is a valid network input on its own.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, TypeVar

import torch

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
T = TypeVar("T")


def round_down(value: int, multiple: int) -> int:
    return max(multiple, (int(value) // multiple) * multiple)


def default_overlap(tile: int, multiple: int) -> int:
    # A quarter of the window: wide enough that the ramps hide the windows' different GroupNorm statistics.
    return round_down(max(tile // 4, 8), multiple)


def window_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of `tile` covering [0, size) with at least `overlap` shared between
    neighbours, spread evenly (every start a multiple of nothing in particular: only sizes matter to the net)."""
    if tile >= size:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, overlap: int, start_open: bool, end_open: bool) -> torch.Tensor:
    """1-D weight: rises over `overlap` samples at a side that meets another window, flat at the image edge."""
    w = torch.ones(length)
    ramp = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
    if start_open:
        w[:overlap] = torch.minimum(w[:overlap], ramp)
    if end_open:
        w[length - overlap:] = torch.minimum(w[length - overlap:], ramp.flip(0))
    return w


class TiledNetwork:
    """`network` evaluated on overlapping windows of at most `tile`×`tile` latent pixels, blended."""

    def __init__(self, network: Network, tile: int, overlap: Optional[int] = None, multiple: int = 1,
                 before_window: Callable[[], None] = lambda: None):
        self.network = network
        self.before_window = before_window  # e.g. a cancel check: one evaluation may be many windows
        self.multiple = max(1, int(multiple))
        self.tile = round_down(tile, self.multiple)
        overlap = default_overlap(self.tile, self.multiple) if overlap is None else int(overlap)
        self.overlap = min(overlap, self.tile // 2)
        self._plans: dict = {}

    def windows(self, height: int, width: int, device=None):
        """[(y, x, h, w)] and the normalised weight of each window, cached per size and device."""
        key = (height, width, str(device))
        if key not in self._plans:
            th, tw = min(self.tile, height), min(self.tile, width)
            ys, xs = window_starts(height, th, self.overlap), window_starts(width, tw, self.overlap)
            plan, total = [], torch.zeros(height, width)
            for top in ys:
                wy = _ramp(th, self.overlap, top > 0, top + th < height)
                for left in xs:
                    wx = _ramp(tw, self.overlap, left > 0, left + tw < width)
                    weight = wy[:, None] * wx[None, :]
                    total[top:top + th, left:left + tw] += weight
                    plan.append(((top, left, th, tw), weight))
            # Normalised once and kept on the device: the hot loop then does no host-to-device copies.
            self._plans[key] = [(box, (weight / total[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]).to(
                device or "cpu")) for box, weight in plan]
        return self._plans[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        plan = self.windows(height, width, x.device)
        if len(plan) == 1:
            return self.network(x, t, context)
        out = torch.zeros_like(x)
        for (top, left, h, w), weight in plan:
            window = (..., slice(top, top + h), slice(left, left + w))
            self.before_window()
            v = self.network(x[window], t, context[window])
            out[window] += v * weight
        return out


# torch.OutOfMemoryError is new in torch 2.5 (torch.cuda.OutOfMemoryError before): the pack declares no minimum
# torch, so the type is looked up, not named.
OOM_ERRORS = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                               getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t is not None)


def is_out_of_memory(error: BaseException) -> bool:
    if OOM_ERRORS and isinstance(error, OOM_ERRORS):
        return True
    # Backends without a dedicated type (MPS, some XPU builds) raise a RuntimeError that says so.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_with_smaller_tiles(run: Callable[[Optional[int]], T], first_tile: Optional[int], full_size: int,
                           multiple: int, min_tile: int, on_oom: Callable[[], None] = lambda: None,
                           on_retry: Callable[[int], None] = lambda tile: None) -> T:
    """`run(tile)`; on out-of-memory free what the failed attempt held and try again with windows half as
    wide, down to `min_tile`. `None` means untiled. The last failure is raised as it was."""
    tile = first_tile
    while True:
        failed = None
        try:
            return run(tile)
        except Exception as error:  # noqa: BLE001 - filtered just below
            if not is_out_of_memory(error):
                raise
            failed = error
        # Outside the handler: the failed attempt's frames (and their tensors) are released before retrying.
        current = full_size if tile is None else tile
        smaller = round_down(current // 2, multiple)
        if smaller < min_tile or smaller >= current:
            raise failed
        failed = None
        on_oom()
        tile = smaller
        on_retry(tile)


class DoesNotFit(MemoryError):
    pass


def bytes_per_pixel(model_channels: int, dtype: torch.dtype) -> int:
    """Working memory of one network evaluation per output latent pixel: activations, skips and ODE state.
    256 bytes per (model channel × element byte) sits between the measured peak and the total allocation of
    the authors' network (≈460 at 64², fp32, CPU)."""
    return model_channels * 256 * (torch.finfo(dtype).bits // 8)


def min_window(size_multiple: int) -> int:
    # Below this the windows are mostly overlap and the network sees too little context.
    return max(16, 4 * size_multiple)


def plan_run(bytes_per_pixel: int, batch: int, height: int, width: int, budget: int, multiple: int,
             min_tile: int, tile: int = 0) -> tuple[int, Optional[int]]:
    """(items per network call, window side or None for untiled) for a `height`×`width` output latent,
    given the working memory one output latent pixel costs and the free-memory `budget` in bytes."""
    if tile:
        tile = round_down(tile, multiple)
        per_item = bytes_per_pixel * min(tile, height) * min(tile, width)
    else:
        per_item = bytes_per_pixel * height * width
    if per_item <= budget:
        return max(1, min(batch, budget // per_item)), (tile or None)
    # One item does not fit: the largest square window that does, one item at a time.
    side = round_down(int(math.sqrt(budget / bytes_per_pixel)), multiple)
    if side < min_tile or bytes_per_pixel * side * side > budget:
        need = bytes_per_pixel * min_tile * min_tile
        raise DoesNotFit(f"upscaling needs about {need / 2**30:.2f} GiB of working memory even in the smallest "
                         f"windows ({min_tile}×{min_tile}), but only {budget / 2**30:.2f} GiB are available")
    return 1, side
