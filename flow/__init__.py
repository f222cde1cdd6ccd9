"""Pure torch: noise schedule, source construction, ODE solvers and the upscale pipeline. No ComfyUI imports."""
from .pipeline import InputError, Progress, UpscaleSettings, item_noise, upscale
from .schedule import alpha_bar, q_sample
from .solvers import METHODS, EvaluationBudgetExceeded, SolverSettings, integrate
from .source import MODES, make_source

__all__ = ["InputError", "Progress", "UpscaleSettings", "item_noise", "upscale", "alpha_bar", "q_sample",
           "METHODS", "EvaluationBudgetExceeded", "SolverSettings", "integrate", "MODES", "make_source"]
