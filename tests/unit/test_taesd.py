"""The pack's TAESD on a CPU: fused oneDNN convolutions give the plain layers' images, and fall back to them
where they cannot (training through the decoder, autocast, an op that fails or disagrees)."""
import logging

import pytest
import torch

import fmboost.models.taesd as taesd_module
from fmboost.flow.runtime import cpu_dtype
from fmboost.models.taesd import TAESD
from fmboost.training import metrics
from fmboost.training.data import load_rgb
from support import REPO

FUSED_AVAILABLE = taesd_module._pointwise_convolution() is not None


@pytest.fixture(scope="module")
def photo():
    """A batch of two whole photos, 296 × 448 px: an odd latent height (37), as the plain layers handle it."""
    img = load_rgb(REPO / "assets" / "fmboost_example.png")
    return torch.stack([img, img.flip(-1)])


def plain_and_fused(dtype, photo):
    vae = TAESD.from_folder(REPO / "weights" / "taesd").set_precision(dtype)
    with torch.inference_mode():
        z = vae.encode(photo)
        fused = vae.fused, z, vae.decode(z)
        vae.fused = False
        plain = vae.encode(photo), vae.decode(z)
    return fused, plain


@pytest.mark.skipif(not FUSED_AVAILABLE, reason="this torch build has no oneDNN fused convolution")
def test_fused_layers_give_the_plain_layers_images_in_float32(photo):
    (used, z, img), (z_plain, img_plain) = plain_and_fused(torch.float32, photo)
    assert used is True
    torch.testing.assert_close(z, z_plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(img, img_plain, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not FUSED_AVAILABLE, reason="this torch build has no oneDNN fused convolution")
def test_fused_layers_in_bfloat16_are_as_close_to_float32_as_the_plain_layers(photo):
    (_, z32, img32), _ = plain_and_fused(torch.float32, photo)
    (used, z, img), (z_plain, img_plain) = plain_and_fused(torch.bfloat16, photo)
    if not used:
        # allowed only on a CPU without bf16 instructions (an AVX2-only one, where `auto` picks fp32 anyway):
        # oneDNN's fused bf16 convolution is not there or not right, and the pack keeps its plain layers
        assert cpu_dtype() == torch.float32
        torch.testing.assert_close(z, z_plain, rtol=0, atol=0)
        torch.testing.assert_close(img, img_plain, rtol=0, atol=0)
        return
    err_fused, err_plain = (z - z32).abs().mean(), (z_plain - z32).abs().mean()
    assert err_fused < 1.2 * err_plain, (err_fused, err_plain)   # seen: 0.029 against 0.030
    assert metrics.psnr(img, img32).min().item() > 40
    assert metrics.psnr(img, img_plain).min().item() > 40


def test_decoding_with_gradients_uses_the_plain_layers(photo):
    """The trainer's pixel loss back-propagates through the decoder; the fused op has no backward."""
    vae = TAESD.from_folder(REPO / "weights" / "taesd")
    z = vae.encode(photo).detach().requires_grad_(True)
    vae.decode(z).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_an_op_that_fails_or_disagrees_falls_back_to_the_plain_layers(photo, monkeypatch, caplog):
    with torch.inference_mode():
        want = TAESD.from_folder(REPO / "weights" / "taesd")
        want.fused = False
        want = want.encode(photo)

    def failing(*args):
        raise RuntimeError("not built with oneDNN")
    failing.binary = failing

    cases = [(failing, "unavailable")]
    real = taesd_module._pointwise_convolution()
    if real is not None:
        def off_by_a_tenth(*args):
            return real(*args) * 1.1
        off_by_a_tenth.binary = lambda *args: real.binary(*args) * 1.1
        cases.append((off_by_a_tenth, "disagree"))
    for op, message in cases:
        monkeypatch.setattr(taesd_module, "_pointwise_convolution", lambda op=op: op)
        vae = TAESD.from_folder(REPO / "weights" / "taesd")
        with caplog.at_level(logging.INFO), torch.inference_mode():
            got = vae.encode(photo)
        assert vae.fused is False
        torch.testing.assert_close(got, want)
        assert message in caplog.text


def test_onednn_switched_off_after_the_check_uses_the_plain_layers(photo):
    vae = TAESD.from_folder(REPO / "weights" / "taesd")
    with torch.inference_mode():
        fused = vae.encode(photo)
        with torch.backends.mkldnn.flags(enabled=False):
            off = vae.encode(photo)
    torch.testing.assert_close(off, fused, rtol=1e-4, atol=1e-4)
