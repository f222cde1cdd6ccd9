"""How the velocity network is run on a device: memory layout and optional compilation.

Precision is the network's own business (`CFMUNet.set_precision`: weights in bf16/fp16, time embedding in
fp32); the ODE state stays fp32 whatever the weights are, so step sizes as small as 1/1000 are not rounded away.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COMPILE_MODES = ("off", "compile", "compile+cudagraphs")


@dataclass(frozen=True)
class RuntimeOptions:
    compile: str = "off"            # off | compile | compile+cudagraphs (CUDA graphs: CUDA, fixed shapes)
    channels_last: str = "auto"     # auto (on for CUDA) | on | off

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.channels_last not in ("auto", "on", "off"):
            raise ValueError(f"channels_last must be auto, on or off, not {self.channels_last!r}")

    def use_channels_last(self, device: torch.device) -> bool:
        # NHWC lets cuDNN use tensor-core convolutions without transposes; on the CPU oneDNN picks its own layout.
        return self.channels_last == "on" or (self.channels_last == "auto" and device.type == "cuda")


def prepare_network(network: torch.nn.Module, device: torch.device, options: RuntimeOptions):
    """(x, t, context) → v, for `network` already on `device`."""
    channels_last = options.use_channels_last(device)
    network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    network.channels_last = channels_last
    if options.compile == "off":
        return network
    if options.compile == "compile+cudagraphs" and device.type == "cuda":
        compiled = torch.compile(network, mode="reduce-overhead", dynamic=False)

        def run_graphed(x, t, context):
            # CUDA graphs replay into the same output buffer: mark each evaluation as a new step and copy the
            # result out before the next replay overwrites it.
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(x, t, context).clone()
        return run_graphed
    # Elsewhere CUDA graphs do not exist; plain compilation still fuses the element-wise work.
    return torch.compile(network, dynamic=False)


def cpu_dtype() -> torch.dtype:
    """The precision `auto` picks on the CPU: bf16 where the CPU has bf16 matrix instructions (AVX512-BF16 or
    AMX), where it runs the pipeline about 2× faster than fp32 for the same image (bench/RESULTS.md, *CPU
    precision*); fp32 elsewhere, since emulated bf16 and fp16 are slower than fp32 on a CPU."""
    cpu = getattr(torch, "cpu", None)
    fast = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if fast else torch.float32
