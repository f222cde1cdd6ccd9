"""ODE integration of dx/dt = v(x, t) from t=0 (source) to t=1 (target).

Step counts count integration steps (the authors count grid points: their `num_steps=8` is our 7 steps).
Fixed-step methods reproduce torchdiffeq's formulas, including its 3/8-rule "rk4"; `dopri5` is torchdiffeq's
adaptive solver. `on_eval` is called after every network evaluation, so progress, previews and cancellation
happen at evaluation granularity; whatever it raises ends the integration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

FIXED_METHODS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}  # evaluations per step
ADAPTIVE_METHODS = ("dopri5",)
METHODS = tuple(FIXED_METHODS) + ADAPTIVE_METHODS


@dataclass(frozen=True)
class SolverSettings:
    method: str = "euler"
    steps: int = 4              # fixed-step methods: integration steps
    atol: float = 1e-5          # adaptive: absolute tolerance
    rtol: float = 1e-3          # adaptive: relative tolerance
    max_evals: int = 200        # adaptive: cap on network evaluations

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown solver method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in FIXED_METHODS and int(self.steps) < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.method in ADAPTIVE_METHODS:
            if not (self.atol > 0 and self.rtol > 0):
                raise ValueError(f"tolerances must be positive, got atol={self.atol}, rtol={self.rtol}")
            if int(self.max_evals) < 6:
                raise ValueError(f"max_evals must be at least 6 (one dopri5 step), got {self.max_evals}")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def planned_evals(self) -> int:
        """Evaluations a fixed-step run makes; the cap for adaptive runs."""
        return self.max_evals if self.adaptive else FIXED_METHODS[self.method] * self.steps

    @classmethod
    def from_authors(cls, num_steps: int, method: str) -> "SolverSettings":
        """The authors' `sample_kwargs` (grid points) → our settings (steps)."""
        return cls(method=method, steps=num_steps - 1)


@dataclass
class EvalInfo:
    nfe: int                    # evaluations so far (this one included)
    t: torch.Tensor             # time this evaluation was made at (0-dim; no host sync taken here)
    x: torch.Tensor             # state it was evaluated at (valid during the callback: Euler updates it in place)
    v: torch.Tensor             # velocity

    def predicted_target(self) -> torch.Tensor:
        """One Euler jump to t=1 from here: a cheap preview of the result."""
        return self.x + (1.0 - self.t) * self.v


class EvaluationBudgetExceeded(RuntimeError):
    pass


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def integrate(velocity: VelocityFn, x0: torch.Tensor, settings: SolverSettings,
              on_eval: Optional[Callable[[EvalInfo], None]] = None,
              trajectory: Optional[list] = None) -> torch.Tensor:
    """Integrate from t=0 to t=1. `velocity(x, t)` gets t as a 0-dim tensor of x's dtype."""
    nfe = 0

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        if settings.adaptive and nfe >= settings.max_evals:
            raise EvaluationBudgetExceeded(
                f"the adaptive solver used its {settings.max_evals} network evaluations before reaching t=1; "
                "raise max evaluations or loosen the tolerances, or use a fixed-step method")
        v = velocity(x, t)
        nfe += 1
        if on_eval is not None:
            on_eval(EvalInfo(nfe, t, x, v))
        return v

    if settings.adaptive:
        import torchdiffeq
        grid = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
        out = torchdiffeq.odeint(f, x0, grid, method=settings.method, atol=settings.atol, rtol=settings.rtol)
        if trajectory is not None:
            trajectory.extend([out[0], out[1]])
        return out[-1]

    grid = torch.linspace(0, 1, int(settings.steps) + 1, dtype=x0.dtype, device=x0.device)
    if settings.method == "euler" and trajectory is None:
        # The common case, in one preallocated state updated in place: x ← x + Δt·v. Grid times stay on the
        # device, so nothing in the loop waits for the GPU.
        x = x0.clone()
        steps = grid[1:] - grid[:-1]
        for k in range(int(settings.steps)):
            x.addcmul_(f(grid[k], x), steps[k])
        return x
    x = x0
    if trajectory is not None:
        trajectory.append(x)
    step = _STEPPERS[settings.method]
    for k in range(int(settings.steps)):
        t0, t1 = grid[k], grid[k + 1]
        x = step(f, t0, t1, x)
        if trajectory is not None:
            trajectory.append(x)
    return x


def _euler(f, t0, t1, x):
    return x + (t1 - t0) * f(t0, x)


def _midpoint(f, t0, t1, x):
    dt = t1 - t0
    half = 0.5 * dt
    k1 = f(t0, x)
    return x + dt * f(t0 + half, x + half * k1)


def _heun(f, t0, t1, x):
    dt = t1 - t0
    k1 = f(t0, x)
    k2 = f(t1, x + dt * k1)
    return x + dt * 0.5 * (k1 + k2)


def _rk4_38(f, t0, t1, x):
    # torchdiffeq's "rk4" (rk4_alt_step_func), which the authors use.
    dt = t1 - t0
    third = 1.0 / 3.0
    k1 = f(t0, x)
    k2 = f(t0 + dt * third, x + dt * k1 * third)
    k3 = f(t0 + dt * (2 * third), x + dt * (k2 - k1 * third))
    k4 = f(t1, x + dt * (k1 - k2 + k3))
    return x + dt * (k1 + 3 * (k2 + k3) + k4) * 0.125


_STEPPERS = {"euler": _euler, "midpoint": _midpoint, "heun": _heun, "rk4": _rk4_38}
