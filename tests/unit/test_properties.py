"""Property-based: over the node's inputs, the output has the right shape, is finite and is deterministic."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmboost.flow import METHODS, SolverSettings, UpscaleSettings, upscale
from fmboost.models.unet import CFMUNet, UNetConfig

CFG = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2,),
                 num_heads=2, dim_head=16)
NETS = {}


def net_for(dtype):
    if dtype not in NETS:
        torch.manual_seed(0)
        NETS[dtype] = CFMUNet(CFG).eval().requires_grad_(False).to(dtype)
    return NETS[dtype]


node_inputs = st.fixed_dictionaries({
    "batch": st.integers(1, 3),
    "h": st.integers(2, 11),
    "w": st.integers(2, 11),
    "dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    "method": st.sampled_from(METHODS),
    "steps": st.integers(1, 3),
    "noise_step": st.integers(0, 999),
    "seed": st.integers(0, 2 ** 63 - 1),
    "mode": st.just("latent"),
    "scale": st.floats(0.01, 100.0),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node_inputs)
def test_upscale_shape_finite_deterministic(p):
    latent = torch.randn(p["batch"], 4, p["h"], p["w"], generator=torch.Generator().manual_seed(1)) * p["scale"]
    solver = SolverSettings(p["method"], steps=p["steps"], atol=1e-3, rtol=1e-2, max_evals=400)
    s = UpscaleSettings(mode=p["mode"], noise_step=p["noise_step"], seed=p["seed"], solver=solver,
                        size_multiple=CFG.size_multiple)
    net = net_for(p["dtype"])
    with torch.inference_mode():
        a = upscale(net, latent, s)
        b = upscale(net, latent, s)
    assert a.shape == (p["batch"], 4, 2 * p["h"], 2 * p["w"])
    assert a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
