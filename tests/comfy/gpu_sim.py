"""Run the pack's nodes in-process under ComfyUI's real `comfy.model_management`, forced into its NVIDIA branch on
this CPU, with a controlled free-memory figure. Used by test_gpu_memory.py, one process per scenario:

    python gpu_sim.py <ComfyUI folder> <scenario> <pack folder>

The "GPU" is `torch.device("cpu", 0)`: tensors on it are ordinary CPU tensors, so everything runs, but model
management treats it as a separate CUDA-like device (it is not equal to `cpu`): it frees memory on it, loads
models to it partially in low-VRAM mode when its budget says so, and unloads them. Where every parameter lives is
ComfyUI's own bookkeeping (`LoadedModel`, `model_lowvram`, `loaded_size`), checked before every evaluation of the
network by a forward pre-hook. Prints one JSON object: what happened.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

GiB = 2 ** 30


def main():
    root, scenario, pack = (os.path.abspath(a) for a in sys.argv[1:4])
    scenario = sys.argv[2]
    sys.path.insert(0, root)
    os.chdir(root)
    import torch
    from comfy.cli_args import args
    args.cpu = True  # no CUDA here: model management starts as --cpu; its device-level branch is changed below
    import comfy.model_management as mm

    fake = torch.device("cpu", 0)
    state = {"free": 6 * GiB, "fixed": False}
    real_is_cpu, real_free = mm.is_device_cpu, mm.get_free_memory

    def is_device_cpu(device):
        return False if device == fake else real_is_cpu(device)

    def get_free_memory(dev=None, torch_free_too=False):
        dev = fake if dev is None else dev
        if dev != fake:
            return real_free(dev, torch_free_too)
        used = 0 if state["fixed"] else sum(m.model_loaded_memory() for m in mm.current_loaded_models
                                            if m.device == fake)
        free = max(0, state["free"] - used)
        return (free, 0) if torch_free_too else free

    # The NVIDIA branch: a CUDA-like device in normal-VRAM mode, no minimum share of free memory for weights.
    mm.is_device_cpu = is_device_cpu
    mm.get_free_memory = get_free_memory
    mm.get_torch_device = lambda: fake
    mm.vram_state = mm.VRAMState.NORMAL_VRAM
    mm.MIN_WEIGHT_MEMORY_RATIO = 0.0

    spec = importlib.util.spec_from_file_location("fmboost_sim", os.path.join(pack, "__init__.py"),
                                                  submodule_search_locations=[pack])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmboost_sim"] = module
    spec.loader.exec_module(module)
    from fmboost_sim.nodes.latent_upscale import CFMLatentUpscale
    from fmboost_sim.nodes.load_model import LoadCFMModel

    cfm = LoadCFMModel.execute("fmboost-sd15-x2.safetensors", "fp32", "ema").result[0]
    patcher = cfm.patcher
    report = {"evaluations": 0, "problems": []}

    def check(module, args):
        report["evaluations"] += 1
        loaded = [m for m in mm.current_loaded_models if m.model is patcher]
        if not loaded:
            report["problems"].append(f"evaluation {report['evaluations']}: the CFM model is not loaded")
        elif patcher.model.model_lowvram or patcher.loaded_size() < patcher.model_size():
            report["problems"].append(
                f"evaluation {report['evaluations']}: {patcher.loaded_size()} of {patcher.model_size()} bytes "
                f"of the CFM model on {fake} (low-VRAM load: {patcher.model.model_lowvram})")
        window = args[0].shape[-2:]
        report.setdefault("windows", set()).add(tuple(window))
    patcher.model.register_forward_pre_hook(check)

    inputs = {"noise_augmentation": -1, "seed": 0, "upsampling": "auto"}
    vae = None
    if scenario == "tiled":
        # A 192² latent out (1536² px) on 1 GiB free: the untiled run needs 2.25 GiB; windows fit.
        latent, state["free"] = torch.randn(1, 4, 96, 96), 1 * GiB
    elif scenario == "tile_size":
        latent, state["free"] = torch.randn(1, 4, 96, 96), 1 * GiB
        inputs["tile_size"] = 64
    elif scenario == "oom":
        # The planned windows run out of memory on the device (as when another process took memory after the
        # plan): the node retries in smaller windows, with the model still loaded whole.
        latent, state["free"] = torch.randn(1, 4, 96, 96), 1 * GiB

        def out_of_memory(module, args):
            if args[0].shape[-1] > 64:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        patcher.model.register_forward_pre_hook(out_of_memory)
    elif scenario == "preview_oom":
        # Previews on; the previewer runs out of memory on its second call. Its latents are recorded.
        import latent_preview
        real_get = latent_preview.get_previewer

        def get_previewer(device, latent_format):
            previewer = real_get(device, latent_format)
            real_decode = previewer.decode_latent_to_preview_image

            def decode(fmt, x0):
                report.setdefault("previews", []).append(list(x0.shape))
                if len(report["previews"]) == 2:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated, in the preview)")
                return real_decode(fmt, x0)
            previewer.decode_latent_to_preview_image = decode
            return previewer
        latent_preview.get_previewer = get_previewer
        from comfy.cli_args import LatentPreviewMethod
        args.preview_method = LatentPreviewMethod.Latent2RGB
        latent, state["free"] = torch.randn(1, 4, 96, 96), 1 * GiB
    elif scenario == "pixel_vae":
        # A connected VAE whose load has to unload everything else: free memory is a fixed small figure.
        import comfy.sd
        from safetensors.torch import load_file
        sd = {}
        for part in ("encoder", "decoder"):
            sd.update({f"taesd_{part}.{k}": v for k, v in
                       load_file(os.path.join(pack, "weights", "taesd", f"taesd_{part}.safetensors")).items()})
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
        vae = comfy.sd.VAE(sd=sd)
        latent, state["free"], state["fixed"] = torch.randn(1, 4, 32, 32), GiB // 2, True
        inputs["upsampling"] = "pixel"
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    if vae is not None:
        inputs["vae"] = vae
    out = CFMLatentUpscale.execute(cfm, {"samples": latent}, **inputs)
    result = out.result[0]["samples"]
    info = out.ui["fmboost"][0]
    report.update(shape=list(result.shape), finite=bool(torch.isfinite(result).all()), plan=info.get("plan"),
                  windows=sorted(report.get("windows", [])), loaded_after=bool(
                      [m for m in mm.current_loaded_models if m.model is patcher]))
    held = cfm._prepared is not None
    mm.unload_all_models()
    report["prepared_dropped_on_unload"] = held and cfm._prepared is None
    print("SIM " + json.dumps(report))


if __name__ == "__main__":
    main()
