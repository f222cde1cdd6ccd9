"""CFM checkpoint formats, detected automatically.

- ours: `.safetensors` whose metadata holds the network config and the method settings;
- the authors' PyTorch-Lightning `.ckpt` (EMA weights `ema_model.ema_model.net.*` or online `model.net.*`),
  read with the restricted unpickler in `safe_pickle`;
- a bare state dict (`.safetensors` or `.ckpt`/`.pt`), whose architecture is taken from a `<name>.json`
  beside it or else inferred from the weights.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .safe_pickle import CheckpointReadError, safe_torch_load, to_plain
from .shading_head import ShadingHead, ShadingHeadConfig
from .unet import CFMUNet, UNetConfig

FORMAT_TAG = "fmboost-cfm"
FORMAT_VERSION = "1"
SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")

EMA_PREFIX = "ema_model.ema_model.net."
HEAD_PREFIX = "shading_head."
ONLINE_PREFIX = "model.net."
# Prefixes a bare net state dict may carry (stripped in this order).
BARE_PREFIXES = (EMA_PREFIX, ONLINE_PREFIX, "net.", "module.")
SIGNATURE_KEYS = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")

# The authors name up-sampling modes psu (pixel space) / lsu (latent space).
UPSAMPLING_ALIASES = {"psu": "pixel", "lsu": "latent", "pixel": "pixel", "latent": "latent"}


class CheckpointError(ValueError):
    """A file that is not a usable CFM checkpoint; the message names the file and what was found."""


@dataclass(frozen=True)
class MethodSettings:
    """How the network was trained: what its inputs mean."""
    scale_factor: float = 0.18215        # network latents = VAE latents × scale_factor
    upsampling_mode: str = "pixel"       # source construction used in training: pixel | latent
    noise_step: int = 400                # noise-augmentation step of the authors' schedule
    low_res: int = 64                    # trained low-res latent size
    high_res: int = 128                  # trained high-res latent size
    latent_family: str = "sd1"           # latent space the network works in (SD1.x: 4 channels)
    source_vae: str = "connected"        # pixel mode: the VAE that built the trained sources. "connected": the
    #                                      latent's own VAE must be connected; "taesd": the pack's TAESD builds
    #                                      the source when no VAE is connected
    back_projection: float = 0.0         # pixel mode: strength of the back-projection of the up-sampled pixels
    #                                      before the encode (`flow.source.back_project`); 0: models without
    source_decoder: str = "vae"          # pixel mode: the decoder of the source's pixels, "vae" (the VAE's own) or
    #                                      "fidelity" (the pack's TAESD fidelity decoder; `flow.source.SOURCE_DECODERS`)
    shading_correction: int = 0          # recommended passes of `flow.shading.correct_shading` after the flow
    #                                      (0: none, the authors' models and models without the field)
    shading_head: bool = False           # the file carries a learned shading head (`models.shading_head`), run
    #                                      after the flow by default. Set by the loader from the file's tensors
    solver: str = "euler"                # recommended solver when none is connected
    solver_steps: int = 4                # ... and its integration steps

    @classmethod
    def from_dict(cls, d: dict) -> "MethodSettings":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "shading_head"}
        if "upsampling_mode" in known:
            mode = UPSAMPLING_ALIASES.get(str(known["upsampling_mode"]))
            if mode is None:
                raise ValueError(f"unknown upsampling_mode {known['upsampling_mode']!r}")
            known["upsampling_mode"] = mode
        return cls(**known)

    def to_dict(self) -> dict:
        """What the file stores; `shading_head` is not stored (the loader derives it from the tensors)."""
        return {k: v for k, v in asdict(self).items() if k != "shading_head"}


@dataclass
class CFMCheckpoint:
    path: str
    format: str                      # "fmboost" | "lightning" | "state_dict"
    weights: str                     # "ema" | "online" | "single"
    net_config: UNetConfig
    method: MethodSettings
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    config_source: str = "stored"    # "stored" | "sidecar" | "inferred" | "given"
    head_config: ShadingHeadConfig | None = None   # the learned shading head's, when the file has one

    def build_network(self, dtype: torch.dtype | None = None) -> CFMUNet:
        """The network, with its shading head (`net.shading_head`) when the file has one."""
        net = CFMUNet(self.net_config)
        if self.head_config is not None:
            net.shading_head = ShadingHead(self.head_config)
        load_state_strict(net, self.state_dict, self.path)
        net.eval().requires_grad_(False)
        if dtype is not None:
            net.set_precision(dtype)
        return net


def load_state_strict(net: torch.nn.Module, state_dict: dict, path: str) -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs net {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:2])})")
        raise CheckpointError(f"{_name(path)}: weights do not fit the CFM network: " + ", ".join(parts))
    net.load_state_dict({k: state_dict[k] for k in expected}, strict=True)


def _name(path) -> str:
    return os.path.basename(os.fspath(path))


# ---------------------------------------------------------------------------------------------- reading

def load_checkpoint(path: str | os.PathLike, weights: str = "ema", net_config: dict | UNetConfig | None = None,
                    ) -> CFMCheckpoint:
    """Read any supported CFM checkpoint. `weights` picks EMA or online weights in the authors' files."""
    path = os.fspath(path)
    if weights not in ("ema", "online"):
        raise ValueError(f"weights must be 'ema' or 'online', not {weights!r}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS_EXT:
        tensors, meta = _read_safetensors(path)
        if meta.get("format") == FORMAT_TAG:
            ckpt = _from_our_metadata(path, tensors, meta)
        else:
            ckpt = _from_bare(path, tensors, weights)
    elif ext in PICKLE_EXT:
        try:
            obj = safe_torch_load(path)
        except CheckpointReadError as e:
            raise CheckpointError(str(e)) from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            ckpt = _from_lightning(path, obj, weights)
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            ckpt = _from_bare(path, obj, weights)
        else:
            raise CheckpointError(f"{_name(path)}: not a CFM checkpoint (found {_describe(obj)})")
    else:
        raise CheckpointError(f"{_name(path)}: unsupported file type {ext!r}; use .safetensors or .ckpt")
    if net_config is not None:
        cfg = net_config if isinstance(net_config, UNetConfig) else UNetConfig.from_dict(net_config)
        ckpt = replace(ckpt, net_config=cfg, config_source="given")
    return ckpt


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{_name(path)}: not a readable safetensors file ({e})") from e
    meta = {}
    if raw_meta.get("fmboost.format") == FORMAT_TAG:
        try:
            meta = {
                "format": FORMAT_TAG,
                "version": raw_meta.get("fmboost.version", "?"),
                "net": json.loads(raw_meta["fmboost.net_config"]),
                "method": json.loads(raw_meta.get("fmboost.method", "{}")),
                "weights": raw_meta.get("fmboost.weights", "single"),
                "shading_head": json.loads(raw_meta.get("fmboost.shading_head", "null")),
            }
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{_name(path)}: fmboost metadata is damaged ({e})") from e
    return tensors, meta


def _from_our_metadata(path, tensors, meta) -> CFMCheckpoint:
    try:
        cfg = UNetConfig.from_dict(meta["net"])
        method = MethodSettings.from_dict(meta["method"])
        head = ShadingHeadConfig.from_dict(meta["shading_head"]) if meta.get("shading_head") else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{_name(path)}: fmboost metadata is invalid ({e})") from e
    has_head_tensors = any(k.startswith(HEAD_PREFIX) for k in tensors)
    if has_head_tensors != (head is not None):
        raise CheckpointError(f"{_name(path)}: " + ("shading head weights without their config in the metadata"
                                                    if has_head_tensors else
                                                    "the metadata names a shading head but its weights are missing"))
    _require_signature(path, tensors)
    # Whether the model has a head is the file's content, not a stored flag.
    method = replace(method, shading_head=head is not None)
    return CFMCheckpoint(path, "fmboost", meta["weights"], cfg, method, tensors, head_config=head)


def _from_lightning(path, obj, weights) -> CFMCheckpoint:
    sd = obj["state_dict"]
    prefix = EMA_PREFIX if weights == "ema" else ONLINE_PREFIX
    net_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not net_sd:
        other = ONLINE_PREFIX if weights == "ema" else EMA_PREFIX
        if any(k.startswith(other) for k in sd):
            raise CheckpointError(f"{_name(path)}: has no {weights} weights ({prefix}*); choose the other weights")
        raise CheckpointError(f"{_name(path)}: Lightning checkpoint without CFM weights "
                              f"(found {len(sd)} keys like {_sample_keys(sd)})")
    _require_signature(path, net_sd)
    hp = to_plain(obj.get("hyper_parameters") or {})
    net_params = _dig(hp, ("fm_cfg", "params", "net_cfg", "params"))
    method = MethodSettings.from_dict({
        "scale_factor": hp.get("scale_factor", MethodSettings.scale_factor),
        "upsampling_mode": hp.get("upsampling_mode", "psu"),
        "noise_step": hp.get("noising_step", MethodSettings.noise_step),
        # The authors' sizes are latent sizes (64 → 128 for 512 → 1024 px).
        "low_res": hp.get("low_res_size", MethodSettings.low_res),
        "high_res": hp.get("high_res_size", MethodSettings.high_res),
    })
    if isinstance(net_params, dict):
        cfg, source = UNetConfig.from_dict(net_params), "stored"
    else:
        cfg, source = _sidecar_or_inferred(path, net_sd)
    return CFMCheckpoint(path, "lightning", weights, cfg, method, net_sd, source)


def _from_bare(path, tensors, weights) -> CFMCheckpoint:
    keys = list(tensors)
    if any(k.startswith(EMA_PREFIX) for k in keys) or any(k.startswith(ONLINE_PREFIX) for k in keys):
        # A Lightning state dict saved on its own: same choice as for the .ckpt.
        return _from_lightning(path, {"state_dict": tensors}, weights)
    for prefix in BARE_PREFIXES[2:]:
        if keys and all(k.startswith(prefix) for k in keys):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            break
    _require_signature(path, tensors)
    side = _read_sidecar(path)
    cfg, source = _sidecar_or_inferred(path, tensors, side)
    method = MethodSettings.from_dict(side["method"]) if isinstance(side.get("method"), dict) else MethodSettings()
    return CFMCheckpoint(path, "state_dict", "single", cfg, method, tensors, source)


def _require_signature(path, sd) -> None:
    if not all(k in sd for k in SIGNATURE_KEYS):
        raise CheckpointError(
            f"{_name(path)}: not a CFM checkpoint: expected keys {', '.join(SIGNATURE_KEYS)}; "
            f"found {len(sd)} tensors like {_sample_keys(sd)}{_guess_family(sd)}")


def _sample_keys(sd, n=3) -> str:
    return ", ".join(repr(k) for k in list(sd)[:n]) or "nothing"


def _guess_family(sd) -> str:
    keys = " ".join(list(sd)[:4000])
    if "model.diffusion_model." in keys:
        return " (this looks like a Stable Diffusion checkpoint: load it with Load Checkpoint)"
    if "first_stage_model." in keys or "decoder.up." in keys or "decoder.conv_in" in keys:
        return " (this looks like a VAE)"
    return ""


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(repr(k) for k in list(obj)[:5])}"
    return type(obj).__name__


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _sidecar_path(path) -> Path | None:
    p = Path(path)
    for cand in (p.with_suffix(".json"), Path(str(p) + ".json")):
        if cand.is_file():
            return cand
    return None


def _read_sidecar(path) -> dict:
    side = _sidecar_path(path)
    if side is None:
        return {}
    try:
        return json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{side.name}: unreadable config beside {_name(path)} ({e})") from e


def _sidecar_or_inferred(path, sd, side: dict | None = None) -> tuple[UNetConfig, str]:
    side = _read_sidecar(path) if side is None else side
    params = side.get("net_params") or side.get("net") or _dig(side, ("fm_cfg", "params", "net_cfg", "params"))
    if isinstance(params, dict):
        return UNetConfig.from_dict(params), "sidecar"
    return infer_unet_config(sd, path), "inferred"


def infer_unet_config(sd: dict, path="weights") -> UNetConfig:
    """Read the architecture off the weights. Heads vs head width cannot be seen in the weights (the
    attention projection only shows their product); we assume the authors' head width of 64, or one head
    when the width is smaller. A `<name>.json` beside the file overrides this."""
    try:
        first = sd["input_blocks.0.0.weight"]
        mc, in_ch = first.shape[0], first.shape[1]
        out_ch = sd["out.2.weight"].shape[0]
        blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
        mults, attn_levels, per_level, level, ds = [], [], [], 0, 1
        count = 0
        for b in blocks[1:]:
            if f"input_blocks.{b}.0.op.weight" in sd or f"input_blocks.{b}.0.op" in sd:
                per_level.append(count)
                count, level, ds = 0, level + 1, ds * 2
                continue
            width = sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0]
            if count == 0:
                mults.append(width // mc)
            count += 1
            if f"input_blocks.{b}.1.qkv.weight" in sd and ds not in attn_levels:
                attn_levels.append(ds)
        per_level.append(count)
        if len(set(per_level)) != 1:
            raise CheckpointError(f"{_name(path)}: uneven residual blocks per level {per_level}")
        inner = sd["middle_block.1.qkv.weight"].shape[0] // 3
        dim_head = 64 if inner % 64 == 0 else inner
        cfg = UNetConfig(in_channels=in_ch, model_channels=mc, out_channels=out_ch, num_res_blocks=per_level[0],
                         attention_resolutions=tuple(attn_levels), channel_mult=tuple(mults),
                         dim_head=dim_head, num_heads=inner // dim_head,
                         use_scale_shift_norm=sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * mc * mults[0])
        cfg.check()
        return cfg
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{_name(path)}: cannot infer the CFM architecture from the weights ({e})") from e


# ---------------------------------------------------------------------------------------------- writing

def save_checkpoint(path: str | os.PathLike, state_dict: dict, net_config: UNetConfig, method: MethodSettings,
                    dtype: torch.dtype | None = torch.float16, weights: str = "ema", extra: dict | None = None,
                    head_config: ShadingHeadConfig | None = None) -> None:
    """`state_dict`: the network's, with a shading head's `shading_head.*` tensors when `head_config` is given."""
    from safetensors.torch import save_file
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
               for k, v in state_dict.items()}
    meta = {
        "fmboost.format": FORMAT_TAG,
        "fmboost.version": FORMAT_VERSION,
        "fmboost.net_config": json.dumps(net_config.to_dict()),
        "fmboost.method": json.dumps(method.to_dict()),
        "fmboost.weights": weights,
    }
    if head_config is not None:
        meta["fmboost.shading_head"] = json.dumps(head_config.to_dict())
    for k, v in (extra or {}).items():
        meta[f"fmboost.{k}"] = v if isinstance(v, str) else json.dumps(v)
    save_file(tensors, os.fspath(path), metadata=meta)


def convert(src: str | os.PathLike, dst: str | os.PathLike, weights: str = "ema",
            dtype: torch.dtype | None = torch.float16, net_config: dict | None = None) -> CFMCheckpoint:
    """Any supported checkpoint → our `.safetensors`. Drops VAE, FID network and optimizer state."""
    ckpt = load_checkpoint(src, weights=weights, net_config=net_config)
    ckpt.build_network()  # refuse to write a file that would not load
    save_checkpoint(dst, ckpt.state_dict, ckpt.net_config, ckpt.method, dtype=dtype, weights=ckpt.weights,
                    extra={"converted_from": _name(src)})
    return ckpt


def rewrite_checkpoint(path: str | os.PathLike, dst: str | os.PathLike | None = None, *, method=None,
                       tensors=None, metadata=None) -> dict:
    """Rewrite an FMBoost `.safetensors` (to `dst`, default in place, atomically), keeping what is not changed.
    `method(MethodSettings) → MethodSettings`, `tensors(dict) → dict` and `metadata(dict) → dict` (raw
    `fmboost.*` strings) transform the parts; the result must still load. Returns the raw metadata written."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = Path(path)
    dst = Path(dst) if dst is not None else path
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("fmboost.format") != FORMAT_TAG:
        raise ValueError(f"{path.name}: not an FMBoost model (no fmboost metadata)")
    data = load_file(str(path))
    if method is not None:
        meta["fmboost.method"] = json.dumps(method(MethodSettings.from_dict(json.loads(meta["fmboost.method"])))
                                            .to_dict())
    if tensors is not None:
        data = tensors(data)
    if metadata is not None:
        meta = metadata(meta)
    tmp = dst.with_name(dst.stem + ".partial" + dst.suffix)
    save_file({k: v.contiguous() for k, v in data.items()}, str(tmp), metadata=meta)
    try:
        load_checkpoint(tmp).build_network()   # refuse to leave a file that would not load
    except Exception:
        tmp.unlink()
        raise
    # safetensors writes owner-only files; keep the permissions the model had (ComfyUI may run as another user)
    os.chmod(tmp, (dst if dst.exists() else path).stat().st_mode & 0o7777)
    os.replace(tmp, dst)
    return meta
