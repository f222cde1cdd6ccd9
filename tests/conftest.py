"""Makes the pack importable as `fmboost` whatever the checkout folder is called, and finds shared data."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _register_pack() -> None:
    if "fmboost" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("fmboost", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmboost"] = module
    spec.loader.exec_module(module)


_register_pack()


def shared_dir() -> Path:
    env = os.environ.get("FMBOOST_SHARED")
    return Path(env) if env else REPO.parent / "shared"


SHARED = shared_dir()
FIXTURES = SHARED / "fixtures" / "fmboost_reference"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (set FMBOOST_SHARED)")
    return FIXTURES
