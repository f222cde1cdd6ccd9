from __future__ import annotations

from comfy_api.latest import io

from ..flow.runtime import COMPILE_MODES, RuntimeOptions
from ..models import CheckpointError, load_checkpoint
from .comfy_model import DEFAULT_MODEL, CFMModel, checkpoint_path, list_checkpoints, pick_dtype
from .socket_types import CFMModelType

import comfy.model_management as mm


class LoadCFMModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        names = list_checkpoints()
        return io.Schema(
            node_id="FMBoostLoadCFMModel",
            display_name="Load CFM Model",
            category="FMBoost",
            description="Loads a Coupling Flow Matching upscaler from models/cfm or models/latent_upscale_models. "
                        "Reads FMBoost .safetensors, the authors' Lightning .ckpt (safely: no code from the file "
                        "runs) and bare state dicts.",
            inputs=[
                io.Combo.Input("ckpt_name", options=names,
                               default=DEFAULT_MODEL if DEFAULT_MODEL in names else None,
                               tooltip="CFM checkpoint: the pack's shipped models (weights/cfm) and your own in "
                                       "models/cfm or models/latent_upscale_models."),
                io.Combo.Input("weight_dtype", options=["auto", "fp32", "fp16", "bf16"], default="auto",
                               tooltip="Precision of the weights on the device (and of the pack's TAESD when it "
                                       "builds the source). auto: bf16 or fp16 on a GPU that supports it; on the "
                                       "CPU bf16 where it has bf16 instructions (about 2× faster), else fp32."),
                io.Combo.Input("weights", options=["ema", "online"], default="ema",
                               tooltip="For the authors' training checkpoints: the EMA weights (usually better) "
                                       "or the online weights. Other files hold one set and ignore this."),
                io.Combo.Input("compile", options=list(COMPILE_MODES), default="off", optional=True,
                               tooltip="torch.compile the network: faster evaluations after a slow first run "
                                       "(and one more slow run per new latent size, up to 8 sizes; later sizes "
                                       "run uncompiled, with a warning in the log). compile+cudagraphs also "
                                       "replays CUDA graphs (CUDA only, up to 4 sizes; best for fixed-step "
                                       "solvers and sizes). Compiled graphs are dropped when the model unloads."),
            ],
            outputs=[io.Custom(CFMModelType).Output(display_name="cfm_model")],
        )

    @classmethod
    def execute(cls, ckpt_name, weight_dtype, weights, compile="off") -> io.NodeOutput:
        path = checkpoint_path(ckpt_name)
        try:
            ckpt = load_checkpoint(path, weights=weights)
            dtype = pick_dtype(weight_dtype, mm.get_torch_device())
            network = ckpt.build_network(dtype)
        except CheckpointError as e:
            raise ValueError(f"Load CFM Model: {e}") from None
        return io.NodeOutput(CFMModel.wrap(ckpt_name, network, ckpt.net_config, ckpt.method, dtype,
                                           RuntimeOptions(compile=compile)))
