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


def _needs_shared():
    import pytest
    return pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the reference material in {SHARED} "
                                                          "(../shared beside the checkout, or FMBOOST_SHARED)")


needs_shared = _needs_shared()
