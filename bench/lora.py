"""LoRA overhead on one SD1.5 UNet step: ours (`LoraManager` on `SD1UNet`) unfused and fused, and diffusers with peft.

    python bench/lora.py [--rounds N] [--latent-size N] [--rank N] [--threads N] [--output bench/results/lora.md]

The published SD1.5 UNet with random weights is written in the diffusers layout (as `sd15_components.py` does) and
loaded by both sides. Three LoRAs of rank `--rank` (random down/up, diffusers module names) patch every attention
projection, feed-forward layer and `proj_in`/`proj_out` of the transformer blocks, the layers a kohya or diffusers
LoRA trains by default. diffusers loads the same tensors with `load_lora_adapter` (it needs peft).

Each round runs one step per state, in a fixed order: ours with no LoRA, 1 LoRA unfused, 1 fused, 3 unfused, 3 fused,
then diffusers with its adapters disabled, 1 adapter and 3 adapters. Switching states (add, fuse, set_adapters) is
not timed. A ratio compares the states of one side within the same round (see `timing.py`: process CPU time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from sd15_components import save_unet, source_commit
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


def measure(rounds: int, latent_size: int, rank: int) -> tuple[dict[str, Comparison], dict[str, float], int]:
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    from refiners_lora import LoraManager
    from refiners_sd15 import SD1UNet

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=generator)
    embedding = torch.randn(2, 77, 768, generator=generator)
    timestep = torch.tensor([TIMESTEP])
    with tempfile.TemporaryDirectory() as folder:
        progress("writing the reference UNet")
        save_unet(Path(folder))
        progress("loading both sides")
        ours = SD1UNet.from_pretrained(folder).eval()
        reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
    loras = random_loras(reference, rank)
    for name, tensors in zip(LORAS, loras, strict=True):
        reference.load_lora_adapter(
            {f"unet.{key}": value for key, value in tensors.items()}, prefix="unet", adapter_name=name
        )  # pyright: ignore
    manager = LoraManager(ours)

    def our_step() -> torch.Tensor:
        ours.set_timestep(timestep)
        ours.set_clip_text_embedding(embedding)
        return ours(latents)

    def reference_step() -> torch.Tensor:
        return reference(latents, timestep, encoder_hidden_states=embedding).sample

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
            reference.disable_adapters()  # pyright: ignore
            return
        reference.enable_adapters()  # pyright: ignore
        reference.set_adapters(list(LORAS[: 1 if state == "1 LoRA" else 3]))  # pyright: ignore

    steps: list[StateStep] = [
        *(("ours", set_ours, state, our_step) for state in OURS_STATES),
        *(("diffusers", set_reference, state, reference_step) for state in DIFFUSERS_STATES),
    ]
    differences: dict[str, float] = {}
    with torch.inference_mode():
        progress("checking outputs (untimed)")
        outputs = state_outputs(steps)
        for state in ("1 LoRA, unfused", "1 LoRA, fused", "3 LoRAs, unfused", "3 LoRAs, fused"):
            theirs = outputs["diffusers", "1 LoRA" if state.startswith("1 ") else "3 LoRAs"]
            differences[state] = max_abs_diff(outputs["ours", state], theirs) / theirs.abs().max().item()
        theirs = outputs["diffusers", "no LoRA"]
        differences["no LoRA"] = max_abs_diff(outputs["ours", "no LoRA"], theirs) / theirs.abs().max().item()
        timings = time_states(steps, rounds)
    pairs = (("1 LoRA, unfused", "1 LoRA"), ("3 LoRAs, unfused", "3 LoRAs"), ("no LoRA", "no LoRA"))
    comparisons = state_comparisons(timings, OURS_STATES, DIFFUSERS_STATES, pairs)
    lora_parameters = sum(value.numel() for value in loras[0].values())
    return comparisons, differences, lora_parameters


TARGET_RATIOS = {
    "ours, 1 LoRA, unfused": 1.10,
    "ours, 3 LoRAs, unfused": 1.10,
    "ours, 1 LoRA, fused": 1.00,
    "ours, 3 LoRAs, fused": 1.00,
}


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
                f"{differences[state]:.1e}" if name.startswith("ours, ") and state in differences else "",
            ]
        )
    table = markdown_table(
        ["case", "time (median)", "baseline (median)", "ratio median", "range", "target", "max rel. diff vs diffusers"],
        rows,
        "lrrrrrr",
    )
    env = environment() | {"repository commit": source_commit()}
    env_table = markdown_table(["", ""], [[key, value] for key, value in env.items()])
    return f"""# LoRA overhead on one SD1.5 UNet step

`python bench/lora.py --rounds {args.rounds} --latent-size {args.latent_size} --rank {args.rank} \\
    --threads {args.threads}`

One UNet step, batch 2, latents (2, 4, {args.latent_size}, {args.latent_size}), text (2, 77, 768), fp32 on the CPU,
published SD1.5 UNet with random weights. Each LoRA has rank {args.rank} on every attention projection, feed-forward
layer and `proj_in`/`proj_out` ({lora_parameters / 1e6:.1f} M parameters per LoRA). The baseline of a row `ours, ...`
is our UNet without LoRA, of `diffusers, ...` diffusers' UNet with its adapters disabled, of `ours / diffusers, ...`
diffusers in the same state. Times are process CPU time of one call; "ratio median" is the median over rounds of
the ratio within a round, "range" its confidence interval (with fewer than 11 rounds: the whole range of the
per-round ratios). The last column is max |ours - diffusers| / max |diffusers| for the same LoRAs.

{table}

{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = unet_step_parser(__doc__ or "", Path("bench/results/lora.md"))
    parser.add_argument("--rank", type=int, default=16, help="rank of each LoRA (default: 16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    comparisons, differences, lora_parameters = measure(args.rounds, args.latent_size, args.rank)
    text = report(comparisons, differences, lora_parameters, args)
    write_report(text, args.output)
    return 0 if all(value <= 1e-4 for value in differences.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
