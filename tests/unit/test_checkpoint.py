"""Checkpoint formats: detection, our safetensors format, converter, inference, safety."""
import json
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmboost.models import CheckpointError, MethodSettings, UNetConfig, convert, load_checkpoint, save_checkpoint
from fmboost.models.checkpoint import infer_unet_config
from fmboost.models.unet import CFMUNet

TINY = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2,),
                  num_heads=2, dim_head=16)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return CFMUNet(TINY).eval()


def sample_inputs(b=2, size=8):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(b, 4, size, size, generator=g), torch.tensor([0.2, 0.7][:b]),
            torch.randn(b, 4, size, size, generator=g))


def test_our_format_roundtrip_keeps_config_and_method(tmp_path):
    net = tiny_net()
    method = MethodSettings(noise_step=250, upsampling_mode="latent", low_res=32, high_res=64)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, net.state_dict(), TINY, method, dtype=None)
    ck = load_checkpoint(path)
    assert (ck.format, ck.net_config, ck.method, ck.config_source) == ("fmboost", TINY, method, "stored")
    x, t, c = sample_inputs()
    torch.testing.assert_close(ck.build_network()(x, t, c), net(x, t, c), atol=0, rtol=0)


def test_fp16_save_halves_the_file(tmp_path):
    net = tiny_net()
    save_checkpoint(tmp_path / "a.safetensors", net.state_dict(), TINY, MethodSettings(), dtype=None)
    save_checkpoint(tmp_path / "b.safetensors", net.state_dict(), TINY, MethodSettings(), dtype=torch.float16)
    a, b = (os.path.getsize(tmp_path / n) for n in ("a.safetensors", "b.safetensors"))
    assert b < 0.55 * a
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "b.safetensors").values())


def test_convert_lightning_ckpt(fixtures_dir, tmp_path):
    src = fixtures_dir / "small_checkpoint_lightning.ckpt"
    dst = tmp_path / "converted.safetensors"
    convert(src, dst, weights="online", dtype=None)
    converted = load_checkpoint(dst)
    original = load_checkpoint(src, weights="online")
    assert converted.net_config == original.net_config
    assert converted.method == original.method and converted.method.upsampling_mode == "pixel"
    assert set(load_file(dst)) == set(original.state_dict)  # the VAE and optimizer state are dropped
    assert os.path.getsize(dst) < os.path.getsize(src) / 3
    for k, v in original.state_dict.items():
        assert torch.equal(converted.state_dict[k], v), k


def test_converter_command(fixtures_dir, tmp_path):
    import subprocess
    import sys
    from support import REPO
    dst = tmp_path / "c.safetensors"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_checkpoint.py"),
                           str(fixtures_dir / "small_checkpoint_lightning.ckpt"), str(dst)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ck = load_checkpoint(dst)
    assert ck.weights == "ema" and all(v.dtype == torch.float16 for v in ck.state_dict.values())
    assert "166 tensors" in proc.stdout


def test_bare_state_dict_is_inferred(tmp_path):
    net = tiny_net()
    save_file(net.state_dict(), tmp_path / "bare.safetensors")
    ck = load_checkpoint(tmp_path / "bare.safetensors")
    assert ck.config_source == "inferred"
    assert (ck.net_config.channel_mult, ck.net_config.num_res_blocks, ck.net_config.attention_resolutions) == \
        ((1, 2), 1, (2,))
    # heads are not visible in the weights: a sidecar json settles them
    (tmp_path / "bare.json").write_text(json.dumps({"net_params": TINY.to_dict(), "method": {"noise_step": 300}}))
    ck = load_checkpoint(tmp_path / "bare.safetensors")
    assert ck.config_source == "sidecar" and ck.net_config == TINY and ck.method.noise_step == 300
    x, t, c = sample_inputs()
    torch.testing.assert_close(ck.build_network()(x, t, c), net(x, t, c), atol=0, rtol=0)


def test_inference_matches_official_architecture(fixtures_dir):
    manifest = json.loads((fixtures_dir / "official_config_manifest.json").read_text())
    shapes = {k: shape for k, shape, _ in manifest["net"]["state_dict"]}
    cfg = infer_unet_config({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    # the official "16" attention level is never reached, so (8,) is the same network
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_resolutions,
            cfg.num_heads, cfg.dim_head) == (128, (1, 2, 4, 8), 3, (8,), 4, 64)
    with torch.device("meta"):
        net = CFMUNet(cfg)
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == shapes


def test_prefixed_bare_state_dict_and_pt(tmp_path):
    net = tiny_net()
    torch.save({"net." + k: v for k, v in net.state_dict().items()}, tmp_path / "w.pt")
    ck = load_checkpoint(tmp_path / "w.pt")
    assert ck.format == "state_dict" and set(ck.state_dict) == set(net.state_dict())


@pytest.mark.parametrize("content,needle", [
    (b"", "not a readable safetensors"),
    (b"\x00" * 100, "not a readable safetensors"),
])
def test_garbage_safetensors(tmp_path, content, needle):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_checkpoint(p)
    assert "junk.safetensors" in str(e.value)


def test_truncated_files(fixtures_dir, tmp_path):
    for name in ("small_net.safetensors", "small_checkpoint_lightning.ckpt"):
        data = (fixtures_dir / name).read_bytes()
        p = tmp_path / ("cut_" + name)
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="cut_"):
            load_checkpoint(p)


def test_not_a_cfm_checkpoint_names_what_was_found(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}, tmp_path / "sd15.safetensors")
    with pytest.raises(CheckpointError, match=r"sd15\.safetensors: not a CFM checkpoint.*Stable Diffusion"):
        load_checkpoint(tmp_path / "sd15.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match=r"list\.ckpt: not a CFM checkpoint \(found list\)"):
        load_checkpoint(tmp_path / "list.ckpt")


def test_missing_and_extra_keys(tmp_path):
    sd = tiny_net().state_dict()
    sd.pop("middle_block.0.in_layers.2.weight")
    sd["bogus.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "bad.safetensors")
    (tmp_path / "bad.json").write_text(json.dumps({"net_params": TINY.to_dict()}))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: weights do not fit.*1 missing.*1 unexpected"):
        load_checkpoint(tmp_path / "bad.safetensors").build_network()


def test_damaged_metadata(tmp_path):
    save_file(tiny_net().state_dict(), tmp_path / "m.safetensors",
              metadata={"fmboost.format": "fmboost-cfm", "fmboost.net_config": "{not json"})
    with pytest.raises(CheckpointError, match="metadata is damaged"):
        load_checkpoint(tmp_path / "m.safetensors")


class _RunsCode:
    """Unpickling this would create a file: the loader must never let it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_in_a_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"model.net.time_embed.0.weight": torch.zeros(2)}, "evil": _RunsCode(str(marker))}
    torch.save(payload, tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_in_a_plain_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned2"
    (tmp_path / "old.ckpt").write_bytes(pickle.dumps({"x": _RunsCode(str(marker))}))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "old.ckpt")
    assert not marker.exists()


def test_lightning_ckpt_reads_hyperparameters(fixtures_dir):
    ck = load_checkpoint(fixtures_dir / "small_checkpoint_lightning.ckpt")
    assert ck.config_source == "stored"
    assert ck.method == MethodSettings(scale_factor=0.18215, upsampling_mode="pixel", noise_step=400,
                                       low_res=64, high_res=128)
    assert ck.net_config.num_heads == 2 and ck.net_config.dim_head == 16
    assert zipfile.is_zipfile(fixtures_dir / "small_checkpoint_lightning.ckpt")


def test_set_model_defaults_command_rewrites_only_the_recommended_settings(tmp_path):
    """scripts/set_model_defaults.py: the node defaults a model carries, chosen after training; weights and
    the training record stay, the trained noise step is remembered, bad values leave the file untouched."""
    import subprocess
    import sys
    from safetensors import safe_open
    from fmboost.flow.settings import MODEL_NOISE_STEP, resolve
    from support import REPO
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_net().state_dict(), TINY, MethodSettings(noise_step=250, solver_steps=2),
                    extra={"training": json.dumps({"steps": 7})})
    before = load_checkpoint(path)

    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "set_model_defaults.py"), str(path), *args],
                              capture_output=True, text=True, timeout=120)
    assert before.method.shading_correction == 0   # models without the field get none
    path.chmod(0o644)
    proc = run("--noise-step", "275", "--solver", "midpoint", "--solver-steps", "3", "--shading-correction", "2")
    assert proc.returncode == 0, proc.stderr
    assert path.stat().st_mode & 0o777 == 0o644   # still readable by a server running as another user
    after = load_checkpoint(path)
    assert (after.method.noise_step, after.method.solver, after.method.solver_steps) == (275, "midpoint", 3)
    assert after.method.shading_correction == 2
    assert after.method.upsampling_mode == before.method.upsampling_mode and after.net_config == before.net_config
    for k, v in before.state_dict.items():
        assert torch.equal(after.state_dict[k], v), k
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["fmboost.training"]) == {"steps": 7, "noise_step": 250}
    settings = resolve(after.method, noise_step=MODEL_NOISE_STEP, have_vae=True).settings
    assert settings.noise_step == 275 and settings.solver.method == "midpoint" and settings.solver.steps == 3
    assert settings.shading_correction == 2
    size = path.stat().st_size
    for bad in (["--noise-step", "1200"], ["--solver", "leapfrog"], ["--solver-steps", "0"],
                ["--shading-correction", "5"]):
        proc = run(*bad)
        assert proc.returncode == 2 and "error:" in proc.stderr, bad
    assert load_checkpoint(path).method == after.method and path.stat().st_size == size
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "set_model_defaults.py"),
                           str(tmp_path / "plain.safetensors"), "--noise-step", "100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not an FMBoost model" in proc.stderr


def test_the_user_docs_state_the_shipped_models_noise_step():
    """README and the node's help page tell the user which step −1 means for the shipped model; they must follow
    the file when `scripts/set_model_defaults.py` changes it."""
    from support import REPO
    step = load_checkpoint(REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors").method.noise_step
    for doc in ("README.md", "js/docs/FMBoostLatentUpscale.md"):
        text = " ".join((REPO / doc).read_text().split())
        assert f"({step} for the shipped model" in text, f"{doc} does not give the shipped noise step {step}"
