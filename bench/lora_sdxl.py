"""LoRA overhead on one SDXL UNet step: ours (`LoraManager` on `SDXLUNet`) unfused and fused, and diffusers with peft.

    flock /work/bigmem.lock python bench/lora_sdxl.py [--rounds N] [--latent-size N] [--rank N] [--threads N]
        [--output bench/results/lora_sdxl.md]

The published SDXL base UNet with random weights (10 GB in float32) is built once; diffusers' `UNet2DConditionModel`
is built on the meta device and takes our tensors as its parameters (as `sdxl.py` does), so both sides share one
copy of the weights. One LoRA of rank `--rank` (random down/up, diffusers module names) patches every attention
projection (`to_q`, `to_k`, `to_v`, `to_out.0`), the layers diffusers' SDXL DreamBooth LoRA script trains. diffusers
loads the same tensors with `load_lora_adapter` (it needs peft).

Each round runs one step per state, in a fixed order: ours with no LoRA, with the LoRA unfused, fused, then diffusers
with its adapter disabled and enabled. Switching states (add, fuse, unfuse, enable) is not timed; ours is unfused
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
    Comparison,
    StateStep,
    environment,
    markdown_table,
    max_abs_diff,
    progress,
    state_comparisons,
    state_outputs,
    time_states,
    unet_step_parser,
    write_report,
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


def measure(rounds: int, latent_size: int, rank: int) -> tuple[dict[str, Comparison], dict[str, float], int]:
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
    lora = random_lora(reference, rank)
    reference.load_lora_adapter(
        {f"unet.{key}": value for key, value in lora.items()}, prefix="unet", adapter_name="one"
    )
    manager = LoraManager(ours)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=generator)
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
        progress("checking outputs (untimed)")
        outputs = state_outputs(steps)
        for state in OURS_STATES:
            theirs = outputs["diffusers", "no LoRA" if state == "no LoRA" else "LoRA"]
            differences[state] = max_abs_diff(outputs["ours", state], theirs) / theirs.abs().max().item()
        timings = time_states(steps, rounds)
    pairs = (("LoRA, unfused", "LoRA"), ("LoRA, fused", "LoRA"), ("no LoRA", "no LoRA"))
    comparisons = state_comparisons(timings, OURS_STATES, DIFFUSERS_STATES, pairs)
    return comparisons, differences, sum(value.numel() for value in lora.values())


def report(
    comparisons: dict[str, Comparison], differences: dict[str, float], lora_parameters: int, args: argparse.Namespace
) -> str:
    rows: list[list[str]] = []
    for name, comparison in comparisons.items():
        low, high = comparison.ratio_median_ci
        target = TARGET_RATIOS.get(name)
        state = name.split(", ", 1)[1]
        rows.append(
            [
                name,
                f"{comparison.ours.median:.2f} s",
                f"{comparison.reference.median:.2f} s",
                f"{comparison.ratio_median:.3f}x",
                f"{low:.3f}-{high:.3f}",
                f"<= {target:.2f}x" if target else "",
                f"{differences[state]:.1e}" if name.startswith("ours, ") else "",
            ]
        )
    table = markdown_table(
        ["case", "time (median)", "baseline (median)", "ratio median", "range", "target", "max rel. diff vs diffusers"],
        rows,
        "lrrrrrr",
    )
    env_table = markdown_table(["", ""], [[key, value] for key, value in environment().items()])
    return f"""# LoRA overhead on one SDXL UNet step

`flock /work/bigmem.lock python bench/lora_sdxl.py --rounds {args.rounds} --latent-size {args.latent_size} \\
    --rank {args.rank} --threads {args.threads}`

One step of the published SDXL base UNet with random weights, batch 2 (classifier-free guidance), latents
(2, 4, {args.latent_size}, {args.latent_size}) ({8 * args.latent_size}x{8 * args.latent_size} images), text
(2, 77, 2048), pooled text (2, 1280), time ids (2, 6), fp32 on the CPU. One LoRA of rank {args.rank} on every
attention projection ({lora_parameters / 1e6:.1f} M parameters). The baseline of a row `ours, ...` is our UNet
without LoRA, of `diffusers, ...` diffusers' UNet (sharing our weights) with its peft adapter disabled, of
`ours / diffusers, ...` diffusers with the adapter enabled (or disabled, for `no LoRA`). Times are process CPU time of
one call; "ratio median" is the median over rounds of the ratio within a round, "range" its confidence interval
(with fewer than 11 rounds: the whole range of the per-round ratios). The last column is
max |ours - diffusers| / max |diffusers| for the same LoRA.

{table}

{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = unet_step_parser(__doc__ or "", Path("bench/results/lora_sdxl.md"))
    parser.add_argument("--rank", type=int, default=16, help="rank of the LoRA (default: 16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    comparisons, differences, lora_parameters = measure(args.rounds, args.latent_size, args.rank)
    write_report(report(comparisons, differences, lora_parameters, args), args.output)
    return 0 if all(value <= 1e-4 for value in differences.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
