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
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from sd15_components import save_unet, source_commit
from timing import (
    Comparison,
    Timing,
    environment,
    markdown_table,
    max_abs_diff,
    progress,
    unet_step_parser,
    write_report,
)

TIMESTEP = 500
SCALE = 0.6
STATES = (("ours", "plain"), ("ours", "IP-Adapter"), ("diffusers", "plain"), ("diffusers", "IP-Adapter"))


def measure(rounds: int, latent_size: int) -> tuple[dict[str, Comparison], float]:
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    from refiners_clip_vision import CLIP_VIT_H_14, CLIPImageEncoder
    from refiners_core.weights import save_tensors
    from refiners_ip_adapter import IPAdapter, text_cross_attentions
    from refiners_ip_adapter.testing import released_weights
    from refiners_sd15 import SD1UNet

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=generator)
    embedding = torch.randn(2, 77, 768, generator=generator)
    image_embeds = torch.cat((torch.zeros(1, 1024), torch.randn(1, 1024, generator=generator)))
    timestep = torch.tensor([TIMESTEP])
    with tempfile.TemporaryDirectory() as folder:
        progress("writing the reference UNet")
        save_unet(Path(folder))
        progress("loading both sides")
        ours = SD1UNet.from_pretrained(folder).eval()
        reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
        inner_dims = [attention.inner_dim for attention in text_cross_attentions(ours)]
        tensors = released_weights("linear", image_embedding_dim=1024, cross_attention_dim=768, inner_dims=inner_dims)
        save_tensors(Path(folder) / "ip-adapter_sd15.safetensors", tensors)
        encoder = CLIPImageEncoder(CLIP_VIT_H_14, device="meta")  # the step does not run it
        ip = IPAdapter.from_pretrained(ours, Path(folder) / "ip-adapter_sd15.safetensors", image_encoder=encoder)
    ip.scale = SCALE
    with torch.inference_mode():
        ip.set_image_embedding(ip.image_proj(image_embeds).reshape(2, -1, 768))
    nested = {
        group: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(group)}
        for group in ("image_proj", "ip_adapter")
    }
    reference._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)  # pyright: ignore

    def our_step() -> torch.Tensor:
        ours.set_timestep(timestep)
        ours.set_clip_text_embedding(embedding)
        return ours(latents)

    def reference_step() -> torch.Tensor:
        added = {"image_embeds": [image_embeds[:, None]]}
        return reference(latents, timestep, encoder_hidden_states=embedding, added_cond_kwargs=added).sample

    def set_ours(state: str) -> None:
        if (state == "IP-Adapter") != ip.is_injected:
            ip.inject() if state == "IP-Adapter" else ip.eject()

    def set_reference(state: str) -> None:
        processors: dict[str, Any] = dict(reference.attn_processors)
        for processor in processors.values():
            if hasattr(processor, "to_k_ip"):
                processor.scale = [SCALE if state == "IP-Adapter" else 0.0]

    setters: dict[str, tuple[Callable[[str], None], Callable[[], torch.Tensor]]] = {
        "ours": (set_ours, our_step),
        "diffusers": (set_reference, reference_step),
    }
    with torch.inference_mode():
        progress("checking outputs (untimed)")
        outputs: dict[tuple[str, str], torch.Tensor] = {}
        for side, state in STATES:
            setters[side][0](state)
            outputs[side, state] = setters[side][1]()
        theirs = outputs["diffusers", "IP-Adapter"]
        difference = max_abs_diff(outputs["ours", "IP-Adapter"], theirs) / theirs.abs().max().item()
        assert max_abs_diff(outputs["ours", "IP-Adapter"], outputs["ours", "plain"]) > 1e-3 * theirs.abs().max().item()
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in STATES}
        for index in range(rounds):
            progress(f"round {index + 1}/{rounds}")
            for side, state in STATES:
                setters[side][0](state)
                start = time.process_time()
                setters[side][1]()
                samples[side, state].append(time.process_time() - start)
    timings = {key: Timing(tuple(values)) for key, values in samples.items()}
    comparisons = {
        "ours, IP-Adapter / ours, plain": Comparison(timings["ours", "IP-Adapter"], timings["ours", "plain"], 1),
        "diffusers, IP-Adapter / diffusers, scale 0": Comparison(
            timings["diffusers", "IP-Adapter"], timings["diffusers", "plain"], 1
        ),
        "ours / diffusers, IP-Adapter": Comparison(
            timings["ours", "IP-Adapter"], timings["diffusers", "IP-Adapter"], 1
        ),
        "ours / diffusers, plain": Comparison(timings["ours", "plain"], timings["diffusers", "plain"], 1),
    }
    return comparisons, difference


def report(comparisons: dict[str, Comparison], difference: float, args: argparse.Namespace) -> str:
    rows: list[list[str]] = []
    for name, comparison in comparisons.items():
        low, high = comparison.ratio_median_ci
        target = "<= 1.00x" if name == "ours / diffusers, IP-Adapter" else ""
        rows.append(
            [
                name,
                f"{comparison.ours.median:.2f} s",
                f"{comparison.reference.median:.2f} s",
                f"{comparison.ratio_median:.3f}x",
                f"{low:.3f}-{high:.3f}",
                target,
            ]
        )
    table = markdown_table(
        ["case", "time (median)", "baseline (median)", "ratio median", "range", "target"], rows, "lrrrrr"
    )
    env = environment() | {"repository commit": source_commit()}
    env_table = markdown_table(["", ""], [[key, value] for key, value in env.items()])
    return f"""# IP-Adapter overhead on one SD1.5 UNet step

`python bench/ip_adapter.py --rounds {args.rounds} --latent-size {args.latent_size} --threads {args.threads}`

One UNet step, batch 2, latents (2, 4, {args.latent_size}, {args.latent_size}), text (2, 77, 768), fp32 on the CPU,
published SD1.5 UNet with random weights, an IP-Adapter of the `ip-adapter_sd15` shapes at scale {SCALE} (4 image
tokens). Times are process CPU time of one call; "ratio median" is the median over rounds of the ratio within a
round, "range" its confidence interval (with fewer than 11 rounds: the whole range of the per-round ratios).
max |ours - diffusers| / max |diffusers| with the IP-Adapter: {difference:.1e}.

{table}

{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = unet_step_parser(__doc__ or "", Path("bench/results/ip_adapter.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    comparisons, difference = measure(args.rounds, args.latent_size)
    text = report(comparisons, difference, args)
    write_report(text, args.output)
    return 0 if difference <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
