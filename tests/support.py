"""Paths shared by all tests, and importing the pack as `fmboost` whatever the checkout folder is called."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ["FMBOOST_SHARED"]) if os.environ.get("FMBOOST_SHARED") else REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "fmboost_reference"

sys.path.insert(0, str(REPO / "scripts"))
from _pack import load_pack  # noqa: E402


def register_pack() -> None:
    load_pack()


def require_shared(path: Path = SHARED) -> Path:
    """`path` (in ../shared) for a test that needs it. A contributor's clone without ../shared skips that test
    with a one-line reason; CI sets FMBOOST_REQUIRE_SHARED=1, so there a missing file fails instead."""
    import pytest
    if path.exists():
        return path
    message = f"needs {path} (the reference material: ../shared beside the checkout, or FMBOOST_SHARED)"
    if os.environ.get("FMBOOST_REQUIRE_SHARED"):
        pytest.fail(message)
    pytest.skip(message)
