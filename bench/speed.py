#!/usr/bin/env python3
"""Speed and memory: CFM upscaling vs the hires-fix pass it replaces, on this machine, in one run.

    .venv/bin/python bench/speed.py [--quick]

Times (median of --runs after a warm-up; ms per image, batch 1 and 4) and peak memory for
- CFM 64²→128² latent with the authors' full-size network (random weights; 305.8 M parameters) at 1, 2, 4, 8
  and 20 Euler evaluations and adaptive dopri5, in fp32 / fp16 / bf16 (half precision on GPU only);
- the same for the shipped default model;
- a hires-fix second pass: ComfyUI's own SD1.5 UNet code (random weights) at a 128² latent, KSampler
  steps=20 at denoise=0.5 with CFG: 20 sampler steps, each one UNet evaluation on a batch of 2
  (conditional + unconditional), i.e. 20 evaluations;
- SD1.5 sampling directly at 1024²: 20 steps with CFG at a 128² latent, the same 20 evaluations from pure noise
  (the cost of the extra base pass at 64² is not counted for hires-fix, so the two rows differ only in name);
- the VAE decode at 1024² that every path shares (SD1.x VAE architecture, random weights).
Ratios are against the hires-fix pass measured in the same run; the floor is FLOPs × evaluations / the measured
matrix-multiply rate. Writes the "## Speed" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from _pack import REPO, load_pack  # noqa: E402

load_pack()
from fmboost.flow import EvaluationBudgetExceeded, SolverSettings, UpscaleSettings, upscale  # noqa: E402
from fmboost.flow.runtime import RuntimeOptions, prepare_network  # noqa: E402
from fmboost.flow.solvers import integrate  # noqa: E402
from fmboost.flow.tiling import bytes_per_pixel, min_window, plan_run  # noqa: E402
from fmboost.models import UNetConfig, load_checkpoint  # noqa: E402
from fmboost.models.autoencoder_kl import AutoencoderKL  # noqa: E402
from fmboost.models.unet import CFMUNet  # noqa: E402

SHARED = Path(os.environ.get("FMBOOST_SHARED") or REPO.parent / "shared")
FIXTURES = SHARED / "fixtures" / "fmboost_reference"


class PeakMemory:
    """Peak device memory (CUDA) or peak resident memory growth (CPU, sampled) during a block."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil
            self.proc = psutil.Process()
            self.base = self.peak = self.proc.memory_info().rss
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.bytes = self.peak - self.base


def timed(fn, device, runs, warm_up=True):
    if warm_up:
        fn()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(runs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times), mem.bytes


def matmul_rate(device, dtype):
    """The best rate of one square matrix multiply over a few sizes: the machine's attainable peak, which is
    what the floor divides by (a median of one small size understated it on the CPU)."""
    best = 0.0
    for n in ((4096, 8192) if device.type == "cuda" else (1024, 2048, 3072)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up, once per size
        fastest = min(timed(lambda: a @ b, device, 1, warm_up=False)[0] for _ in range(5))
        best = max(best, 2 * n ** 3 / fastest)
        del a, b
    return best


def flops_of(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sd15_unet(device, dtype):
    sys.path.insert(0, str(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui"))
    import comfy.cli_args
    if device.type == "cpu":  # as `main.py --cpu`: ComfyUI's CPU attention path, no CUDA probing
        comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    cfg = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
               channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
               transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_spatial_transformer=True,
               legacy=False, context_dim=768, num_heads=8, use_linear_in_transformer=False, adm_in_channels=None,
               use_temporal_attention=False, use_temporal_resblock=False)
    unet = UNetModel(**cfg, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    return unet.eval().requires_grad_(False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--evals", default="1,2,4,8,20")
    ap.add_argument("--quick", action="store_true",
                    help="CPU-sized: batch 1 (the shipped model also at 4), one run, evaluations 1/4/8/20, the "
                         "hires-fix pass timed for one of its 20 evaluations and multiplied by 20, the large output "
                         "at 1 evaluation")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--json")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile and CUDA-graph runs")
    ap.add_argument("--from-json", help="rewrite the section from an earlier run's --json, measuring nothing")
    ap.add_argument("--defaults-only", action="store_true",
                    help="only time the shipped models at the node's defaults (a section of its own)")
    args = ap.parse_args(argv)
    if args.defaults_only:
        text = node_defaults(args)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quality import replace_section
        replace_section(Path(args.results), "## Node defaults speed", text)
        print(text)
        return
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        device = torch.device(saved.get("device", "cpu"))
        args.runs = saved.get("runs", args.runs)
        args.quick = saved.get("quick", False)
        return write(saved["rows"], saved["rates"], device, args, saved.get("checks", {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    evals = [int(e) for e in ("1,4,8,20" if args.quick else args.evals).split(",")]
    runs = 1 if args.quick else args.runs
    dtypes = ([torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows, checks = [], {}
    rates = {str(d).split(".")[-1]: matmul_rate(device, d) for d in dtypes}

    def add(name, dtype, batch, evaluations, seconds, mem, flops):
        rows.append(dict(name=name, dtype=str(dtype).split(".")[-1], batch=batch, evals=evaluations,
                         ms_per_image=1000 * seconds / batch, peak_mib=mem / 2 ** 20,
                         floor_ms=(1000 * flops * evaluations / rates[str(dtype).split(".")[-1]]  # flops: per image
                                   if flops else None)))
        print(json.dumps(rows[-1]), file=sys.stderr)

    with torch.inference_mode():
        # hires-fix pass and direct 1024² sampling: ComfyUI's SD1.5 UNet at a 128² latent, CFG batch of 2
        for dtype in dtypes:
            unet = sd15_unet(device, dtype)
            for batch in batches:
                x = torch.randn(2 * batch, 4, 128, 128, device=device, dtype=dtype)
                ts = torch.full((2 * batch,), 500.0, device=device)
                ctx = torch.randn(2 * batch, 77, 768, device=device, dtype=dtype)
                one = lambda: unet(x, ts, context=ctx)  # noqa: E731
                flops = flops_of(one) / batch
                if args.quick:  # one evaluation timed, ×20: the 20 evaluations of a pass cost the same each
                    sec, mem = timed(one, device, runs)
                    sec *= 20
                else:
                    sec, mem = timed(lambda: [one() for _ in range(20)], device, runs)
                for name in ("hires-fix pass (SD1.5 UNet, 20 steps at denoise 0.5, CFG)",
                             "SD1.5 directly at 1024² (20 steps, CFG)"):
                    add(name, dtype, batch, 20, sec, mem, flops)
            del unet
        # the VAE decode at 1024² every path shares
        vae = AutoencoderKL().to(device).eval()
        z = torch.randn(1, 4, 128, 128, device=device)
        sec, mem = timed(lambda: vae.decode(z), device, runs)
        add("VAE decode 1024² (shared by all)", torch.float32, 1, 1, sec, mem, flops_of(lambda: vae.decode(z)))
        del vae
        # CFM: the authors' full-size network and the shipped default, run the way the node runs them
        manifest = json.loads((FIXTURES / "official_config_manifest.json").read_text())
        configs = {"CFM full-size (authors' config, 305.8 M)": (UNetConfig.from_dict(manifest["net_params"]), None)}
        shipped = REPO / "weights" / "cfm" / "fmboost-sd15-x2.safetensors"
        if shipped.exists():
            configs["CFM shipped default"] = (None, shipped)
        compile_modes = ["off"] + (["compile", "compile+cudagraphs"] if args.compile else [])
        for label, (config, path) in configs.items():
            for dtype in dtypes:
                net = (CFMUNet(config) if path is None else load_checkpoint(path).build_network()).eval()
                net.requires_grad_(False).set_precision(dtype).to(device)
                for mode in compile_modes:
                    run_net = prepare_network(net, device, RuntimeOptions(compile=mode))
                    tag = "" if mode == "off" else f" [{mode}]"
                    # --quick still times the shipped model at batch 4 too: seconds on a CPU
                    for batch in (batches if path is None or not args.quick else [1, 4]):
                        latent = torch.randn(batch, 4, 64, 64, device=device) * 5
                        x1 = torch.randn(batch, 4, 128, 128, device=device)
                        flops = flops_of(lambda: net(x1, torch.tensor(0.5, device=device), x1)) / batch
                        for i, n in enumerate(evals):
                            s = UpscaleSettings(mode="latent", solver=SolverSettings("euler", steps=n),
                                                size_multiple=net.config.size_multiple)
                            sec, mem = timed(lambda: upscale(run_net, latent, s, device=device), device, runs,
                                             warm_up=(i == 0 or device.type == "cuda"))
                            add(f"{label}, euler{tag}", dtype, batch, n, sec, mem, flops)
                    if mode != "off":
                        continue
                    if device.type == "cuda":
                        checks[f"{label}, {str(dtype).split('.')[-1]}: host syncs in the Euler loop"] = \
                            loop_host_syncs(run_net, device)
                    counted = []
                    cap = 60 if args.quick else 300
                    s = UpscaleSettings(mode="latent", solver=SolverSettings("dopri5", atol=1e-3, rtol=1e-3,
                                                                             max_evals=cap),
                                        size_multiple=net.config.size_multiple)
                    try:
                        sec, mem = timed(lambda: counted.append(0) or upscale(
                            run_net, latent[:1], s, device=device,
                            on_progress=lambda p: counted.__setitem__(-1, p.nfe)), device, runs, warm_up=False)
                        add(f"{label}, dopri5 adaptive", dtype, 1, counted[-1], sec, mem, flops)
                    except EvaluationBudgetExceeded:  # random weights give no smooth flow to adapt to
                        print(f"{label} {dtype}: dopri5 reached {cap} evaluations; row left out", file=sys.stderr)
                large_output(label, net, dtype, device, args, add)
                del net, run_net
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    write(rows, rates, device, args, checks)


def node_defaults(args) -> str:
    """What a user waits for: 64² → 128² latent (512² → 1024² px) with each shipped model at the node's defaults
    (flow.settings.resolve: the trained source, noise step and recommended solver; the pack's TAESD builds a
    pixel-mode source in the model's precision), against the two resizes it replaces, timed in the same run.
    Batch 1, best of `runs` after a warm-up, at the precision `auto` picks (on the CPU: flow.runtime.cpu_dtype)
    and in fp32. Returns a section for bench/RESULTS.md."""
    import torch.nn.functional as F
    from fmboost.flow.runtime import cpu_dtype
    from fmboost.flow.settings import HEAD_ONLY, resolve, shading_label
    from fmboost.flow.source import make_source
    from fmboost.models.taesd import TAESD
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = cpu_dtype() if device.type == "cpu" else (
        torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    dtypes = [auto] + ([torch.float32] if auto != torch.float32 else [])
    latent = torch.randn(1, 4, 64, 64, device=device) * 5
    runs = max(3, args.runs)

    def best(fn):
        fn()
        return min(timed(fn, device, 1, warm_up=False)[0] for _ in range(runs))

    def name(dtype):
        return str(dtype).split(".")[-1] + (" (auto)" if dtype == auto else "")

    s = 0.18215
    rows = {("latent bilinear ×2 (core LatentUpscaleBy)", "float32"):
            best(lambda: F.interpolate(latent, scale_factor=2, mode="bilinear"))}
    source = "TAESD decode → bilinear ×2 → TAESD encode (the pixel-space source alone)"
    for dtype in dtypes:
        taesd = TAESD.from_folder(REPO / "weights" / "taesd").to(device).set_precision(dtype)
        rows[(source, name(dtype))] = best(lambda: make_source(latent * s, "pixel", s, taesd))
        if taesd.fused:
            taesd.fused = False
            rows[(source + ", TAESD's plain layers", name(dtype))] = best(
                lambda: make_source(latent * s, "pixel", s, taesd))
            taesd.fused = None
        for path in sorted((REPO / "weights" / "cfm").glob("*.safetensors")):
            ck = load_checkpoint(path)
            net = ck.build_network(dtype).to(device)
            r = resolve(ck.method, size_multiple=ck.net_config.size_multiple)
            solver = r.settings.solver
            bp = f", back-projected {r.settings.back_projection:g}" if r.settings.back_projection else ""
            sc = shading_label(r.settings)
            label = (f"{path.name}, node defaults ({r.settings.mode} source{bp}, {solver.method} {solver.steps}, "
                     f"k={r.settings.noise_step}{sc})")
            rows[(label, name(dtype))] = best(lambda: upscale(net, latent, r.settings, vae=taesd, device=device))
            if sc:
                plain = dataclasses.replace(r.settings, shading_correction=0, shading_head=False)
                rows[(f"{path.name}, the same without shading correction", name(dtype))] = best(
                    lambda: upscale(net, latent, plain, vae=taesd, device=device))
            if r.settings.shading_head:
                head = resolve(ck.method, size_multiple=ck.net_config.size_multiple,
                               shading_correction=HEAD_ONLY).settings
                rows[(f"{path.name}, the same with the head alone (shading_correction -2)", name(dtype))] = \
                    best(lambda: upscale(net, latent, head, vae=taesd, device=device))
                passes = max(1, r.settings.shading_correction)
                taesd_pass = dataclasses.replace(r.settings, shading_correction=passes, shading_head=False)
                rows[(f"{path.name}, the same with {passes} TAESD pass{'es' if passes > 1 else ''} and no head",
                      name(dtype))] = best(lambda: upscale(net, latent, taesd_pass, vae=taesd, device=device))
            if taesd.change is not None and r.settings.shading_correction:   # its learned encoder move, against
                with taesd.exact_move():                                          # two encodes a pass
                    rows[(f"{path.name}, node defaults, the exact encoder move (two TAESD encodes a pass)",
                          name(dtype))] = best(lambda: upscale(net, latent, r.settings, vae=taesd, device=device))
            if taesd.fused:   # the CPU's fused TAESD convolutions (models.taesd), against its plain layers
                taesd.fused = False
                rows[(f"{path.name}, node defaults, TAESD's plain layers (no fused CPU convolutions)",
                      name(dtype))] = best(lambda: upscale(net, latent, r.settings, vae=taesd, device=device))
                taesd.fused = None
    base = rows[(source, name(torch.float32))]
    lines = [f"## Node defaults speed ({datetime.date.today().isoformat()})", "",
             f"- machine: {cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, "
             f"{torch.get_num_threads()} threads; torch {torch.__version__}, Python {platform.python_version()}",
             f"- 64² → 128² latent (512² → 1024² px), batch 1, best of {runs} after a warm-up; "
             "`bench/speed.py --defaults-only`. Precision: what the node's weight_dtype `auto` picks on this "
             "device (network and the pack's TAESD), and fp32",
             "- on a CPU the pack's TAESD runs each convolution fused with its ReLU and skip addition (one oneDNN "
             "call, `models/taesd.py`); rows marked *plain layers* run the same weights without that, for comparison",
             "- each shading pass moves the latent by the pack's learned encoder move (`TAESD.encode_change`, a "
             "small network) where it has one; rows marked *exact encoder move* run the two TAESD encodes instead",
             "",
             "| what | precision | seconds | × the fp32 pixel-space source alone |", "|---|---|---|---|"]
    lines += [f"| {what} | {prec} | {sec:.3f} | {sec / base:.2f} |" for (what, prec), sec in rows.items()]
    return "\n".join(lines) + "\n"


def loop_host_syncs(run_net, device) -> str:
    """CUDA: a 4-step Euler loop with torch's sync debug mode set to "error"; "none", or what synchronised."""
    x0 = torch.randn(1, 4, 128, 128, device=device)
    ctx = x0.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        integrate(lambda x, t: run_net(x, t, ctx), x0, SolverSettings("euler", steps=4))
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def large_output(label, net, dtype, device, args, add):
    """2048² → 4096² px (latent 256² → 512²) in windows sized for a 12 GiB budget, as the node plans them."""
    if device.type != "cuda" and "full-size" in label:
        return  # hours on a CPU
    _, tile = plan_run(bytes_per_pixel(net.config.model_channels, dtype), 1, 512, 512,
                       budget=int(0.9 * 12 * 2**30) - 2 * 2**30, multiple=net.config.size_multiple,
                       min_tile=min_window(net.config.size_multiple))
    evaluations = 1 if args.quick else 4
    latent = torch.randn(1, 4, 256, 256, device=device) * 5
    s = UpscaleSettings(mode="latent", solver=SolverSettings("euler", steps=evaluations),
                        size_multiple=net.config.size_multiple)
    run_net = prepare_network(net, device, RuntimeOptions())
    sec, mem = timed(lambda: upscale(run_net, latent, s, device=device, tile=tile), device, 1, warm_up=False)
    add(f"{label}, 2048²→4096² in {tile or 512}² windows (12 GiB plan)", dtype, 1, evaluations, sec, mem, None)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


NOTES = [
    "How to read this:",
    "",
    "- The hires-fix pass is counted as KSampler steps=20 at denoise=0.5. ComfyUI then samples 20 steps of a "
    "40-step schedule (it stretches the schedule so that 20 steps are run), and each step is one UNet call on "
    "the conditional and unconditional batch (CFG): 20 evaluations of a batch of 2 per image. `--quick` times one "
    "such evaluation and multiplies by 20; the full run times all 20.",
    "- SD1.5 directly at 1024² runs the same 20 CFG evaluations at the same latent size, so its row equals the "
    "hires-fix row (the hires-fix base pass at 512² is not counted in its favour).",
    "- The VAE decode is shared by every path and is not part of any ratio.",
    "- floor = FLOPs (torch's FLOP counter, per image) × evaluations / the best rate of a square matrix multiply "
    "(several sizes, fastest of 5 runs each): the time the work would take at the machine's attainable peak.",
    "- peak MiB: CUDA peak allocation during the timed runs; on the CPU, the growth of resident memory during "
    "the timed runs after the warm-up (memory the warm-up already took is not counted again).",
    "- 2048²→4096² row: the window size the node would choose with 12 GiB free (`flow.tiling.plan_run`), "
    "run through the node's tiled path.",
    "- Half precision (fp16/bf16), batch 4 for the full-size network, torch.compile and CUDA-graph rows, and the "
    "GPU targets are measured only on a GPU (`bench/speed.py --compile`).",
]


def targets(rows, hires, device, checks):
    """Issue 4's targets, checked against this run's rows."""
    def find(prefix, dtype, batch, evals):
        for r in rows:
            if r["name"] == prefix and r["dtype"] == dtype and r["batch"] == batch and r["evals"] == evals:
                return r
        return None

    out = ["| target | measured | met |", "|---|---|---|"]
    full = "CFM full-size (authors' config, 305.8 M), euler"
    for evals, limit in ((4, 1 / 20), (20, 1 / 4)):
        for (dtype, batch), base in sorted(hires.items()):
            r = find(full, dtype, batch, evals)
            if r:
                ratio = r["ms_per_image"] / base
                out.append(f"| full-size CFM, {evals} evals ≤ {limit:.2f} × hires-fix ({dtype}, batch {batch}) | "
                           f"{ratio:.3f} × | {'yes' if ratio <= limit else 'no'} |")
    if device.type == "cuda":
        r = find(full, "bfloat16", 4, 4)
        if r and r["floor_ms"]:
            ratio = r["ms_per_image"] / r["floor_ms"]
            out.append(f"| full-size CFM bf16 batch 4 within 2× of the FLOP floor | {ratio:.2f} × floor | "
                       f"{'yes' if ratio <= 2 else 'no'} |")
        for r in rows:
            if "2048²→4096²" in r["name"] and "full-size" in r["name"]:
                out.append(f"| 2048²→4096² within a 12 GiB budget ({r['dtype']}) | {r['peak_mib'] / 1024:.1f} GiB "
                           f"peak | {'yes' if r['peak_mib'] <= 12 * 1024 else 'no'} |")
        for what, found in checks.items():
            out.append(f"| {what}: none | {found} | {'yes' if found == 'none' else 'no'} |")
    else:
        for evals in (4, 8):
            r = find("CFM shipped default, euler", "float32", 1, evals)
            if r:
                out.append(f"| CPU: shipped default 64²→128² in < 10 s ({evals} evals) | {r['ms_per_image'] / 1000:.1f} s"
                           f" | {'yes' if r['ms_per_image'] < 10_000 else 'no'} |")
    return out


def write(rows, rates, device, args, checks):
    hires = {(r["dtype"], r["batch"]): r["ms_per_image"] for r in rows if r["name"].startswith("hires-fix")}
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    lines = [f"## Speed ({datetime.date.today().isoformat()})", "",
             f"- machine: {name}; {torch.get_num_threads()} CPU threads; torch {torch.__version__}; "
             f"Python {platform.python_version()}",
             "- measured matrix-multiply rate: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in rates.items()),
             f"- {'`--quick`: ' if args.quick else ''}median of {1 if args.quick else args.runs} run(s) after a warm-up; ratio = time / the hires-fix pass "
             "(same dtype and batch, same run); floor = FLOPs × evaluations / matmul rate", "",
             "| what | dtype | batch | evals | ms/image | × hires-fix | floor ms | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["ms_per_image"] / hires[(r["dtype"], r["batch"])] if (r["dtype"], r["batch"]) in hires else None
        ratio_s = "" if ratio is None else f"{ratio:.3f}"
        floor_s = "" if r["floor_ms"] is None else f"{r['floor_ms']:.0f}"
        lines.append(f"| {r['name']} | {r['dtype']} | {r['batch']} | {r['evals']} | {r['ms_per_image']:.0f} | "
                     f"{ratio_s} | {floor_s} | {r['peak_mib']:.0f} |")
    below = [r["name"] for r in rows if r["floor_ms"] and r["ms_per_image"] < r["floor_ms"]]
    lines += ["", *targets(rows, hires, device, checks), "", *NOTES]
    if below:  # the probe is not the best kernel this machine has; say so instead of hiding the rows
        lines.append(f"- {len(below)} row(s) ran faster than their floor: this machine runs those layers faster "
                     "than the probe multiply, so the floor is not a bound there.")
    text = "\n".join(lines) + "\n"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import replace_section
    replace_section(Path(args.results), "## Speed", text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "rates": rates, "device": device.type,
                                               "runs": 1 if args.quick else args.runs, "quick": args.quick,
                                               "checks": checks},
                                              indent=1))
    print(text)


if __name__ == "__main__":
    main()
