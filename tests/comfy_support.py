"""Helpers for the server tests: models the tests make, prompt builders, reading outputs."""
from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from support import FIXTURES, REPO, SHARED
from fmboost.models import MethodSettings, UNetConfig, save_checkpoint
from fmboost.models.unet import CFMUNet

TINY = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2,),
                  num_heads=2, dim_head=16)
TINY_METHOD = MethodSettings(noise_step=300, upsampling_mode="latent", low_res=16, high_res=32)
# a model trained on back-projected pixel sources built by the pack's TAESD (like the shipped one)
BACK_PROJECTED_METHOD = MethodSettings(noise_step=300, upsampling_mode="pixel", source_vae="taesd",
                                       back_projection=0.75, low_res=16, high_res=32)
FIDELITY_SOURCE_METHOD = MethodSettings(noise_step=300, upsampling_mode="pixel", source_vae="taesd",
                                        source_decoder="fidelity", low_res=16, high_res=32)


class RunsCodeIfUnpickled:
    """A pickle payload that would create a file if anything ever unpickled it with code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_state(seed=0, zero_velocity=False):
    torch.manual_seed(seed)
    net = CFMUNet(TINY)
    if zero_velocity:
        torch.nn.init.zeros_(net.out[2].weight)
        torch.nn.init.zeros_(net.out[2].bias)
    return net.state_dict()


def make_models(models_dir):
    cfm = models_dir / "cfm"
    save_checkpoint(cfm / "tiny.safetensors", tiny_state(), TINY, TINY_METHOD, dtype=None)
    save_checkpoint(cfm / "zero.safetensors", tiny_state(zero_velocity=True), TINY, TINY_METHOD, dtype=None)
    save_checkpoint(cfm / "zero_back_projected.safetensors", tiny_state(zero_velocity=True), TINY,
                    BACK_PROJECTED_METHOD, dtype=None)
    save_checkpoint(cfm / "zero_fidelity_source.safetensors", tiny_state(zero_velocity=True), TINY,
                    FIDELITY_SOURCE_METHOD, dtype=None)
    copy_shared(FIXTURES / "small_checkpoint_lightning.ckpt", cfm / "authors_small.ckpt")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
              cfm / "not_cfm.safetensors")
    (cfm / "truncated.safetensors").write_bytes((cfm / "tiny.safetensors").read_bytes()[:5000])
    # broken and hostile checkpoints
    copy_shared(SHARED / "weights" / "sd-latent-upscaler-city96" / "latent-upscaler-v2.1_SDv1-x2.0.safetensors",
                cfm / "other_architecture.safetensors")
    state = tiny_state()
    state.pop("middle_block.0.in_layers.2.weight")
    state["extra.weight"] = torch.zeros(1)
    save_checkpoint(cfm / "wrong_keys.safetensors", state, TINY, TINY_METHOD, dtype=None)
    save_file(tiny_state(), cfm / "bad_metadata.safetensors",
              metadata={"fmboost.format": "fmboost-cfm", "fmboost.net_config": '{"model_channels": "many"'})
    torch.save({"state_dict": {f"model.net.{k}": v for k, v in tiny_state().items()},
                "payload": RunsCodeIfUnpickled(str(models_dir.parent / "PWNED"))}, cfm / "hostile.ckpt")
    # the authors' bare state dict, in the other model folder, with its architecture in a sidecar json
    upscalers = models_dir / "latent_upscale_models"
    upscalers.mkdir(parents=True, exist_ok=True)
    copy_shared(FIXTURES / "small_net.safetensors", upscalers / "authors_small_net.safetensors")
    copy_shared(FIXTURES / "small_config.json", upscalers / "authors_small_net.json")
    # the example workflows' model names; the SD ones are empty files, enough for validation only
    shutil.copy(cfm / "tiny.safetensors", cfm / "fmboost-sd15-x2.safetensors")
    for folder, name in (("checkpoints", "v1-5-pruned-emaonly.safetensors"),
                         ("loras", "lcm-lora-sdv1-5.safetensors")):
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
        (models_dir / folder / name).write_bytes(b"")
    for part in ("encoder", "decoder"):
        shutil.copy(REPO / "weights" / "taesd" / f"taesd_{part}.safetensors", models_dir / "vae_approx")


def copy_shared(src, dst):
    """Copies a file from ../shared when there is one; the tests that use it call require_shared themselves."""
    if src.exists():
        shutil.copy(src, dst)


def make_example_image(path, size=(96, 64)):
    """A smooth test image with some structure (what LoadImage in the example workflow reads)."""
    import numpy as np
    from PIL import Image
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x + y) / 2], -1)
    Image.fromarray((rgb * 255).astype("uint8")).save(path)


def read_latent(path) -> torch.Tensor:
    data = load_file(path)
    assert "latent_format_version_0" in data  # SaveLatent stores raw latents
    return data["latent_tensor"]


def upscale_prompt(latent_name, ckpt="tiny.safetensors", *, seed=0, noise=-1, mode="latent", solver=None,
                   vae=None, weights="ema", dtype="fp32", tile_size=None, compile=None):
    prompt = {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": latent_name}},
        "2": {"class_type": "FMBoostLoadCFMModel",
              "inputs": {"ckpt_name": ckpt, "weight_dtype": dtype, "weights": weights}},
        "3": {"class_type": "FMBoostLatentUpscale",
              "inputs": {"cfm_model": ["2", 0], "samples": ["1", 0], "noise_augmentation": noise, "seed": seed,
                         "upsampling": mode}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "latents/cfm"}},
    }
    if tile_size is not None:
        prompt["3"]["inputs"]["tile_size"] = tile_size
    if compile is not None:
        prompt["2"]["inputs"]["compile"] = compile
    if solver is not None:
        prompt["5"] = {"class_type": "FMBoostSolverSettings", "inputs": solver}
        prompt["3"]["inputs"]["solver"] = ["5", 0]
    if vae is not None:
        prompt["6"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
        prompt["3"]["inputs"]["vae"] = ["6", 0]
    return prompt


def solver(method="euler", steps=8, atol=1e-5, rtol=1e-3, max_evals=200):
    return {"method": method, "steps": steps, "atol": atol, "rtol": rtol, "max_evals": max_evals}


def cfm_stage(workflow: dict, image: str):
    """The workflow's CFM configuration, exactly as it is (Load CFM Model, Solver Settings, every CFM Latent
    Upscale of its chain), fed by a photo (Load Image → VAE Encode, TAESD) in place of the KSampler; its VAE
    input, if any, is TAESD too. Returns the prompt, the output node and the number of ×2 stages."""
    ups = {k: v for k, v in workflow.items() if v["class_type"] == "FMBoostLatentUpscale"}
    chain = [next(k for k, v in ups.items() if v["inputs"]["samples"][0] not in ups)]
    while nxt := next((k for k, v in ups.items() if v["inputs"]["samples"][0] == chain[-1]), None):
        chain.append(nxt)
    prompt = {
        "photo": {"class_type": "LoadImage", "inputs": {"image": image}},
        "taesd": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["photo", 0], "vae": ["taesd", 0]}},
    }
    for key in chain:
        inputs = dict(workflow[key]["inputs"])
        for name, value in list(inputs.items()):
            if not isinstance(value, list):
                continue
            src = workflow[value[0]]
            if name == "samples":
                inputs[name] = ["encode", 0] if key == chain[0] else [f"w{value[0]}", 0]
            elif name == "vae":
                inputs[name] = ["taesd", 0]
            else:
                assert src["class_type"].startswith("FMBoost"), (name, src["class_type"])
                prompt[f"w{value[0]}"] = {"class_type": src["class_type"], "inputs": src["inputs"]}
                inputs[name] = [f"w{value[0]}", 0]
        prompt[f"w{key}"] = {"class_type": "FMBoostLatentUpscale", "inputs": inputs}
    prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"w{chain[-1]}", 0], "vae": ["taesd", 0]}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "wf"}}
    prompt["bilinear"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["encode", 0],
                                                                      "upscale_method": "bilinear",
                                                                      "scale_by": float(2 ** len(chain))}}
    prompt["decode_b"] = {"class_type": "VAEDecode", "inputs": {"samples": ["bilinear", 0], "vae": ["taesd", 0]}}
    prompt["save_b"] = {"class_type": "SaveImage", "inputs": {"images": ["decode_b", 0], "filename_prefix": "b"}}
    return prompt, len(chain)
