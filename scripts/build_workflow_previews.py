#!/usr/bin/env python3
"""Render each example workflow in the real frontend (headless Chromium) and save workflows/<name>.jpg, the
thumbnail the template browser shows. Needs the provisioned environment (scripts/provision.sh) and Chromium.

    .venv/bin/python scripts/build_workflow_previews.py
"""
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import register_pack  # noqa: E402

register_pack()
from comfy_support import make_example_image, make_models  # noqa: E402
from comfyui_server import ComfyServer  # noqa: E402


def main():
    import requests
    from PIL import Image
    from playwright.sync_api import sync_playwright
    base = Path(tempfile.mkdtemp(prefix="fmboost-previews-"))
    server = ComfyServer(base)
    make_models(base / "models")
    make_example_image(base / "input" / "fmboost_example.png")
    server.start()
    try:
        requests.post(server.url + "/settings/Comfy.TutorialCompleted", json=True, timeout=10)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 2800, "height": 1300})
            page.goto(server.url, wait_until="networkidle", timeout=180_000)
            page.wait_for_function("window.app && window.app.graph", timeout=180_000)
            page.keyboard.press("Escape")
            for path in sorted((REPO / "workflows").glob("*.json")):
                page.evaluate("wf => window.app.loadGraphData(wf)", json.loads(path.read_text()))
                page.wait_for_timeout(800)
                # Scale 1 (below ~0.6 the frontend draws nodes without text), nodes placed clear of the overlays.
                box = page.evaluate("""() => { const c = window.app.canvas, nodes = window.app.graph._nodes;
                    const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1]));
                    const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
                    const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
                    c.ds.scale = 1; c.ds.offset = [-x0 + 120, -y0 + 200];
                    c.setDirty(true, true); c.draw(true, true);
                    return [x1 - x0, y1 - y0]; }""")
                page.wait_for_timeout(500)
                png = page.locator("#graph-canvas").screenshot()
                full = Image.open(io.BytesIO(png)).convert("RGB")
                img = full.crop((90, 140, min(full.width, 150 + int(box[0])), min(full.height, 240 + int(box[1]))))
                img.thumbnail((960, 540))
                out = path.with_suffix(".jpg")
                img.save(out, quality=85)
                print(f"wrote {out.relative_to(REPO)} {img.size}")
            browser.close()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
