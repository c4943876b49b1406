"""LoHa, LoKr and DoRA overhead on one SD1.5 UNet step: ours (`LoraManager` on `SD1UNet`) unfused and fused, against
the plain step and against diffusers' UNet with PEFT holding the same adapters.

    python bench/lycoris.py [--rounds N] [--latent-size N] [--rank N] [--threads N] [--output bench/results/lycoris.md]

The published SD1.5 UNet with random weights is written in the diffusers layout (as `sd15_components.py` does) and
loaded by both sides. Each adapter (PEFT's `LoHaConfig`, `LoKrConfig` and `LoraConfig(use_dora=True)`, rank
`--rank`, alpha = rank) patches every attention projection, feed-forward layer and `proj_in`/`proj_out` of the
transformer blocks; PEFT injects it into diffusers' UNet (`inject_adapter_in_model`), its weights are drawn at random
(`refiners_lora.testing.write_peft_file`) and the file PEFT writes is the one we load, so both sides hold the same
values. Outputs are checked to agree before timing.

Each round runs one step per state, in a fixed order: ours with no adapter, then each family unfused and fused, then
diffusers with no adapter and each family. Switching states (add, fuse, inject) is not timed,
nor is the first call in each state (it pays once what the switch leaves behind: the kernel's page faults after a
fuse, the text's keys and values computed again). A ratio compares the
states of one side within the same round (see `timing.py`: process CPU time).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
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
    max_abs_diff,
    progress,
    relative_diff,
    state_comparisons,
    state_outputs,
    state_table,
    time_states,
    unet_step_main,
)
from torch import nn

FAMILIES = ("LoHa", "LoKr", "DoRA")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
OURS_STATES = ("no LoRA", *(f"{family}, {how}" for family in FAMILIES for how in ("unfused", "fused")))
DIFFUSERS_STATES = ("no LoRA", *FAMILIES)
SEED = 6


def peft_config(family: str, rank: int) -> Any:
    """PEFT's config of `family` on `TARGETS`, alpha = rank."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig  # pyright: ignore[reportPrivateImportUsage]

    if family == "LoHa":
        return LoHaConfig(r=rank, alpha=rank, target_modules=TARGETS)
    if family == "LoKr":
        return LoKrConfig(r=rank, alpha=rank, target_modules=TARGETS, decompose_factor=8)
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, use_dora=True)


def inject(unet: nn.Module, family: str, rank: int, path: Path) -> None:
    """Inject PEFT's `family` adapter into `unet` with random weights (always the same: seed `SEED`) and write its
    file to `path`."""
    from peft import inject_adapter_in_model  # pyright: ignore[reportPrivateImportUsage]

    from refiners_lora.testing import write_peft_file

    config = peft_config(family, rank)
    inject_adapter_in_model(config, unet)
    write_peft_file(unet, config, path, prefix="base_model.model.", seed=SEED)


def strip(unet: nn.Module) -> None:
    """Put back the base layer of every PEFT layer of `unet`, and drop the config PEFT left on it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, module.get_base_layer())
    if hasattr(unet, "peft_config"):
        delattr(unet, "peft_config")


def measure(args: argparse.Namespace) -> StepMeasurement:
    from safetensors.torch import load_file

    from refiners_lora import LoraManager

    with sd15_unet_step(args.latent_size) as step:
        reference = step.reference
        manager = LoraManager(step.ours)
    files = Path(tempfile.mkdtemp())
    paths = {family: files / f"{family}.safetensors" for family in FAMILIES}
    current: list[str] = []  # the family PEFT holds now

    def set_reference(state: str) -> None:
        if current != [state]:
            strip(reference)
            current.clear()
        if state != "no LoRA" and not current:
            inject(reference, state, args.rank, paths[state])
            current.append(state)

    def set_ours(state: str) -> None:
        family, _, how = state.partition(", ")
        manager.unfuse()
        for name in manager.names:
            if name != family:
                manager.remove(name)
        if family != "no LoRA" and not manager.names:
            manager.add(family, paths[family])
        if how == "fused":
            manager.fuse()

    progress("writing the adapters' files")
    for family in FAMILIES:
        set_reference(family)
    parameters = {family: 0 for family in FAMILIES}
    steps: list[StateStep] = [
        *(("diffusers", set_reference, state, step.reference_step) for state in DIFFUSERS_STATES),
        *(("ours", set_ours, state, step.ours_step) for state in OURS_STATES),
    ]
    differences: dict[str, float] = {}
    with torch.inference_mode():
        outputs = state_outputs(steps)
        for state in OURS_STATES:
            theirs = outputs["diffusers", state.partition(", ")[0]]
            differences[state] = relative_diff(outputs["ours", state], theirs)
        for family in FAMILIES:
            lora = outputs["diffusers", family]
            assert max_abs_diff(lora, outputs["diffusers", "no LoRA"]) > 1e-3 * lora.abs().max().item(), family
        timings = time_states(steps, args.rounds, settling_calls=1)
    for family in FAMILIES:
        parameters[family] = sum(tensor.numel() for tensor in load_file(paths[family]).values())
    shutil.rmtree(files)
    pairs = [(f"{family}, unfused", family) for family in FAMILIES] + [("no LoRA", "no LoRA")]
    comparisons = state_comparisons(timings, OURS_STATES, DIFFUSERS_STATES, pairs)
    return StepMeasurement(comparisons, differences, max(parameters.values()))


TARGET_RATIOS = {f"ours, {family}, fused": 1.00 for family in FAMILIES} | {
    f"ours / diffusers, {family}, unfused": 1.00 for family in FAMILIES
}


def report(measured: StepMeasurement, args: argparse.Namespace) -> str:
    parameters = measured.parameters
    table = state_table(measured.comparisons, TARGET_RATIOS, measured.differences, "max rel. diff vs PEFT")
    env_table = environment_table(environment() | {"repository commit": source_commit()})
    return f"""# LoHa, LoKr and DoRA overhead on one SD1.5 UNet step

`python bench/lycoris.py --rounds {args.rounds} --latent-size {args.latent_size} --rank {args.rank} \\
    --threads {args.threads}`

One UNet step, batch 2, latents (2, 4, {args.latent_size}, {args.latent_size}), text (2, 77, 768), fp32 on the CPU,
published SD1.5 UNet with random weights. Each adapter (PEFT's LoHa, LoKr, and LoRA with DoRA magnitudes) has rank
{args.rank}, alpha = rank, on every attention projection, feed-forward layer and `proj_in`/`proj_out` (at most
{parameters / 1e6:.1f} M parameters per adapter). The baseline of a row `ours, ...` is our UNet without adapter, of
`diffusers, ...` diffusers' UNet without adapter, of `ours / diffusers, ...` diffusers with PEFT holding the same
adapter. Times are process CPU time of one call, the second in each state;
"ratio median" is the median over rounds of the ratio within a
round, "range" its confidence interval (with fewer than 11 rounds: the whole range of the per-round ratios). The last
column is max |ours - PEFT| / max |PEFT| for the same adapter.

{table}

{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    output = Path("bench/results/lycoris.md")
    return unet_step_main(argv, __doc__ or "", output, measure, report, rank_of="each adapter")


if __name__ == "__main__":
    sys.exit(main())
