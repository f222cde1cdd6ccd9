"""Session fixtures: one real ComfyUI server with this pack, models and inputs made by the tests."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from comfy_support import make_example_image, make_models
from comfyui_server import ComfyServer, setups


SETUPS = setups()


def pytest_generate_tests(metafunc):
    """Every test that uses a server runs against each ComfyUI setup: the pinned one and upstream 0.33."""
    if "comfy_setup" in metafunc.fixturenames:
        metafunc.parametrize("comfy_setup", list(SETUPS), indirect=True, scope="session")


@pytest.fixture(scope="session")
def comfy_setup(request):
    setup = SETUPS[request.param]
    if setup.missing():  # 0.33 comes from ../shared: a contributor's clone without it skips, CI fails
        (pytest.fail if os.environ.get("FMBOOST_REQUIRE_SHARED") else pytest.skip)(setup.missing())
    return setup


@pytest.fixture(scope="session")
def server(tmp_path_factory, comfy_setup):
    base = tmp_path_factory.mktemp(f"comfy_base_{comfy_setup.name}")
    srv = ComfyServer(base, extra_args=["--preview-method", "latent2rgb"], setup=comfy_setup)
    make_models(base / "models")
    make_example_image(base / "input" / "fmboost_example.png")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def latent_file(server):
    """Writes a raw latent into the server's input folder as a .latent file; returns its name."""
    counter = [0]

    def write(tensor: torch.Tensor, name: str | None = None) -> str:
        counter[0] += 1
        name = name or f"in_{id(counter)}_{counter[0]}.latent"
        save_file({"latent_tensor": tensor.contiguous(), "latent_format_version_0": torch.tensor([])},
                  server.base / "input" / name)
        return name
    return write
