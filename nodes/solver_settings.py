from __future__ import annotations

from comfy_api.latest import io

from ..flow import METHODS, SolverSettings
from .socket_types import CFMSolverType

# The widgets start at the core's defaults (flow.solvers.SolverSettings). An unconnected solver input uses the
# model's recommendation instead (flow.settings.default_solver).
DEFAULT_SOLVER = SolverSettings()


class CFMSolverSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMBoostSolverSettings",
            display_name="CFM Solver Settings",
            category="FMBoost",
            description="How CFM Latent Upscale integrates the flow from the noised source (t=0) to the "
                        "high-resolution latent (t=1). Network evaluations = steps × 1 (euler), × 2 "
                        "(midpoint, heun), × 4 (rk4); dopri5 chooses its own steps.",
            inputs=[
                io.Combo.Input("method", options=list(METHODS), default=DEFAULT_SOLVER.method,
                               tooltip="euler: fastest. midpoint/heun: 2nd order, 2 evaluations a step. rk4: "
                                       "the authors' 3/8-rule RK4, 4 a step. dopri5: adaptive, uses the "
                                       "tolerances and the evaluation cap instead of steps."),
                io.Int.Input("steps", default=DEFAULT_SOLVER.steps, min=1, max=200,
                             tooltip="Integration steps for fixed-step methods (the authors count grid "
                                     "points: their num_steps N is N−1 steps here)."),
                io.Float.Input("atol", default=DEFAULT_SOLVER.atol, min=1e-8, max=1.0, step=1e-6, round=False,
                               tooltip="dopri5 only: absolute error tolerance per step."),
                io.Float.Input("rtol", default=DEFAULT_SOLVER.rtol, min=1e-8, max=1.0, step=1e-5, round=False,
                               tooltip="dopri5 only: relative error tolerance per step."),
                io.Int.Input("max_evals", default=DEFAULT_SOLVER.max_evals, min=6, max=10000,
                             tooltip="dopri5 only: stop with an error after this many network evaluations."),
            ],
            outputs=[io.Custom(CFMSolverType).Output(display_name="solver")],
        )

    @classmethod
    def execute(cls, method, steps, atol, rtol, max_evals) -> io.NodeOutput:
        try:
            return io.NodeOutput(SolverSettings(method=method, steps=steps, atol=atol, rtol=rtol,
                                                max_evals=max_evals))
        except ValueError as e:
            raise ValueError(f"CFM Solver Settings: {e}") from None
