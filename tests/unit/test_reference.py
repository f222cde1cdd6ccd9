"""Our network, solvers, schedule and pipeline against the outputs of the authors' code (fixtures)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fmboost.flow import SolverSettings, UpscaleSettings, alpha_bar, integrate, q_sample, upscale
from fmboost.models import CFMUNet, UNetConfig, load_checkpoint

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return load_file(fixtures_dir / "small_golden.safetensors")


@pytest.fixture(scope="module")
def small_params(fixtures_dir):
    return json.loads((fixtures_dir / "small_config.json").read_text())["net_params"]


@pytest.fixture(scope="module")
def ema_net(fixtures_dir, small_params):
    return load_checkpoint(fixtures_dir / "small_net.safetensors", net_config=small_params).build_network()


@pytest.fixture(scope="module")
def ckpt_nets(fixtures_dir):
    path = fixtures_dir / "small_checkpoint_lightning.ckpt"
    return {w: load_checkpoint(path, weights=w).build_network() for w in ("ema", "online")}


def test_forward_ema_and_online(golden, ema_net, ckpt_nets):
    args = golden["forward.x"], golden["forward.t"], golden["forward.context"]
    torch.testing.assert_close(ema_net(*args), golden["forward.out_ema"], **TOL)
    torch.testing.assert_close(ckpt_nets["ema"](*args), golden["forward.out_ema"], **TOL)
    torch.testing.assert_close(ckpt_nets["online"](*args), golden["forward.out_online"], **TOL)
    # EMA and online weights really differ, so the two checks above test the choice
    assert (golden["forward.out_ema"] - golden["forward.out_online"]).abs().max() > 0.5


def test_forward_scalar_t(golden, ema_net):
    out = ema_net(golden["forward.x"], golden["forward_scalar_t.t"], golden["forward.context"])
    torch.testing.assert_close(out, golden["forward_scalar_t.out_ema"], **TOL)


def test_intermediates(golden, ema_net):
    from fmboost.models.unet import timestep_sinusoid
    t = golden["forward.t"]
    torch.testing.assert_close(timestep_sinusoid(t, 32), golden["debug.t_sinusoidal"], **TOL)
    torch.testing.assert_close(ema_net.time_embed(golden["debug.t_sinusoidal"]), golden["debug.t_emb"], **TOL)


@pytest.mark.parametrize("name,num_points,method", [("euler_8", 8, "euler"), ("rk4_8", 8, "rk4"),
                                                    ("rk4_40", 40, "rk4")])
def test_sampling(golden, ema_net, name, num_points, method):
    settings = SolverSettings.from_authors(num_points, method)
    evals = []
    traj = []
    out = integrate(lambda x, t: ema_net(x, t, golden["sample.context"]), golden["sample.x0"], settings,
                    on_eval=lambda info: evals.append(info.nfe), trajectory=traj)
    torch.testing.assert_close(out, golden[f"sample.{name}.out"], **TOL)
    expected_evals = {"euler_8": 7, "rk4_8": 28, "rk4_40": 156}[name]
    assert evals == list(range(1, expected_evals + 1))
    assert settings.planned_evals() == expected_evals
    if f"sample.{name}.trajectory" in golden:
        torch.testing.assert_close(torch.stack(traj), golden[f"sample.{name}.trajectory"], **TOL)


def test_sampling_online_weights(golden, ckpt_nets):
    out = integrate(lambda x, t: ckpt_nets["online"](x, t, golden["sample.context"]), golden["sample.x0"],
                    SolverSettings.from_authors(8, "euler"))
    torch.testing.assert_close(out, golden["sample.euler_8.out_online"], **TOL)


def test_noise_schedule(golden):
    torch.testing.assert_close(alpha_bar(), golden["schedule.alpha_bar_t"], atol=1e-6, rtol=0)
    assert alpha_bar()[400].item() == pytest.approx(0.6539039611816406, abs=1e-7)
    out = q_sample(golden["qsample.x"], 400, golden["qsample.noise"])
    torch.testing.assert_close(out, golden["qsample.t400.out"], atol=1e-6, rtol=0)


class IdentityVAE:
    """The fixture's pipeline ran with an identity first stage: pixels are the latent itself."""

    def decode(self, latent):
        return latent

    def encode(self, pixels):
        return pixels


@pytest.mark.parametrize("weights,key", [("online", "pipeline.out"), ("ema", "pipeline.out_if_ema_used")])
def test_whole_pipeline(golden, ckpt_nets, weights, key):
    net = ckpt_nets[weights]
    settings = UpscaleSettings(scale_factor=1.0, mode="pixel", noise_step=400,
                               solver=SolverSettings.from_authors(8, "euler"))
    out = upscale(net, golden["pipeline.lres_z"], settings, vae=IdentityVAE(), noise=golden["pipeline.noise"])
    torch.testing.assert_close(out, golden[key], **TOL)
    # latent mode is the same computation when the VAE is the identity
    latent_mode = upscale(net, golden["pipeline.lres_z"], UpscaleSettings(
        scale_factor=1.0, mode="latent", solver=settings.solver), noise=golden["pipeline.noise"])
    torch.testing.assert_close(latent_mode, golden[key], **TOL)


def test_official_config_keys_and_shapes(fixtures_dir):
    manifest = json.loads((fixtures_dir / "official_config_manifest.json").read_text())
    with torch.device("meta"):
        net = CFMUNet(UNetConfig.from_dict(manifest["net_params"]))
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: shape for k, shape, _ in manifest["net"]["state_dict"]}
    assert len(theirs) == 408
    assert ours == theirs
    assert sum(p.numel() for p in net.parameters()) == manifest["net"]["parameter_count"] == 305_806_340
