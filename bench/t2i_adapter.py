"""T2I-Adapter on one SD1.5 UNet step: ours (`T2IAdapter` on `SD1UNet`) against the plain step and against diffusers.

    python bench/t2i_adapter.py [--rounds N] [--latent-size N] [--threads N] [--output bench/results/t2i_adapter.md]

The published SD1.5 UNet and the published SD1.5 full adapter (TencentARC/t2iadapter_canny_sd15v2's architecture)
with random weights are written in the diffusers layout and loaded by both sides. A generation computes the
adapter's features once (diffusers' pipeline before its loop, ours once per generated size), so a step costs the
UNet plus the feature additions: each round runs one step per state (ours without and with the adapter, diffusers
without and with `down_intrablock_additional_residuals`, cloned per step as its pipeline does), then the adapter
network alone on both sides. Timings are process CPU time (see `timing.py`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from adapter_step import sd15_unet_step
from sd15_components import source_commit
from timing import (
    StateStep,
    StepMeasurement,
    environment,
    environment_table,
    progress,
    ratio_table,
    relative_diff,
    state_outputs,
    state_ratios,
    time_states,
    unet_step_main,
)

from refiners_sd15.testing import randomize_with_seed

ADAPTER_CONFIG: dict[str, Any] = {
    "adapter_type": "full_adapter",
    "channels": [320, 640, 1280, 1280],
    "downscale_factor": 8,
    "in_channels": 1,
    "num_res_blocks": 2,
}
STATES = ("no adapter", "T2I-Adapter")
RATIOS = {  # row -> (side, state) timed, (side, state) of the baseline
    "ours, T2I-Adapter / no adapter": (("ours", "T2I-Adapter"), ("ours", "no adapter")),
    "diffusers, T2I-Adapter / no adapter": (("diffusers", "T2I-Adapter"), ("diffusers", "no adapter")),
    "ours / diffusers, T2I-Adapter step": (("ours", "T2I-Adapter"), ("diffusers", "T2I-Adapter")),
    "ours / diffusers, adapter network": (("ours", "adapter network"), ("diffusers", "adapter network")),
}


def measure(args: argparse.Namespace) -> StepMeasurement:
    from diffusers import T2IAdapter as DiffusersT2IAdapter  # pyright: ignore[reportPrivateImportUsage]

    from refiners_t2i_adapter import T2IAdapter

    with sd15_unet_step(args.latent_size) as step:
        size = 8 * args.latent_size
        condition = torch.rand(1, 1, size, size, generator=step.generator)
        progress("writing and loading the adapter")
        with torch.device("meta"):
            adapter: Any = DiffusersT2IAdapter.from_config(ADAPTER_CONFIG)  # pyright: ignore[reportUnknownMemberType]
        adapter = adapter.to_empty(device="cpu")
        randomize_with_seed(adapter, seed=1)
        adapter.save_pretrained(step.folder / "adapter")
        t2i = T2IAdapter.from_pretrained(step.ours, step.folder / "adapter", scale=0.8).set_condition(condition)
    adapter = adapter.eval()

    with torch.inference_mode():
        features = [0.8 * feature.repeat(2, 1, 1, 1) for feature in adapter(condition)]

    def set_ours(state: str) -> None:
        if state == "T2I-Adapter" and not t2i.is_injected:
            t2i.inject()
        elif state == "no adapter" and t2i.is_injected:
            t2i.eject()

    def reference_step(state: str) -> Callable[[], torch.Tensor]:
        def reference() -> torch.Tensor:
            residuals = [feature.clone() for feature in features] if state == "T2I-Adapter" else None
            return step.reference_step(down_intrablock_additional_residuals=residuals)

        return reference

    steps: list[StateStep] = [
        *(("ours", set_ours, state, step.ours_step) for state in STATES),
        *(("diffusers", set_ours, state, reference_step(state)) for state in STATES),
    ]
    networks: list[StateStep] = [
        ("ours", set_ours, "adapter network", lambda: t2i.model(condition)),
        ("diffusers", set_ours, "adapter network", lambda: adapter(condition)),
    ]
    differences: dict[str, float] = {}
    with torch.inference_mode():
        outputs = state_outputs(steps)
        for state in STATES:
            differences[state] = relative_diff(outputs["ours", state], outputs["diffusers", state])
        timings = time_states([*steps, *networks], args.rounds)
    return StepMeasurement(state_ratios(timings, RATIOS), differences)


TARGET_RATIOS = {"ours / diffusers, T2I-Adapter step": 1.0, "ours / diffusers, adapter network": 1.0}


def report(measured: StepMeasurement, args: argparse.Namespace) -> str:
    differences = measured.differences
    table = ratio_table(measured.comparisons, TARGET_RATIOS, digits=3)
    env_table = environment_table(environment() | {"repository commit": source_commit()})
    return f"""# T2I-Adapter on one SD1.5 UNet step

`python bench/t2i_adapter.py --rounds {args.rounds} --latent-size {args.latent_size} --threads {args.threads}`

One UNet step, batch 2, latents (2, 4, {args.latent_size}, {args.latent_size}), text (2, 77, 768), fp32 on the CPU,
published SD1.5 UNet and full adapter (in_channels 1) with random weights, scale 0.8. The adapter's features are
computed once, outside the timed step, on both sides (as a generation does); the last row times the adapter network
alone on a {8 * args.latent_size}x{8 * args.latent_size} condition. "ratio median" is the median over rounds of the
ratio within a round, "range" its confidence interval. Max |ours - diffusers| / max |diffusers| of the step: without
adapter {differences["no adapter"]:.1e}, with it {differences["T2I-Adapter"]:.1e}.

{table}

{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    return unet_step_main(argv, __doc__ or "", Path("bench/results/t2i_adapter.md"), measure, report)


if __name__ == "__main__":
    sys.exit(main())
