"""A real ComfyUI server for tests: its own base directory, this pack linked into custom_nodes, loopback only.

ComfyUI comes from COMFYUI_PATH, else from .cache/comfyui (scripts/provision.sh puts 0.3.75 there).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-FMBoost"


def comfyui_path() -> Path:
    path = Path(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui")
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {path}: run scripts/provision.sh or set COMFYUI_PATH")
    return path


class Setup:
    """One ComfyUI the tests run against: where it is, what its process needs beside the venv, its frontend."""

    def __init__(self, name, path: Path, pythonpath: Path | None = None, front_end_root: Path | None = None):
        self.name, self.path, self.pythonpath, self.front_end_root = name, path, pythonpath, front_end_root

    def missing(self) -> str | None:
        if not (self.path / "main.py").is_file():
            return f"ComfyUI {self.name} is not provisioned at {self.path} (scripts/provision.sh)"
        return None


def setups() -> dict[str, Setup]:
    """The pinned ComfyUI (0.3.75 with its frontend, or COMFYUI_PATH) and upstream 0.33.0 with frontend 1.58.1
    (unpacked by provision.sh from ../shared; its packages in their own folder)."""
    deps = REPO / ".cache" / "comfyui-0.33-deps"
    return {
        "pinned": Setup("pinned", Path(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui")),
        "0.33": Setup("0.33", REPO / ".cache" / "comfyui-0.33", deps,
                      deps / "comfyui_frontend_package" / "static"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, extra_args=(), setup: Setup | None = None):
        self.base = base
        self.setup = setup or setups()["pinned"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.proc = None
        self.log_path = base / "server.log"
        for sub in ("custom_nodes", "models/cfm", "models/vae_approx", "input", "output", "user", "temp"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    def start(self, timeout=180):
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(os.environ)
        if self.setup.front_end_root:
            cmd += ["--front-end-root", str(self.setup.front_end_root)]
        if self.setup.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.setup.pythonpath), env.get("PYTHONPATH")]))
        self.log = open(self.log_path, "ab")
        path = self.setup.path if self.setup.name != "pinned" else comfyui_path()
        self.proc = subprocess.Popen(cmd, cwd=path, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start in {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            self.log.close()

    def restart(self):
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------------------------------- API
    def get(self, path, **kw):
        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def object_info(self, node=None):
        return self.get("/object_info" + (f"/{node}" if node else ""))

    def queue(self, prompt: dict, client_id: str | None = None) -> requests.Response:
        return requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": client_id or "tests"},
                             timeout=30)

    def run(self, prompt: dict, timeout=300) -> dict:
        """Queue a prompt and wait for its history entry."""
        r = self.queue(prompt)
        if r.status_code != 200:
            raise PromptRejected(r.status_code, r.json())
        return self.wait(r.json()["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout=300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def output_file(self, entry: dict, node_id: str, kind: str = "latents") -> Path:
        item = entry["outputs"][node_id][kind][0]
        return self.base / "output" / item.get("subfolder", "") / item["filename"]


class PromptRejected(Exception):
    def __init__(self, status, body):
        super().__init__(f"{status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data
    return None


def new_client_id() -> str:
    return uuid.uuid4().hex


class Watcher:
    """The server's websocket as a client sees it: JSON events and binary preview frames."""

    def __init__(self, server: ComfyServer):
        import websocket
        self.client_id = new_client_id()
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}",
                                              timeout=60)
        self.events: list[tuple[str, dict]] = []
        self.previews = 0

    def until(self, predicate, timeout=300):
        """Read events until predicate(type, data) is true; returns that event."""
        import websocket
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(msg, bytes):
                self.previews += 1
                continue
            event = json.loads(msg)
            item = (event["type"], event.get("data", {}))
            self.events.append(item)
            if predicate(*item):
                return item
        raise TimeoutError("event not seen")

    def progress(self, node: str) -> list[int]:
        return [d["value"] for t, d in self.events if t == "progress" and d.get("node") == node]

    def close(self):
        self.ws.close()
