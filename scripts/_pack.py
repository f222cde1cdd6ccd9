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


# What the trainer commands (train_shading_head.py, train_fidelity_decoder.py, train_encode_change.py) share.

def repo_path(path) -> Path:
    """A recipe's path: absolute as it is, relative to the repository otherwise."""
    return Path(path) if Path(path).is_absolute() else (REPO / path).resolve()


def read_recipe(args, overrides, keys=None) -> dict:
    """The JSON recipe of a CPU trainer at `args.config`, with each option in `overrides` that the command line
    gave written over it; with `keys`, a recipe holding any other key is refused (SystemExit naming them). Its
    `precision` (bf16 unless given) is what this CPU runs fast (`training.train.training_precision`)."""
    import json
    import torch
    recipe = json.loads(Path(args.config).read_text())
    if keys is not None and (unknown := set(recipe) - set(keys)):
        raise SystemExit(f"{args.config}: unknown recipe keys {sorted(unknown)}")
    for key in overrides:
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    from fmboost.training.train import training_precision
    recipe["precision"] = training_precision(recipe.get("precision", "bf16"), torch.device("cpu"), print)
    return recipe


def recipe_photos(recipe, scan_images) -> list:
    """The recipe's photos with a side of at least its crop, shuffled by its `shuffle_seed`, the first
    `max_images` of them (all without one); SystemExit when none is large enough."""
    import random
    paths = scan_images(repo_path(recipe["images"]), recipe["crop"]).usable
    if not paths:
        raise SystemExit(f"no photo in {recipe['images']} has a side of {recipe['crop']} px")
    random.Random(recipe.get("shuffle_seed", 0)).shuffle(paths)
    return paths[: recipe.get("max_images") or len(paths)]


def readable_by_all(path) -> None:
    """safetensors writes 0600; a weights file is for everyone who runs the pack (the umask decides)."""
    import os
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
