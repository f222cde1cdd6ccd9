"""Loading pickled checkpoints (`.ckpt`, `.pt`) without ever running code from them.

The authors' Lightning checkpoints pickle omegaconf objects, so plain `torch.load(weights_only=True)`
refuses them. We still use torch's restricted weights-only unpickler (tensors, storages, plain containers),
and map every other global the file names to an inert placeholder class: constructing or building one only
records its arguments. Nothing the file names is imported or called.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch


class Placeholder:
    """Stands in for a class a pickle refers to; holds what the pickle gave it, does nothing else."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder for {self.qualname}>"


def _placeholder_for(qualname: str) -> type:
    return type("Placeholder_" + qualname.replace(".", "_"), (Placeholder,), {"qualname": qualname})


class CheckpointReadError(ValueError):
    pass


def safe_torch_load(path: str | os.PathLike) -> Any:
    """torch.load with the weights-only unpickler; foreign classes become `Placeholder`s."""
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError as e:
        # Not a zip-format torch.save file: only the plain weights-only path is allowed.
        foreign = None
        reason = str(e)
    except Exception as e:  # truncated or corrupt zip
        raise CheckpointReadError(f"cannot read {os.fspath(path)!r} as a torch checkpoint: {e}") from e
    try:
        if foreign is None:
            return torch.load(path, map_location="cpu", weights_only=True)
        placeholders = [(_placeholder_for(name), name) for name in foreign]
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError) as e:
        detail = reason if foreign is None else str(e)
        raise CheckpointReadError(
            f"cannot read {os.fspath(path)!r} safely as a torch checkpoint: {detail.splitlines()[0] if detail else e}"
        ) from e


def to_plain(obj: Any) -> Any:
    """Turn placeholders of omegaconf containers back into plain dicts/lists (for reading hyper-parameters)."""
    if isinstance(obj, Placeholder):
        state = obj.state if isinstance(obj.state, dict) else {}
        name = obj.qualname
        if name.endswith("DictConfig") or name.endswith("ListConfig"):
            return to_plain(state.get("_content"))
        if "_val" in state:  # omegaconf value nodes (AnyNode, IntegerNode, ...)
            return to_plain(state["_val"])
        return repr(obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
