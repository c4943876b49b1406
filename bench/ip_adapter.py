"""IP-Adapter overhead on one SD1.5 UNet step: ours (`IPAdapter` on `SD1UNet`) against our plain step, and against
diffusers' UNet with the same IP-Adapter.

    python bench/ip_adapter.py [--rounds N] [--latent-size N] [--threads N] [--output bench/results/ip_adapter.md]

The published SD1.5 UNet with random weights is written in the diffusers layout (as `sd15_components.py` does) and
loaded by both sides; random IP-Adapter weights of the `ip-adapter_sd15` shapes (4 image tokens, 16 cross-attentions)
are loaded by ours from a `.safetensors` file in the released layout and by diffusers' UNet with its IP-Adapter
loader. Both sides get the same image embedding `(2, 1024)` (negative row zero): the step includes the attention to
the image tokens, not the image encoder (run once per reference image, outside the denoising loop).

Each round runs one step per state, in a fixed order: ours plain, ours with the IP-Adapter, diffusers with the
IP-Adapter at scale 0 (its processors then skip the image attention) and at scale 0.6. Switching states is not timed.
"""

from __future__ import annotations

import argparse
import sys
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
    ratio_table,
    relative_diff,
    state_outputs,
    state_ratios,
    time_states,
    unet_step_main,
)

SCALE = 0.6
STATES = ("plain", "IP-Adapter")
RATIOS = {  # row -> (side, state) timed, (side, state) of the baseline
    "ours, IP-Adapter / ours, plain": (("ours", "IP-Adapter"), ("ours", "plain")),
    "diffusers, IP-Adapter / diffusers, scale 0": (("diffusers", "IP-Adapter"), ("diffusers", "plain")),
    "ours / diffusers, IP-Adapter": (("ours", "IP-Adapter"), ("diffusers", "IP-Adapter")),
    "ours / diffusers, plain": (("ours", "plain"), ("diffusers", "plain")),
}
TARGET_RATIOS = {"ours / diffusers, IP-Adapter": 1.00}


def measure(args: argparse.Namespace) -> StepMeasurement:
    from refiners_clip_vision import CLIP_VIT_H_14, CLIPImageEncoder
    from refiners_core.weights import save_tensors
    from refiners_ip_adapter import IPAdapter, text_cross_attentions
    from refiners_ip_adapter.testing import released_weights

    with sd15_unet_step(args.latent_size) as step:
        image_embeds = torch.cat((torch.zeros(1, 1024), torch.randn(1, 1024, generator=step.generator)))
        inner_dims = [attention.inner_dim for attention in text_cross_attentions(step.ours)]
        tensors = released_weights("linear", image_embedding_dim=1024, cross_attention_dim=768, inner_dims=inner_dims)
        path = step.folder / "ip-adapter_sd15.safetensors"
        save_tensors(path, tensors)
        encoder = CLIPImageEncoder(CLIP_VIT_H_14, device="meta")  # the step does not run it
        ip = IPAdapter.from_pretrained(step.ours, path, image_encoder=encoder)
    reference = step.reference
    ip.scale = SCALE
    with torch.inference_mode():
        ip.set_image_embedding(ip.image_proj(image_embeds).reshape(2, -1, 768))
    nested = {
        group: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(group)}
        for group in ("image_proj", "ip_adapter")
    }
    reference._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)

    def reference_step() -> torch.Tensor:
        added = {"image_embeds": [image_embeds[:, None]]}
        return step.reference_step(added_cond_kwargs=added)

    def set_ours(state: str) -> None:
        if (state == "IP-Adapter") != ip.is_injected:
            ip.inject() if state == "IP-Adapter" else ip.eject()

    def set_reference(state: str) -> None:
        processors: dict[str, Any] = dict(reference.attn_processors)
        for processor in processors.values():
            if hasattr(processor, "to_k_ip"):
                processor.scale = [SCALE if state == "IP-Adapter" else 0.0]

    steps: list[StateStep] = [
        *(("ours", set_ours, state, step.ours_step) for state in STATES),
        *(("diffusers", set_reference, state, reference_step) for state in STATES),
    ]
    with torch.inference_mode():
        outputs = state_outputs(steps)
        theirs = outputs["diffusers", "IP-Adapter"]
        difference = relative_diff(outputs["ours", "IP-Adapter"], theirs)
        assert max_abs_diff(outputs["ours", "IP-Adapter"], outputs["ours", "plain"]) > 1e-3 * theirs.abs().max().item()
        timings = time_states(steps, args.rounds)
    return StepMeasurement(state_ratios(timings, RATIOS), {"IP-Adapter": difference})


def report(measured: StepMeasurement, args: argparse.Namespace) -> str:
    table = ratio_table(measured.comparisons, TARGET_RATIOS, align="lrrrrr")
    env_table = environment_table(environment() | {"repository commit": source_commit()})
    return f"""# IP-Adapter overhead on one SD1.5 UNet step

`python bench/ip_adapter.py --rounds {args.rounds} --latent-size {args.latent_size} --threads {args.threads}`

One UNet step, batch 2, latents (2, 4, {args.latent_size}, {args.latent_size}), text (2, 77, 768), fp32 on the CPU,
published SD1.5 UNet with random weights, an IP-Adapter of the `ip-adapter_sd15` shapes at scale {SCALE} (4 image
tokens). Times are process CPU time of one call; "ratio median" is the median over rounds of the ratio within a
round, "range" its confidence interval (with fewer than 11 rounds: the whole range of the per-round ratios).
max |ours - diffusers| / max |diffusers| with the IP-Adapter: {measured.differences["IP-Adapter"]:.1e}.

{table}

{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    return unet_step_main(argv, __doc__ or "", Path("bench/results/ip_adapter.md"), measure, report)


if __name__ == "__main__":
    sys.exit(main())
