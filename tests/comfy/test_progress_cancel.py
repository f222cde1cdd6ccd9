"""What an artist sees while an upscale runs: progress per network evaluation, previews, and Cancel."""
import time

import requests
import torch

from comfy_support import read_latent, solver, upscale_prompt
from comfyui_server import Watcher


def raw_latent(b, h, w):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(0)) * 4


def test_progress_advances_every_evaluation_with_previews(server, latent_file):
    watch = Watcher(server)
    try:
        prompt = upscale_prompt(latent_file(raw_latent(1, 8, 8)), solver=solver("heun", steps=5))
        pid = server.queue(prompt, watch.client_id).json()["prompt_id"]
        watch.until(lambda t, d: t == "execution_success" and d.get("prompt_id") == pid)
        assert watch.progress("3") == list(range(1, 11))  # heun: 2 evaluations × 5 steps
        maxes = {d["max"] for t, d in watch.events if t == "progress" and d.get("node") == "3"}
        assert maxes == {10}
        assert watch.previews >= 10  # one latent preview per evaluation
        executed = [d for t, d in watch.events if t == "executed" and d.get("node") == "3"]
        assert executed and executed[0]["output"]["fmboost"][0]["evaluations"] == 10
    finally:
        watch.close()


def test_cancel_stops_within_an_evaluation_and_the_server_goes_on(server, latent_file):
    watch = Watcher(server)
    try:
        long_run = upscale_prompt(latent_file(raw_latent(1, 32, 32)), solver=solver("rk4", steps=200))
        pid = server.queue(long_run, watch.client_id).json()["prompt_id"]
        watch.until(lambda t, d: t == "progress" and d.get("node") == "3" and d["value"] >= 3)
        at_cancel = watch.progress("3")[-1]
        requests.post(server.url + "/interrupt", timeout=10)
        started = time.time()
        watch.until(lambda t, d: t == "execution_interrupted" and d.get("prompt_id") == pid, timeout=120)
        assert time.time() - started < 30
        after = [v for v in watch.progress("3") if v > at_cancel]
        assert len(after) <= 2, f"{len(after)} evaluations ran after Cancel"
        entry = server.wait(pid)
        assert entry["status"]["status_str"] == "error"
        assert "outputs" not in entry or "4" not in entry.get("outputs", {})
    finally:
        watch.close()
    ok = server.run(upscale_prompt(latent_file(raw_latent(1, 4, 4)), seed=1))
    assert ok["status"]["status_str"] == "success"
    assert read_latent(server.output_file(ok, "4")).shape == (1, 4, 8, 8)


def test_a_huge_latent_runs_in_windows_and_cancel_stops_it_inside_an_evaluation(server, latent_file):
    """16384² px (a 2048² latent → 4096²): the largest EmptyLatentImage. It runs tiled instead of failing, and
    Cancel, checked before every window, ends it long before its first evaluation (hundreds of windows) is done."""
    watch = Watcher(server)
    try:
        prompt = upscale_prompt("unused", tile_size=128, solver=solver("euler", steps=2))
        prompt["1"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 16384, "height": 16384,
                                                                    "batch_size": 1}}
        pid = server.queue(prompt, watch.client_id).json()["prompt_id"]
        watch.until(lambda t, d: t == "executing" and d.get("node") == "3" and d.get("prompt_id") == pid,
                    timeout=120)
        time.sleep(5)
        requests.post(server.url + "/interrupt", timeout=10)
        started = time.time()
        watch.until(lambda t, d: t == "execution_interrupted" and d.get("prompt_id") == pid, timeout=120)
        assert time.time() - started < 15
        assert watch.progress("3") == [], "Cancel came inside the first evaluation"
        entry = server.wait(pid)
        assert entry["status"]["status_str"] == "error"
        messages = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert messages == [], messages  # interrupted, not failed (no out-of-memory, no error)
    finally:
        watch.close()
    ok = server.run(upscale_prompt(latent_file(raw_latent(1, 4, 4)), seed=2))
    assert ok["status"]["status_str"] == "success"
