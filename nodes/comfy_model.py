"""ComfyUI glue around the core: model folders, model management, the VAE adapter, progress/preview/cancel."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher
from comfy.patcher_extension import CallbacksMP
import comfy.utils
import folder_paths
import latent_preview

from ..flow import Progress
from ..flow.runtime import RuntimeOptions, cpu_dtype, prepare_network
from ..flow.tiling import DoesNotFit, bytes_per_pixel, is_out_of_memory, min_window, plan_run, round_down
from ..models import MethodSettings, UNetConfig

MODEL_FOLDERS = ("cfm", "latent_upscale_models")
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_DIR = os.path.join(PACK_DIR, "weights", "cfm")   # the models that come with the pack
DEFAULT_MODEL = "fmboost-sd15-x2.safetensors"


def register_model_folders() -> None:
    """Where CFM models are found, in this order (the first file of a name wins):

    1. `models/cfm` and any `cfm` paths of `extra_model_paths.yaml`;
    2. the pack's own `weights/cfm` (the shipped models: listed right after install, nothing copied);
    3. `models/latent_upscale_models` and its extra paths.

    `latent_upscale_models` is native in recent ComfyUI; `cfm` is ours. Either is added where it is missing."""
    exts = set(folder_paths.supported_pt_extensions)
    for name in MODEL_FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([default], exts)
            continue
        paths, known = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.insert(0, default)
        if not known:  # made by extra_model_paths.yaml before us: without extensions every file would be listed
            folder_paths.folder_names_and_paths[name] = (paths, exts)
    folder_paths.add_model_folder_path("cfm", SHIPPED_DIR)  # appended: after the user's own cfm folders


def list_checkpoints() -> list[str]:
    names = []
    for folder in MODEL_FOLDERS:
        for name in folder_paths.get_filename_list(folder):
            if name not in names:
                names.append(name)
    return names


def checkpoint_path(name: str) -> str:
    # Only names ComfyUI lists from the model folders: no absolute paths, no "..".
    if name not in list_checkpoints():
        raise FileNotFoundError(f"CFM model {name!r} is not in models/{' or models/'.join(MODEL_FOLDERS)}")
    for folder in MODEL_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(f"CFM model {name!r} is not in models/{' or models/'.join(MODEL_FOLDERS)}")


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]
    if device.type == "cpu":
        return cpu_dtype()
    if mm.should_use_bf16(device):
        return torch.bfloat16
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.float32


@dataclass
class CFMModel:
    """What `Load CFM Model` hands to `CFM Latent Upscale`."""
    name: str
    patcher: comfy.model_patcher.ModelPatcher
    net_config: UNetConfig
    method: MethodSettings
    dtype: torch.dtype
    runtime: RuntimeOptions = RuntimeOptions()
    _prepared: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def wrap(cls, name, network, net_config, method, dtype, runtime=RuntimeOptions()) -> "CFMModel":
        patcher = comfy.model_patcher.ModelPatcher(
            network, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        model = cls(name, patcher, net_config, method, dtype, runtime)
        # Unloaded by model management: drop the compiled graphs (CUDA graphs hold device memory of their own).
        patcher.add_callback(CallbacksMP.ON_DETACH, lambda *_: model.release_prepared())
        return model

    @property
    def shading_head(self):
        """The network's learned shading head (on the network's device), or None."""
        return getattr(self.patcher.model, "shading_head", None)

    def release_prepared(self) -> None:
        if self._prepared is not None and hasattr(self._prepared[1], "release"):
            self._prepared[1].release()
        self._prepared = None

    def load(self, batch: int, height: int, width: int, tile: int = 0) -> "RunPlan":
        """Load to the device and plan the run: how many items go through the network together and, when one
        item's activations do not fit, the window size.

        The network is small next to its activations, so it is always loaded whole, asking model management
        only for the least working memory the run can fall back to (one smallest window, or one of the user's
        windows). Asking for the whole untiled run, as this once did, made ComfyUI on NVIDIA keep the weights
        on the CPU whenever that figure exceeded free VRAM: exactly the runs tiling exists for. Other models
        are then unloaded, as far as needed and possible, to give the whole run room; the plan fits what is
        free after that."""
        per_pixel = bytes_per_pixel(self.net_config.model_channels, self.dtype)
        device = self.patcher.load_device
        side = round_down(tile, self.net_config.size_multiple) if tile else self.min_tile
        least = per_pixel * min(side, height) * min(side, width)
        whole = (least if tile else per_pixel * height * width) * batch
        mm.load_models_gpu([self.patcher], memory_required=least, force_full_load=True)
        if whole > least and device != torch.device("cpu"):
            mm.free_memory(whole + mm.extra_reserved_memory(), device,
                           keep_loaded=[m for m in mm.current_loaded_models if m.model is self.patcher])
        free = mm.get_free_memory(device)
        try:
            max_batch, tile = plan_run(per_pixel, batch, height, width, int(0.9 * free),
                                       self.net_config.size_multiple, self.min_tile, tile)
        except DoesNotFit as e:
            raise MemoryError(f"{e} on {device}: close other models or use a smaller CFM model") from None
        return RunPlan(self.network(device), device, max_batch, tile)

    @property
    def min_tile(self) -> int:
        return min_window(self.net_config.size_multiple)

    def network(self, device):
        """The loaded network, prepared for `device` (precision layout, optional compilation) once per device."""
        key = (str(device), self.runtime)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, prepare_network(self.patcher.model, torch.device(device), self.runtime))
        return self._prepared[1]


@dataclass
class RunPlan:
    network: object
    device: torch.device
    max_batch: int
    tile: int | None      # None: the whole latent in one window


class ComfyVAE:
    """ComfyUI's VAE (BHWC pixels in [0, 1]) seen through the core's `PixelVAE` protocol (BCHW)."""

    def __init__(self, vae):
        self.vae = vae

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        pixels = self.vae.decode(latent)
        # A real image VAE gives RGB larger than the latent; video VAEs give 5-D, "pixel_space" the latent itself.
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] <= latent.shape[-2]:
            raise ValueError(
                f"the VAE does not fit this model: it decoded a {tuple(pixels.shape)} tensor from a "
                f"{tuple(latent.shape)} latent; pixel mode needs the SD1.x VAE (or TAESD) that made the latent")
        return pixels.movedim(-1, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.clamp(0, 1).movedim(1, -1))


_TAESD = {}


def builtin_taesd(device, dtype=torch.float32):
    """The pack's own TAESD (weights/taesd, MIT) on `device` in the CFM model's precision, for pixel-mode
    sources when no VAE is connected. Small (2.4 M parameters), so it is kept outside ComfyUI's model
    management."""
    from ..models.taesd import TAESD
    key = (str(device), dtype)
    if key not in _TAESD:
        _TAESD.clear()
        _TAESD[key] = TAESD.from_folder(os.path.join(PACK_DIR, "weights", "taesd")).to(device).set_precision(dtype)
    return _TAESD[key]


def preview_latent(latent: torch.Tensor) -> torch.Tensor:
    """What a preview decodes: the predicted latent area-averaged down to ComfyUI's preview size (`--preview-size`,
    512 px by default), not the full output. A preview of a 2048² px upscale then costs what a 512² one does,
    so it can never be what runs the device out of memory."""
    from comfy.cli_args import args
    limit = max(1, int(getattr(args, "preview_size", 512) or 512) // 8)
    h, w = latent.shape[-2:]
    if max(h, w) > limit:
        scale = limit / max(h, w)
        latent = torch.nn.functional.interpolate(latent.float(), size=(max(1, round(h * scale)),
                                                                        max(1, round(w * scale))), mode="area")
    return latent.float()


class ProgressReporter:
    """Progress bar per network evaluation, latent previews when enabled, and Cancel checked every evaluation."""

    def __init__(self, device, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        # The network's latents are scaled SD1.x latents: what ComfyUI's SD1.5 previewers expect.
        self.previewer = latent_preview.get_previewer(device, comfy.latent_formats.SD15())

    def __call__(self, progress: Progress) -> None:
        mm.throw_exception_if_processing_interrupted()
        preview = None
        if self.previewer is not None:
            try:
                latent = preview_latent(progress.preview(rows=1))
                preview = self.previewer.decode_latent_to_preview_image("JPEG", latent)
            except Exception as error:  # noqa: BLE001 - only out-of-memory is handled, anything else is raised
                if not is_out_of_memory(error):
                    raise
                # A preview is not worth the run: it must not count as the network's out-of-memory either,
                # which would shrink the windows for nothing.
                self.previewer = None
                logging.warning("CFM Latent Upscale: out of memory while decoding a preview; previews are off "
                                "for the rest of this upscale")
        self.bar.update_absolute(progress.nfe, progress.planned, preview)
