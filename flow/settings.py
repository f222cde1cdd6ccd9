"""The one place where a model's stored method settings become the settings of an upscale.

The node, the benchmark, the trainer's validation and the tests all call `resolve`, so "the defaults" mean
the same thing everywhere: the up-sampling mode the checkpoint was trained for, its trained noise step, its
recommended solver and its recommended shading correction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .pipeline import UpscaleSettings
from .solvers import SolverSettings
from .source import MODES

AUTO = "auto"
UPSAMPLING_CHOICES = (AUTO,) + MODES
MODEL_NOISE_STEP = -1          # the node's "use the trained step"
MODEL_SHADING = -1             # the node's "the model's own correction": its shading head, if it has one, and
#                                the TAESD passes it recommends
HEAD_ONLY = -2                 # the node's "the model's shading head alone, no TAESD pass": fast on a CPU
MAX_SHADING_PASSES = 4


def check_shading_passes(passes: int) -> int:
    """A shading correction's pass count (`shading.correct_shading`), refused outside 0–MAX_SHADING_PASSES."""
    if not 0 <= int(passes) <= MAX_SHADING_PASSES:
        raise ValueError(f"shading_correction must be 0–{MAX_SHADING_PASSES} passes, got {passes}")
    return int(passes)


@dataclass(frozen=True)
class Resolved:
    settings: UpscaleSettings
    mismatch: Optional[str]    # a warning when the chosen mode is not the one the model was trained for
    builtin_vae: bool          # pixel mode with no VAE connected: the source is built with the pack's TAESD


class MissingVAE(ValueError):
    pass


def default_solver(method) -> SolverSettings:
    """The solver the checkpoint recommends (its metadata), used when none is connected."""
    return SolverSettings(method=method.solver, steps=method.solver_steps)


def resolve(method, *, size_multiple: int = 1, upsampling: str = AUTO, noise_step: int = MODEL_NOISE_STEP,
            seed: int = 0, solver: Optional[SolverSettings] = None, have_vae: bool = False,
            shading_correction: int = MODEL_SHADING) -> Resolved:
    """A model's method settings (`models.MethodSettings`) plus the user's choices → the upscale's settings.

    `upsampling` "auto" takes the trained mode; another mode runs but reports the mismatch. Pixel mode without
    a connected VAE uses the pack's TAESD when the model was trained on TAESD-built sources, and otherwise
    raises `MissingVAE` saying what to connect. `shading_correction` −1 (`MODEL_SHADING`) takes the model's own
    correction (its learned shading head when the file has one, then the TAESD passes it recommends); 1–4: the
    head, when the file has one, then that many TAESD passes; −2 (`HEAD_ONLY`): the head alone (a model without
    one is refused); 0 turns both off."""
    if upsampling not in UPSAMPLING_CHOICES:
        raise ValueError(f"unknown up-sampling {upsampling!r}; choose one of {', '.join(UPSAMPLING_CHOICES)}")
    trained = method.upsampling_mode
    mode = trained if upsampling == AUTO else upsampling
    mismatch = None
    if mode != trained:
        mismatch = (f"this model was trained for {trained} up-sampling, not {mode}: expect a worse image "
                    f"(set upsampling to auto or {trained})")
    builtin_vae = False
    if mode == "pixel" and not have_vae:
        if method.source_vae != "taesd":
            raise MissingVAE("pixel up-sampling needs a VAE: connect the vae input (the VAE that made the "
                             "latent)" + (", or choose latent up-sampling" if trained != "pixel" else ""))
        builtin_vae = True
    step = method.noise_step if noise_step == MODEL_NOISE_STEP else int(noise_step)
    if shading_correction == HEAD_ONLY:
        if not method.shading_head:
            raise ValueError(f"shading_correction {HEAD_ONLY} runs the model's learned shading head alone, and "
                             "this model has none: use -1 (the model's own correction), 0 (off) or 1–"
                             f"{MAX_SHADING_PASSES} TAESD passes")
        head, passes = True, 0
    else:
        passes = check_shading_passes(method.shading_correction if shading_correction == MODEL_SHADING
                                      else shading_correction)
        head = method.shading_head and shading_correction != 0
    settings = UpscaleSettings(scale_factor=method.scale_factor, mode=mode,
                               noise_step=step, seed=seed, solver=solver or default_solver(method),
                               size_multiple=size_multiple, back_projection=method.back_projection,
                               source_decoder=method.source_decoder,
                               shading_correction=passes,
                               shading_head=head)
    return Resolved(settings, mismatch, builtin_vae)


def shading_label(settings: UpscaleSettings) -> str:
    """How an upscale's shading is corrected, for tables and logs: ", shading head", ", shading correction 1",
    both joined with " + ", or "" for none."""
    parts = (["shading head"] if settings.shading_head else []) + (
        [f"shading correction {settings.shading_correction}"] if settings.shading_correction else [])
    return ", " + " + ".join(parts) if parts else ""
