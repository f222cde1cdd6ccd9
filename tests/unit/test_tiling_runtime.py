"""Large-latent and fast paths: tiled evaluation, out-of-memory retry, memory planning, precision, layout, compile."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fmboost.flow import SolverSettings, UpscaleSettings, upscale
from fmboost.flow.runtime import RuntimeOptions, prepare_network
from fmboost.flow.tiling import (DoesNotFit, TiledNetwork, is_out_of_memory, plan_run, run_with_smaller_tiles,
                                 window_starts)
from fmboost.models import load_checkpoint
from fmboost.models.taesd import TAESD
from fmboost.models.unet import CFMUNet, UNetConfig
from fmboost.flow.settings import resolve
from support import REPO, SHARED, require_shared

CFG = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2,),
                 num_heads=2, dim_head=16)


def tiny_net(dtype=torch.float32):
    torch.manual_seed(0)
    return CFMUNet(CFG).eval().requires_grad_(False).set_precision(dtype)


@pytest.mark.parametrize("size,tile,overlap", [(64, 32, 8), (70, 32, 8), (33, 16, 4), (40, 40, 8), (100, 48, 12)])
def test_windows_cover_everything_with_the_overlap(size, tile, overlap):
    starts = window_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    covered = torch.zeros(size)
    for s in starts:
        covered[s:s + tile] += 1
    assert (covered >= 1).all()
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap, "neighbours share at least the overlap"


def test_blend_weights_sum_to_one_and_fade_at_inner_edges():
    tiled = TiledNetwork(lambda x, t, c: x, tile=32, overlap=8, multiple=4)
    plan = tiled.windows(72, 56)
    total = torch.zeros(72, 56)
    for (y, x, h, w), weight in plan:
        total[y:y + h, x:x + w] += weight
    torch.testing.assert_close(total, torch.ones(72, 56))
    (y, x, h, w), first = plan[0]
    assert first[0, 0] == 1.0, "image corners are not faded"
    assert first[h // 2, -1] < 0.2, "a window's inner edge fades out"


def test_tiling_is_exact_for_a_pointwise_network():
    # With no spatial interaction, blending normalised weights must give back the untiled result exactly.
    def pointwise(x, t, c):
        return torch.tanh(x) * 2 + c * t
    x, c = torch.randn(2, 4, 56, 72), torch.randn(2, 4, 56, 72)
    t = torch.tensor(0.3)
    torch.testing.assert_close(TiledNetwork(pointwise, 24, multiple=4)(x, t, c), pointwise(x, t, c))


def test_tiled_network_calls_the_net_on_windows_no_larger_than_the_tile():
    seen = []

    def net(x, t, c):
        seen.append(tuple(x.shape[-2:]))
        return x
    TiledNetwork(net, 32, multiple=4)(torch.zeros(1, 4, 80, 48), torch.tensor(0.0), torch.zeros(1, 4, 80, 48))
    assert seen and all(h <= 32 and w <= 32 and h % 4 == 0 and w % 4 == 0 for h, w in seen)
    assert len(seen) == len(window_starts(80, 32, 8)) * len(window_starts(48, 32, 8))


@pytest.fixture(scope="module")
def shipped():
    ck = load_checkpoint(REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors")
    return ck, ck.build_network(torch.float32), TAESD.from_folder(REPO / "weights" / "taesd")


def psnr(a, b):
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def test_tiled_upscale_of_a_photo_matches_the_untiled_one(shipped):
    """The shipped model on a held-out photo (512×384 px → latent 48×64 → 96×128): windows of 48 and 32
    latent pixels give images within invisible distance of the untiled run, and no worse against the truth."""
    ck, net, vae = shipped
    path = sorted(require_shared(SHARED / "data" / "photos" / "val").iterdir())[3]
    truth = torch.from_numpy(np.array(Image.open(path).convert("RGB").resize((512, 384)))).float()
    truth = truth.div(255).permute(2, 0, 1)[None]
    # the node's defaults for this model (flow.settings.resolve), not numbers written here for one model, but
    # without the shading correction: it runs after the windows, on the whole image, and re-draws TAESD's fine
    # grain from any small change of its input (the difference tiling makes, 40.7 dB, becomes 38.1 dB)
    settings = resolve(ck.method, size_multiple=ck.net_config.size_multiple, have_vae=True).settings
    settings = dataclasses.replace(settings, shading_correction=0)
    with torch.inference_mode():
        low = vae.encode(F.interpolate(truth, scale_factor=0.5, mode="area"))
        whole = vae.decode(upscale(net, low, settings, vae=vae))
        for tile, min_psnr in ((48, 40.0), (32, 33.0)):
            tiled = vae.decode(upscale(net, low, settings, vae=vae, tile=tile))
            assert psnr(tiled, whole) > min_psnr, tile
            assert psnr(tiled, truth) > psnr(whole, truth) - 0.2, tile
            # Seams: no column or row of the error map stands out from the rest by much.
            err = (tiled - whole).pow(2).mean(dim=(0, 1))
            assert err.mean(0).max() < 30 * err.mean(0).median(), tile


def test_a_check_runs_before_every_window_and_can_stop_an_evaluation():
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    net_calls = []
    tiled = TiledNetwork(lambda x, t, c: net_calls.append(1) or x, 16, multiple=2, before_window=check)
    with pytest.raises(Stop):
        tiled(torch.zeros(1, 4, 48, 48), torch.tensor(0.0), torch.zeros(1, 4, 48, 48))
    assert len(net_calls) == 2, "the run stopped inside the evaluation, before its third window"


class OutOfMemoryAbove:
    """A velocity net that raises torch's own out-of-memory error on windows larger than `limit`."""

    def __init__(self, net, limit):
        self.net, self.limit, self.sizes = net, limit, []

    def __call__(self, x, t, c):
        self.sizes.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x, t, c)


def test_out_of_memory_retries_with_smaller_windows_until_it_fits():
    net = tiny_net()
    latent = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(0))
    settings = UpscaleSettings(solver=SolverSettings("euler", steps=2), size_multiple=2, seed=3)
    flaky = OutOfMemoryAbove(net, limit=24)
    freed, retries = [], []
    out = run_with_smaller_tiles(lambda tile: upscale(flaky, latent, settings, tile=tile), None, 80, 2, 8,
                                 on_oom=lambda: freed.append(1), on_retry=retries.append)
    assert retries == [40, 20] and len(freed) == 2
    torch.testing.assert_close(out, upscale(net, latent, settings, tile=20))


def test_out_of_memory_below_the_smallest_window_and_other_errors_are_raised():
    net = tiny_net()
    latent = torch.randn(1, 4, 16, 16)
    settings = UpscaleSettings(solver=SolverSettings("euler", steps=1), size_multiple=2)
    with pytest.raises(torch.OutOfMemoryError):
        run_with_smaller_tiles(lambda tile: upscale(OutOfMemoryAbove(net, 4), latent, settings, tile=tile),
                               None, 32, 2, 16)

    def broken(tile):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_smaller_tiles(broken, None, 32, 2, 8)
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_memory_plan():
    bpp = 1000
    # Fits whole: as many items per call as the budget allows.
    assert plan_run(bpp, 8, 64, 64, budget=bpp * 64 * 64 * 3, multiple=4, min_tile=16) == (3, None)
    # One item does not fit: the largest square window that does, rounded to the size multiple.
    assert plan_run(bpp, 2, 256, 256, budget=bpp * 100 * 100, multiple=4, min_tile=16) == (1, 100)
    assert plan_run(bpp, 2, 256, 256, budget=bpp * 99 * 99, multiple=4, min_tile=16) == (1, 96)
    # The user's window size is kept when it fits.
    assert plan_run(bpp, 4, 256, 256, budget=bpp * 64 * 64 * 2, multiple=4, min_tile=16, tile=64) == (2, 64)
    with pytest.raises(DoesNotFit, match="smallest windows"):
        plan_run(bpp, 1, 256, 256, budget=bpp * 8 * 8, multiple=4, min_tile=16)


def test_half_precision_keeps_the_time_embedding_in_fp32_and_stays_close():
    ref = tiny_net(torch.float32)
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.1, 0.9])
    expected = ref(x, t, c)
    for dtype in (torch.bfloat16, torch.float16):
        net = tiny_net(dtype)
        assert net.time_embed[0].weight.dtype == torch.float32
        assert net.input_blocks[0][0].weight.dtype == dtype and net.dtype == dtype
        out = net(x, t, c)
        assert out.dtype == torch.float32, "the velocity comes back in the state's dtype"
        rel = (out - expected).norm() / expected.norm()
        assert rel < 0.03, (dtype, float(rel))


def test_the_shipped_pipeline_in_bf16_gives_the_fp32_image():
    """What `auto` runs on a CPU with bf16 instructions: the network and the pack's TAESD (channels-last) in
    bf16, the ODE state in fp32. The photo must come out the same to the eye and no worse against the truth."""
    ck = load_checkpoint(REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors")
    img = Image.open(REPO / "assets" / "fmboost_example.png").convert("RGB").resize((256, 256))
    truth = torch.from_numpy(np.array(img)).float().div(255).permute(2, 0, 1)[None]
    settings = resolve(ck.method, size_multiple=ck.net_config.size_multiple, have_vae=True).settings
    ref_vae = TAESD.from_folder(REPO / "weights" / "taesd")
    out = {}
    with torch.inference_mode():
        low = ref_vae.encode(F.interpolate(truth, scale_factor=0.5, mode="area"))
        for dtype in (torch.float32, torch.bfloat16):
            vae = TAESD.from_folder(REPO / "weights" / "taesd").set_precision(dtype)
            assert vae.encoder[0].weight.dtype == dtype
            assert vae.encoder[0].weight.is_contiguous(memory_format=torch.channels_last)
            z = upscale(ck.build_network(dtype), low, settings, vae=vae)
            assert z.dtype == torch.float32 and vae.encode(truth).dtype == torch.float32
            out[dtype] = ref_vae.decode(z)
    assert psnr(out[torch.bfloat16], out[torch.float32]) > 38
    assert psnr(out[torch.bfloat16], truth) > psnr(out[torch.float32], truth) - 0.05


def test_channels_last_gives_the_same_velocity():
    net = tiny_net()
    x, c, t = torch.randn(2, 4, 16, 24), torch.randn(2, 4, 16, 24), torch.tensor(0.4)
    expected = net(x, t, c)
    fast = prepare_network(net, torch.device("cpu"), RuntimeOptions(channels_last="on"))
    assert net.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x, t, c), expected, atol=1e-5, rtol=1e-4)
    # attention blocks hand channels-last on to the convolutions after them
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
             for m in net.modules() if type(m).__name__ == "AttentionBlock"]
    fast(x.contiguous(memory_format=torch.channels_last), t, c.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    prepare_network(net, torch.device("cpu"), RuntimeOptions(channels_last="auto"))  # CPU: back to NCHW
    assert net.input_blocks[0][0].weight.is_contiguous() and not net.channels_last
    with pytest.raises(ValueError, match="compile mode"):
        RuntimeOptions(compile="fast")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler")
def test_compile_keeps_a_bounded_set_of_sizes_and_warns_when_it_runs_uncompiled(caplog):
    """Every new latent size, batch chunk or retry window is a new graph; past the bound, new sizes run eagerly
    (same numbers), with one warning instead of torch's silent stop."""
    from fmboost.flow.runtime import CompiledNetwork
    net = tiny_net()
    compiled = CompiledNetwork(net, "compile", limit=2)
    t = torch.tensor(0.3)
    with torch.inference_mode():
        for size in (8, 12, 16, 20, 8):
            x = torch.randn(1, 4, size, size)
            torch.testing.assert_close(compiled(x, t, x), net(x, t, x), atol=1e-4, rtol=1e-3)
    assert len(compiled.shapes) == 2 and compiled.fallbacks == 2
    warnings = [r for r in caplog.records if "runs uncompiled" in r.getMessage()]
    assert len(warnings) == 1 and "1×4×16×16" in warnings[0].getMessage()
    compiled.release()
    assert compiled.shapes == set() and compiled._compiled is None


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler")
def test_compiled_network_matches_eager():
    net = tiny_net()
    x, c, t = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.tensor(0.25)
    expected = net(x, t, c)
    compiled = prepare_network(net, torch.device("cpu"), RuntimeOptions(compile="compile"))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, t, c), expected, atol=1e-4, rtol=1e-3)
        settings = UpscaleSettings(solver=SolverSettings("euler", steps=2), size_multiple=2, seed=1)
        latent = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(upscale(compiled, latent, settings), upscale(net, latent, settings),
                                   atol=1e-4, rtol=1e-3)


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ATen calls that read a device value on the host (`.item()`, `float(t)`, `bool(t)`, `nonzero`
    ...): on a GPU each is a synchronisation that stalls the queue, so the ODE loop must make none. (`.tolist()`
    and `.cpu()` of a CPU tensor do not reach the dispatcher; the CUDA bench checks those with sync debug mode.)"""
    SYNCING = {"item", "_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "unique",
               "_unique2"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
@pytest.mark.parametrize("tile", [None, 16])
def test_fixed_step_loop_never_reads_a_device_value_on_the_host(method, tile):
    from fmboost.flow.solvers import integrate
    net = tiny_net()
    x0, ctx = torch.randn(2, 4, 40, 40), torch.randn(2, 4, 40, 40)
    run = TiledNetwork(net, tile, 4, net.config.size_multiple) if tile else net
    evals = []
    with torch.inference_mode(), HostReads() as reads:
        out = integrate(lambda x, t: run(x, t, ctx), x0, SolverSettings(method, steps=2),
                        on_eval=lambda info: evals.append(info.predicted_target()))
    assert reads.seen == [], f"host reads inside the ODE loop: {reads.seen}"
    assert len(evals) == SolverSettings(method, steps=2).planned_evals() and out.shape == x0.shape
    # the mode does see host reads when there are some, so the empty list above means something
    with torch.inference_mode(), HostReads() as reads:
        float(out.mean())
        bool(out.isfinite().all())
    assert reads.seen == ["item.default", "is_nonzero.default"]
