#!/usr/bin/env python3
"""Writes the example workflows: UI format (drag-and-drop, template browser) in workflows/, and an API-format
copy of each (for POST /prompt scripting) in workflows/api/. One description per graph, both formats from it.

    python scripts/build_workflows.py
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "workflows"

SD15 = "v1-5-pruned-emaonly.safetensors"
LCM_LORA = "lcm-lora-sdv1-5.safetensors"
CFM = "fmboost-sd15-x2.safetensors"
EXAMPLE_IMAGE = "fmboost_example.png"

# Socket inputs (name, type), widget names (in order; "+control" marks control_after_generate), outputs.
SPECS = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], ["lora_name", "strength_model", "strength_clip"],
                   [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "ModelSamplingDiscrete": ([("model", "MODEL")], ["sampling", "zsnr"], [("MODEL", "MODEL")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed+control", "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")]),
    "VAELoader": ([], ["vae_name"], [("VAE", "VAE")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [], [("LATENT", "LATENT")]),
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "FMBoostLoadCFMModel": ([], ["ckpt_name", "weight_dtype", "weights", "compile"], [("cfm_model", "CFM_MODEL")]),
    "FMBoostSolverSettings": ([], ["method", "steps", "atol", "rtol", "max_evals"], [("solver", "CFM_SOLVER")]),
    "FMBoostLatentUpscale": ([("cfm_model", "CFM_MODEL"), ("samples", "LATENT"), ("solver", "CFM_SOLVER"),
                              ("vae", "VAE")],
                             ["noise_augmentation", "seed+control", "upsampling", "tile_size", "shading_correction"],
                             [("LATENT", "LATENT")]),
}
UI_ONLY_WIDGETS = {"upload"}  # frontend-only widgets: in widgets_values, not in the API prompt
OPTIONAL_DEFAULTS = {"compile": "off", "tile_size": 0, "shading_correction": -1}  # optional widgets a graph need not spell out


@dataclass
class Node:
    id: int
    type: str
    widgets: dict
    links: dict = field(default_factory=dict)   # input name -> (Node, output index)
    pos: tuple = (0, 0)
    title: str | None = None

    def value(self, widget: str):
        return self.widgets[widget] if widget in self.widgets else OPTIONAL_DEFAULTS[widget]


class Graph:
    def __init__(self, name: str, description: str):
        self.name, self.description = name, description
        self.nodes: list[Node] = []

    def add(self, type_, col, row, title=None, **kw) -> Node:
        inputs = {n for n, _ in SPECS[type_][0]}
        links = {k: v for k, v in kw.items() if k in inputs}
        widgets = {k: v for k, v in kw.items() if k not in inputs}
        node = Node(len(self.nodes) + 1, type_, widgets, links, (60 + col * 340, 60 + row * 220), title)
        self.nodes.append(node)
        return node

    # ------------------------------------------------------------------------------------------ API
    def api(self) -> dict:
        prompt = {}
        for n in self.nodes:
            inputs = {}
            for w in SPECS[n.type][1]:
                name = w.split("+")[0]
                if name not in UI_ONLY_WIDGETS:
                    inputs[name] = n.value(name)
            for name, (src, slot) in n.links.items():
                inputs[name] = [str(src.id), slot]
            prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
        return prompt

    # ------------------------------------------------------------------------------------------- UI
    def ui(self) -> dict:
        links, nodes = [], []
        out_links: dict[tuple[int, int], list[int]] = {}
        for n in self.nodes:
            for name, (src, slot) in n.links.items():
                link_id = len(links) + 1
                in_slot = [i for i, _ in SPECS[n.type][0]].index(name)
                links.append([link_id, src.id, slot, n.id, in_slot, SPECS[src.type][2][slot][1]])
                out_links.setdefault((src.id, slot), []).append(link_id)
        link_by_target = {(l[3], l[4]): l[0] for l in links}
        for order, n in enumerate(self.nodes):
            sockets, widget_names, outputs = SPECS[n.type]
            values = []
            for w in widget_names:
                name = w.split("+")[0]
                values.append(n.value(name))
                if w.endswith("+control"):
                    values.append(n.widgets.get("control_after_generate", "fixed"))
            node = {
                "id": n.id, "type": n.type, "pos": list(n.pos), "size": [300, 60 + 26 * (len(values) + len(sockets))],
                "flags": {}, "order": order, "mode": 0,
                "inputs": [{"name": name, "type": typ, "link": link_by_target.get((n.id, i))}
                           for i, (name, typ) in enumerate(sockets)],
                "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, i), []), "slot_index": i}
                            for i, (name, typ) in enumerate(outputs)],
                "properties": {"Node name for S&R": n.type},
                "widgets_values": values,
            }
            if n.title:
                node["title"] = n.title
            nodes.append(node)
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "version": 0.4,
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "fmboost": {"description": self.description}},
        }


def txt2img(g: Graph, ckpt_out, clip_out, width=512, height=512, steps=20, cfg=7.0, sampler="euler",
            scheduler="normal", model_out=None, col=1):
    pos = g.add("CLIPTextEncode", col, 0, "Positive", clip=clip_out,
                text="a lighthouse on a rocky coast at sunset, detailed photograph")
    neg = g.add("CLIPTextEncode", col, 1, "Negative", clip=clip_out, text="blurry, lowres, watermark")
    empty = g.add("EmptyLatentImage", col, 2, width=width, height=height, batch_size=1)
    return g.add("KSampler", col + 1, 0, model=model_out or (ckpt_out, 0), positive=(pos, 0), negative=(neg, 0),
                 latent_image=(empty, 0), seed=42, control_after_generate="fixed", steps=steps, cfg=cfg,
                 sampler_name=sampler, scheduler=scheduler, denoise=1.0)


def cfm_upscale(g: Graph, cfm_model, samples, col, row=0, vae=None, mode="auto", solver=None, seed=0,
                noise_step=-1):
    links = {"cfm_model": (cfm_model, 0), "samples": (samples, 0)}
    if solver is not None:
        links["solver"] = (solver, 0)
    if vae is not None:
        links["vae"] = vae
    return g.add("FMBoostLatentUpscale", col, row, noise_augmentation=noise_step, seed=seed,
                 control_after_generate="fixed", upsampling=mode, **links)


def build() -> list[Graph]:
    graphs = []

    g = Graph('SD1.5 text to image at 512 px, then CFM upscale to 1024 px', "SD1.5 text-to-image at 512², then CFM to 1024².")
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, ckpt_name=SD15)
    sampler = txt2img(g, ckpt, (ckpt, 1))
    cfm = g.add("FMBoostLoadCFMModel", 2, 1, ckpt_name=CFM, weight_dtype="auto", weights="ema")
    up = cfm_upscale(g, cfm, sampler, 3)
    dec = g.add("VAEDecode", 4, 0, samples=(up, 0), vae=(ckpt, 2))
    g.add("SaveImage", 5, 0, images=(dec, 0), filename_prefix="fmboost/sd15_1024")
    graphs.append(g)

    g = Graph('SD1.5 with LCM LoRA in 4 steps, then CFM upscale to 1024 px', "SD1.5 + LCM-LoRA in 4 steps at 512², then CFM to 1024².")
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, ckpt_name=SD15)
    lora = g.add("LoraLoader", 0, 1, model=(ckpt, 0), clip=(ckpt, 1), lora_name=LCM_LORA, strength_model=1.0,
                 strength_clip=1.0)
    lcm = g.add("ModelSamplingDiscrete", 0, 2, model=(lora, 0), sampling="lcm", zsnr=False)
    sampler = txt2img(g, ckpt, (lora, 1), steps=4, cfg=1.5, sampler="lcm", scheduler="sgm_uniform",
                      model_out=(lcm, 0))
    cfm = g.add("FMBoostLoadCFMModel", 2, 1, ckpt_name=CFM, weight_dtype="auto", weights="ema")
    solver = g.add("FMBoostSolverSettings", 2, 2, method="euler", steps=4, atol=1e-5, rtol=1e-3, max_evals=200)
    up = cfm_upscale(g, cfm, sampler, 3, solver=solver)
    dec = g.add("VAEDecode", 4, 0, samples=(up, 0), vae=(ckpt, 2))
    g.add("SaveImage", 5, 0, images=(dec, 0), filename_prefix="fmboost/lcm_1024")
    graphs.append(g)

    g = Graph('SD1.5 at 512 px, then two CFM upscales to 2048 px', "SD1.5 at 512², CFM to 1024², CFM again to 2048² (64→128→256 latents).")
    ckpt = g.add("CheckpointLoaderSimple", 0, 0, ckpt_name=SD15)
    sampler = txt2img(g, ckpt, (ckpt, 1))
    cfm = g.add("FMBoostLoadCFMModel", 2, 1, ckpt_name=CFM, weight_dtype="auto", weights="ema")
    # Both ×2 run at noise step 100 instead of the model's 325: the second starts from the first one's
    # result, which already has its texture, and magnifies whatever texture the first one invented
    # (bench/RESULTS.md, *Cascade*).
    up1 = cfm_upscale(g, cfm, sampler, 3, noise_step=100)
    up2 = cfm_upscale(g, cfm, up1, 4, seed=1, noise_step=100)
    dec = g.add("VAEDecode", 5, 0, samples=(up2, 0), vae=(ckpt, 2))
    g.add("SaveImage", 6, 0, images=(dec, 0), filename_prefix="fmboost/cascade_2048")
    graphs.append(g)

    g = Graph('Upscale an existing image 2x with CFM',
              "Upscale an existing image 2×: Load Image → VAE Encode (TAESD) → CFM → VAE Decode (TAESD).")
    img = g.add("LoadImage", 0, 0, image=EXAMPLE_IMAGE, upload="image")
    vae = g.add("VAELoader", 0, 2, vae_name="taesd")
    enc = g.add("VAEEncode", 1, 0, pixels=(img, 0), vae=(vae, 0))
    cfm = g.add("FMBoostLoadCFMModel", 1, 1, ckpt_name=CFM, weight_dtype="auto", weights="ema")
    up = cfm_upscale(g, cfm, enc, 2, vae=(vae, 0))
    dec = g.add("VAEDecode", 3, 0, samples=(up, 0), vae=(vae, 0))
    g.add("SaveImage", 4, 0, images=(dec, 0), filename_prefix="fmboost/upscaled")
    graphs.append(g)
    return graphs


def main():
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for g in build():
        # The template browser shows a custom node's template by its file name only (title and description
        # alike), so each name is the sentence that says what the workflow does.
        (OUT / f"{g.name}.json").write_text(json.dumps(g.ui(), indent=1) + "\n")
        (OUT / "api" / f"{g.name}.json").write_text(json.dumps(g.api(), indent=1) + "\n")
        print(f"wrote workflows/{g.name}.json and workflows/api/{g.name}.json")


if __name__ == "__main__":
    main()
