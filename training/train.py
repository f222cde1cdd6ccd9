"""Training a CFM model (or the paper's regression baseline) on cached latent pairs.

Flow matching as the authors: x0 = q_sample(source, k, ε), x_t = t·x1 + (1−t)·x0, t ~ U(0, 1),
loss = ‖v(x_t, t | source) − (x1 − x0)‖². The regression baseline predicts x1 from the source in one pass.

Resumable: `run_dir/last.pt` (network, EMA, optimizer, step, RNG) is written atomically every `save_every`
steps and when interrupted; a new run with the same run_dir continues from it. Multi-GPU: launched by
`torchrun`, each rank draws its own samples; rank 0 validates and writes files.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..flow import q_sample, upscale
from ..flow.pipeline import build_source
from ..flow.settings import resolve
from ..models import MethodSettings, UNetConfig, save_checkpoint
from ..models.unet import CFMUNet
from . import metrics
from .data import LatentStore, SourceRecipe, build_store, load_rgb, scan_images, stored_chunks


@dataclass
class TrainConfig:
    images: str
    out: str
    run_dir: str
    vae: str
    val_images: str | None = None
    crop: int = 256                 # pixels: random crops of crop/8 latent pixels, drawn afresh every step
    max_side: int = 768             # images are encoded once, whole, with their long side at most this
    net: dict = field(default_factory=lambda: dict(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=2,
                                                   attention_resolutions=[4], num_heads=4, dim_head=32))
    mode: str = "pixel"
    noise_step: int = 400
    t_dist: str = "uniform"         # uniform | logit_normal (t = sigmoid(N(t_mean, 1)))
    t_mean: float = 0.0
    solver: str = "euler"           # the solver recommended in the model's metadata
    solver_steps: int = 4
    init: str | None = None         # warm start: an FMBoost .safetensors with the same network
    objective: str = "cfm"          # cfm | regression
    pixel_loss: float = 0.0         # weight of an MSE in pixels ([0, 1]) through the training VAE's decoder, on
    pixel_items: int = 8            # this many items of each batch, a random `pixel_crop`² latent window of each,
    pixel_crop: int = 16            # between the decoded prediction of x1 and the decoded target,
    pixel_lowpass: int = 1          # both averaged over blocks of this many pixels first (1: every pixel)
    back_projection: float = 0.0    # pixel mode: back-projection strength of the source (`flow.source.back_project`)
    source_decoder: str = "vae"     # pixel mode: the decoder of the source's pixels (`flow.source.SOURCE_DECODERS`)
    noise_steps: list | None = None  # each step draws its noise step from these (None: `noise_step` alone, which
                                    # stays the model's recommended one)
    sampled_ssim: float = 0.0       # losses on the model's own result (`sampled_loss`): the solver run with
    sampled_mse: float = 0.0        # gradients from the noised source on `pixel_items` items, decoded in a
    sampled_detail: float = 0.0     # `pixel_crop`² latent window: weights of 1 − SSIM, of the pixel MSE and of
    detail_range: list = field(default_factory=lambda: [0.8, 1.3])  # a penalty when its detail ratio leaves this
    detail_edge_threshold: float = 0.0  # > 0: that ratio leaves out the target's strong edges (luma gradient
                                    # above this per pixel, `metrics.edge_mask`), so the model cannot meet its
                                    # floor with texture drawn along them; 0: every pixel (the spectrum's ratio)
    detail_ceiling: float = 0.0     # weight of a ceiling block by block (`metrics.excess_detail`): a penalty where
    detail_ceiling_ratio: float = 2.0  # the result has more than this × the target's texture, at any contrast
    batch: int = 32
    lr: float = 2e-4
    warmup: int = 500
    decay_from: int | None = None   # cosine decay of the learning rate from this step to 0 at `steps`
    weight_decay: float = 0.0
    steps: int = 20000
    ema: float = 0.999
    grad_clip: float = 1.0
    precision: str = "fp32"         # fp32 | bf16 | fp16 (autocast; bf16 on the CPU too)
    grad_checkpointing: bool = False
    val_every: int = 1000
    val_count: int = 8
    save_every: int = 250
    seed: int = 0
    max_minutes: float | None = None
    max_images: int | None = None   # train on the first this many images of a fixed shuffle (whole chunks of 64)
    store: str | None = None        # a folder of latent-store chunks made earlier: used as it is, `images` unread


class EMA:
    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int):
        # Warm-up of the decay (as in many EMA implementations) so early averages are not dominated by init.
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), net.parameters()):
            e.lerp_(p.detach(), 1 - d)


# Rank 0 builds the latent store while the other ranks wait in a barrier: far longer than the collectives'
# 10-minute default on a large folder.
DIST_TIMEOUT_MINUTES = 180


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        import datetime
        timeout = datetime.timedelta(minutes=DIST_TIMEOUT_MINUTES)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)  # NCCL binds each rank to its own GPU, not all to cuda:0
            try:
                torch.distributed.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local))
            except TypeError:  # torch < 2.3 has no device_id
                torch.distributed.init_process_group("nccl", timeout=timeout)
        else:
            torch.distributed.init_process_group("gloo", timeout=timeout)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def load_training_vae(spec: str):
    """A VAE for building pairs: a TAESD folder (taesd_encoder/decoder.safetensors), or an SD1.x VAE
    `.safetensors` (original/ldm or diffusers layout, or a whole SD1.x checkpoint's first stage)."""
    from ..models.taesd import TAESD
    p = Path(spec)
    if p.is_file() and p.suffix in (".safetensors", ".sft"):
        from safetensors.torch import load_file
        from ..models.autoencoder_kl import AutoencoderKL
        return AutoencoderKL.from_state_dict(load_file(p), p.name), f"sdvae:{p.name}:{p.stat().st_size}"
    if p.is_dir() and (p / "taesd_encoder.safetensors").exists():
        enc = __import__("safetensors.torch", fromlist=["load_file"]).load_file(p / "taesd_encoder.safetensors")
        out_ch = enc["14.weight"].shape[0] if "14.weight" in enc else None
        if out_ch != 4:
            raise ValueError(f"{spec}: this TAESD has {out_ch} latent channels; FMBoost models work in the "
                             "4-channel SD1.x latent space (use taesd, not taesdxl3/taef1)")
        return TAESD.from_folder(p), f"taesd:{p.name}"
    raise ValueError(f"{spec}: not a TAESD folder (taesd_encoder/decoder.safetensors) nor an SD1.x VAE .safetensors")


def _lr_at(step, cfg):
    """Linear warm-up, then constant; with `decay_from`, a cosine from there down to 0 at `steps` (so a run can
    be continued with a decay: resume it with a larger `steps` and `decay_from` at the step it stopped)."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.decay_from is not None and step >= cfg.decay_from:
        span = max(1, cfg.steps - cfg.decay_from)
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.decay_from) / span)))
    return lr


def training_precision(precision: str, device: torch.device, log=None) -> str:
    """The precision a recipe's `precision` gets on this device: as asked, except bf16 on a CPU without bf16
    instructions, which runs in fp32 (flow.runtime.cpu_dtype: emulated bf16 is far slower), said to `log`. fp16
    autocast is for GPUs. Every CPU trainer of the pack (this one, the shading head's, the encoder move's, the
    fidelity decoder's) takes its precision from here."""
    if device.type != "cpu":
        return precision
    if precision == "fp16":
        raise ValueError("fp16 autocast is for GPUs; use --precision bf16 on the CPU")
    from ..flow.runtime import cpu_dtype
    if precision != "bf16" or cpu_dtype() == torch.bfloat16:
        return precision
    if log:
        log("this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 would be emulated, tens of times slower "
            "than fp32 (bench/RESULTS.md, *CPU precision*); training in fp32")
    return "fp32"


def _save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _method(cfg: TrainConfig) -> MethodSettings:
    source_vae = "taesd" if cfg.vae and Path(cfg.vae).is_dir() and cfg.mode == "pixel" else "connected"
    return MethodSettings(scale_factor=0.18215, upsampling_mode=cfg.mode, noise_step=cfg.noise_step,
                          low_res=cfg.crop // 16, high_res=cfg.crop // 8, latent_family="sd1",
                          source_vae=source_vae, back_projection=cfg.back_projection,
                          source_decoder=cfg.source_decoder, solver=cfg.solver,
                          solver_steps=cfg.solver_steps)


def export(cfg: TrainConfig, ema_net, step: int, extra: dict | None = None):
    info = {"objective": cfg.objective, "steps": step, "crop": cfg.crop, "batch": cfg.batch, "lr": cfg.lr,
            "noise_step": cfg.noise_step, "data": os.path.basename(os.path.normpath(cfg.images))}
    if cfg.pixel_loss:
        info |= {"pixel_loss": cfg.pixel_loss, "pixel_items": cfg.pixel_items, "pixel_crop": cfg.pixel_crop,
                 "pixel_lowpass": cfg.pixel_lowpass}
    if cfg.noise_steps:
        info |= {"noise_steps": list(cfg.noise_steps)}
    if sampled(cfg):
        info |= {"sampled_ssim": cfg.sampled_ssim, "sampled_mse": cfg.sampled_mse,
                 "sampled_detail": cfg.sampled_detail, "detail_range": list(cfg.detail_range),
                 "detail_edge_threshold": cfg.detail_edge_threshold, "detail_ceiling": cfg.detail_ceiling,
                 "detail_ceiling_ratio": cfg.detail_ceiling_ratio,
                 "pixel_items": cfg.pixel_items, "pixel_crop": cfg.pixel_crop, "solver_steps": cfg.solver_steps}
    # Written beside and renamed into place, so a model folder never holds a half-written file.
    tmp = Path(cfg.out).with_name(Path(cfg.out).name + ".partial")
    save_checkpoint(tmp, ema_net.state_dict(), ema_net.config, _method(cfg), dtype=torch.float16,
                    extra={"training": json.dumps(info | (extra or {}))})
    os.replace(tmp, cfg.out)


class Validator:
    """Fixed centre crops of held-out images: CFM (EMA weights) vs latent bilinear, decoded with the same VAE."""

    def __init__(self, cfg: TrainConfig, vae, device):
        self.cfg, self.vae, self.device = cfg, vae, device
        report = scan_images(cfg.val_images, cfg.crop)
        crops = []
        for p in report.usable[: cfg.val_count]:
            img = load_rgb(p)
            _, h, w = img.shape
            y, x = (h - cfg.crop) // 2, (w - cfg.crop) // 2
            crops.append(img[:, y:y + cfg.crop, x:x + cfg.crop])
        self.truth = torch.stack(crops)
        with torch.inference_mode():
            from .data import downscale2
            self.lo_raw = vae.encode(downscale2(self.truth).to(device))
            # the flow's source, built once (with a back-projection it costs two more VAE passes at full size)
            self.source = build_source(self.lo_raw, resolve(_method(cfg), have_vae=True).settings, vae, device)

    @torch.inference_mode()
    def run(self, net, step: int, run_dir: Path) -> dict:
        cfg = self.cfg
        net.eval()
        vae = self.vae
        if cfg.objective == "cfm":
            s = resolve(_method(cfg), size_multiple=net.config.size_multiple, have_vae=True).settings
            out_raw = upscale(net, self.lo_raw, s, source=self.source, device=self.device)
        else:
            out_raw = net(self.source, torch.zeros((), device=self.device), self.source) / 0.18215
        result = vae.decode(out_raw).cpu()
        bilinear = vae.decode(F.interpolate(self.lo_raw, scale_factor=2, mode="bilinear", align_corners=False)).cpu()
        low_px = vae.decode(self.lo_raw).cpu()
        low = F.interpolate(low_px, scale_factor=2, mode="nearest")
        bicubic = F.interpolate(low_px, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
        source = vae.decode(self.source / 0.18215).cpu()  # what the flow starts from, decoded
        scores = {}
        for name, img in (("model", result), ("latent_bilinear", bilinear), ("bicubic", bicubic),
                          ("source", source)):
            scores[name] = {"psnr": metrics.psnr(img, self.truth).mean().item(),
                            "ssim": metrics.ssim(img, self.truth).mean().item(),
                            "detail": metrics.detail_ratio(img, self.truth).mean().item(),
                            "colour": metrics.colour_error(img, self.truth).mean().item()}
        self._grid([low, bilinear, result, self.truth], run_dir / f"val_{step:07d}.png")
        (run_dir / f"val_{step:07d}.json").write_text(json.dumps({"step": step, **scores}, indent=1))
        return scores

    @staticmethod
    def _grid(columns, path: Path):
        """Rows: validation images; columns: low-res | latent bilinear | model | ground truth."""
        from PIL import Image
        rows = torch.cat([torch.cat(list(col), dim=-2) for col in columns], dim=-1)  # (3, N·H, 4·W)
        arr = (rows.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(path)


def train(cfg: TrainConfig, log=print) -> dict:
    rank, world = _dist()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    vae, vae_id = load_training_vae(cfg.vae)
    vae.to(device)  # loaded frozen (requires_grad False): the pixel loss differentiates through it, not into it
    recipe = SourceRecipe(cfg.back_projection, cfg.source_decoder)
    if cfg.store:
        chunks = stored_chunks(cfg.store, vae_id, cfg.max_images, recipe)
        if rank == 0:
            log(f"data: {len(chunks)} chunks of the latent store in {cfg.store}")
    else:
        report = scan_images(cfg.images, cfg.crop)
        if rank == 0:
            log(f"data: {report.summary()}")
        if not report.usable:
            raise ValueError(f"no usable training images in {cfg.images} ({report.summary()})")
        images = training_images(report.usable, cfg.seed)
        cache_dir = Path(os.environ.get("FMBOOST_CACHE") or run_dir / "cache")
        if rank == 0:
            build_store(images, vae, vae_id, cache_dir, cfg.max_side, cfg.max_images,
                        progress=_cache_progress(log), recipe=recipe)
        _barrier(world)
        # found, not rebuilt, by the other ranks
        chunks = build_store(images, vae, vae_id, cache_dir, cfg.max_side, cfg.max_images, recipe=recipe)
    store = LatentStore(chunks, cfg.mode, min_size=cfg.crop // 8)
    size = cfg.crop // 8

    net = CFMUNet(UNetConfig.from_dict(cfg.net)).to(device)
    if cfg.init and not (run_dir / "last.pt").exists():
        from ..models import load_checkpoint
        from ..models.checkpoint import HEAD_PREFIX, load_state_strict
        init = load_checkpoint(cfg.init)
        # A shading head learned the old network's drift: the trained network gets none (train a new one).
        load_state_strict(net, {k: v.float() for k, v in init.state_dict.items() if not k.startswith(HEAD_PREFIX)},
                          cfg.init)
        if rank == 0:
            log(f"warm start from {os.path.basename(cfg.init)}"
                + (" (its shading head is not carried over)" if init.head_config is not None else ""))
    net.grad_checkpointing = cfg.grad_checkpointing
    ema = EMA(net, cfg.ema)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    state_path = run_dir / "last.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])
        if rank == 0:
            log(f"resumed from step {step}")
    ema.model.to(device)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    precision = training_precision(cfg.precision, device, log if rank == 0 else None)
    use_amp = precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and precision == "fp16")
    validator = Validator(cfg, vae, device) if (rank == 0 and cfg.val_images) else None

    def save():
        if rank != 0:
            return
        _save_atomic({"net": net.state_dict(), "ema": ema.model.state_dict(), "opt": opt.state_dict(),
                      "step": torch.tensor(step), "rng": torch.get_rng_state(),
                      "config": json.dumps(asdict(cfg))}, state_path)
        export(cfg, ema.model, step, {"images_seen": step * cfg.batch * world})

    # SIGTERM (a scheduler or `kill`) and SIGINT end the run like Ctrl-C: the state is saved first. Background
    # jobs start with SIGINT ignored, so both are set explicitly.
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    if threading_main():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + step)
    started, seen_t, seen_n = time.time(), time.time(), 0
    bar = _progress_bar(cfg.steps, step, rank)
    last = {}
    try:
        while step < cfg.steps:
            if cfg.max_minutes and time.time() - started > 60 * cfg.max_minutes:
                log(f"time budget of {cfg.max_minutes} min reached at step {step}")
                if validator is not None and step % cfg.val_every:  # the weights it stops with, validated
                    last = validator.run(ema.model, step, run_dir)
                    log(f"step {step}: val {json.dumps(last)}")
                break
            z1, src = (t.to(device) for t in store.batch(cfg.batch, size, gen))
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            net.train()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                if cfg.objective == "cfm":
                    k = cfg.noise_step if not cfg.noise_steps else \
                        cfg.noise_steps[int(torch.randint(len(cfg.noise_steps), (), generator=gen))]
                    x0 = q_sample(src, k, torch.randn(z1.shape, generator=gen).to(device))
                    t = sample_t(cfg, z1.shape[0], gen).to(device)
                    tb = t[:, None, None, None]
                    xt = tb * z1 + (1 - tb) * x0
                    pred = model(xt, t, src)
                    loss = F.mse_loss(pred.float(), z1 - x0)
                    x1_pred = xt + (1 - tb) * pred.float()
                else:
                    pred = model(src, torch.zeros(z1.shape[0], device=device), src)
                    loss = F.mse_loss(pred.float(), z1)
                    x1_pred = pred.float()
                if cfg.pixel_loss:
                    loss = loss + cfg.pixel_loss * pixel_mse(vae, x1_pred, z1, cfg.pixel_items, cfg.pixel_crop,
                                                             gen, cfg.pixel_lowpass)
                if cfg.objective == "cfm" and sampled(cfg):
                    loss = loss + sampled_loss(model, vae, x0, z1, src, cfg, gen)["loss"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            ema.update(net, step)
            step += 1
            seen_n += cfg.batch * world
            if bar is not None:
                rate = seen_n / max(1e-6, time.time() - seen_t)
                bar.set_postfix(loss=f"{loss.item():.4f}", gnorm=f"{grad_norm.item():.2f}", img_s=f"{rate:.1f}")
                bar.update(1)
            if step % cfg.save_every == 0:
                save()
            if validator is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                last = validator.run(ema.model, step, run_dir)
                rate = seen_n / max(1e-6, time.time() - seen_t)
                log(f"step {step}: {rate:.1f} samples/s; val {json.dumps(last)}")
    except KeyboardInterrupt:
        log(f"interrupted at step {step}; saving")
    finally:
        save()
        if bar is not None:
            bar.close()
        if world > 1:
            torch.distributed.destroy_process_group()
    return {"step": step, "val": last}


def random_windows(shape, n: int, crop: int, gen: torch.Generator):
    """A random `crop`² window (clipped to the latent's size) for each of the first `n` items of latents of
    `shape`, drawn once (rows, then columns): returns a function that cuts those windows out of any latent of
    that shape, so the prediction and its target are compared in the same place."""
    h, w = shape[-2:]
    crop = min(crop, h, w)
    ys = torch.randint(h - crop + 1, (n,), generator=gen).tolist()
    xs = torch.randint(w - crop + 1, (n,), generator=gen).tolist()

    def cut(z: torch.Tensor) -> torch.Tensor:
        return torch.stack([z[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(zip(ys, xs))])
    return cut


def pixel_mse(vae, z1_pred: torch.Tensor, z1: torch.Tensor, items: int, crop: int,
              gen: torch.Generator, lowpass: int = 1) -> torch.Tensor:
    """MSE between the decoded prediction and the decoded target (pixels in [0, 1]) on the first `items` items,
    each in its own random `crop`² latent window, both averaged over `lowpass`² pixel blocks first (1: none; a
    larger block leaves texture to the flow loss and holds colour and shading). Latent-space MSE alone is blind
    to what the decoder does with an averaged latent: it decodes with a colour cast (brighter reds and greens
    with TAESD), which this sees."""
    windows = random_windows(z1.shape, min(items, z1.shape[0]), crop, gen)

    def decoded(z):
        px = vae.decode(windows(z) / vae.scale_factor).float()
        return F.avg_pool2d(px, lowpass) if lowpass > 1 else px
    with torch.no_grad():
        target = decoded(z1)
    return F.mse_loss(decoded(z1_pred), target)


def sampled(cfg: TrainConfig) -> bool:
    return bool(cfg.sampled_ssim or cfg.sampled_mse or cfg.sampled_detail)


def euler(model, x0: torch.Tensor, context: torch.Tensor, steps: int) -> torch.Tensor:
    """The node's Euler solver from t=0 to 1, differentiable (training runs it with gradients)."""
    x = x0
    for i in range(steps):
        t = torch.full((x.shape[0],), i / steps, device=x.device)
        x = x + model(x, t, context).float() / steps
    return x


def sampled_loss(model, vae, x0: torch.Tensor, z1: torch.Tensor, src: torch.Tensor, cfg: TrainConfig,
                 gen: torch.Generator) -> dict:
    """Losses on what the user gets: the model's own result, the solver (`cfg.solver_steps` Euler steps) run
    from the noised source x0 on the first `cfg.pixel_items` items, decoded by the training VAE in a random
    `cfg.pixel_crop`² latent window of each, against the decoded target. `sampled_ssim` · (1 − SSIM) +
    `sampled_mse` · pixel MSE reward the detail the model gets right; alone they would make it average its
    guesses into blur, so `sampled_detail` · (log of how far the windows' detail ratio, their high-frequency
    energy over the target's (`metrics.high_frequency_energy`), lies outside `detail_range`)² holds its amount of
    detail. With `detail_edge_threshold` the ratio is that of the high-pass energy (`metrics.high_pass_energy`)
    away from the target's strong edges: the texture a floor asks for cannot be drawn along them; with
    `detail_ceiling`, `metrics.excess_detail` penalises texture above the target's block by block, so it cannot be
    drawn where the target has none either. Returns the
    weighted sum ("loss") and its parts (plain numbers)."""
    if cfg.solver != "euler":
        raise ValueError(f"the sampled losses run the Euler solver; this recipe's solver is {cfg.solver!r}")
    n = min(cfg.pixel_items, z1.shape[0])
    x1 = euler(model, x0[:n], src[:n], cfg.solver_steps)
    windows = random_windows(z1.shape, n, cfg.pixel_crop, gen)

    def decoded(z):
        return vae.decode(windows(z) / vae.scale_factor).float().clamp(0, 1)
    with torch.no_grad():
        target = decoded(z1[:n])
    result = decoded(x1)
    ssim_loss = (1 - metrics.ssim(result, target)).mean()
    mse = F.mse_loss(result, target)
    if cfg.detail_edge_threshold:
        keep = 1 - metrics.edge_mask(target, cfg.detail_edge_threshold)
        energy = lambda img: metrics.high_pass_energy(img, keep)  # noqa: E731
    else:
        energy = metrics.high_frequency_energy
    ratio = energy(result).sum() / energy(target).sum().clamp_min(1e-8)
    low, high = (math.log(v) for v in cfg.detail_range)
    log_ratio = torch.log(ratio.clamp_min(1e-6))
    detail = F.relu(low - log_ratio) ** 2 + F.relu(log_ratio - high) ** 2
    ceiling = metrics.excess_detail(result, target, cfg.detail_ceiling_ratio) if cfg.detail_ceiling else \
        torch.zeros(())
    loss = cfg.sampled_ssim * ssim_loss + cfg.sampled_mse * mse + cfg.sampled_detail * detail + \
        cfg.detail_ceiling * ceiling
    return {"loss": loss, "ssim": 1 - ssim_loss.item(), "mse": mse.item(), "detail_ratio": ratio.item(),
            "detail": detail.item(), "ceiling": ceiling.item()}


def training_images(usable: list, seed: int) -> list:
    """The training images in a fixed shuffle, so that a run on the first `max_images` (whole chunks of the
    latent store) mixes every source of the folder."""
    images = list(usable)
    random.Random(seed).shuffle(images)
    return images


def sample_t(cfg: TrainConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    if cfg.t_dist == "uniform":
        return torch.rand(n, generator=gen)
    if cfg.t_dist == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen) + cfg.t_mean)
    raise ValueError(f"unknown t_dist {cfg.t_dist!r}; choose uniform or logit_normal")


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _progress_bar(total, start, rank):
    if rank != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=2.0)


def _cache_progress(log):
    last = [0.0]

    def report(done, total):
        if time.time() - last[0] > 10 or done == total:
            last[0] = time.time()
            log(f"caching latents: {done}/{total} images")
    return report
