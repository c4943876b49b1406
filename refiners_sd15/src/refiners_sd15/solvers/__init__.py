"""Diffusion solvers for Stable Diffusion 1.5: `DDIM`, `DPMSolver` (DPM-Solver++ 2M) and `Euler`.

    sd.solver = DPMSolver(num_inference_steps=30)

Each reproduces the diffusers scheduler SD1.5 pipelines use when built with `num_inference_steps` only; other
timestep spacings are options. A plugin adds its own by subclassing `Solver` and registering it with the
`refiners_register_solvers` hook.
"""

from refiners_sd15.solvers.ddim import DDIM
from refiners_sd15.solvers.dpm_solver import DPMSolver
from refiners_sd15.solvers.euler import Euler
from refiners_sd15.solvers.solver import SD15_SCHEDULE, Solver, TimestepSpacing, denoising_end_step

__all__ = ["DDIM", "SD15_SCHEDULE", "DPMSolver", "Euler", "Solver", "TimestepSpacing", "denoising_end_step"]
