"""Paths shared by all tests, and importing the pack as `fmboost` whatever the checkout folder is called."""
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ["FMBOOST_SHARED"]) if os.environ.get("FMBOOST_SHARED") else REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "fmboost_reference"


def register_pack() -> None:
    if "fmboost" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("fmboost", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmboost"] = module
    spec.loader.exec_module(module)
