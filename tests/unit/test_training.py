"""The training command: pairs, cache, loop, resume, validation, refusal of bad input, DDP, metrics, TAESD."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fmboost.models import load_checkpoint
from fmboost.models.autoencoder_kl import AutoencoderKL
from fmboost.models.taesd import TAESD
from fmboost.training import metrics
from fmboost.training.train import TrainConfig, train
from support import REPO, SHARED, require_shared

TAESD_DIR = REPO / "weights" / "taesd"
TINY_NET = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_heads=2,
                dim_head=16)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    require_shared(SHARED / "data" / "photos")
    root = tmp_path_factory.mktemp("photos")
    (root / "train").mkdir()
    (root / "val").mkdir()
    train = sorted((SHARED / "data" / "photos" / "train").glob("*.jpg"))[:6]
    for p in train:
        shutil.copy(p, root / "train")
    for p in sorted((SHARED / "data" / "photos" / "val").glob("*.jpg"))[:2]:
        shutil.copy(p, root / "val")
    (root / "train" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 40)).save(root / "train" / "tiny.png")
    return root


def config(photos, tmp_path, **kw):
    base = dict(images=str(photos / "train"), val_images=str(photos / "val"), vae=str(TAESD_DIR),
                out=str(tmp_path / "model.safetensors"), run_dir=str(tmp_path / "run"), crop=64,
                max_side=192, net=TINY_NET, batch=4, steps=4, warmup=2, val_every=4, val_count=2,
                save_every=2)
    return TrainConfig(**(base | kw))


def test_train_writes_a_loadable_model_validation_and_reports_bad_images(photos, tmp_path):
    logs = []
    result = train(config(photos, tmp_path), log=logs.append)
    assert result["step"] == 4
    assert any("6 usable images, 1 unreadable skipped (e.g. broken.jpg), 1 smaller than the crop" in l
               for l in logs)
    ck = load_checkpoint(tmp_path / "model.safetensors")
    assert ck.method.upsampling_mode == "pixel" and ck.method.noise_step == 400
    assert ck.method.source_vae == "taesd"  # trained on sources the pack's own TAESD can rebuild
    assert (ck.method.solver, ck.method.solver_steps) == ("euler", 4)
    assert (ck.method.low_res, ck.method.high_res) == (4, 8)
    assert ck.net_config.model_channels == 32
    info = json.loads(__import__("safetensors").safe_open(str(tmp_path / "model.safetensors"), "pt")
                      .metadata()["fmboost.training"])
    assert info["objective"] == "cfm" and info["steps"] == 4
    val = json.loads((tmp_path / "run" / "val_0000004.json").read_text())
    assert set(val) == {"step", "model", "latent_bilinear", "bicubic", "source"}
    assert set(val["model"]) == {"psnr", "ssim", "detail", "colour"}
    grid = Image.open(tmp_path / "run" / "val_0000004.png")
    assert grid.size == (4 * 64, 2 * 64)  # low | bilinear | model | truth, one row per val image


def test_a_warm_start_from_a_model_with_a_shading_head_leaves_the_head_behind(photos, tmp_path):
    """The head learned the old network's drift: the retrained network is written without one, and the
    warm start says so."""
    from fmboost.models.checkpoint import HEAD_PREFIX, rewrite_checkpoint
    from fmboost.models.shading_head import ShadingHead, ShadingHeadConfig
    train(config(photos, tmp_path / "a", steps=2), log=lambda _: None)
    head = ShadingHead(ShadingHeadConfig(channels=8, depth=2))
    init = tmp_path / "init.safetensors"
    rewrite_checkpoint(tmp_path / "a" / "model.safetensors", init,
                       tensors=lambda t: {**t, **{HEAD_PREFIX + k: v for k, v in head.state_dict().items()}},
                       metadata=lambda m: {**m, "fmboost.shading_head": json.dumps(head.config.to_dict())})
    assert load_checkpoint(init).method.shading_head
    logs = []
    train(config(photos, tmp_path / "b", steps=2, init=str(init)), log=logs.append)
    assert any("warm start from init.safetensors (its shading head is not carried over)" in l for l in logs)
    out = load_checkpoint(tmp_path / "b" / "model.safetensors")
    assert not out.method.shading_head and out.head_config is None
    assert not any(k.startswith(HEAD_PREFIX) for k in out.state_dict)


def test_resume_continues_from_the_last_step(photos, tmp_path):
    train(config(photos, tmp_path, steps=4))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert int(state["step"]) == 4
    logs = []
    result = train(config(photos, tmp_path, steps=6), log=logs.append)
    assert "resumed from step 4" in logs and result["step"] == 6
    stores = list((tmp_path / "run" / "cache").glob("store-*"))
    assert len(stores) == 1 and list(stores[0].glob("chunk-*"))  # the store was reused, not rebuilt
    assert not any("caching latents" in l for l in logs)


def test_loss_goes_down(photos, tmp_path):
    """A few dozen steps on six images must fit better than at the start (the loop really learns)."""
    cfg = config(photos, tmp_path, steps=60, lr=2e-3, warmup=5, val_images=None, save_every=1000, batch=8)
    from fmboost.training.data import LatentStore
    from fmboost.flow import q_sample
    train(config(photos, tmp_path / "first", steps=1, val_images=None, save_every=1000))
    torch.manual_seed(0)
    trained = train(cfg)
    assert trained["step"] == 60
    store = LatentStore(sorted(next((tmp_path / "run" / "cache").glob("store-*")).glob("chunk-*")), "pixel")
    z1, src = store.batch(32, 8, torch.Generator().manual_seed(3))

    def flow_loss(path):
        net = load_checkpoint(path).build_network(torch.float32)
        g = torch.Generator().manual_seed(1)
        x0 = q_sample(src, 400, torch.randn(z1.shape, generator=g))
        t = torch.rand(z1.shape[0], generator=g)
        xt = t[:, None, None, None] * z1 + (1 - t[:, None, None, None]) * x0
        with torch.inference_mode():
            return torch.nn.functional.mse_loss(net(xt, t, src), z1 - x0).item()
    before, after = flow_loss(tmp_path / "first" / "model.safetensors"), flow_loss(tmp_path / "model.safetensors")
    assert after < 0.8 * before, (before, after)


def test_regression_baseline_objective(photos, tmp_path):
    train(config(photos, tmp_path, objective="regression"))
    meta = __import__("safetensors").safe_open(str(tmp_path / "model.safetensors"), "pt").metadata()
    assert json.loads(meta["fmboost.training"])["objective"] == "regression"


def test_a_vae_of_another_family_is_refused(photos, tmp_path):
    fake = tmp_path / "taef1"
    fake.mkdir()
    enc = load_file(TAESD_DIR / "taesd_encoder.safetensors")
    enc["14.weight"] = torch.zeros(16, 64, 3, 3)
    enc["14.bias"] = torch.zeros(16)
    save_file(enc, fake / "taesd_encoder.safetensors")
    shutil.copy(TAESD_DIR / "taesd_decoder.safetensors", fake)
    with pytest.raises(ValueError, match="16 latent channels"):
        train(config(photos, tmp_path, vae=str(fake)))
    with pytest.raises(ValueError, match="not a TAESD folder"):
        train(config(photos, tmp_path, vae=str(tmp_path)))
    flux_like = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16)
    save_file(flux_like.state_dict(), tmp_path / "flux_vae.safetensors")
    with pytest.raises(ValueError, match="16-channel VAE"):
        train(config(photos, tmp_path, vae=str(tmp_path / "flux_vae.safetensors")))
    save_file({"model.diffusion_model.x": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="not a KL VAE"):
        train(config(photos, tmp_path, vae=str(tmp_path / "unet.safetensors")))


def test_distributed_data_parallel_two_processes(photos, tmp_path):
    """torchrun with two CPU processes (gloo): both train, rank 0 writes the model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "scripts" / "train_cfm.py"), "--images", str(photos / "train"), "--vae", str(TAESD_DIR),
           "--out", str(tmp_path / "ddp.safetensors"), "--run-dir", str(tmp_path / "run"), "--crop", "64",
           "--max-side", "128", "--steps", "3", "--batch", "2", "--save-every", "3",
           "--net", json.dumps(TINY_NET)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "ddp.safetensors")
    assert json.loads(__import__("safetensors").safe_open(str(tmp_path / "ddp.safetensors"), "pt")
                      .metadata()["fmboost.training"])["images_seen"] == 3 * 2 * 2
    assert ck.net_config.model_channels == 32


def test_metrics_on_known_images():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 64, 64, generator=g)
    assert torch.allclose(metrics.ssim(img, img), torch.ones(2))
    noisy = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    expected = -10 * torch.log10(((metrics.luma(noisy) - metrics.luma(img)) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(metrics.psnr(noisy, img), expected)
    assert (metrics.ssim(noisy, img) < 0.99).all()
    blurred = torch.nn.functional.avg_pool2d(img, 3, 1, 1)
    torch.testing.assert_close(metrics.detail_ratio(img, img), torch.ones(2))
    assert (metrics.detail_ratio(blurred, img) < 0.5).all()
    assert (metrics.detail_ratio(noisy, blurred) > 1.5).all()
    # chroma: halfway to grey is half as colourful; a uniform cast or a brightness change is not paler
    grey = metrics.luma(img).expand_as(img)
    torch.testing.assert_close(metrics.chroma_ratio((img + grey) / 2, img), torch.full((2,), 0.5))
    torch.testing.assert_close(metrics.chroma_ratio(img * 0.5 + torch.tensor([0.2, 0.1, 0.0]).view(1, 3, 1, 1),
                                                    img * 0.5), torch.ones(2))
    assert (metrics.chroma_ratio(grey, img) < 1e-3).all()


def test_our_taesd_reconstructs_a_photo():
    vae = TAESD.from_folder(TAESD_DIR)
    img = torch.from_numpy(np.array(Image.open(REPO / "assets" / "fmboost_example.png").convert("RGB"))
                           ).float().div(255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        z = vae.encode(img)
        rec = vae.decode(z)
    assert z.shape == (1, 4, 37, 56)
    assert 0.5 < (z * vae.scale_factor).std() < 2.0  # SD-UNet-space latents have unit-ish spread
    assert metrics.psnr(rec, img).item() > 24


def to_diffusers(sd, levels):
    """The diffusers names for an ldm-layout VAE state dict, written out independently of the loader."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[1] == "down":
            i, kind = parts[2], parts[3]
            nk = (f"encoder.down_blocks.{i}.resnets.{parts[4]}." + ".".join(parts[5:]) if kind == "block" else
                  f"encoder.down_blocks.{i}.downsamplers.0." + ".".join(parts[4:]))
        elif parts[1] == "up":
            i = levels - 1 - int(parts[2])
            nk = (f"decoder.up_blocks.{i}.resnets.{parts[4]}." + ".".join(parts[5:]) if parts[3] == "block" else
                  f"decoder.up_blocks.{i}.upsamplers.0." + ".".join(parts[4:]))
        elif parts[1] == "mid":
            if parts[2].startswith("block_"):
                nk = f"{parts[0]}.mid_block.resnets.{int(parts[2][-1]) - 1}." + ".".join(parts[3:])
            else:
                name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[parts[3]]
                nk = f"{parts[0]}.mid_block.attentions.0.{name}.{parts[4]}"
                if v.ndim == 4:
                    v = v[:, :, 0, 0]
        else:
            nk = k.replace("norm_out", "conv_norm_out") if parts[0] in ("encoder", "decoder") else k
        out[nk.replace("nin_shortcut", "conv_shortcut")] = v
    return out


def test_sd_vae_loads_from_ldm_checkpoint_and_diffusers_layouts():
    torch.manual_seed(0)
    ref = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1).eval()
    sd = ref.state_dict()
    layouts = {"ldm": sd, "checkpoint": {f"first_stage_model.{k}": v for k, v in sd.items()} | {
        "model.diffusion_model.foo": torch.zeros(1)}, "diffusers": to_diffusers(sd, 2)}
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in layouts["diffusers"]
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        z_ref, img_ref = ref.encode(x), ref.decode(ref.encode(x))
        for name, layout in layouts.items():
            vae = AutoencoderKL.from_state_dict(layout, name)
            torch.testing.assert_close(vae.encode(x), z_ref, atol=1e-6, rtol=1e-6, msg=name)
            torch.testing.assert_close(vae.decode(z_ref), img_ref, atol=1e-6, rtol=1e-6, msg=name)
    assert z_ref.shape == (1, 4, 16, 16)


def test_gradient_checkpointing_gives_the_same_gradients():
    from fmboost.models.unet import CFMUNet, UNetConfig
    torch.manual_seed(0)
    net = CFMUNet(UNetConfig.from_dict(TINY_NET)).train()
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.rand(2)
    grads = []
    for flag in (False, True):
        net.zero_grad()
        net.grad_checkpointing = flag
        net(x, t, c).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_sigterm_saves_the_run_and_resume_continues(photos, tmp_path):
    """A killed run (SIGTERM, as a scheduler or `kill` sends) saves its state; the same command resumes."""
    import signal
    import time
    cmd = [sys.executable, str(REPO / "scripts" / "train_cfm.py"), "--images", str(photos / "train"),
           "--vae", str(TAESD_DIR), "--out", str(tmp_path / "m.safetensors"), "--run-dir", str(tmp_path / "run"),
           "--crop", "64", "--max-side", "128", "--steps", "100000", "--batch", "2", "--save-every", "1",
           "--net", json.dumps(TINY_NET)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    # In the training loop (a first step saved), not in its set-up, however loaded the machine is
    while not (tmp_path / "run" / "last.pt").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "interrupted at step" in out, out[-2000:]
    step = int(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"])
    assert step > 0
    assert json.loads(__import__("safetensors").safe_open(str(tmp_path / "m.safetensors"), "pt")
                      .metadata()["fmboost.training"])["steps"] == step
    assert not list(tmp_path.glob("*.partial"))


def test_store_crops_line_up_and_every_step_sees_fresh_crops(photos, tmp_path):
    """The latent store: each image encoded once (target, low-res latent, a source per mode); crops drawn at
    random even offsets, so the source crop is the same window of the same image as the target crop."""
    from fmboost.flow.source import make_source
    from fmboost.training.data import LatentStore, build_store, encode_image, load_rgb, prepare_image, scan_images
    vae = TAESD.from_folder(TAESD_DIR)
    images = scan_images(photos / "train", 64).usable[:2]
    chunks = build_store(images, vae, "taesd:test", tmp_path, max_side=128)
    img = prepare_image(load_rgb(images[0]), 128)
    assert max(img.shape[-2:]) <= 128 and img.shape[-1] % 16 == 0 and img.shape[-2] % 16 == 0
    enc = encode_image(vae, img)
    h, w = img.shape[-2:]
    assert enc["hi"].shape == (4, h // 8, w // 8) and enc["lo"].shape == (4, h // 16, w // 16)
    s = vae.scale_factor
    torch.testing.assert_close(enc["latent"].float(), make_source(enc["lo"].float()[None], "latent", s)[0], atol=0.02,
                               rtol=0.02)
    store = LatentStore(chunks, "latent")
    assert len(store) == 2
    gen = torch.Generator().manual_seed(0)
    z1, src = store.batch(16, 8, gen)
    assert z1.shape == src.shape == (16, 4, 8, 8)
    # every (target, source) pair is one window (at an even offset, maybe flipped) of one stored image
    for a, b in zip(z1, src):
        found = []
        for hi, full in zip(store.hi, store.src):
            h, w = hi.shape[-2:]
            for y in range(0, h - 7):
                for x in range(0, w - 7):
                    for flip in (False, True):
                        win = hi[:, y:y + 8, x:x + 8].float()
                        win = win.flip(-1) if flip else win
                        if torch.equal(win, a):
                            s_win = full[:, y:y + 8, x:x + 8].float()
                            found.append((y % 2, x % 2, torch.equal(s_win.flip(-1) if flip else s_win, b)))
        assert found and all(f == (0, 0, True) for f in found), found
    z1b, _ = store.batch(16, 8, gen)
    assert not torch.equal(z1, z1b)  # fresh crops each call
    with pytest.raises(ValueError, match="unknown up-sampling mode"):
        LatentStore(chunks, "bicubic")


def test_learning_rate_warms_up_then_decays_to_zero_from_decay_from():
    from fmboost.training.train import _lr_at
    cfg = TrainConfig(images="", out="", run_dir="", vae="", lr=1e-3, warmup=10, steps=300)
    assert _lr_at(0, cfg) == pytest.approx(1e-4) and _lr_at(9, cfg) == pytest.approx(1e-3)
    assert _lr_at(299, cfg) == pytest.approx(1e-3)          # no decay unless asked for
    cfg.decay_from = 100                                      # continue a run with a cosine decay
    assert _lr_at(99, cfg) == _lr_at(100, cfg) == pytest.approx(1e-3)
    assert _lr_at(200, cfg) == pytest.approx(5e-4)
    assert _lr_at(300, cfg) == pytest.approx(0, abs=1e-12)
    lrs = [_lr_at(s, cfg) for s in range(100, 301)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_a_carried_store_trains_without_the_photos_and_must_come_from_the_same_vae(photos, tmp_path):
    """What a lent GPU gets (scripts/gpu_pack.sh): the chunks of a store built here, no training photos."""
    train(config(photos, tmp_path / "first", steps=1, val_images=None))
    carried = tmp_path / "carried"
    carried.mkdir()
    for chunk in (tmp_path / "first" / "run" / "cache").glob("store-*/chunk-*.safetensors"):
        shutil.copy(chunk, carried)
    logs = []
    result = train(config(photos, tmp_path / "gpu", images=str(tmp_path / "no-photos-here"), store=str(carried),
                          steps=2, val_images=None), log=logs.append)
    assert result["step"] == 2 and any("1 chunks of the latent store" in l for l in logs)
    chunk = next(carried.glob("chunk-*"))
    save_file(load_file(chunk), chunk, metadata={"vae": "taesd:another", "max_side": "192"})
    with pytest.raises(ValueError, match="taesd:another"):
        train(config(photos, tmp_path / "gpu2", store=str(carried), steps=1, val_images=None))
    with pytest.raises(ValueError, match="no latent-store chunks"):
        train(config(photos, tmp_path / "gpu3", store=str(tmp_path / "empty"), steps=1, val_images=None))


def test_pixel_loss_compares_the_same_decoded_windows_and_trains_only_the_prediction():
    from fmboost.training.train import pixel_mse
    vae = TAESD.from_folder(TAESD_DIR)
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(3, 4, 12, 10, generator=g)
    assert pixel_mse(vae, z1.clone(), z1, 2, 8, torch.Generator().manual_seed(5)).item() == 0
    # a prediction that is right in the windows picked and wrong outside them costs nothing: both sides are
    # decoded from the same windows
    gen = torch.Generator().manual_seed(5)
    ys = torch.randint(12 - 8 + 1, (2,), generator=gen).tolist()
    xs = torch.randint(10 - 8 + 1, (2,), generator=gen).tolist()
    wrong = z1 + 1.0
    for i, (y, x) in enumerate(zip(ys, xs)):
        wrong[i, :, y:y + 8, x:x + 8] = z1[i, :, y:y + 8, x:x + 8]
    wrong[2] += 5.0   # the third item is not among the 2 items compared
    assert pixel_mse(vae, wrong, z1, 2, 8, torch.Generator().manual_seed(5)).item() == 0
    # a colour shift in latent space is seen, and its gradient reaches the prediction, not the decoder
    shift = torch.tensor([0.5, -0.5, 0.3, 0.0])[None, :, None, None]
    pred = (z1 + shift).requires_grad_(True)
    loss = pixel_mse(vae, pred, z1, 3, 8, torch.Generator().manual_seed(5))
    assert loss.item() > 1e-3
    loss.backward()
    assert pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())
    with torch.no_grad():
        stepped = pred - 0.5 * pred.grad / pred.grad.abs().max()
    assert pixel_mse(vae, stepped, z1, 3, 8, torch.Generator().manual_seed(5)).item() < loss.item()
    # lowpass: both decoded windows averaged over 4² pixel blocks before the MSE
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        ys = torch.randint(12 - 8 + 1, (3,), generator=gen).tolist()
        xs = torch.randint(10 - 8 + 1, (3,), generator=gen).tolist()
        dec = [torch.nn.functional.avg_pool2d(
            vae.decode(torch.stack([z[i, :, y:y + 8, x:x + 8] for i, (y, x) in enumerate(zip(ys, xs))])
                       / vae.scale_factor), 4) for z in (pred, z1)]
        expected = torch.nn.functional.mse_loss(*dec).item()
        got = pixel_mse(vae, pred, z1, 3, 8, torch.Generator().manual_seed(5), lowpass=4).item()
    assert got == pytest.approx(expected, rel=1e-5) and got < loss.item()


def test_training_with_the_pixel_loss_records_it(photos, tmp_path):
    out = train(config(photos, tmp_path, pixel_loss=20.0, pixel_items=2, pixel_crop=4, pixel_lowpass=2))
    assert out["step"] == 4
    meta = __import__("safetensors").safe_open(str(tmp_path / "model.safetensors"), "pt").metadata()
    training = json.loads(meta["fmboost.training"])
    assert [training[k] for k in ("pixel_loss", "pixel_items", "pixel_crop", "pixel_lowpass")] == [20.0, 2, 4, 2]


def landing_on(result, x0):
    """A model of constant velocity: the Euler solver from x0 lands exactly on `result`, whatever its steps."""
    return lambda x, t, ctx: result[:x.shape[0]] - x0[:x.shape[0]]


def test_sampled_losses_score_the_solvers_own_result():
    """`sampled_loss` runs the Euler solver from x0 and scores its decoded result: a velocity that lands on the
    target costs nothing; one that lands on a blurred target loses SSIM and is held by the detail floor; the
    gradient reaches the network, not the VAE; other solvers are refused."""
    from fmboost.flow.shading import gaussian_blur
    from fmboost.models.unet import CFMUNet, UNetConfig
    from fmboost.training.train import sampled_loss
    vae = TAESD.from_folder(TAESD_DIR)
    img = torch.from_numpy(np.asarray(Image.open(REPO / "assets" / "fmboost_example.png").convert("RGB"),
                                      dtype=np.float32) / 255).permute(2, 0, 1)[None, :, :128, :256]
    z1 = vae.encode(torch.cat([img[..., :128], img[..., 128:]])) * vae.scale_factor
    src = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(z1, 2), scale_factor=2, mode="bilinear")
    x0 = src + 0.3 * torch.randn(z1.shape, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(images="", out="", run_dir="", vae=str(TAESD_DIR), solver="euler", solver_steps=2,
                      pixel_items=2, pixel_crop=12, sampled_ssim=1.0, sampled_mse=20.0, sampled_detail=10.0)

    exact = sampled_loss(landing_on(z1, x0), vae, x0, z1, src, cfg, torch.Generator().manual_seed(1))
    assert exact["loss"].item() == pytest.approx(0, abs=1e-6) and exact["ssim"] == pytest.approx(1, abs=1e-6)
    assert exact["detail_ratio"] == pytest.approx(1, abs=1e-4)
    blurred = sampled_loss(landing_on(gaussian_blur(z1, 1.5), x0), vae, x0, z1, src, cfg,
                           torch.Generator().manual_seed(1))
    assert blurred["detail_ratio"] < 0.5 and blurred["detail"] > 0.1 and blurred["ssim"] < 0.95
    assert blurred["loss"].item() > 10 * blurred["detail"] > 0
    # the floor alone: inside detail_range the detail term is 0
    loose = TrainConfig(**(cfg.__dict__ | {"detail_range": [0.01, 1.3]}))
    assert sampled_loss(landing_on(gaussian_blur(z1, 1.5), x0), vae, x0, z1, src, loose,
                        torch.Generator().manual_seed(1))["detail"] == 0
    torch.manual_seed(0)
    net = CFMUNet(UNetConfig.from_dict(TINY_NET))
    sampled_loss(net, vae, x0, z1, src, cfg, torch.Generator().manual_seed(1))["loss"].backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert sum(p.grad.abs().sum() for p in net.parameters()) > 0
    assert all(p.grad is None for p in vae.parameters())
    with pytest.raises(ValueError, match="Euler"):
        sampled_loss(net, vae, x0, z1, src, TrainConfig(**(cfg.__dict__ | {"solver": "heun"})),
                     torch.Generator().manual_seed(1))


def test_the_detail_floor_can_be_measured_away_from_strong_edges():
    """With `detail_edge_threshold`, the detail ratio of the sampled losses leaves out the target's strong edges:
    speckles drawn along an edge (what a floor taught a network trained on fidelity-decoded sources) add nothing
    to it, while the same speckles in a flat area count; every-pixel ratio (the spectrum's) counts both."""
    from fmboost.training import metrics
    from fmboost.training.train import sampled_loss
    g = torch.Generator().manual_seed(0)
    target = torch.full((1, 3, 64, 64), 0.2)
    target[..., 32:] = 0.8                                   # a vertical edge at x = 32
    target = target + 0.01 * torch.randn(target.shape, generator=g)   # faint texture everywhere
    speckle = 0.08 * torch.randn((1, 1, 64, 2), generator=g)
    along, flat = target.clone(), target.clone()
    along[..., 29:31] -= speckle                             # dark speckles beside the edge
    flat[..., 8:10] -= speckle                               # the same, far from it
    keep = 1 - metrics.edge_mask(target, 0.05)
    assert keep[0, 0, :, 29:36].sum() == 0 and keep[0, 0, :, :26].min() == 1 and keep[0, 0, :, 39:].min() == 1

    def ratio(x, k=None):
        return (metrics.high_pass_energy(x, k) / metrics.high_pass_energy(target, k)).item()
    assert ratio(along, keep) == pytest.approx(1, abs=1e-2)
    assert ratio(flat, keep) > 5
    # without the mask both count alike, and the edge's own energy hides them
    assert ratio(along) == pytest.approx(ratio(flat), rel=0.05) and ratio(along) > 1.1
    assert metrics.detail_ratio(along, target).item() > 1.1

    # through the sampled losses: the decoded windows of a result with and without the threshold
    vae = TAESD.from_folder(TAESD_DIR)
    z1 = vae.encode(target.clamp(0, 1)) * vae.scale_factor
    z_along, z_flat = (vae.encode(x.clamp(0, 1)) * vae.scale_factor for x in (along, flat))
    cfg = TrainConfig(images="", out="", run_dir="", vae=str(TAESD_DIR), solver="euler", solver_steps=1,
                      pixel_items=1, pixel_crop=8, sampled_ssim=1.0, sampled_detail=10.0)
    guarded = TrainConfig(**(cfg.__dict__ | {"detail_edge_threshold": 0.05}))
    x0 = torch.zeros_like(z1)

    def scored(result, c):
        return sampled_loss(landing_on(result, x0), vae, x0, z1, z1, c,
                            torch.Generator().manual_seed(1))["detail_ratio"]
    assert scored(z_along, guarded) < 1 < 1.15 < scored(z_along, cfg)   # the speckles along the edge: left out
    assert scored(z_flat, guarded) > 5                                   # in the flat area: counted


def test_the_detail_ceiling_penalises_texture_only_where_the_target_has_none():
    """metrics.excess_detail: 0 for the target itself and for a result with as much texture as the target where
    the target has it; positive for grain drawn on the target's flat surface, and growing with it; through the
    sampled losses, `detail_ceiling` adds it (times its weight) and reports it."""
    from fmboost.training import metrics
    from fmboost.training.train import sampled_loss
    g = torch.Generator().manual_seed(0)
    target = torch.full((1, 3, 64, 64), 0.5)
    texture = 0.05 * torch.randn((1, 1, 64, 32), generator=g)
    target[..., :32] += texture                              # textured left half, flat right half
    grain = 0.05 * torch.randn((1, 1, 64, 32), generator=g)
    retextured, grainy, grainier = target.clone(), target.clone(), target.clone()
    retextured[..., :32] += grain - texture                  # other texture of the same strength, same place
    grainy[..., 32:] += 0.5 * grain                          # grain on the flat half
    grainier[..., 32:] += grain
    assert metrics.excess_detail(target, target, 2.0).item() == 0
    assert metrics.excess_detail(retextured, target, 2.0).item() == 0
    assert 0 < metrics.excess_detail(grainy, target, 2.0).item() < metrics.excess_detail(grainier, target, 2.0).item()
    # the floor's whole-window ratio sees more energy in a result whose extra texture lies where the target's
    # does, and the ceiling none there
    more = target.clone()
    more[..., :32] += 0.73 * grain
    assert metrics.high_pass_energy(more).item() > metrics.high_pass_energy(grainy).item()
    assert metrics.excess_detail(more, target, 2.0).item() == 0 < metrics.excess_detail(grainy, target, 2.0).item()

    vae = TAESD.from_folder(TAESD_DIR)
    z1, z_grainy = (vae.encode(x.clamp(0, 1)) * vae.scale_factor for x in (target, grainier))
    cfg = TrainConfig(images="", out="", run_dir="", vae=str(TAESD_DIR), solver="euler", solver_steps=1,
                      pixel_items=1, pixel_crop=8, sampled_ssim=1.0)
    capped = TrainConfig(**(cfg.__dict__ | {"detail_ceiling": 10.0}))
    x0 = torch.zeros_like(z1)

    def scored(result, c):
        return sampled_loss(landing_on(result, x0), vae, x0, z1, z1, c, torch.Generator().manual_seed(1))
    plain, with_ceiling = scored(z_grainy, cfg), scored(z_grainy, capped)
    assert plain["ceiling"] == 0 < with_ceiling["ceiling"]
    assert with_ceiling["loss"].item() == pytest.approx(plain["loss"].item() + 10 * with_ceiling["ceiling"], rel=1e-4)
    assert scored(z1, capped)["ceiling"] == 0


def test_training_with_the_sampled_losses_records_them(photos, tmp_path):
    out = train(config(photos, tmp_path, noise_steps=[250, 300], sampled_ssim=1.0, sampled_mse=20.0,
                       sampled_detail=10.0, detail_range=[0.6, 1.3], pixel_items=2, pixel_crop=4,
                       solver="euler", solver_steps=2))
    assert out["step"] == 4
    meta = __import__("safetensors").safe_open(str(tmp_path / "model.safetensors"), "pt").metadata()
    training = json.loads(meta["fmboost.training"])
    assert [training[k] for k in ("noise_steps", "sampled_ssim", "sampled_mse", "sampled_detail",
                                  "detail_range", "solver_steps")] == [[250, 300], 1.0, 20.0, 10.0, [0.6, 1.3], 2]


@pytest.mark.parametrize("recipe", sorted((REPO / "training" / "recipes").glob("*.json")), ids=lambda p: p.stem)
def test_every_recipe_is_a_valid_training_config(recipe):
    """A recipe is data for scripts/train_cfm.py: every key a TrainConfig field, its files in the repository."""
    settings = json.loads(recipe.read_text())
    assert settings.pop("comment", "").strip(), "a recipe says what it is for"
    cfg = TrainConfig(**settings, out="model.safetensors", run_dir="run")
    assert (REPO / cfg.vae).is_dir()
    assert cfg.init is None or (REPO / cfg.init).is_file()
    assert cfg.crop % 16 == 0 and cfg.mode in ("pixel", "latent")
    assert cfg.decay_from is None or cfg.decay_from < cfg.steps


def test_back_projection_makes_the_source_decode_closer_to_its_pixels():
    """flow.source.back_project with the pack's TAESD on what pixel mode encodes (a decoded image up-sampled ×2):
    the round trip of the back-projected pixels is nearer those pixels, in values and in colour."""
    from fmboost.flow.source import back_project, make_source
    vae = TAESD.from_folder(TAESD_DIR)
    img = torch.from_numpy(np.array(Image.open(REPO / "assets" / "fmboost_example.png").convert("RGB"))
                           ).float().div(255).permute(2, 0, 1)[None][:, :, :144, :256]
    s = vae.scale_factor
    with torch.inference_mode():
        lo = vae.encode(img) * s
        x = torch.nn.functional.interpolate(vae.decode(lo / s), scale_factor=2, mode="bilinear")
        assert torch.equal(back_project(vae, x, 0.0), x)
        y = back_project(vae, x, 0.75)
        assert y.min() >= 0 and y.max() <= 1 and not torch.equal(y, x)
        plain, projected = vae.decode(vae.encode(x)), vae.decode(vae.encode(y))
        assert metrics.psnr(projected, x).item() > metrics.psnr(plain, x).item() + 1.0
        assert metrics.colour_error(projected, x).item() < 0.5 * metrics.colour_error(plain, x).item()
        # the pixel-mode source applies it between the up-sampling and the encode
        torch.testing.assert_close(make_source(lo, "pixel", s, vae, back_projection=0.75), vae.encode(y) * s)
        torch.testing.assert_close(make_source(lo, "pixel", s, vae), vae.encode(x) * s)


def test_back_projection_is_the_models_setting_and_a_store_is_built_for_one(photos, tmp_path):
    """A model trained with back-projected sources says so in its metadata, and the node's settings take it from
    there; a store holds sources for one strength, and a carried store made for another is refused."""
    from fmboost.flow.settings import resolve
    from fmboost.models import MethodSettings
    from fmboost.training.data import SourceRecipe, store_key
    train(config(photos, tmp_path, steps=1, val_images=None, back_projection=0.75))
    ck = load_checkpoint(str(tmp_path / "model.safetensors"))
    assert ck.method.back_projection == 0.75
    assert resolve(ck.method).settings.back_projection == 0.75
    assert resolve(MethodSettings.from_dict({"upsampling_mode": "pixel", "source_vae": "taesd"})
                   ).settings.back_projection == 0   # models saved before the setting existed
    chunks = sorted((tmp_path / "run" / "cache").glob("store-*/chunk-*.safetensors"))
    assert len(chunks) == 1
    images = sorted((photos / "train").glob("*.jpg"))
    assert store_key(images, 192, "x") == store_key(images, 192, "x", SourceRecipe(0.0)) != store_key(
        images, 192, "x", SourceRecipe(0.75))
    with pytest.raises(ValueError, match="strength 0.75, not this run's 0.0"):
        train(config(photos, tmp_path / "other", store=str(chunks[0].parent), steps=1, val_images=None))


def test_a_fidelity_decoded_source_decodes_with_the_fidelity_decoder():
    """flow.source.make_source with decoder "fidelity": the pack's TAESD decodes the low-res latent with its fidelity
    decoder before the up-sampling and the encode; a VAE without one (a connected SD VAE) uses its own decoder;
    an unknown decoder is refused."""
    from fmboost.flow.source import make_source
    vae = TAESD.from_folder(TAESD_DIR)
    assert vae.fidelity_decoder is not None
    img = torch.from_numpy(np.array(Image.open(REPO / "assets" / "fmboost_example.png").convert("RGB"))
                           ).float().div(255).permute(2, 0, 1)[None][:, :, :144, :256]
    s = vae.scale_factor
    up = lambda x: torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear")  # noqa: E731
    with torch.inference_mode():
        lo = vae.encode(img) * s
        fid = make_source(lo, "pixel", s, vae, decoder="fidelity")
        torch.testing.assert_close(fid, vae.encode(up(vae.decode_fidelity(lo / s))) * s)
        plain = make_source(lo, "pixel", s, vae)
        assert (fid - plain).abs().mean() > 0.02

        class OwnDecoderOnly:   # what a connected VAE offers
            decode, encode = staticmethod(vae.decode), staticmethod(vae.encode)
        torch.testing.assert_close(make_source(lo, "pixel", s, OwnDecoderOnly(), decoder="fidelity"), plain)
        with pytest.raises(ValueError, match="unknown source decoder 'sharp'"):
            make_source(lo, "pixel", s, vae, decoder="sharp")


def test_the_source_decoder_is_the_models_setting_and_a_store_is_built_for_one(photos, tmp_path):
    """A model trained on fidelity-decoded sources says so in its metadata and the node's settings take it from
    there (older files: the VAE's own decoder); a store holds sources of one decoder, and a carried store made
    with another is refused."""
    from fmboost.flow.settings import resolve
    from fmboost.models import MethodSettings
    from fmboost.training.data import SourceRecipe, store_key
    train(config(photos, tmp_path, steps=1, val_images=None, source_decoder="fidelity"))
    ck = load_checkpoint(str(tmp_path / "model.safetensors"))
    assert ck.method.source_decoder == "fidelity"
    assert resolve(ck.method).settings.source_decoder == "fidelity"
    assert resolve(MethodSettings.from_dict({"upsampling_mode": "pixel", "source_vae": "taesd"})
                   ).settings.source_decoder == "vae"   # models saved before the setting existed
    chunks = sorted((tmp_path / "run" / "cache").glob("store-*/chunk-*.safetensors"))
    assert len(chunks) == 1
    images = sorted((photos / "train").glob("*.jpg"))
    assert store_key(images, 192, "x") == store_key(images, 192, "x", SourceRecipe(0.0, "vae")) != store_key(
        images, 192, "x", SourceRecipe(0.0, "fidelity"))
    with pytest.raises(ValueError, match="decoded by the 'fidelity' decoder, not this run's 'vae'"):
        train(config(photos, tmp_path / "other", store=str(chunks[0].parent), steps=1, val_images=None))


def test_bf16_training_on_a_cpu_without_bf16_instructions_runs_in_fp32(photos, tmp_path):
    """A recipe's bf16 autocast is emulated on a CPU without AVX512-BF16 or AMX, tens of times slower than fp32
    (a TAESD decode 0.9 s → 88 s, a training step 4.5 s → 220 s on such a machine): the trainer says so and trains
    in fp32 there, and keeps bf16 where the CPU has it. fp16 autocast stays refused on the CPU."""
    from fmboost.flow.runtime import cpu_dtype
    from fmboost.training.train import training_precision
    cpu = torch.device("cpu")
    has_bf16 = cpu_dtype() == torch.bfloat16
    assert training_precision("bf16", cpu) == ("bf16" if has_bf16 else "fp32")
    assert training_precision("fp32", cpu) == "fp32"
    assert training_precision("bf16", torch.device("cuda", 0)) == "bf16"
    with pytest.raises(ValueError, match="fp16 autocast is for GPUs"):
        training_precision("fp16", cpu)
    logs = []
    assert train(config(photos, tmp_path, precision="bf16", steps=1, val_images=None), log=logs.append)["step"] == 1
    assert any("no bf16 instructions" in line and "training in fp32" in line for line in logs) == (not has_bf16)
