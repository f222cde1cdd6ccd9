"""How the velocity network is run on a device: memory layout and optional compilation.

Precision is the network's own business (`CFMUNet.set_precision`: weights in bf16/fp16, time embedding in
fp32); the ODE state stays fp32 whatever the weights are, so step sizes as small as 1/1000 are not rounded away.
"""
from __future__ import annotations

import logging
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


# Compiled graphs kept per network: one per input shape (compiled with static shapes, the fastest kernels). torch
# itself stops compiling after 8 graphs of one function, silently; CUDA graphs also hold memory per shape.
MAX_COMPILED_SHAPES = {"compile": 8, "compile+cudagraphs": 4}


class CompiledNetwork:
    """`network` compiled once per input shape, for at most `limit` shapes (latent sizes, leftover batch chunks,
    retry windows); beyond that, new shapes run eagerly, with one warning that says so. `release()` drops the
    compiled graphs (and the CUDA graphs' memory with them, once nothing else holds it)."""

    def __init__(self, network: torch.nn.Module, mode: str, limit: int | None = None):
        self.network, self.mode = network, mode
        self.limit = MAX_COMPILED_SHAPES[mode] if limit is None else limit
        self.shapes: set = set()
        self.fallbacks = 0
        self._compiled = None

    def _build(self):
        if self.mode == "compile+cudagraphs":
            compiled = torch.compile(self.network, mode="reduce-overhead", dynamic=False)

            def run_graphed(x, t, context):
                # CUDA graphs replay into the same output buffer: mark each evaluation as a new step and copy
                # the result out before the next replay overwrites it.
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(x, t, context).clone()
            return run_graphed
        return torch.compile(self.network, dynamic=False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shape = (tuple(x.shape), tuple(t.shape), str(x.device))
        if shape not in self.shapes:
            if len(self.shapes) >= self.limit:
                if not self.fallbacks:
                    logging.warning("CFM: %s already holds graphs for %d input sizes; %s runs uncompiled "
                                    "(a new latent size, batch chunk or window each compile once)",
                                    self.mode, self.limit, "×".join(map(str, x.shape)))
                self.fallbacks += 1
                return self.network(x, t, context)
            self.shapes.add(shape)
        if self._compiled is None:
            self._compiled = self._build()
        return self._compiled(x, t, context)

    def release(self) -> None:
        self._compiled = None
        self.shapes.clear()


def prepare_network(network: torch.nn.Module, device: torch.device, options: RuntimeOptions):
    """(x, t, context) → v, for `network` already on `device`."""
    channels_last = options.use_channels_last(device)
    network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    network.channels_last = channels_last
    if options.compile == "off":
        return network
    # Elsewhere than CUDA, CUDA graphs do not exist; plain compilation still fuses the element-wise work.
    mode = options.compile if device.type == "cuda" else "compile"
    return CompiledNetwork(network, mode)


def cpu_dtype() -> torch.dtype:
    """The precision `auto` picks on the CPU: bf16 where the CPU has bf16 matrix instructions (AVX512-BF16 or
    AMX), where it runs the pipeline about 2× faster than fp32 for the same image (bench/RESULTS.md, *CPU
    precision*); fp32 elsewhere, since emulated bf16 and fp16 are slower than fp32 on a CPU."""
    cpu = getattr(torch, "cpu", None)
    fast = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if fast else torch.float32
