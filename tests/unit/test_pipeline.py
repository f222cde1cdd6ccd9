"""The upscale pipeline: shapes, padding, batches, seeds, cascades, solvers, input checks."""
import pytest
import torch

from fmboost.flow import (EvaluationBudgetExceeded, InputError, SolverSettings, UpscaleSettings, integrate,
                          item_noise, upscale)
from fmboost.flow.source import make_source
from fmboost.models.unet import CFMUNet, UNetConfig

CFG = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), attention_resolutions=(4,),
                 num_heads=2, dim_head=16)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return CFMUNet(CFG).eval().requires_grad_(False)


def settings(**kw):
    base = dict(solver=SolverSettings("euler", steps=2), size_multiple=CFG.size_multiple, seed=7)
    return UpscaleSettings(**(base | kw))


def raw_latent(b, h, w, seed=1):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed)) * 5


@pytest.mark.parametrize("h,w", [(8, 8), (8, 12), (9, 9), (5, 7), (2, 3)])
def test_any_size_gives_twice_the_size(net, h, w):
    out = upscale(net, raw_latent(1, h, w), settings())
    assert out.shape == (1, 4, 2 * h, 2 * w)
    assert torch.isfinite(out).all()


def test_padding_leaves_no_border(net):
    # 9×9 → 18×18 needs padding to 20×20; the rows next to the crop must look like the rest
    out = upscale(net, raw_latent(1, 9, 9), settings())
    inner = out[..., 2:-2, 2:-2].std()
    for edge in (out[..., -1, :], out[..., :, -1]):
        assert 0.5 * inner < edge.std() < 2 * inner


def test_batch_items_equal_single_runs(net):
    lat = raw_latent(3, 8, 8)
    batch = upscale(net, lat, settings())
    for i in range(3):
        alone = upscale(net, lat[i:i + 1], settings(), batch_index=[i])
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_max_batch_splits_without_changing_results(net):
    lat = raw_latent(5, 6, 6)
    seen = []
    whole = upscale(net, lat, settings())
    split = upscale(net, lat, settings(), max_batch=2, on_progress=lambda p: seen.append((p.rows, p.planned)))
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    assert [r for r, _ in seen[::2]] == [slice(0, 2), slice(2, 4), slice(4, 5)] and seen[0][1] == 6


def test_adaptive_batch_items_equal_single_runs(net):
    lat = raw_latent(2, 4, 4)
    s = settings(solver=SolverSettings("dopri5", atol=1e-4, rtol=1e-3, max_evals=300))
    batch = upscale(net, lat, s)
    for i in range(2):
        torch.testing.assert_close(batch[i:i + 1], upscale(net, lat[i:i + 1], s, batch_index=[i]),
                                   atol=1e-5, rtol=1e-5)


def test_seed_reproduces_and_changes(net):
    lat = raw_latent(1, 8, 8)
    a, b = upscale(net, lat, settings(seed=3)), upscale(net, lat, settings(seed=3))
    assert torch.equal(a, b)
    c = upscale(net, lat, settings(seed=4))
    assert (a - c).abs().max() > 1e-2


def test_noise_step_zero_is_deterministic_in_the_seed(net):
    lat = raw_latent(1, 8, 8)
    a, b = upscale(net, lat, settings(seed=1, noise_step=0)), upscale(net, lat, settings(seed=2, noise_step=0))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # ᾱ[0] = 1: the noise has no weight


def test_item_noise_depends_on_seed_plus_index_only():
    n = item_noise((4, 6, 6), seed=10, batch_index=[0, 1, 2])
    torch.testing.assert_close(n[2], item_noise((4, 6, 6), seed=10, batch_index=[2])[0], atol=0, rtol=0)
    torch.testing.assert_close(n[1], item_noise((4, 6, 6), seed=11, batch_index=[0])[0], atol=0, rtol=0)
    assert n.std().item() == pytest.approx(1.0, abs=0.15)


def test_cascade(net):
    once = upscale(net, raw_latent(1, 4, 6), settings())
    twice = upscale(net, once, settings())
    assert twice.shape == (1, 4, 16, 24)


def test_latent_scale_is_applied_once(net):
    """Zero steps of change: with noise step 0 and a zero network, the output is the bilinear source."""
    lat = raw_latent(1, 4, 4)
    out = upscale(lambda x, t, c: torch.zeros_like(x), lat, settings(noise_step=0))
    expected = torch.nn.functional.interpolate(lat, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,steps,evals", [("euler", 3, 3), ("midpoint", 3, 6), ("heun", 3, 6),
                                                ("rk4", 2, 8)])
def test_fixed_solvers_evaluation_counts_and_accuracy(method, steps, evals):
    # dx/dt = x·cos(t) has the exact solution x0·exp(sin t)
    count = []
    out = integrate(lambda x, t: x * torch.cos(t), torch.ones(3), SolverSettings(method, steps=steps),
                    on_eval=lambda i: count.append(i.nfe))
    exact = torch.exp(torch.sin(torch.tensor(1.0, dtype=torch.float64)))
    err = (out - exact).abs().max().item()
    assert len(count) == evals
    assert err < {"euler": 0.2, "midpoint": 0.05, "heun": 0.05, "rk4": 1e-3}[method]
    # convergence order: doubling the steps divides the error by 2^order
    finer = integrate(lambda x, t: x * torch.cos(t), torch.ones(3, dtype=torch.float64),
                      SolverSettings(method, steps=16))
    coarse = integrate(lambda x, t: x * torch.cos(t), torch.ones(3, dtype=torch.float64),
                       SolverSettings(method, steps=8))
    order = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[method]
    ratio = (coarse - exact).abs().max() / (finer - exact).abs().max()
    assert 2 ** order * 0.6 < ratio < 2 ** order * 1.6


def test_dopri5_accuracy_and_cap():
    out = integrate(lambda x, t: x * torch.cos(t), torch.ones(3, dtype=torch.float64),
                    SolverSettings("dopri5", atol=1e-8, rtol=1e-8, max_evals=500))
    assert (out - torch.exp(torch.sin(torch.tensor(1.0, dtype=torch.float64)))).abs().max() < 1e-6
    with pytest.raises(EvaluationBudgetExceeded, match="used its 6 network evaluations"):
        integrate(lambda x, t: x * torch.cos(40 * t), torch.ones(3),
                  SolverSettings("dopri5", atol=1e-10, rtol=1e-10, max_evals=6))


def test_callback_exception_stops_within_one_evaluation(net):
    calls = []

    class Cancelled(Exception):
        pass

    def on_progress(p):
        calls.append(p.nfe)
        if p.nfe == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        upscale(net, raw_latent(1, 8, 8), settings(solver=SolverSettings("euler", steps=10)),
                on_progress=on_progress)
    assert calls == [1, 2]


def test_progress_reports_plan_and_preview(net):
    seen = []
    upscale(net, raw_latent(2, 5, 5), settings(solver=SolverSettings("heun", steps=2)),
            on_progress=lambda p: seen.append((p.nfe, p.planned, tuple(p.preview(rows=2).shape))))
    assert seen == [(i, 4, (2, 4, 10, 10)) for i in range(1, 5)]


def test_preview_is_one_euler_jump_to_the_end():
    from fmboost.flow.pipeline import Progress
    from fmboost.flow.solvers import EvalInfo
    x, v = torch.ones(2, 4, 6, 6), torch.full((2, 4, 6, 6), 2.0)
    p = Progress(1, 4, EvalInfo(1, torch.tensor(0.25), x, v), slice(0, 2), (5, 5))
    assert p.preview().shape == (1, 4, 5, 5)
    torch.testing.assert_close(p.preview(), torch.full((1, 4, 5, 5), 1 + 0.75 * 2))


@pytest.mark.parametrize("shape", [(8, 6), (2, 8, 6), (2, 1, 8, 6)])
def test_noise_mask_keeps_its_layout(shape):
    from fmboost.flow.source import upsample_mask
    mask = torch.zeros(shape)
    mask[..., :4, :] = 1.0
    up = upsample_mask(mask)
    assert up.shape == (*shape[:-2], 16, 12)
    assert up[..., :7, :].min() == 1.0 and up[..., 9:, :].max() == 0.0


@pytest.mark.parametrize("bad,needle", [
    (torch.zeros(1, 16, 8, 8), "16 channels"),
    (torch.zeros(1, 4, 2, 8, 8), "video latent"),
    (torch.zeros(0, 4, 8, 8), "empty"),
    (torch.zeros(1, 4, 1, 1), "too small"),
    (torch.full((1, 4, 8, 8), float("nan")), "NaN"),
    (torch.full((1, 4, 8, 8), float("inf")), "NaN or Inf"),
])
def test_bad_latents(net, bad, needle):
    with pytest.raises(InputError, match=needle):
        upscale(net, bad, settings())


@pytest.mark.parametrize("kw,needle", [
    (dict(method="euler", steps=0), "steps must be at least 1"),
    (dict(method="dopri5", atol=-1.0), "tolerances must be positive"),
    (dict(method="rk45"), "unknown solver method"),
])
def test_bad_solver_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SolverSettings(**kw)


def test_bad_noise_step(net):
    with pytest.raises(ValueError, match="0..999"):
        upscale(net, raw_latent(1, 4, 4), settings(noise_step=1000))


def test_pixel_mode_needs_a_vae():
    with pytest.raises(ValueError, match="needs a VAE"):
        make_source(torch.zeros(1, 4, 4, 4), "pixel", 0.18215, None)


class StubVAE:
    """A VAE of another family: 8× down-sampling but 16 latent channels."""

    def decode(self, latent):
        return torch.rand(latent.shape[0], 3, latent.shape[2] * 8, latent.shape[3] * 8)

    def encode(self, pixels):
        return torch.zeros(pixels.shape[0], 16, pixels.shape[2] // 8, pixels.shape[3] // 8)


def test_pixel_mode_refuses_a_vae_of_another_family():
    with pytest.raises(ValueError, match="VAE does not fit this model"):
        make_source(torch.zeros(1, 4, 4, 4), "pixel", 0.18215, StubVAE())



def test_settings_follow_the_model_and_say_when_they_do_not():
    """flow.settings.resolve: the one place that turns a checkpoint's method into an upscale's settings."""
    from fmboost.flow.settings import MissingVAE, resolve
    from fmboost.models import MethodSettings
    shipped_like = MethodSettings(upsampling_mode="pixel", noise_step=100, source_vae="taesd", solver="heun",
                                  solver_steps=3)
    r = resolve(shipped_like, size_multiple=4)
    assert (r.settings.mode, r.settings.noise_step, r.settings.size_multiple) == ("pixel", 100, 4)
    assert (r.settings.solver.method, r.settings.solver.steps) == ("heun", 3)
    assert r.builtin_vae and r.mismatch is None          # no VAE connected: the pack's TAESD builds the source
    assert not resolve(shipped_like, have_vae=True).builtin_vae
    r = resolve(shipped_like, upsampling="latent", noise_step=7, solver=SolverSettings("rk4", steps=2))
    assert r.settings.mode == "latent" and r.settings.noise_step == 7 and r.settings.solver.method == "rk4"
    assert "trained for pixel up-sampling, not latent" in r.mismatch
    authors = MethodSettings()   # the authors' models: pixel mode with their own (SD) VAE
    with pytest.raises(MissingVAE, match="connect the vae input"):
        resolve(authors)
    assert resolve(authors, have_vae=True).settings.mode == "pixel"
    latent_model = MethodSettings(upsampling_mode="latent")
    assert resolve(latent_model).settings.mode == "latent" and resolve(latent_model).mismatch is None
    with pytest.raises(MissingVAE, match="or choose latent up-sampling"):
        resolve(latent_model, upsampling="pixel")
    with pytest.raises(ValueError, match="unknown up-sampling"):
        resolve(latent_model, upsampling="nearest")
    # the core's solver default and an unconnected solver input of a model without a recommendation agree
    assert resolve(latent_model).settings.solver == SolverSettings()
    # shading correction: the model's passes unless the user sets them; none for models that do not say
    assert resolve(latent_model).settings.shading_correction == 0
    corrected = MethodSettings(upsampling_mode="latent", shading_correction=1)
    assert resolve(corrected).settings.shading_correction == 1
    assert resolve(corrected, shading_correction=0).settings.shading_correction == 0
    assert resolve(latent_model, shading_correction=3).settings.shading_correction == 3
    with pytest.raises(ValueError, match="shading_correction must be"):
        resolve(corrected, shading_correction=5)


class CountingTAESD:
    """The pack's TAESD, counting what it decodes."""

    def __init__(self, vae):
        self.vae, self.decoded = vae, []

    def decode(self, latent):
        self.decoded.append(tuple(latent.shape[-2:]))
        return self.vae.decode(latent)

    def __getattr__(self, name):
        if name == "vae":
            raise AttributeError(name)
        return getattr(self.vae, name)


@torch.inference_mode()
def test_an_upscale_decodes_the_low_res_latent_once_for_its_source_and_its_shading_reference(net):
    """Pixel mode's source and the shading correction's reference both want TAESD's decode of the low-res latent
    (flow.source.DecodeOnce): the second costs nothing, and the result is what two decodes give."""
    from fmboost.flow.source import DecodeOnce
    from fmboost.models.taesd import TAESD
    from support import REPO
    taesd = TAESD.from_folder(REPO / "weights" / "taesd")
    latent = raw_latent(2, 8, 8) / 5
    s = settings(mode="pixel", shading_correction=1)
    counting = CountingTAESD(taesd)
    out = upscale(net, latent, s, vae=counting)
    assert counting.decoded == [(8, 8), (16, 16)]   # the low-res latent once, then the pass's result
    # the node hands it a DecodeOnce of its own, with the source built first: the same
    node = CountingTAESD(taesd)
    once = DecodeOnce(node)
    from fmboost.flow.pipeline import build_source
    again = upscale(net, latent, s, source=build_source(latent, s, once), shading_vae=once)
    assert node.decoded == [(8, 8), (16, 16)]
    torch.testing.assert_close(again, out)
    # without the memo: the same result from two decodes of the low-res latent
    counting = CountingTAESD(taesd)
    plain = upscale(net, latent, s, source=build_source(latent, s, counting), shading_vae=counting)
    assert counting.decoded == [(8, 8), (8, 8), (16, 16)]
    torch.testing.assert_close(plain, out)
    # another latent is decoded afresh
    assert once.decode(latent[:1]).shape == (1, 3, 64, 64) and node.decoded[-1] == (8, 8)
