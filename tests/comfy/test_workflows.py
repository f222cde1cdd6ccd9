"""The example workflows: every node exists in the running server, every widget value is valid, the API copies
match the UI files, and the image-upscale workflow runs end to end."""
import json

import numpy as np
import pytest
from PIL import Image

from comfyui_server import PromptRejected, execution_error
from support import REPO

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
IMAGE_WORKFLOW = "Upscale an existing image 2x with CFM"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def test_there_are_four_workflows_with_api_copies():
    names = {p.stem for p in WORKFLOWS}
    assert names == {"SD1.5 text to image at 512 px, then CFM upscale to 1024 px",
                     "SD1.5 with LCM LoRA in 4 steps, then CFM upscale to 1024 px",
                     "SD1.5 at 512 px, then two CFM upscales to 2048 px", IMAGE_WORKFLOW}
    for p in WORKFLOWS:  # the template browser shows the name as title and description: a sentence, and a
        assert (REPO / "workflows" / f"{p.stem}.jpg").is_file()  # result image as its thumbnail
    for p in WORKFLOWS:
        assert (REPO / "workflows" / "api" / p.name).is_file()


def widget_specs(node_info):
    """(name, type, options) of the widgets the frontend shows, in order, as object_info describes them."""
    out = []
    for section in ("required", "optional"):
        for name, spec in node_info["input"].get(section, {}).items():
            typ, opts = spec[0], spec[1] if len(spec) > 1 else {}
            if isinstance(typ, list):
                typ, opts = "COMBO", {**opts, "options": typ}
            if typ in WIDGET_TYPES and not opts.get("forceInput"):
                out.append((name, typ, opts))
    return out


def check_value(node, name, typ, opts, value):
    where = f"{node}.{name}={value!r}"
    if typ == "COMBO":
        assert value in opts["options"], where
    elif typ in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if typ == "INT":
            assert float(value).is_integer(), where
        assert opts.get("min", -np.inf) <= value <= opts.get("max", np.inf), where
    elif typ == "BOOLEAN":
        assert isinstance(value, bool), where
    elif typ == "STRING":
        assert isinstance(value, str), where


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_is_valid_for_the_server(server, path):
    info = server.object_info()
    wf = json.loads(path.read_text())
    api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert node["type"] in info, f"{path.name}: unknown node type {node['type']}"
        values = list(node["widgets_values"])
        derived = {}
        for name, typ, opts in widget_specs(info[node["type"]]):
            assert values, f"{node['type']}: no value for widget {name}"
            value = values.pop(0)
            check_value(node["type"], name, typ, opts, value)
            derived[name] = value
            if opts.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            if opts.get("image_upload"):
                assert values.pop(0) == "image"
        assert values == [], f"{node['type']}: extra widget values {values}"
        # the API copy holds the same values and links
        api_inputs = api[str(node["id"])]["inputs"]
        assert api[str(node["id"])]["class_type"] == node["type"]
        assert {k: v for k, v in api_inputs.items() if not isinstance(v, list)} == derived
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                link = next(l for l in wf["links"] if l[0] == inp["link"])
                assert api_inputs[inp["name"]] == [str(link[1]), link[2]]
    # links join sockets of the same type
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        in_name = nodes[dst]["inputs"][dst_slot]["name"]
        in_info = info[nodes[dst]["type"]]["input"]
        in_type = {**in_info.get("required", {}), **in_info.get("optional", {})}[in_name][0]
        assert out_type == in_type == typ, f"link {link_id}: {out_type} → {in_type} ({typ})"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_passes_server_validation(server, path):
    prompt = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    r = server.queue(prompt)
    assert r.status_code == 200, r.text
    assert r.json()["node_errors"] == {}
    entry = server.wait(r.json()["prompt_id"])
    if path.stem != IMAGE_WORKFLOW:
        # validation passed; the test server's SD1.5 checkpoint is an empty placeholder
        err = execution_error(entry)
        assert err is not None and err["node_type"] == "CheckpointLoaderSimple"


def test_upscale_existing_image_runs_end_to_end(server):
    prompt = json.loads((REPO / "workflows" / "api" / f"{IMAGE_WORKFLOW}.json").read_text())
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    out = Image.open(server.output_file(entry, save_id, "images"))
    src = Image.open(server.base / "input" / "fmboost_example.png")
    assert out.size == (2 * src.size[0], 2 * src.size[1])
    pixels = np.asarray(out).astype(float)
    assert pixels.std() > 5  # an image, not a flat field


SHIPPED = REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors"


def test_shipped_model_upscales_the_example_photo_faithfully(server):
    """The main job on a fresh machine: shipped model + shipped TAESD + the example photo → a 2× image whose
    ×2 downscale matches the input (the model adds detail, it must not change the picture)."""
    import shutil

    import torch
    import torch.nn.functional as F
    assert SHIPPED.is_file(), "the default model is part of the repository"
    shutil.copy(SHIPPED, server.base / "models" / "cfm" / "shipped-default.safetensors")
    shutil.copy(REPO / "assets" / "fmboost_example.png", server.base / "input" / "example_photo.png")
    prompt = json.loads((REPO / "workflows" / "api" / f"{IMAGE_WORKFLOW}.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = "example_photo.png"
        if node["class_type"] == "FMBoostLoadCFMModel":
            node["inputs"]["ckpt_name"] = "shipped-default.safetensors"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    out = np.asarray(Image.open(server.output_file(entry, save_id, "images"))).astype(np.float32) / 255
    src = np.asarray(Image.open(REPO / "assets" / "fmboost_example.png").convert("RGB")).astype(np.float32) / 255
    assert out.shape == (2 * src.shape[0], 2 * src.shape[1], 3)
    down = F.interpolate(torch.from_numpy(out).permute(2, 0, 1)[None], scale_factor=0.5, mode="bilinear",
                         antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    psnr = -10 * np.log10(np.mean((down - src) ** 2))
    # measured: latent bilinear 23.3 dB, a random network 14.0, the noised source alone 16.1
    assert psnr > 22, f"the upscaled photo drifts from its input: {psnr:.1f} dB"
