"""Bad input, faults and load: clear errors, nothing lost, the server stays up (issue: reliability)."""
import time

import psutil
import pytest
import requests
import torch

from comfy_support import read_latent, solver, upscale_prompt
from comfyui_server import Watcher, execution_error
from support import SHARED, require_shared


def raw_latent(b, h, w, seed=0):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed)) * 4


def latent_of(case):
    if case == "sd3_latent":
        return torch.randn(1, 16, 8, 8)
    if case == "video_latent":
        return torch.randn(1, 4, 3, 8, 8)
    if case == "empty_batch":
        return torch.zeros(0, 4, 8, 8)
    if case == "one_by_one":
        return torch.zeros(1, 4, 1, 1)
    lat = raw_latent(1, 8, 8)
    if case == "nan":
        lat[0, 1, 2, 3] = float("nan")
    if case == "inf":
        lat[0, 0, 0, 0] = float("inf")
    return lat


# case → (prompt changes, text the error must contain)
BAD_INPUTS = {
    "sd3_latent": ({}, "16 channels"),
    "video_latent": ({}, "video latent"),
    "empty_batch": ({}, "batch is empty"),
    "one_by_one": ({}, "too small to upscale (1×1)"),
    "nan": ({}, "NaN or Inf"),
    "inf": ({}, "NaN or Inf"),
    "dopri_cap": ({"solver": solver("dopri5", atol=1e-8, rtol=1e-8, max_evals=6)}, "used its 6 network evaluations"),
    "pixel_without_vae": ({"mode": "pixel"}, "pixel up-sampling needs a VAE"),
    "pixel_space_vae": ({"mode": "pixel", "vae": "pixel_space"}, "VAE does not fit this model"),
    "not_cfm": ({"ckpt": "not_cfm.safetensors"}, "not_cfm.safetensors: not a CFM checkpoint"),
    "truncated": ({"ckpt": "truncated.safetensors"}, "truncated.safetensors: not a readable safetensors file"),
    "other_architecture": ({"ckpt": "other_architecture.safetensors"},
                           "other_architecture.safetensors: not a CFM checkpoint"),
    "wrong_keys": ({"ckpt": "wrong_keys.safetensors"}, "1 missing (e.g. middle_block.0.in_layers.2.weight)"),
    "bad_metadata": ({"ckpt": "bad_metadata.safetensors"}, "bad_metadata.safetensors: fmboost metadata is damaged"),
    "hostile_pickle": ({"ckpt": "hostile.ckpt"}, "hostile.ckpt"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_the_server_goes_on(server, latent_file, case):
    changes, needle = BAD_INPUTS[case]
    if case == "other_architecture":
        require_shared(SHARED / "weights" / "sd-latent-upscaler-city96")
    prompt = upscale_prompt(latent_file(latent_of(case)), **changes)
    entry = server.run(prompt)
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and err is not None, case
    assert needle in err["exception_message"], err["exception_message"]
    assert err["exception_type"] != "torch.OutOfMemoryError"
    if case == "hostile_pickle":
        assert not (server.base / "PWNED").exists()
    ok = server.run(upscale_prompt(latent_file(raw_latent(1, 4, 4, seed=hash(case) % 1000))))
    assert ok["status"]["status_str"] == "success"


def server_rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def test_cancel_returns_memory(server, latent_file):
    name = latent_file(raw_latent(1, 32, 32))
    warm = server.run(upscale_prompt(name, solver=solver("euler", steps=2), seed=100))
    assert warm["status"]["status_str"] == "success"
    before = server_rss(server)
    watch = Watcher(server)
    try:
        pid = server.queue(upscale_prompt(name, solver=solver("rk4", steps=200), seed=101),
                           watch.client_id).json()["prompt_id"]
        watch.until(lambda t, d: t == "progress" and d.get("node") == "3" and d["value"] >= 5)
        requests.post(server.url + "/interrupt", timeout=10)
        watch.until(lambda t, d: t == "execution_interrupted" and d.get("prompt_id") == pid, timeout=120)
    finally:
        watch.close()
    time.sleep(0.5)
    after = server_rss(server)
    assert after - before < 48 * 2**20, f"RSS grew by {(after - before) / 2**20:.0f} MiB after a cancelled run"
    assert server.run(upscale_prompt(name, seed=102))["status"]["status_str"] == "success"


def test_fifty_upscales_do_not_grow_memory(server, latent_file):
    name = latent_file(raw_latent(1, 8, 8, seed=5))
    for seed in range(10):  # warm-up: allocator pools, caches
        assert server.run(upscale_prompt(name, seed=1000 + seed))["status"]["status_str"] == "success"
    start = server_rss(server)
    for seed in range(50):
        assert server.run(upscale_prompt(name, seed=2000 + seed))["status"]["status_str"] == "success"
    growth = server_rss(server) - start
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 50 upscales"


def test_twenty_queued_prompts_match_one_by_one(server, latent_file):
    cases = [(seed, 4 + seed % 3, 4 + (seed * 7) % 5) for seed in range(20)]
    names = {c: latent_file(raw_latent(1, c[1], c[2], seed=c[0])) for c in cases}
    ids = {}
    for c in cases:
        r = server.queue(upscale_prompt(names[c], seed=300 + c[0]))
        assert r.status_code == 200
        ids[c] = r.json()["prompt_id"]
    queued = {c: read_latent(server.output_file(server.wait(pid), "4")) for c, pid in ids.items()}
    requests.post(server.url + "/free", json={"free_memory": True}, timeout=10)  # drop cached outputs
    for c in cases:
        alone = read_latent(server.output_file(server.run(upscale_prompt(names[c], seed=300 + c[0])), "4"))
        assert queued[c].shape == (1, 4, 2 * c[1], 2 * c[2])
        assert torch.equal(queued[c], alone), c


def test_same_inputs_give_bit_identical_latents_across_runs_and_restarts(server, latent_file):
    name = latent_file(raw_latent(2, 6, 10, seed=77))
    prompt = upscale_prompt(name, seed=123, solver=solver("heun", steps=3))
    first = read_latent(server.output_file(server.run(prompt), "4"))
    requests.post(server.url + "/free", json={"free_memory": True, "unload_models": True}, timeout=10)
    time.sleep(1)
    second = read_latent(server.output_file(server.run(prompt), "4"))
    server.restart()
    third = read_latent(server.output_file(server.run(prompt), "4"))
    assert torch.equal(first, second) and torch.equal(first, third)
    other_seed = read_latent(server.output_file(server.run(upscale_prompt(name, seed=124,
                                                                          solver=solver("heun", steps=3))), "4"))
    assert not torch.equal(first, other_seed)
