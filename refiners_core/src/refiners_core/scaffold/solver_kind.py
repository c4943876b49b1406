"""The `solver` kind: a diffusion solver for every latent diffusion model, registered with
`refiners_register_solvers`."""

IMPLEMENTATION = '''\
"""`$Class`: a diffusion solver for refiners' latent diffusion models. The skeleton is the deterministic DDIM update
(eta = 0) ending on the predicted clean latents; replace `step` and `add_noise` with your method and keep `tests/`
passing."""

from __future__ import annotations

import torch
from refiners_sd15.solvers import Solver


class $Class(Solver):
    """`$Class(num_inference_steps=N)`; the noise schedule and timestep spacing come from `Solver` (and the
    model's scheduler config once set on a model)."""

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        alpha = self._alpha(step)
        last = step + 1 >= self.num_inference_steps
        alpha_next = torch.ones_like(alpha) if last else self._alpha(step + 1)
        # What the model predicted, read as the solver's `prediction_type` says (the noise by default).
        clean, noise = self.clean_and_noise(x.double(), model_output.double(), alpha.sqrt(), (1 - alpha).sqrt())
        return (alpha_next.sqrt() * clean + (1 - alpha_next).sqrt() * noise).to(x.dtype)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        alpha = self._alpha(step).to(x.dtype)
        return alpha.sqrt() * x + (1 - alpha).sqrt() * noise

    def _alpha(self, step: int) -> torch.Tensor:
        return self.alphas_cumprod[int(self.timesteps[step])].double()
'''

PLUGIN = '''\
"""The hooks of $distribution (entry point `$entry_point` in the `refiners` group)."""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import Reference, SolverSpec, hookimpl


@hookimpl
def refiners_register_solvers(register: Callable[[SolverSpec], None]) -> None:
    # A reference ("module:attribute") is imported on first use: registering imports neither torch nor the solver.
    register(
        SolverSpec(
            name="$name",
            factory=Reference("$package.solver:$Class"),
            summary="$summary",
        )
    )
'''

TESTS = '''\
"""$Class denoises exactly when told the true noise, and refiners finds it."""

from __future__ import annotations

import torch
from refiners_core.plugins import registry

from $package import $Class


def test_each_step_with_the_true_noise_reaches_the_next_noise_level() -> None:
    solver = $Class(num_inference_steps=10)
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)

    x = solver.add_noise(clean, noise, 0)
    for step in solver.inference_steps:
        x = solver.step(x, noise, step)
        expected = clean if step == solver.num_inference_steps - 1 else solver.add_noise(clean, noise, step + 1)
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def test_refiners_finds_the_solver() -> None:
    solver = registry(reload=True).solvers["$name"].factory(num_inference_steps=4)

    assert isinstance(solver, $Class)
    assert len(solver.inference_steps) == 4
'''

MODULE = "solver"
EXPORTS = ("$Class",)
DEPENDENCIES: tuple[str, ...] = ("refiners-sd15",)
