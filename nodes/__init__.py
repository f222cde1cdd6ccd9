"""ComfyUI nodes of the pack: thin glue over `models/` and `flow/`."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .comfy_model import register_model_folders
from .latent_upscale import CFMLatentUpscale
from .load_model import LoadCFMModel
from .solver_settings import CFMSolverSettings

register_model_folders()


class FMBoostExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadCFMModel, CFMLatentUpscale, CFMSolverSettings]
