"""The learned shading head (models.shading_head): stored in the model's file, chosen by `shading_correction`,
run after the flow; the shipped model's head does the TAESD correction's work."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmboost.flow import InputError, SolverSettings, UpscaleSettings, upscale
from fmboost.flow.settings import resolve
from fmboost.flow.shading import correct_shading
from fmboost.models import CheckpointError, MethodSettings, UNetConfig, load_checkpoint, save_checkpoint
from fmboost.models.checkpoint import HEAD_PREFIX, rewrite_checkpoint
from fmboost.models.shading_head import ShadingHead, ShadingHeadConfig
from fmboost.models.taesd import TAESD
from fmboost.models.unet import CFMUNet
from support import REPO

TINY = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2,),
                  num_heads=2, dim_head=16)
SHIPPED = REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors"


def random_head(seed=0, config=ShadingHeadConfig(channels=8, depth=2)):
    torch.manual_seed(seed)
    head = ShadingHead(config)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return head.eval().requires_grad_(False)


def with_head(tmp_path, head):
    torch.manual_seed(1)
    net = CFMUNet(TINY).eval()
    path = tmp_path / "m.safetensors"
    sd = {**net.state_dict(), **{HEAD_PREFIX + k: v for k, v in head.state_dict().items()}}
    save_checkpoint(path, sd, TINY, MethodSettings(upsampling_mode="latent"), dtype=None, head_config=head.config)
    return path, net


def test_an_untrained_head_changes_nothing():
    head = ShadingHead(ShadingHeadConfig(channels=8, depth=2))
    x1, src = torch.randn(2, 4, 12, 10), torch.randn(2, 4, 12, 10)
    assert torch.equal(head(x1, src), x1)


def test_a_pooled_head_runs_on_any_size_and_sees_farther():
    """pool 4: a branch at a quarter of the resolution. It runs on sizes that 4 does not divide, even smaller
    than 4, and a change far outside the plain head's receptive field reaches its output."""
    pooled = random_head(config=ShadingHeadConfig(channels=8, depth=2, pool=4))
    plain = random_head(config=ShadingHeadConfig(channels=8, depth=2))
    for h, w in ((13, 10), (3, 5), (32, 32)):
        x1, src = torch.randn(1, 4, h, w), torch.randn(1, 4, h, w)
        assert pooled(x1, src).shape == (1, 4, h, w)
    assert torch.equal(ShadingHead(ShadingHeadConfig(channels=8, depth=2, pool=4))(x1, src), x1)
    far = src.clone()
    far[..., 18:, 18:] += 1.0        # 11 px from the corner block: beyond the plain head's 5 × 5 view
    for head, reaches in ((pooled, True), (plain, False)):
        moved = (head(x1, far) - head(x1, src))[..., :8, :8].abs().max().item()
        assert (moved > 1e-6) == reaches, (head.config, moved)
    with pytest.raises(ValueError):
        ShadingHeadConfig.from_dict({"pool": 1})


@pytest.mark.parametrize("pool", [0, 4])
def test_the_head_travels_in_the_models_file(tmp_path, pool):
    head = random_head(config=ShadingHeadConfig(channels=8, depth=2, pool=pool))
    path, net = with_head(tmp_path, head)
    ck = load_checkpoint(path)
    assert ck.method.shading_head and ck.head_config == head.config
    built = ck.build_network()
    x1, src = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(built.shading_head(x1, src), head(x1, src), atol=0, rtol=0)
    # the stored method does not claim a head; the loader derives it from the tensors
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert "shading_head" not in json.loads(f.metadata()["fmboost.method"])
    # without one: no head, and the flag is false even if a file's method JSON says otherwise
    plain = tmp_path / "plain.safetensors"
    save_checkpoint(plain, net.state_dict(), TINY, dataclasses.replace(ck.method, shading_head=True), dtype=None)
    assert not load_checkpoint(plain).method.shading_head
    assert load_checkpoint(plain).build_network().shading_head is None


def test_a_head_without_its_config_or_weights_is_refused(tmp_path):
    path, _ = with_head(tmp_path, random_head())
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    no_config = tmp_path / "no_config.safetensors"
    save_file(tensors, str(no_config), metadata={k: v for k, v in meta.items() if k != "fmboost.shading_head"})
    with pytest.raises(CheckpointError, match="shading head weights without their config"):
        load_checkpoint(no_config)
    no_weights = tmp_path / "no_weights.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}, str(no_weights), metadata=meta)
    with pytest.raises(CheckpointError, match="its weights are missing"):
        load_checkpoint(no_weights)


def test_rewriting_a_model_keeps_its_head(tmp_path):
    path, _ = with_head(tmp_path, random_head())
    before = load_file(path)
    rewrite_checkpoint(path, method=lambda m: dataclasses.replace(m, noise_step=300))
    ck = load_checkpoint(path)
    assert ck.method.noise_step == 300 and ck.method.shading_head
    after = load_file(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_shading_correction_chooses_the_head_and_taesd_passes():
    method = MethodSettings(upsampling_mode="latent", shading_head=True, shading_correction=0)
    pick = lambda m, v: (lambda s: (s.shading_head, s.shading_correction))(  # noqa: E731
        resolve(m, shading_correction=v).settings)
    assert pick(method, -1) == (True, 0)        # the model's own: its head
    assert pick(method, 0) == (False, 0)        # off
    assert pick(method, 2) == (True, 2)         # the head, then TAESD passes
    assert pick(method, -2) == (True, 0)        # the head alone
    both = dataclasses.replace(method, shading_correction=1)   # the shipped model's: head + 1 pass
    assert pick(both, -1) == (True, 1)
    assert pick(both, -2) == (True, 0)
    assert pick(both, 0) == (False, 0)
    plain = dataclasses.replace(both, shading_head=False)
    assert pick(plain, -1) == (False, 1) and pick(plain, 3) == (False, 3)
    with pytest.raises(ValueError, match="runs the model's learned shading head alone, and this model has none"):
        resolve(plain, shading_correction=-2)
    for bad in (-3, 5):
        with pytest.raises(ValueError, match="shading_correction must be"):
            resolve(both, shading_correction=bad)


@torch.inference_mode()
def test_the_head_runs_before_the_taesd_passes(tmp_path):
    """−1 on a file with a head and a recommended pass: the pass corrects the head's result, as
    `correct_shading(head(flow))`, and differs from the pass alone."""
    head = random_head()
    path, _ = with_head(tmp_path, head)
    rewrite_checkpoint(path, method=lambda m: dataclasses.replace(m, shading_correction=1))
    ck = load_checkpoint(path)
    net = ck.build_network()
    vae = TAESD.from_folder(REPO / "weights" / "taesd")
    latent = torch.randn(2, 4, 6, 8)
    settings = resolve(ck.method, seed=3).settings
    assert settings.shading_head and settings.shading_correction == 1
    got = upscale(net, latent, settings, vae=vae)
    headed = upscale(net, latent, dataclasses.replace(settings, shading_correction=0))
    torch.testing.assert_close(got, correct_shading(vae, latent, headed, 1), atol=1e-4, rtol=1e-4)
    alone = upscale(net, latent, dataclasses.replace(settings, shading_head=False), vae=vae)
    assert (got - alone).abs().mean() > 1e-3


@torch.inference_mode()
def test_upscale_runs_the_head_on_the_flows_result(tmp_path):
    head = random_head()
    path, _ = with_head(tmp_path, head)
    net = load_checkpoint(path).build_network()
    latent = torch.randn(3, 4, 6, 8)
    s = UpscaleSettings(mode="latent", noise_step=100, seed=5, solver=SolverSettings("euler", steps=2))
    plain = upscale(net, latent, s)
    on = upscale(net, latent, dataclasses.replace(s, shading_head=True))
    source = torch.nn.functional.interpolate(latent * s.scale_factor, scale_factor=2, mode="bilinear")
    expect = head(plain * s.scale_factor, source) / s.scale_factor
    torch.testing.assert_close(on, expect, atol=1e-5, rtol=1e-5)
    assert (on - plain).abs().mean() > 1e-3
    # each item alone as in its batch (the head is local and per item)
    alone = upscale(net, latent[1:2], dataclasses.replace(s, shading_head=True), batch_index=[1])
    torch.testing.assert_close(alone, on[1:2], atol=1e-4, rtol=1e-4)
    # an explicit head wins over the network's; none at all is a clear error
    other = random_head(seed=7)
    torch.testing.assert_close(upscale(net, latent, dataclasses.replace(s, shading_head=True), shading_head=other),
                               other(plain * s.scale_factor, source) / s.scale_factor, atol=1e-5, rtol=1e-5)
    net.shading_head = None
    with pytest.raises(InputError, match="no shading head"):
        upscale(net, latent, dataclasses.replace(s, shading_head=True))


def test_training_fits_a_known_move():
    """train_head on pairs whose move is a fixed linear map of (source − result): the loss falls to a small
    part of the move's energy, and the trained head reproduces the move on new pairs."""
    from fmboost.training.shading_head import train_head
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(4, 4, generator=g) * 0.3

    def pairs(n):
        out, src = torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 4, 16, 16, generator=g)
        return {"out": out, "src": src, "dz": torch.einsum("ij,njhw->nihw", mix, src - out)}

    head = train_head(pairs(64), ShadingHeadConfig(channels=16, depth=2), steps=300, batch=16, lr=5e-3,
                      precision="fp32", log=None)
    test = pairs(8)
    with torch.no_grad():
        err = (head.delta(test["out"], test["src"]) - test["dz"])[..., 1:-1, 1:-1].pow(2).mean()
    assert err < 0.05 * test["dz"].pow(2).mean(), (err, test["dz"].pow(2).mean())


@torch.inference_mode()
def test_head_then_pass_pairs_are_the_move_of_the_models_head_and_one_pass(tmp_path):
    """make_pairs' `head_then_pass` target: the move from the flow's result to one TAESD pass after the model's
    current head (not after the result itself); a model without a head, or an unknown target, is refused."""
    from support import SHARED, require_shared
    from fmboost.training.shading_head import make_pairs
    photo = sorted(require_shared(SHARED / "data" / "photos" / "train").glob("*.jpg"))[:1]
    head = random_head(config=ShadingHeadConfig(channels=8, depth=2))
    path, _ = with_head(tmp_path, head)
    ck = load_checkpoint(path)
    net = ck.build_network()
    vae = TAESD.from_folder(REPO / "weights" / "taesd", change=False)
    kw = dict(crop=64, crops_per_image=1, seed=3, log=None)
    plain = make_pairs(ck, net, vae, vae, photo, **kw)
    both = make_pairs(ck, net, vae, vae, photo, target="head_then_pass", **kw)
    assert torch.equal(plain["out"], both["out"]) and torch.equal(plain["src"], both["src"])
    s = ck.method.scale_factor
    start = head(both["out"], both["src"]) / s
    expect = correct_shading(vae, both["low"], start, 1) * s - both["out"]
    torch.testing.assert_close(both["dz"], expect, atol=1e-4, rtol=1e-4)
    assert (both["dz"] - plain["dz"]).abs().mean() > 0.1 * plain["dz"].abs().mean()
    net.shading_head = None
    with pytest.raises(ValueError, match="has a shading head"):
        make_pairs(ck, net, vae, vae, photo, target="head_then_pass", **kw)
    with pytest.raises(ValueError, match="unknown head target"):
        make_pairs(ck, net, vae, vae, photo, target="two_passes", **kw)


def test_the_training_command_writes_a_model_that_runs_its_head(tmp_path):
    """scripts/train_shading_head.py on two training photos with a tiny head: the pairs are the TAESD
    correction's moves of the model's own results; the written model loads with its head (the shipped model's
    own head replaced), keeps the network's weights and the recommended passes; a second run reuses the pairs."""
    import subprocess
    import sys
    from support import SHARED, require_shared
    photos = require_shared(SHARED / "data" / "photos" / "train")
    recipe = json.loads((REPO / "training" / "recipes" / "heads" / "shading-head.json").read_text())
    recipe.update(images=str(photos), max_images=2, channels=8, depth=2, steps=30, batch=4)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "with-head.safetensors"
    cmd = [sys.executable, str(REPO / "scripts" / "train_shading_head.py"), "--config", str(tmp_path / "r.json"),
           "--model", str(SHIPPED), "--out", str(out), "--work-dir", str(tmp_path / "work"), "--threads", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    ck, shipped = load_checkpoint(out), load_checkpoint(SHIPPED)
    assert ck.method.shading_head and ck.method == shipped.method   # the recommended passes are kept
    assert ck.head_config == ShadingHeadConfig(channels=8, depth=2)   # the shipped model's head is replaced
    network = {k: v for k, v in shipped.state_dict.items() if not k.startswith(HEAD_PREFIX)}
    assert network and all(torch.equal(ck.state_dict[k], v) for k, v in network.items())
    assert {k for k in ck.state_dict if k.startswith(HEAD_PREFIX)} == {HEAD_PREFIX + k for k in
                                                                     ShadingHead(ck.head_config).state_dict()}
    assert resolve(ck.method, have_vae=True).settings.shading_head
    # the pairs: one TAESD pass's move of the flow's result, in network space
    (pairs_file,) = (tmp_path / "work").glob("pairs-*.pt")
    pairs = torch.load(pairs_file, weights_only=True)
    assert pairs["out"].shape == (4, 4, 32, 32) and pairs["low"].shape == (4, 4, 16, 16)
    vae = TAESD.from_folder(REPO / "weights" / "taesd", change=False)
    s = shipped.method.scale_factor
    with torch.inference_mode():
        move = correct_shading(vae, pairs["low"][:1], pairs["out"][:1] / s, 1) * s - pairs["out"][:1]
    torch.testing.assert_close(move, pairs["dz"][:1], atol=1e-4, rtol=1e-4)
    assert pairs["dz"].abs().mean() > 0.01
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and f"from {pairs_file.name}" in second.stdout, second.stdout + second.stderr


@pytest.mark.parametrize("recipe", sorted((REPO / "training" / "recipes" / "heads").glob("*.json")),
                         ids=lambda p: p.stem)
def test_every_head_recipe_has_what_the_command_reads(recipe):
    settings = json.loads(recipe.read_text())
    assert settings.pop("comment", "").strip(), "a recipe says what it is for"
    assert {"images", "vae", "crop", "crops_per_image", "noise_steps", "channels", "depth", "steps", "batch",
            "lr"} <= set(settings)
    known = {"images", "vae", "max_images", "crop", "crops_per_image", "noise_steps", "precision", "channels",
             "depth", "pool", "steps", "batch", "lr", "mean_weight", "shuffle_seed", "seed", "target"}
    assert set(settings) <= known, set(settings) - known
    assert (REPO / settings["vae"]).is_dir() and settings["crop"] % 16 == 0
    ShadingHeadConfig.from_dict(settings)
    from fmboost.training.shading_head import TARGETS
    assert settings.get("target", "taesd_pass") in TARGETS
