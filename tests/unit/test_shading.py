"""Shading correction (flow.shading): large-scale shading and colour pulled to the low-res image's, detail kept.

Real TAESD and the pack's CC0 example photo: a latent whose decoded image has a colour cast and a brightness
drift stands in for what a small flow model makes. The pass here moves the latent by two encodes (the exact
move); the pack's learned move, which the node uses, is held to it in test_encode_change.py."""
import dataclasses

import pytest
import torch

from fmboost.flow import InputError, SolverSettings, UpscaleSettings, upscale
from fmboost.flow.shading import SHADING_SIGMA, correct_shading, from_ycbcr, gaussian_blur, to_ycbcr
from fmboost.models.taesd import TAESD
from fmboost.training import metrics
from fmboost.training.data import downscale2, load_rgb
from support import REPO


@pytest.fixture(scope="module")
def vae():
    return TAESD.from_folder(REPO / "weights" / "taesd", change=False)


@pytest.fixture(scope="module")
def photo():
    img = load_rgb(REPO / "assets" / "fmboost_example.png")
    _, h, w = img.shape
    y, x = (h - 128) // 2, (w - 128) // 2
    return img[:, y:y + 128, x:x + 128][None]


def cast(img):
    """An orange cast and a darker left half: the drift the shipped model's flow adds, exaggerated."""
    ramp = torch.linspace(-0.06, 0.02, img.shape[-1]).view(1, 1, 1, -1)
    return (img * torch.tensor([1.08, 1.0, 0.9]).view(1, 3, 1, 1) + 0.02 + ramp).clamp(0, 1)


@torch.inference_mode()
def test_a_colour_cast_goes_and_the_detail_stays(vae, photo):
    low = vae.encode(downscale2(photo))
    drifted = vae.encode(cast(photo))
    before = vae.decode(drifted)
    after = vae.decode(correct_shading(vae, low, drifted, passes=1))
    colour_before, colour_after = (metrics.colour_error(x, photo).item() for x in (before, after))
    assert colour_before > 5 and colour_after < colour_before / 3, (colour_before, colour_after)  # seen: 6.1, 1.5
    blurred = [metrics.psnr(gaussian_blur(x, 4), gaussian_blur(photo, 4)).item() for x in (before, after)]
    assert blurred[1] > blurred[0] + 4, blurred          # seen: 31.1 → 37.2 dB over 4 px
    assert metrics.psnr(after, photo).item() > metrics.psnr(before, photo).item() + 0.3   # seen: +0.56 dB
    # as much fine detail as before (seen: 1.15×). Not the same grain: TAESD decodes its own fine texture, and
    # a smooth change of the encoder's input re-draws it (the high-pass of a photo's own round trip correlates
    # with the photo's by 0.1)
    assert 0.8 < metrics.detail_ratio(after, before).item() < 1.3
    # a second pass goes on closer; none changes nothing
    twice = vae.decode(correct_shading(vae, low, drifted, passes=2))
    assert metrics.colour_error(twice, photo).item() < colour_before / 3
    assert correct_shading(vae, low, drifted, passes=0) is drifted


@torch.inference_mode()
def test_a_flat_low_res_image_makes_a_flat_result(vae):
    grey = torch.full((1, 3, 64, 64), 0.5)
    low = vae.encode(grey)
    scratched = vae.encode(cast(torch.full((1, 3, 128, 128), 0.5)))
    std_before = (vae.decode(scratched) * 255).std(dim=(-2, -1)).max().item()
    out = vae.decode(correct_shading(vae, low, scratched, passes=1)) * 255
    assert std_before > 4 and out.std(dim=(-2, -1)).max().item() < std_before / 3
    assert (out.mean(dim=(-2, -1)) - 127.5).abs().max().item() < 4


@torch.inference_mode()
def test_batch_items_are_corrected_as_if_alone(vae, photo):
    pair = torch.cat([photo, photo.flip(-1)])
    low, drifted = vae.encode(downscale2(pair)), vae.encode(cast(pair))
    both = correct_shading(vae, low, drifted, passes=1)
    for i in range(2):
        alone = correct_shading(vae, low[i:i + 1], drifted[i:i + 1], passes=1)
        # a batch rounds differently from one item (1e-6 in pixels), and two encodes at full size amplify
        # that about a hundred times (seen: 2.3e-4); leaking one item into another would move it by ~0.1
        torch.testing.assert_close(both[i:i + 1], alone, atol=1e-3, rtol=1e-3)


def test_gaussian_blur_keeps_a_constant_and_small_images():
    x = torch.full((2, 3, 5, 7), 0.25)
    torch.testing.assert_close(gaussian_blur(x, SHADING_SIGMA), x)   # smaller than the kernel: replicated
    y = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(y, 2.0)
    assert blurred.shape == y.shape
    assert abs(blurred.mean().item() - y.mean().item()) < 0.01 and blurred.std() < y.std() / 3


@torch.inference_mode()
def test_upscale_runs_the_passes_the_settings_ask_for(vae, photo):
    """upscale = the flow, then correct_shading with its settings' passes; without a VAE it says what to do."""
    low = vae.encode(downscale2(photo))[..., :4, :4]

    def network(x, t, context):
        return torch.zeros_like(x)
    base = UpscaleSettings(mode="latent", noise_step=0, solver=SolverSettings("euler", steps=1))
    plain = upscale(network, low, base)
    corrected = upscale(network, low, dataclasses.replace(base, shading_correction=1), vae=vae)
    torch.testing.assert_close(corrected, correct_shading(vae, low, plain, passes=1))
    assert (corrected - plain).abs().mean() > 1e-3
    with pytest.raises(InputError, match="shading correction needs a VAE"):
        upscale(network, low, dataclasses.replace(base, shading_correction=1))
    calls = []
    upscale(network, low, dataclasses.replace(base, shading_correction=2), vae=vae,
            before_window=lambda: calls.append(1))
    assert len(calls) == 2   # Cancel is checked before each pass


def test_ycbcr_is_bt601_and_goes_back():
    """The reference's brightness and colour are split in BT.601 YCbCr (flow.shading.to_ycbcr)."""
    colours = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]]).T.view(1, 3, 1, 4)
    ycc = to_ycbcr(colours)[0, :, 0].T
    torch.testing.assert_close(ycc[0], torch.tensor([1.0, 0.0, 0.0]))              # white: no chroma
    torch.testing.assert_close(ycc[1], torch.tensor([0.299, -0.168736, 0.5]))      # red: Cr at its top
    torch.testing.assert_close(ycc[2], torch.tensor([0.114, 0.5, -0.081312]))      # blue: Cb at its top
    torch.testing.assert_close(ycc[3], torch.tensor([0.5, 0.0, 0.0]))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_ycbcr(to_ycbcr(x)), x)
