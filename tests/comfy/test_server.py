"""The pack inside a real ComfyUI server, through its HTTP API."""
import pytest
import torch

from comfyui_server import PromptRejected, execution_error
from fmboost.flow import SolverSettings, UpscaleSettings, item_noise, upscale
from fmboost.flow.runtime import cpu_dtype
from fmboost.flow.schedule import alpha_bar
from fmboost.models import load_checkpoint

from comfy_support import BACK_PROJECTED_METHOD, FIDELITY_SOURCE_METHOD, TINY_METHOD, read_latent, solver, upscale_prompt
from support import FIXTURES, REPO, require_shared

NODES = {"FMBoostLoadCFMModel": "Load CFM Model", "FMBoostLatentUpscale": "CFM Latent Upscale",
         "FMBoostSolverSettings": "CFM Solver Settings"}


def raw_latent(b, h, w, seed=0):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed)) * 4


def reference(ckpt_path, latent, *, seed, step, mode="latent", solver_settings=SolverSettings("euler", steps=4),
              weights="ema"):
    ck = load_checkpoint(ckpt_path, weights=weights)
    settings = UpscaleSettings(scale_factor=ck.method.scale_factor, mode=mode, noise_step=step, seed=seed,
                               solver=solver_settings, size_multiple=ck.net_config.size_multiple)
    with torch.inference_mode():
        return upscale(ck.build_network(), latent, settings)


def test_nodes_are_registered_with_tooltips(server):
    info = server.object_info()
    for node_id, display in NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["display_name"] == display
        assert node["python_module"].startswith("custom_nodes.")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    ckpts = info["FMBoostLoadCFMModel"]["input"]["required"]["ckpt_name"][1]["options"]
    assert {"tiny.safetensors", "fmboost-sd15-x2.safetensors"} <= set(ckpts)
    assert "authors_small.ckpt" in ckpts or not FIXTURES.exists()
    assert info["FMBoostLatentUpscale"]["output"] == ["LATENT"]


def test_upscale_our_checkpoint_matches_the_core(server, latent_file):
    lat = raw_latent(2, 8, 12)
    entry = server.run(upscale_prompt(latent_file(lat), seed=5))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    out = read_latent(server.output_file(entry, "4"))
    assert out.shape == (2, 4, 16, 24)
    expected = reference(server.base / "models/cfm/tiny.safetensors", lat, seed=5, step=TINY_METHOD.noise_step)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_tile_size_runs_in_windows_like_the_core(server, latent_file):
    """tile_size through the real server: the same windows and blend as the core's tiled run, and close to
    (but not bit-equal with) the untiled result."""
    lat = raw_latent(1, 16, 20, seed=4)
    entry = server.run(upscale_prompt(latent_file(lat), seed=2, tile_size=16))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    out = read_latent(server.output_file(entry, "4"))
    ck = load_checkpoint(server.base / "models/cfm/tiny.safetensors")
    settings = UpscaleSettings(scale_factor=ck.method.scale_factor, noise_step=TINY_METHOD.noise_step, seed=2,
                               solver=SolverSettings("euler", steps=4), size_multiple=ck.net_config.size_multiple)
    with torch.inference_mode():
        tiled = upscale(ck.build_network(), lat, settings, tile=16)
        whole = upscale(ck.build_network(), lat, settings)
    torch.testing.assert_close(out, tiled, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, whole)


def test_upscale_authors_checkpoint(server, latent_file):
    require_shared(FIXTURES)
    lat = raw_latent(1, 8, 8, seed=3)
    for weights in ("ema", "online"):
        entry = server.run(upscale_prompt(latent_file(lat), "authors_small.ckpt", seed=1, noise=400,
                                          weights=weights, solver=solver("rk4", steps=2)))
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        out = read_latent(server.output_file(entry, "4"))
        expected = reference(FIXTURES / "small_checkpoint_lightning.ckpt", lat, seed=1, step=400,
                             solver_settings=SolverSettings("rk4", steps=2), weights=weights)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_zero_velocity_model_returns_the_noised_source(server, latent_file):
    """With v ≡ 0 the output is x0: checks the scale conversions, the schedule and the seed convention."""
    lat = raw_latent(2, 6, 6, seed=4)
    entry = server.run(upscale_prompt(latent_file(lat), "zero.safetensors", seed=11, noise=250))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    out = read_latent(server.output_file(entry, "4"))
    s = TINY_METHOD.scale_factor
    z_up = torch.nn.functional.interpolate(lat * s, scale_factor=2, mode="bilinear", align_corners=False)
    a = alpha_bar()[250]
    expected = (a.sqrt() * z_up + (1 - a).sqrt() * item_noise((4, 12, 12), 11, [0, 1])) / s
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pixel_mode_with_taesd_equals_decode_resize_encode(server, latent_file):
    """Pixel up-sampling through the stock VAELoader (TAESD) equals stock VAE Decode → Upscale → VAE Encode."""
    lat = raw_latent(1, 8, 8, seed=2)
    name = latent_file(lat)
    ours = server.run(upscale_prompt(name, "zero.safetensors", noise=0, mode="pixel", vae="taesd"))
    assert ours["status"]["status_str"] == "success", execution_error(ours)
    stock = server.run({
        "1": {"class_type": "LoadLatent", "inputs": {"latent": name}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["6", 0]}},
        "8": {"class_type": "ImageScale", "inputs": {"image": ["7", 0], "upscale_method": "bilinear",
                                                     "width": 128, "height": 128, "crop": "disabled"}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["6", 0]}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "latents/stock"}},
    })
    assert stock["status"]["status_str"] == "success", execution_error(stock)
    a, b = read_latent(server.output_file(ours, "4")), read_latent(server.output_file(stock, "4"))
    assert a.shape == b.shape == (1, 4, 16, 16)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
    latent_mode = read_latent(server.output_file(
        server.run(upscale_prompt(name, "zero.safetensors", noise=0, mode="latent")), "4"))
    assert (latent_mode - a).abs().mean() > 0.05  # the two modes really differ


@pytest.mark.parametrize("name, method, source", [
    ("zero_back_projected.safetensors", BACK_PROJECTED_METHOD, {"back_projection": 0.75}),
    ("zero_fidelity_source.safetensors", FIDELITY_SOURCE_METHOD, {"decoder": "fidelity"}),
], ids=["back_projection", "fidelity_decoder"])
def test_the_models_source_recipe_builds_the_source(server, latent_file, name, method, source):
    """A model trained on back-projected pixel sources, or on sources decoded by the pack's fidelity decoder,
    gets them through the server, with every widget at its default and no VAE connected (the pack's TAESD):
    with v ≡ 0 the output is that source, noised."""
    from fmboost.flow.source import make_source
    from fmboost.models.taesd import TAESD
    lat = raw_latent(1, 8, 8, seed=3)
    entry = server.run(upscale_prompt(latent_file(lat), name, mode="auto"))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    out = read_latent(server.output_file(entry, "4"))
    s, step = method.scale_factor, method.noise_step
    taesd = TAESD.from_folder(REPO / "weights" / "taesd")
    with torch.inference_mode():
        built = make_source(lat * s, "pixel", s, taesd, **source)
        plain = make_source(lat * s, "pixel", s, taesd)
    a = alpha_bar()[step]
    expected = (a.sqrt() * built + (1 - a).sqrt() * item_noise((4, 16, 16), 0, [0])) / s
    # The server's thread count differs from this process's, and the clamp and the second encode carry
    # last-bit differences of the first decode into a few elements (seen: 5e-4): the tolerance of the
    # pixel-mode test above, two orders below what the recipe changes.
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=1e-3)
    assert (built - plain).abs().mean() > 0.02   # the recipe is not a no-op here


def test_batch_index_selects_the_same_noise_as_in_the_batch(server, latent_file):
    lat = raw_latent(2, 4, 4)
    prompt = upscale_prompt(latent_file(lat), seed=3)
    # LatentFromBatch sets batch_index: the picked item must get the noise it had in the batch
    prompt["10"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["1", 0], "batch_index": 1,
                                                                "length": 1}}
    prompt["3"]["inputs"]["samples"] = ["10", 0]
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    single = read_latent(server.output_file(entry, "4"))
    both = read_latent(server.output_file(server.run(upscale_prompt(latent_file(lat), seed=3)), "4"))
    torch.testing.assert_close(single[0], both[1], atol=1e-5, rtol=1e-5)


def test_cascade_two_upscales(server, latent_file):
    prompt = upscale_prompt(latent_file(raw_latent(1, 4, 6)))
    prompt["7"] = {"class_type": "FMBoostLatentUpscale",
                   "inputs": {"cfm_model": ["2", 0], "samples": ["3", 0], "noise_augmentation": -1, "seed": 0,
                              "upsampling": "latent"}}
    prompt["4"]["inputs"]["samples"] = ["7", 0]
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    assert read_latent(server.output_file(entry, "4")).shape == (1, 4, 16, 24)


def test_invalid_widget_values_are_refused_before_running(server, latent_file):
    with pytest.raises(PromptRejected) as e:
        server.run(upscale_prompt(latent_file(raw_latent(1, 4, 4)), solver=solver(steps=0)))
    assert e.value.status == 400 and "steps" in str(e.value)

def test_paths_outside_the_model_folders_are_refused(server, latent_file):
    secret = server.base / "secret.safetensors"
    secret.write_bytes((server.base / "models/cfm/tiny.safetensors").read_bytes())
    for name in ("../../secret.safetensors", str(secret)):
        try:
            entry = server.run(upscale_prompt(latent_file(raw_latent(1, 4, 4)), ckpt=name))
        except PromptRejected as e:  # refused by ComfyUI's own validation
            assert e.status == 400
            continue
        err = execution_error(entry)
        assert entry["status"]["status_str"] == "error" and "is not in models/cfm" in err["exception_message"]


def test_bare_state_dict_with_sidecar_in_latent_upscale_models(server, latent_file):
    """small_net.safetensors (the EMA weights, no metadata) + its config beside it == the .ckpt's EMA weights."""
    require_shared(FIXTURES)
    name = latent_file(raw_latent(1, 8, 8, seed=9))
    a = server.run(upscale_prompt(name, "authors_small_net.safetensors", seed=2, noise=400))
    b = server.run(upscale_prompt(name, "authors_small.ckpt", seed=2, noise=400, weights="ema"))
    assert a["status"]["status_str"] == b["status"]["status_str"] == "success", execution_error(a)
    torch.testing.assert_close(read_latent(server.output_file(a, "4")), read_latent(server.output_file(b, "4")),
                               atol=0, rtol=0)


def test_half_precision_weights(server, latent_file):
    name = latent_file(raw_latent(1, 8, 8, seed=6))
    outs = {}
    for dtype in ("fp32", "bf16", "auto"):
        entry = server.run(upscale_prompt(name, seed=4, dtype=dtype))
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        outs[dtype] = read_latent(server.output_file(entry, "4"))
    assert outs["bf16"].dtype == torch.float32  # the ODE state and the output stay fp32
    diff = (outs["bf16"] - outs["fp32"]).abs()
    assert 0 < diff.max() and diff.mean() < 0.05 * outs["fp32"].abs().mean()
    # auto on the CPU: bf16 where the CPU has bf16 instructions (this CI machine does), else fp32
    assert torch.equal(outs["auto"], outs["bf16" if cpu_dtype() == torch.bfloat16 else "fp32"])


def test_a_users_model_of_the_shipped_name_wins_over_the_shipped_one(server, latent_file):
    """Documented order: models/cfm (and its extra paths) before the pack's weights/cfm. The test server's
    models/cfm holds the tiny model under the shipped model's name: listed once, and it is what runs."""
    options = server.object_info("FMBoostLoadCFMModel")["FMBoostLoadCFMModel"]["input"]["required"]["ckpt_name"]
    names = options[1]["options"] if options[0] == "COMBO" else options[0]
    assert names.count("fmboost-sd15-x2.safetensors") == 1
    lat = raw_latent(1, 8, 8, seed=3)
    entry = server.run(upscale_prompt(latent_file(lat), "fmboost-sd15-x2.safetensors", seed=1))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    expected = reference(server.base / "models/cfm/fmboost-sd15-x2.safetensors", lat, seed=1,
                         step=TINY_METHOD.noise_step)
    torch.testing.assert_close(read_latent(server.output_file(entry, "4")), expected, atol=1e-5, rtol=1e-5)


def test_the_server_starts_clean(server):
    """What a newcomer sees at start: the pack loads, and ComfyUI prints no import failures (torchaudio is
    provisioned beside the pinned torch)."""
    log = server.log_text()
    start = log[:log.index("Starting server")]  # the start, before any test's prompt could log anything
    assert "ComfyUI-FMBoost" in start and "IMPORT FAILED" not in start, start[-3000:]
    assert "No module named 'torchaudio'" not in start and "Traceback" not in start, start[-3000:]
