"""The pack's learned TAESD encoder move (models.taesd.EncodeChange, training/encode_change.py): a shading pass
that moves the latent as two TAESD encodes would, for a fraction of their cost; trained and written by its
command; exact wherever it is absent."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from fmboost.flow import upscale
from fmboost.flow.settings import resolve
from fmboost.flow.shading import SHADING_SIGMA, correct_shading, encode_change, gaussian_blur
from fmboost.models import load_checkpoint
from fmboost.models.taesd import ENCODE_CHANGE, ENCODE_CHANGE_KEY, TAESD, EncodeChange, EncodeChangeConfig
from fmboost.training import metrics
from fmboost.training.data import downscale2, load_rgb, scan_images
from fmboost.training.encode_change import RECIPE_KEYS, fit, make_pairs
from support import REPO, SHARED, require_shared

TAESD_DIR = REPO / "weights" / "taesd"
SHIPPED = REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors"


@pytest.fixture(scope="module")
def shipped():
    ck = load_checkpoint(SHIPPED)
    return ck, ck.build_network(torch.float32)


@pytest.fixture(scope="module")
def example():
    """A 256 px crop of the pack's CC0 example photo (skimage's `chelsea`; one of the training photos the
    shipped move learned from: the held-out measurement is the bench's, bench/RESULTS.md)."""
    img = load_rgb(REPO / "assets" / "fmboost_example.png")
    _, h, w = img.shape
    y, x = (h - 256) // 2, (w - 256) // 2
    return img[:, y:y + 256, x:x + 256][None]


@torch.inference_mode()
def test_the_learned_move_does_the_passs_work(shipped, example):
    """The node defaults on a photo, their pass once with the learned move and once with two encodes: the same
    gain over no pass, nearly the same image at the pass's scale, the same colour."""
    ck, net = shipped
    learned, exact = TAESD.from_folder(TAESD_DIR), TAESD.from_folder(TAESD_DIR, change=False)
    assert learned.change is not None and exact.change is None and (TAESD_DIR / ENCODE_CHANGE).exists()
    low = exact.encode(downscale2(example))
    settings = resolve(ck.method, size_multiple=ck.net_config.size_multiple, have_vae=True).settings
    head = upscale(net, low, dataclasses.replace(settings, shading_correction=0), vae=exact)
    images = {"none": exact.decode(head)}
    for name, vae in (("learned", learned), ("exact", exact)):
        images[name] = exact.decode(correct_shading(vae, low, head, settings.shading_correction))
    psnr = {k: metrics.psnr(v, example).item() for k, v in images.items()}
    colour = {k: metrics.colour_error(v, example).item() for k, v in images.items()}
    gain = {k: psnr[k] - psnr["none"] for k in ("learned", "exact")}
    assert gain["exact"] > 0.15, psnr                                    # seen: +0.24 dB
    assert gain["learned"] > 0.8 * gain["exact"], psnr                   # seen: +0.25 dB
    assert abs(colour["learned"] - colour["exact"]) < 0.75, colour       # seen: 1.44, 1.94 (none: 1.22)
    blur = lambda x: gaussian_blur(x, SHADING_SIGMA)  # noqa: E731
    assert metrics.psnr(blur(images["learned"]), blur(images["exact"])).item() > 35   # seen: 41.0 dB


@torch.inference_mode()
def test_the_learned_move_takes_a_strong_cast_away():
    """Far outside what it learned from (an orange cast and a dark left half, exaggerated; test_shading.py holds
    the exact move to the same): most of the cast goes, and the large scales come closer to the photo."""
    vae = TAESD.from_folder(TAESD_DIR)
    img = load_rgb(REPO / "assets" / "fmboost_example.png")[None, :, 40:168, 100:228]
    ramp = torch.linspace(-0.06, 0.02, 128).view(1, 1, 1, -1)
    cast = (img * torch.tensor([1.08, 1.0, 0.9]).view(1, 3, 1, 1) + 0.02 + ramp).clamp(0, 1)
    low, drifted = vae.encode(downscale2(img)), vae.encode(cast)
    before, after = vae.decode(drifted), vae.decode(correct_shading(vae, low, drifted, passes=1))
    colour = [metrics.colour_error(x, img).item() for x in (before, after)]
    blurred = [metrics.psnr(gaussian_blur(x, 4), gaussian_blur(img, 4)).item() for x in (before, after)]
    assert colour[1] < colour[0] / 3, colour                 # seen: 6.3 → 1.0
    # seen: 31.4 → 33.1 dB over 4 px; the exact move goes farther (+5.7): the learned one saw no casts this strong
    assert blurred[1] > blurred[0] + 1, blurred


@torch.inference_mode()
def test_with_the_learned_move_a_flat_image_stays_flat_and_items_stay_alone(example):
    vae = TAESD.from_folder(TAESD_DIR)
    ramp = torch.linspace(-0.06, 0.02, 128).view(1, 1, 1, -1)
    tint = lambda x: (x * torch.tensor([1.08, 1.0, 0.9]).view(1, 3, 1, 1) + 0.02 + ramp).clamp(0, 1)  # noqa: E731
    grey = torch.full((1, 3, 128, 128), 0.5)
    low, tinted = vae.encode(downscale2(grey)), vae.encode(tint(grey))
    before = (vae.decode(tinted) * 255).std(dim=(-2, -1)).max().item()
    out = vae.decode(correct_shading(vae, low, tinted, passes=1)) * 255
    assert before > 4 and out.std(dim=(-2, -1)).max().item() < before / 3   # seen: 8.1 → 1.4
    assert (out.mean(dim=(-2, -1)) - 127.5).abs().max().item() < 4          # seen: 2.5
    photo = example[..., :128, :128]
    pair = torch.cat([photo, photo.flip(-1)])
    low, drifted = vae.encode(downscale2(pair)), vae.encode(tint(pair))
    both = correct_shading(vae, low, drifted, passes=1)
    for i in range(2):
        alone = correct_shading(vae, low[i:i + 1], drifted[i:i + 1], passes=1)
        torch.testing.assert_close(both[i:i + 1], alone, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_without_the_network_the_move_is_two_encodes():
    vae = TAESD.from_folder(TAESD_DIR, change=False)
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8) * 3
    d = vae.decode(z)
    e = gaussian_blur(torch.randn(1, 3, 64, 64), 4) * 0.5
    torch.testing.assert_close(vae.encode_change(z, d, e), vae.encode(d + e) - vae.encode(d))
    # a VAE without encode_change (the user's, through ComfyUI) gets the same from flow.shading
    plain = type("Plain", (), {"encode": vae.encode, "decode": vae.decode})()
    torch.testing.assert_close(encode_change(plain, z, d, e), vae.encode(d + e) - vae.encode(d))


@torch.inference_mode()
def test_exact_move_holds_the_two_encodes_only_inside_it():
    """The benches' switch (`TAESD.exact_move`): inside, the learned TAESD moves by two encodes; afterwards, and
    after an error inside, it has its network back."""
    vae = TAESD.from_folder(TAESD_DIR)
    net = vae.change
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8) * 3
    d = vae.decode(z)
    e = gaussian_blur(torch.randn(1, 3, 64, 64), 4) * 0.5
    two_encodes = vae.encode(d + e) - vae.encode(d)
    with vae.exact_move():
        assert vae.change is None
        torch.testing.assert_close(vae.encode_change(z, d, e), two_encodes)
    assert vae.change is net
    assert not torch.allclose(vae.encode_change(z, d, e), two_encodes)
    with pytest.raises(RuntimeError, match="inside"):
        with vae.exact_move():
            raise RuntimeError("inside")
    assert vae.change is net


@torch.inference_mode()
def test_the_learned_move_follows_the_change():
    """No change, no move (exactly: the network's part is its output less its output for no change); a
    brighter change moves the latent the way the encoder does (the learned and exact moves point the same way)."""
    learned, exact = TAESD.from_folder(TAESD_DIR), TAESD.from_folder(TAESD_DIR, change=False)
    img = load_rgb(REPO / "assets" / "fmboost_example.png")[None, :, :128, :128]
    z = exact.encode(img)
    d = exact.decode(z)
    e = torch.full_like(d, 0.05)
    assert torch.equal(learned.encode_change(z, d, torch.zeros_like(d)), torch.zeros_like(z))
    moved, want = learned.encode_change(z, d, e), exact.encode_change(z, d, e)
    cosine = torch.nn.functional.cosine_similarity(moved.flatten(), want.flatten(), dim=0).item()
    assert cosine > 0.8, cosine


def test_fitting_learns_the_moves_of_its_pairs(shipped):
    photos = require_shared(SHARED / "data" / "photos" / "train")
    ck, net = shipped
    vae = TAESD.from_folder(TAESD_DIR, change=False)
    with pytest.raises(ValueError, match="change=False"):
        make_pairs(ck, net, TAESD.from_folder(TAESD_DIR), vae, [], crop=128)
    pairs = make_pairs(ck, net, vae, vae, scan_images(photos, 128).usable[:3], crop=128, crops_per_image=2,
                       log=None)
    assert pairs["z"].shape == (6, 4, 16, 16) and pairs["d"].shape == pairs["e"].shape == (6, 3, 128, 128)
    assert pairs["d"].dtype == torch.float16 and pairs["dz"].abs().mean() > 0
    config = EncodeChangeConfig(channels=16, depth=1)
    untrained = EncodeChange(config)
    trained, unexplained = fit(pairs, config, steps=150, batch=4, lr=3e-3, log=None)
    with torch.inference_mode():
        err = lambda m: (m(pairs["z"], pairs["d"].float(), pairs["e"].float()) - pairs["dz"]).pow(2).mean().item()  # noqa: E731
        assert err(trained) < 0.6 * err(untrained), (err(trained), err(untrained))
    assert 0 < unexplained < 1


def test_the_training_command_writes_a_move_the_pack_loads(tmp_path):
    photos = require_shared(SHARED / "data" / "photos" / "train")
    recipe = json.loads((REPO / "training" / "recipes" / "encoders" / "encode-change.json").read_text())
    recipe.update(images=str(photos), max_images=2, steps=3, crop=128, channels=8, depth=1)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out, work = tmp_path / ENCODE_CHANGE, tmp_path / "work"
    command = [sys.executable, str(REPO / "scripts" / "train_encode_change.py"), "--config", str(tmp_path / "r.json"),
               "--model", str(SHIPPED), "--out", str(out), "--work-dir", str(work), "--threads", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()[ENCODE_CHANGE_KEY])
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert meta["config"] == {"channels": 8, "depth": 1, "latent_channels": 4}
    assert meta["training"]["steps"] == 3 and meta["training"]["pairs"] == 2
    assert out.stat().st_mode & 0o044 == 0o044   # readable by all (safetensors alone writes 0600)
    assert len(list(work.glob("change-pairs-*.pt"))) == 1
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)   # the pairs are reused
    assert again.returncode == 0 and "pairs: 2 from change-pairs-" in again.stdout, again.stdout[-2000:]
    vae = TAESD(TAESD_DIR / "taesd_encoder.safetensors", TAESD_DIR / "taesd_decoder.safetensors",
                encode_change_path=out)
    assert vae.change.config == EncodeChangeConfig(channels=8, depth=1)
    recipe["colour"] = 1
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "unknown recipe keys ['colour']" in refused.stderr


@pytest.mark.parametrize("recipe", sorted((REPO / "training" / "recipes" / "encoders").glob("*.json")),
                         ids=lambda p: p.stem)
def test_every_encoder_recipe_holds_what_its_command_reads(recipe):
    settings = json.loads(recipe.read_text())
    assert settings.pop("comment", "").strip(), "a recipe says what it is for"
    assert set(settings) <= RECIPE_KEYS, set(settings) - RECIPE_KEYS
    assert (REPO / settings["vae"]).is_dir()
    EncodeChangeConfig.from_dict(settings)
