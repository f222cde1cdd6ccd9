"""Import this pack as `fmboost` from a script, whatever the checkout folder is called."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_pack():
    if "fmboost" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fmboost", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fmboost"] = module
        spec.loader.exec_module(module)
    return sys.modules["fmboost"]
