"""LoRA overhead on one SD1.5 UNet step: ours (`LoraManager` on `SD1UNet`) unfused and fused, and diffusers with peft.

    python bench/lora.py [--rounds N] [--latent-size N] [--rank N] [--threads N] [--output bench/results/lora.md]

The published SD1.5 UNet with random weights is written in the diffusers layout (as `sd15_components.py` does) and
loaded by both sides. Three LoRAs of rank `--rank` (random down/up, diffusers module names) patch every attention
projection, feed-forward layer and `proj_in`/`proj_out` of the transformer blocks, the layers a kohya or diffusers
LoRA trains by default. diffusers loads the same tensors with `load_lora_adapter` (it needs peft).

Each round runs one step per state, in a fixed order: ours with no LoRA, 1 LoRA unfused, 1 fused, 3 unfused, 3 fused,
then diffusers with its adapters disabled, 1 adapter and 3 adapters. Switching states (add, fuse, set_adapters) is
not timed, nor is the first call in each state: it pays once what the switch leaves behind (the kernel's page
faults after a fuse, the text's keys and values computed again), as a generation does once, not at every step.
A ratio compares the states of one side within the same round (see `timing.py`: process CPU time).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from adapter_step import sd15_unet_step
from sd15_components import source_commit
from timing import (
    StateStep,
    StepMeasurement,
    environment,
    environment_table,
    relative_diff,
    state_comparisons,
    state_outputs,
    state_table,
    time_states,
    unet_step_main,
)
from torch import nn

LORAS = ("one", "two", "three")
TARGETS = ("attn1.", "attn2.", "ff.net", "proj_in", "proj_out")
OURS_STATES = ("no LoRA", "1 LoRA, unfused", "1 LoRA, fused", "3 LoRAs, unfused", "3 LoRAs, fused")
DIFFUSERS_STATES = ("no LoRA", "1 LoRA", "3 LoRAs")


def random_loras(unet: nn.Module, rank: int) -> list[dict[str, torch.Tensor]]:
    """PEFT-layout LoRAs (no prefix) on the transformer layers of a diffusers UNet, one per name in `LORAS`."""
    loras: list[dict[str, torch.Tensor]] = []
    for seed in range(len(LORAS)):
        generator = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for name, module in unet.named_modules():
            if not isinstance(module, nn.Linear | nn.Conv2d) or not any(target in name for target in TARGETS):
                continue
            weight = module.weight
            down_shape = (rank, *weight.shape[1:])  # proj_in / proj_out are 1x1 convolutions in diffusers
            up_shape = (weight.shape[0], rank, *weight.shape[2:])
            tensors[f"{name}.lora_A.weight"] = torch.randn(down_shape, generator=generator) * weight.shape[1] ** -0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(up_shape, generator=generator) * 0.01
        loras.append(tensors)
    return loras


def measure(args: argparse.Namespace) -> StepMeasurement:
    from refiners_lora import LoraManager

    with sd15_unet_step(args.latent_size) as step:
        reference = step.reference
        loras = random_loras(reference, args.rank)
    for name, tensors in zip(LORAS, loras, strict=True):
        reference.load_lora_adapter(
            {f"unet.{key}": value for key, value in tensors.items()}, prefix="unet", adapter_name=name
        )
    manager = LoraManager(step.ours)

    def set_ours(state: str) -> None:
        manager.unfuse()
        wanted = 0 if state == "no LoRA" else 1 if state.startswith("1 ") else 3
        for name in manager.names[wanted:]:
            manager.remove(name)
        for name, tensors in list(zip(LORAS, loras, strict=True))[len(manager.names) : wanted]:
            manager.add(name, tensors)
        if state.endswith("fused") and not state.endswith("unfused"):
            manager.fuse()

    def set_reference(state: str) -> None:
        if state == "no LoRA":
            reference.disable_adapters()
            return
        reference.enable_adapters()
        reference.set_adapters(list(LORAS[: 1 if state == "1 LoRA" else 3]))

    steps: list[StateStep] = [
        *(("ours", set_ours, state, step.ours_step) for state in OURS_STATES),
        *(("diffusers", set_reference, state, step.reference_step) for state in DIFFUSERS_STATES),
    ]
    differences: dict[str, float] = {}
    with torch.inference_mode():
        outputs = state_outputs(steps)
        for state in ("1 LoRA, unfused", "1 LoRA, fused", "3 LoRAs, unfused", "3 LoRAs, fused"):
            theirs = outputs["diffusers", "1 LoRA" if state.startswith("1 ") else "3 LoRAs"]
            differences[state] = relative_diff(outputs["ours", state], theirs)
        differences["no LoRA"] = relative_diff(outputs["ours", "no LoRA"], outputs["diffusers", "no LoRA"])
        timings = time_states(steps, args.rounds, settling_calls=1)
    pairs = (("1 LoRA, unfused", "1 LoRA"), ("3 LoRAs, unfused", "3 LoRAs"), ("no LoRA", "no LoRA"))
    comparisons = state_comparisons(timings, OURS_STATES, DIFFUSERS_STATES, pairs)
    return StepMeasurement(comparisons, differences, sum(value.numel() for value in loras[0].values()))


TARGET_RATIOS = {
    "ours, 1 LoRA, unfused": 1.10,
    "ours, 3 LoRAs, unfused": 1.10,
    "ours, 1 LoRA, fused": 1.00,
    "ours, 3 LoRAs, fused": 1.00,
}


def report(measured: StepMeasurement, args: argparse.Namespace) -> str:
    lora_parameters = measured.parameters
    table = state_table(measured.comparisons, TARGET_RATIOS, measured.differences, "max rel. diff vs diffusers")
    env_table = environment_table(environment() | {"repository commit": source_commit()})
    return f"""# LoRA overhead on one SD1.5 UNet step

`python bench/lora.py --rounds {args.rounds} --latent-size {args.latent_size} --rank {args.rank} \\
    --threads {args.threads}`

One UNet step, batch 2, latents (2, 4, {args.latent_size}, {args.latent_size}), text (2, 77, 768), fp32 on the CPU,
published SD1.5 UNet with random weights. Each LoRA has rank {args.rank} on every attention projection, feed-forward
layer and `proj_in`/`proj_out` ({lora_parameters / 1e6:.1f} M parameters per LoRA). The baseline of a row `ours, ...`
is our UNet without LoRA, of `diffusers, ...` diffusers' UNet with its adapters disabled, of `ours / diffusers, ...`
diffusers in the same state. Times are process CPU time of one call, the second in each state;
"ratio median" is the median over rounds of
the ratio within a round, "range" its confidence interval (with fewer than 11 rounds: the whole range of the
per-round ratios). The last column is max |ours - diffusers| / max |diffusers| for the same LoRAs.

{table}

{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    return unet_step_main(argv, __doc__ or "", Path("bench/results/lora.md"), measure, report, rank_of="each LoRA")


if __name__ == "__main__":
    sys.exit(main())
