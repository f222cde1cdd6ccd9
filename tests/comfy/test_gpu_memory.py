"""Model placement on a user's GPU, without a GPU: ComfyUI's real model management in its NVIDIA branch, with a
controlled free-memory figure (tests/comfy/gpu_sim.py), driving the nodes' real code path in-process.

Each scenario fails on the pack before this test existed: the model was loaded for the whole untiled run, which
on NVIDIA left every weight off the device when that did not fit; and in pixel mode the VAE's load unloaded the
model between its load and the network's evaluations."""
import json
import os
import subprocess
import sys
from pathlib import Path

from support import REPO

SIM = Path(__file__).with_name("gpu_sim.py")


def simulate(setup, scenario: str) -> dict:
    env = dict(os.environ)
    if setup.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(setup.pythonpath), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SIM), str(setup.path), scenario, str(REPO)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SIM ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][4:])


def assert_loaded_whole_and_done(report, shape):
    assert report["problems"] == []          # the whole model on the device at every evaluation
    assert report["evaluations"] > 0 and report["loaded_after"]
    assert report["shape"] == shape and report["finite"]
    assert report["prepared_dropped_on_unload"]    # compiled graphs would go with it


def test_a_large_upscale_runs_in_windows_with_the_model_on_the_device(comfy_setup):
    """192² latent out on 1 GiB free: the untiled run needs about 2.25 GiB (fp32), so the plan picks windows
    that fit, and the model itself is loaded whole."""
    r = simulate(comfy_setup, "tiled")
    assert_loaded_whole_and_done(r, [1, 4, 192, 192])
    window = r["plan"]["window"]
    assert isinstance(window, int) and 64 <= window < 192
    assert r["windows"] == [[window, window]]


def test_an_explicit_tile_size_is_what_model_management_is_asked_for(comfy_setup):
    r = simulate(comfy_setup, "tile_size")
    assert_loaded_whole_and_done(r, [1, 4, 192, 192])
    assert r["plan"]["window"] == 64 and r["windows"] == [[64, 64]]


def test_pixel_mode_with_a_vae_that_evicts_everything_keeps_the_model_for_the_run(comfy_setup):
    """The connected VAE's load frees all other models on the device (fixed small free memory): the source is
    built first, so the CFM model is loaded after it and stays for every evaluation."""
    r = simulate(comfy_setup, "pixel_vae")
    assert_loaded_whole_and_done(r, [1, 4, 64, 64])
    assert r["plan"]["window"] == "whole"


def test_out_of_memory_in_the_planned_windows_retries_smaller_with_the_model_loaded(comfy_setup):
    r = simulate(comfy_setup, "oom")
    assert_loaded_whole_and_done(r, [1, 4, 192, 192])
    first, last = max(r["windows"]), min(r["windows"])
    assert last[0] <= 64 < first[0] and r["plan"]["window"] == last[0]


def test_previews_are_small_and_their_out_of_memory_is_not_the_networks(comfy_setup):
    """Previews decode the prediction at ComfyUI's preview size (512 px: a 64² latent), not the 192² output; a
    preview that runs out of memory turns previews off and leaves the plan alone."""
    r = simulate(comfy_setup, "preview_oom")
    assert_loaded_whole_and_done(r, [1, 4, 192, 192])
    assert r["previews"] == [[1, 4, 64, 64]] * 2     # the second failed; none after it
    assert r["windows"] == [[r["plan"]["window"]] * 2] and r["evaluations"] == 8   # no retry: 4 windows × 2
