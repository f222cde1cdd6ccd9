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
from dataclasses import replace

from _pack import load_pack


def set_defaults(path: str | os.PathLike, **changes) -> dict:
    """Rewrite the method metadata of an FMBoost .safetensors with `changes` (MethodSettings fields); returns
    the new method. The training record keeps the noise step the model was trained with."""
    load_pack()
    from fmboost.models.checkpoint import rewrite_checkpoint
    from fmboost.flow.schedule import check_step
    from fmboost.flow.solvers import SolverSettings
    from fmboost.flow.settings import check_shading_passes
    result = {}

    def change(method):
        new = replace(method, **{k: v for k, v in changes.items() if v is not None})
        check_step(new.noise_step)  # refuses a step outside the schedule
        SolverSettings(new.solver, steps=new.solver_steps)  # refuses an unknown solver or a bad step count
        check_shading_passes(new.shading_correction)  # refuses a pass count out of range
        result["old"], result["new"] = method, new
        return new

    def keep_trained_step(meta):
        training = json.loads(meta.get("fmboost.training", "{}"))
        training.setdefault("noise_step", result["old"].noise_step)
        return {**meta, "fmboost.training": json.dumps(training)}

    rewrite_checkpoint(path, method=change, metadata=keep_trained_step)
    return result["new"].to_dict()


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
