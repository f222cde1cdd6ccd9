"""Set the node defaults an FMBoost model carries: the noise step and the solver a user gets with every widget
untouched. They are chosen by measurement after training (e.g. the noise step whose detail ratio is right), so
they are written into the file's metadata here, not trained in. The weights and other metadata are kept, and
the file is replaced atomically.

    .venv/bin/python scripts/set_model_defaults.py MODEL.safetensors --noise-step 275 [--solver euler --solver-steps 2]
        [--shading-correction 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

from _pack import load_pack


def set_defaults(path: str | os.PathLike, **changes) -> dict:
    """Rewrite the method metadata of an FMBoost .safetensors with `changes` (MethodSettings fields); returns
    the new method. The training record keeps the noise step the model was trained with."""
    load_pack()
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from fmboost.models.checkpoint import FORMAT_TAG, MethodSettings
    from fmboost.flow.schedule import check_step
    from fmboost.flow.solvers import SolverSettings
    from fmboost.flow.settings import check_shading_passes
    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("fmboost.format") != FORMAT_TAG:
        raise ValueError(f"{path.name}: not an FMBoost model (no fmboost metadata)")
    method = MethodSettings.from_dict(json.loads(meta["fmboost.method"]))
    new = replace(method, **{k: v for k, v in changes.items() if v is not None})
    check_step(new.noise_step)  # refuses a step outside the schedule
    SolverSettings(new.solver, steps=new.solver_steps)  # refuses an unknown solver or a bad step count
    check_shading_passes(new.shading_correction)  # refuses a pass count out of range
    training = json.loads(meta.get("fmboost.training", "{}"))
    training.setdefault("noise_step", method.noise_step)
    meta["fmboost.method"] = json.dumps(asdict(new))
    meta["fmboost.training"] = json.dumps(training)
    tensors = load_file(str(path))
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return asdict(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--noise-step", type=int)
    ap.add_argument("--solver")
    ap.add_argument("--solver-steps", type=int)
    ap.add_argument("--shading-correction", type=int, help="passes of the shading correction (0: none)")
    args = ap.parse_args(argv)
    try:
        print(json.dumps(set_defaults(args.model, noise_step=args.noise_step, solver=args.solver,
                                      solver_steps=args.solver_steps,
                                      shading_correction=args.shading_correction)))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
