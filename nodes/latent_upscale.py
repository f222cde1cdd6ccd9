from __future__ import annotations

import logging
import time

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..flow import EvaluationBudgetExceeded, InputError, upscale
from ..flow.pipeline import build_source, check_latent
from ..flow.settings import (AUTO, HEAD_ONLY, MAX_SHADING_PASSES, MODEL_NOISE_STEP, MODEL_SHADING,
                             UPSAMPLING_CHOICES, resolve)
from ..flow.source import DecodeOnce, upsample_mask
from ..flow.tiling import run_with_smaller_tiles
from .comfy_model import CFMModel, ComfyVAE, ProgressReporter, builtin_taesd
from .socket_types import CFMModelType, CFMSolverType


class CFMLatentUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMBoostLatentUpscale",
            display_name="CFM Latent Upscale",
            category="FMBoost",
            description="Doubles a latent's height and width (4× the pixels) with Coupling Flow Matching: the "
                        "bilinear-upsampled latent is noised a little and carried to a sharp high-resolution "
                        "latent by the flow model. Feed the result to VAE Decode, or to another CFM Latent "
                        "Upscale for 4×.",
            inputs=[
                io.Custom(CFMModelType).Input("cfm_model", tooltip="From Load CFM Model."),
                io.Latent.Input("samples", tooltip="An SD1.x/LCM latent, e.g. a KSampler's output or VAE Encode."),
                io.Int.Input("noise_augmentation", default=MODEL_NOISE_STEP, min=MODEL_NOISE_STEP, max=999,
                             tooltip="Step (0–999) of the forward diffusion used to noise the upsampled source "
                                     "before the flow. Higher: more invented detail, less faithful; 0: none. "
                                     "-1: the step the model recommends (325 for the shipped model; 450 gives "
                                     "it about the photos' amount of detail; the authors' models recommend 400). "
                                     "For a cascade (two ×2 in a row), 100 in both: the second starts from "
                                     "the first one's texture and magnifies it."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the augmentation noise. Item i of a batch uses seed + its "
                                     "batch index, like ComfyUI's samplers."),
                io.Combo.Input("upsampling", options=list(UPSAMPLING_CHOICES), default=AUTO,
                               tooltip="How the source is brought to the high-res grid. auto: the way the model "
                                       "was trained (recommended). latent: bilinear ×2 of the latent. pixel: VAE "
                                       "decode → ×2 → VAE encode. A mode the model was not trained for runs, "
                                       "with a warning: expect a worse image."),
                io.Custom(CFMSolverType).Input("solver", optional=True,
                                               tooltip="From CFM Solver Settings. Unconnected: the solver the "
                                                       "model recommends (its metadata; the shipped model: "
                                                       "euler, 2 steps)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="For pixel up-sampling: the VAE that made the latent (SD1.x, or TAESD). "
                                     "Unconnected: models trained on TAESD sources (the shipped ones) use the "
                                     "pack's own TAESD; other pixel-mode models ask for it."),
                io.Int.Input("tile_size", default=0, min=0, max=4096, step=8, optional=True,
                             tooltip="0: automatic: the whole latent at once when it fits in free memory, else "
                                     "the largest windows that fit (and smaller ones after an out-of-memory). "
                                     "Otherwise: run the network on overlapping windows of at most this many "
                                     "output latent pixels (8 pixels each), blended across their overlaps."),
                io.Int.Input("shading_correction", default=MODEL_SHADING, min=HEAD_ONLY,
                             max=MAX_SHADING_PASSES, optional=True,
                             tooltip="Pulls the result's large-scale shading and colour back to the low-res "
                                     "image's (a 2-pixel blur of it, bicubic ×2), leaving the detail: fixes "
                                     "colour casts and brightness drift. -1: the model's own correction (the "
                                     "shipped model: its learned shading head, then 1 TAESD pass). 1–4: the "
                                     "model's head, if it has one, then that many TAESD passes; each decodes "
                                     "the result with the pack's TAESD and moves the latent by the pixel "
                                     "change, through a small learned model of TAESD's encoder (milliseconds "
                                     "on a GPU, about a second at 1024² on a CPU). -2: the head alone, no pass "
                                     "(fastest on a CPU; a little less faithful colour). 0: off."),
            ],
            outputs=[io.Latent.Output(tooltip="The latent at twice the height and width.")],
        )

    @classmethod
    def execute(cls, cfm_model: CFMModel, samples, noise_augmentation, seed, upsampling, solver=None,
                vae=None, tile_size=0, shading_correction=MODEL_SHADING) -> io.NodeOutput:
        latent = samples["samples"]
        try:
            resolved = resolve(cfm_model.method, size_multiple=cfm_model.net_config.size_multiple,
                               upsampling=upsampling, noise_step=noise_augmentation, seed=seed, solver=solver,
                               have_vae=vae is not None, shading_correction=shading_correction)
        except ValueError as e:  # MissingVAE, or a value out of range
            raise ValueError(f"CFM Latent Upscale: {e}") from None
        settings, solver = resolved.settings, resolved.settings.solver
        if resolved.mismatch:
            logging.warning("CFM Latent Upscale (%s): %s", cfm_model.name, resolved.mismatch)
        started = time.perf_counter()
        try:
            # Bad input is reported before the model is moved to the device or any memory is taken.
            check_latent(latent, cfm_model.net_config.latent_channels)
            batch, height, width = latent.shape[0], latent.shape[-2] * 2, latent.shape[-1] * 2
            device = cfm_model.patcher.load_device
            pixel_vae = ComfyVAE(vae) if vae is not None else None
            # The shading is compared with the pack's TAESD whatever VAE built the source: a few TAESD passes
            # cost what one SD VAE decode of the result would. When the TAESD builds the source too, the
            # low-res latent's decode serves both (DecodeOnce).
            needed = resolved.builtin_vae or settings.shading_correction
            taesd = DecodeOnce(builtin_taesd(device, cfm_model.dtype)) if needed else None
            if resolved.builtin_vae:
                pixel_vae = taesd
            shading_vae = taesd if settings.shading_correction else None
            # The source first: a connected VAE's own load may unload other models, and must not unload ours
            # between its load and the last evaluation. Built once, it also serves every out-of-memory retry.
            with torch.inference_mode():
                source = build_source(latent, settings, pixel_vae, device)
            plan = cfm_model.load(batch, height, width, tile=tile_size)
            reporter = ProgressReporter(plan.device, solver.planned_evals())
            windows = []

            def run(tile):
                windows.append(tile)
                with torch.inference_mode():
                    return upscale(plan.network, latent, settings, source=source,
                                   batch_index=samples.get("batch_index"),
                                   latent_channels=cfm_model.net_config.latent_channels, on_progress=reporter,
                                   device=plan.device, max_batch=plan.max_batch, tile=tile,
                                   before_window=mm.throw_exception_if_processing_interrupted,
                                   shading_vae=shading_vae, shading_head=cfm_model.shading_head)

            out = run_with_smaller_tiles(run, plan.tile, max(height, width), cfm_model.net_config.size_multiple,
                                         cfm_model.min_tile, on_oom=mm.soft_empty_cache,
                                         on_retry=lambda tile: logging.warning(
                                             "CFM Latent Upscale: out of memory; retrying in %d×%d windows",
                                             tile, tile))
        except (InputError, EvaluationBudgetExceeded, ValueError, MemoryError) as e:
            raise ValueError(f"CFM Latent Upscale: {e}") from None
        except mm.OOM_EXCEPTION:
            oom = True
        else:
            oom = False
        if oom:  # raised outside the handler, so the failed run's tensors can be freed first
            mm.soft_empty_cache()
            raise MemoryError("CFM Latent Upscale: the device ran out of memory even in the smallest windows; "
                              "upscale a smaller batch or close other models")
        result = {k: v for k, v in samples.items() if k not in ("samples", "noise_mask")}
        result["samples"] = out.to(mm.intermediate_device())
        if samples.get("noise_mask") is not None:
            result["noise_mask"] = upsample_mask(samples["noise_mask"])
        seconds = time.perf_counter() - started
        info = {"input": list(latent.shape), "output": list(result["samples"].shape), "seconds": round(seconds, 3),
                "evaluations": reporter.bar.current, "upsampling": settings.mode,
                "noise_augmentation": settings.noise_step, "solver": f"{solver.method} {solver.steps}",
                "shading_correction": settings.shading_correction, "shading_head": settings.shading_head,
                # The memory plan, which free memory decides when tile_size is 0. Windows change the image
                # within invisible distance (tested); the items per call leave it unchanged on the CPU (tested),
                # while a GPU may pick other kernels for another batch size and differ in the last bits.
                "plan": {"window": windows[-1] or "whole", "items_per_call": plan.max_batch}}
        if resolved.mismatch:
            info["warning"] = resolved.mismatch
        return io.NodeOutput(result, ui={"fmboost": [info]})
