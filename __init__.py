"""FMBoost: Coupling Flow Matching latent upscaling for ComfyUI (Schusterbauer et al., ECCV 2024).

Registration only. The nodes (and with them ComfyUI) are imported when ComfyUI calls the entry point, so
the pure-torch core in `models/` and `flow/` imports without ComfyUI.
"""
WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes import FMBoostExtension
    return FMBoostExtension()
