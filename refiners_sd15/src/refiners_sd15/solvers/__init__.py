"""Diffusion solvers for the latent diffusion models (SD1.5, SDXL): `DDIM`, `DDPM`, `DPMSolver` (DPM-Solver++ 2M),
`DPMSolverSDE` (DPM-Solver++ 2M SDE), `Euler`, `EulerAncestral`, `Heun` and `LCM`.

    sd.solver = DPMSolver(num_inference_steps=30, sigma_schedule="karras")  # "DPM++ 2M Karras"

Each reproduces the diffusers scheduler Stable Diffusion pipelines use when built with `num_inference_steps` only;
the timestep spacing (`TimestepSpacing`), the training betas (`NoiseSchedule`), Karras or exponential sigmas
(`SigmaSchedule`) and what the model predicts (`PredictionType`) are options of every solver. A plugin adds its own
by subclassing `Solver` (`StochasticSolver` for one that draws noise) and registering it with the
`refiners_register_solvers` hook.
"""

from refiners_sd15.solvers.ddim import DDIM
from refiners_sd15.solvers.ddpm import DDPM
from refiners_sd15.solvers.dpm_solver import DPMSolver, DPMSolverSDE
from refiners_sd15.solvers.euler import Euler
from refiners_sd15.solvers.euler_ancestral import EulerAncestral
from refiners_sd15.solvers.heun import Heun
from refiners_sd15.solvers.lcm import LCM
from refiners_sd15.solvers.solver import (
    SD15_SCHEDULE,
    NoiseSchedule,
    PredictionType,
    SigmaSchedule,
    Solver,
    StochasticSolver,
    TimestepSpacing,
    denoising_end_step,
)

__all__ = [
    "DDIM",
    "DDPM",
    "LCM",
    "SD15_SCHEDULE",
    "DPMSolver",
    "DPMSolverSDE",
    "Euler",
    "EulerAncestral",
    "Heun",
    "NoiseSchedule",
    "PredictionType",
    "SigmaSchedule",
    "Solver",
    "StochasticSolver",
    "TimestepSpacing",
    "denoising_end_step",
]
