"""LoRA overhead on one SDXL UNet step: ours (`LoraManager` on `SDXLUNet`) unfused and fused, and diffusers with peft.

    flock /work/bigmem.lock python bench/lora_sdxl.py [--rounds N] [--latent-size N] [--rank N] [--threads N]
        [--output bench/results/lora_sdxl.md]

The published SDXL base UNet with random weights (10 GB in float32) is built once; diffusers' `UNet2DConditionModel`
is built on the meta device and takes our tensors as its parameters (as `sdxl.py` does), so both sides share one
copy of the weights. One LoRA of rank `--rank` (random down/up, diffusers module names) patches every attention
projection (`to_q`, `to_k`, `to_v`, `to_out.0`), the layers diffusers' SDXL DreamBooth LoRA script trains. diffusers
loads the same tensors with `load_lora_adapter` (it needs peft).

Each round runs one step per state, in a fixed order: ours with no LoRA, with the LoRA unfused, fused, then diffusers
with its adapter disabled and enabled. Switching states (add, fuse, unfuse, enable) is not timed,
nor is the first call in each state (it pays once what the switch leaves behind: the kernel's page faults after a
fuse, the text's keys and values computed again); ours is unfused
before diffusers runs, since fusing writes into the shared weights (and `unfuse` restores them bit for bit). A ratio
compares two states within the same round (see `timing.py`: process CPU time).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timing import (
    StateStep,
    StepMeasurement,
    environment,
    environment_table,
    progress,
    relative_diff,
    state_comparisons,
    state_outputs,
    state_table,
    time_states,
    unet_step_main,
)
from torch import nn

TIMESTEP = 500
TIME_IDS = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
OURS_STATES = ("no LoRA", "LoRA, unfused", "LoRA, fused")
DIFFUSERS_STATES = ("no LoRA", "LoRA")
TARGET_RATIOS = {"ours, LoRA, unfused": 1.10, "ours, LoRA, fused": 1.00, "ours / diffusers, LoRA, unfused": 1.00}


def random_lora(unet: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """A PEFT-layout LoRA (no prefix) on the attention projections of a diffusers UNet."""
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(TARGETS):
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator)
            tensors[f"{name}.lora_A.weight"] *= module.in_features**-0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
    return tensors


def measure(args: argparse.Namespace) -> StepMeasurement:
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    from refiners_lora import LoraManager
    from refiners_sdxl import SDXLUNet, diffusers_sdxl_unet_mapping
    from refiners_sdxl.testing import SDXL_BASE_UNET_CONFIG

    progress("building the published SDXL UNet with random weights")
    ours = SDXLUNet().eval()
    with torch.device("meta"):
        reference: Any = UNet2DConditionModel.from_config(SDXL_BASE_UNET_CONFIG)  # pyright: ignore[reportUnknownMemberType]
    own = ours.state_dict()
    shared = {theirs: own[key] for theirs, key in diffusers_sdxl_unet_mapping(ours.config).items()}
    reference.load_state_dict(shared, strict=True, assign=True)
    reference.eval()
    lora = random_lora(reference, args.rank)
    reference.load_lora_adapter(
        {f"unet.{key}": value for key, value in lora.items()}, prefix="unet", adapter_name="one"
    )
    manager = LoraManager(ours)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, args.latent_size, args.latent_size, generator=generator)
    text = torch.randn(2, 77, 2048, generator=generator)
    pooled = torch.randn(2, 1280, generator=generator)
    timestep, time_ids = torch.tensor([TIMESTEP]), torch.tensor([TIME_IDS] * 2)
    added = {"text_embeds": pooled, "time_ids": time_ids}

    def our_step() -> torch.Tensor:
        ours.set_timestep(timestep)
        ours.set_clip_text_embedding(text)
        ours.set_pooled_text_embedding(pooled)
        ours.set_time_ids(time_ids)
        return ours(latents)

    def reference_step() -> torch.Tensor:
        return reference(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample

    def set_ours(state: str) -> None:
        manager.unfuse()
        if state == "no LoRA" and manager.names:
            manager.remove("one")
        if state != "no LoRA" and not manager.names:
            manager.add("one", lora)
        if state == "LoRA, fused":
            manager.fuse()

    def set_reference(state: str) -> None:
        manager.unfuse()  # the weights are shared: diffusers must see them as they were
        if state == "no LoRA":
            reference.disable_adapters()
        else:
            reference.enable_adapters()

    steps: list[StateStep] = [
        *(("ours", set_ours, state, our_step) for state in OURS_STATES),
        *(("diffusers", set_reference, state, reference_step) for state in DIFFUSERS_STATES),
    ]
    differences: dict[str, float] = {}
    with torch.inference_mode():
        outputs = state_outputs(steps)
        for state in OURS_STATES:
            theirs = outputs["diffusers", "no LoRA" if state == "no LoRA" else "LoRA"]
            differences[state] = relative_diff(outputs["ours", state], theirs)
        timings = time_states(steps, args.rounds, settling_calls=1)
    pairs = (("LoRA, unfused", "LoRA"), ("LoRA, fused", "LoRA"), ("no LoRA", "no LoRA"))
    comparisons = state_comparisons(timings, OURS_STATES, DIFFUSERS_STATES, pairs)
    return StepMeasurement(comparisons, differences, sum(value.numel() for value in lora.values()))


def report(measured: StepMeasurement, args: argparse.Namespace) -> str:
    lora_parameters = measured.parameters
    table = state_table(measured.comparisons, TARGET_RATIOS, measured.differences, "max rel. diff vs diffusers")
    env_table = environment_table(environment())
    return f"""# LoRA overhead on one SDXL UNet step

`flock /work/bigmem.lock python bench/lora_sdxl.py --rounds {args.rounds} --latent-size {args.latent_size} \\
    --rank {args.rank} --threads {args.threads}`

One step of the published SDXL base UNet with random weights, batch 2 (classifier-free guidance), latents
(2, 4, {args.latent_size}, {args.latent_size}) ({8 * args.latent_size}x{8 * args.latent_size} images), text
(2, 77, 2048), pooled text (2, 1280), time ids (2, 6), fp32 on the CPU. One LoRA of rank {args.rank} on every
attention projection ({lora_parameters / 1e6:.1f} M parameters). The baseline of a row `ours, ...` is our UNet
without LoRA, of `diffusers, ...` diffusers' UNet (sharing our weights) with its peft adapter disabled, of
`ours / diffusers, ...` diffusers with the adapter enabled (or disabled, for `no LoRA`). Times are process CPU time of
one call, the second in each state;
"ratio median" is the median over rounds of the ratio within a round, "range" its confidence interval
(with fewer than 11 rounds: the whole range of the per-round ratios). The last column is
max |ours - diffusers| / max |diffusers| for the same LoRA.

{table}

{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    output = Path("bench/results/lora_sdxl.md")
    return unet_step_main(argv, __doc__ or "", output, measure, report, rank_of="the LoRA")


if __name__ == "__main__":
    sys.exit(main())
