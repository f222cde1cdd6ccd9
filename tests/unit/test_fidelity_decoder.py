"""The pack's TAESD fidelity decoder (training/fidelity_decoder.py): closer to the low-res image than TAESD's
decoder on a photo it never saw, the brightness of the shading correction's reference, trained and written by
its command."""
import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from fmboost.flow.shading import SHADING_SIGMA, correct_shading, gaussian_blur, shading_reference, to_ycbcr
from fmboost.models.taesd import FIDELITY_DECODER, TAESD
from fmboost.training import metrics
from fmboost.training.data import downscale2, load_rgb, scan_images
from fmboost.training.fidelity_decoder import RECIPE_KEYS, fit, low_res_batch, photo_store
from support import REPO, SHARED, require_shared

TAESD_DIR = REPO / "weights" / "taesd"


@pytest.fixture(scope="module")
def example():
    """The pack's CC0 example photo, down-sampled ×2 as a low-res image. It is skimage's `chelsea`, one of the
    922 training photos but not among the 300 the shipped fidelity decoder was fitted on (its recipe's first
    300 of a shuffle with seed 0)."""
    return downscale2(load_rgb(REPO / "assets" / "fmboost_example.png")[None, :, :288])   # 144 × 224 px


def test_the_shipped_fidelity_decoder_is_closer_to_the_image_than_taesd(example):
    vae = TAESD.from_folder(TAESD_DIR)
    assert vae.fidelity_decoder is not None and (TAESD_DIR / FIDELITY_DECODER).exists()
    with torch.inference_mode():
        z = vae.encode(example)
        plain, fidelity = vae.decode(z), vae.decode_fidelity(z)
    gain = metrics.psnr(fidelity, example).item() - metrics.psnr(plain, example).item()
    assert gain > 0.5, gain
    # and not by drawing less of the image: its large scales are closer too (σ 2 px)
    blur = lambda x: gaussian_blur(x, SHADING_SIGMA)  # noqa: E731
    assert metrics.psnr(blur(fidelity), blur(example)) > metrics.psnr(blur(plain), blur(example))
    # without the file (or with fidelity=False) decode_fidelity is the plain decode
    plain_only = TAESD.from_folder(TAESD_DIR, fidelity=False)
    with torch.inference_mode():
        torch.testing.assert_close(plain_only.decode_fidelity(z), plain)


def chroma_distance(a, b):
    """RMS difference of two images' Cb and Cr (BT.601), 0–255."""
    return (((to_ycbcr(a)[:, 1:] - to_ycbcr(b)[:, 1:]) ** 2).mean().sqrt() * 255).item()


def test_the_shading_correction_takes_brightness_from_the_fidelity_decoder_and_colour_from_taesds(example):
    """correct_shading's reference is bicubic ×2 of the low-res image with the fidelity decoder's luma and the
    TAESD decoder's chroma (the fidelity decoder, fitted on luma, is paler). The pass moves the result's large
    scales there: its luma towards the fidelity decoder's, its colour towards TAESD's (the exact move, two
    encodes: what the reference is worth alone). Without the fidelity decoder both come from TAESD's."""
    with_fidelity = TAESD.from_folder(TAESD_DIR, change=False)
    without = TAESD.from_folder(TAESD_DIR, fidelity=False, change=False)
    with torch.inference_mode():
        low = with_fidelity.encode(example)
        out = with_fidelity.encode(F.interpolate(example, scale_factor=2, mode="bilinear", align_corners=False))
        refs = {name: gaussian_blur(F.interpolate(decode(low), scale_factor=2, mode="bicubic",
                                                  align_corners=False).clamp(0, 1), SHADING_SIGMA)
                for name, decode in (("fidelity", with_fidelity.decode_fidelity), ("plain", without.decode))}
        assert chroma_distance(refs["fidelity"], refs["plain"]) > 1.0          # seen: 1.5
        reference = shading_reference(with_fidelity, low)
        assert metrics.psnr(reference, refs["fidelity"]).item() > 60            # seen: 82 dB (clamping)
        assert chroma_distance(reference, refs["plain"]) < 0.2                  # seen: 0.06
        torch.testing.assert_close(shading_reference(without, low), refs["plain"])

        got = gaussian_blur(with_fidelity.decode(correct_shading(with_fidelity, low, out, 1)), SHADING_SIGMA)
        luma = {name: metrics.psnr(got, ref).item() for name, ref in refs.items()}
        assert luma["fidelity"] > luma["plain"] + 3, luma                      # seen: 41.3 and 35.5 dB
        colour = {name: chroma_distance(got, ref) for name, ref in refs.items()}
        assert colour["plain"] < colour["fidelity"] - 0.2, colour               # seen: 1.40 and 1.80
        got = gaussian_blur(with_fidelity.decode(correct_shading(without, low, out, 1)), SHADING_SIGMA)
        luma = {name: metrics.psnr(got, ref).item() for name, ref in refs.items()}
        assert luma["plain"] > luma["fidelity"] + 1.5, luma                    # seen: 39.1 and 36.1 dB


def test_fitting_brings_the_decoder_closer_to_its_training_crops():
    photos_dir = require_shared(SHARED / "data" / "photos" / "train")
    paths = scan_images(photos_dir, 256).usable[:2]
    photos = photo_store(paths, load_rgb, max_side=384)
    vae = TAESD.from_folder(TAESD_DIR, fidelity=False)
    batch = low_res_batch(photos, random.Random(7), 8, 128)
    before = vae.decoder.state_dict()
    state, steps = fit(vae, photos, steps=40, batch=4, crop=128, lr=5e-4, log=lambda _: None)
    assert steps == 40
    assert all(torch.equal(vae.decoder.state_dict()[k], v) for k, v in before.items())   # a copy was trained
    tuned = TAESD.from_folder(TAESD_DIR, fidelity=False)
    tuned.decoder.load_state_dict(state)
    with torch.inference_mode():
        z = vae.encode_scaled(batch)
        mse_before = F.mse_loss(vae.decoder(z), batch).item()
        mse_after = F.mse_loss(tuned.decoder(z), batch).item()
    assert mse_after < 0.95 * mse_before, (mse_before, mse_after)


def test_the_training_command_writes_a_decoder_the_pack_loads(tmp_path):
    photos = require_shared(SHARED / "data" / "photos" / "train")
    recipe = json.loads((REPO / "training" / "recipes" / "decoders" / "fidelity-decoder.json").read_text())
    recipe.update(images=str(photos), max_images=2, steps=3, batch=2, crop=128)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / FIDELITY_DECODER
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "train_fidelity_decoder.py"), "--config",
                          str(tmp_path / "r.json"), "--out", str(out), "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()["fmboost.fidelity_decoder"])
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert record["steps"] == 3 and record["images"] == 2 and record["recipe"] == "r.json"
    assert out.stat().st_mode & 0o044 == 0o044   # readable by all (safetensors alone writes 0600)
    vae = TAESD(TAESD_DIR / "taesd_encoder.safetensors", TAESD_DIR / "taesd_decoder.safetensors", out)
    assert vae.fidelity_decoder is not None
    with torch.inference_mode():
        img = vae.decode_fidelity(torch.zeros(1, 4, 8, 8))
    assert img.shape == (1, 3, 64, 64) and 0 <= img.min() and img.max() <= 1


@pytest.mark.parametrize("recipe", sorted((REPO / "training" / "recipes" / "decoders").glob("*.json")),
                         ids=lambda p: p.stem)
def test_every_decoder_recipe_holds_what_its_command_reads(recipe):
    settings = json.loads(recipe.read_text())
    assert settings.pop("comment", "").strip(), "a recipe says what it is for"
    assert set(settings) <= RECIPE_KEYS, set(settings) - RECIPE_KEYS
    assert {"images", "vae", "crop", "batch", "lr", "steps"} <= set(settings)
    assert (REPO / settings["vae"]).is_dir() and settings["crop"] % 16 == 0
