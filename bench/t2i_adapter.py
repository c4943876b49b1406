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

from refiners_sd15.testing import randomize_with_seed

TIMESTEP = 500
ADAPTER_CONFIG: dict[str, Any] = {
    "adapter_type": "full_adapter",
    "channels": [320, 640, 1280, 1280],
    "downscale_factor": 8,
    "in_channels": 1,
    "num_res_blocks": 2,
}
STATES = ("ours, no adapter", "ours, T2I-Adapter", "diffusers, no adapter", "diffusers, T2I-Adapter")


def measure(rounds: int, latent_size: int) -> tuple[dict[str, Comparison], dict[str, float]]:
    from diffusers import T2IAdapter as DiffusersT2IAdapter  # pyright: ignore[reportPrivateImportUsage]
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    from refiners_sd15 import SD1UNet
    from refiners_t2i_adapter import T2IAdapter

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=generator)
    embedding = torch.randn(2, 77, 768, generator=generator)
    condition = torch.rand(1, 1, 8 * latent_size, 8 * latent_size, generator=generator)
    timestep = torch.tensor([TIMESTEP])
    with tempfile.TemporaryDirectory() as folder:
        progress("writing the reference UNet and adapter")
        save_unet(Path(folder))
        with torch.device("meta"):
            adapter: Any = DiffusersT2IAdapter.from_config(ADAPTER_CONFIG)  # pyright: ignore[reportUnknownMemberType]
        adapter = adapter.to_empty(device="cpu")
        randomize_with_seed(adapter, seed=1)
        adapter.save_pretrained(Path(folder) / "adapter")
        progress("loading both sides")
        ours = SD1UNet.from_pretrained(folder).eval()
        reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
        t2i = T2IAdapter.from_pretrained(ours, Path(folder) / "adapter", scale=0.8).set_condition(condition)
    adapter = adapter.eval()

    with torch.inference_mode():
        features = [0.8 * feature.repeat(2, 1, 1, 1) for feature in adapter(condition)]

    def our_step() -> torch.Tensor:
        ours.set_timestep(timestep)
        ours.set_clip_text_embedding(embedding)
        return ours(latents)

    def set_ours(state: str) -> None:
        if state.endswith("T2I-Adapter") and not t2i.is_injected:
            t2i.inject()
        elif state.endswith("no adapter") and t2i.is_injected:
            t2i.eject()

    def reference_step(state: str) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            residuals = [feature.clone() for feature in features] if state.endswith("T2I-Adapter") else None
            return reference(
                latents, timestep, encoder_hidden_states=embedding, down_intrablock_additional_residuals=residuals
            ).sample

        return step

    steps: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("ours, no adapter", our_step),
        ("ours, T2I-Adapter", our_step),
        ("diffusers, no adapter", reference_step("no adapter")),
        ("diffusers, T2I-Adapter", reference_step("T2I-Adapter")),
    ]
    networks: list[tuple[str, Callable[[], Any]]] = [
        ("ours, adapter network", lambda: t2i.model(condition)),
        ("diffusers, adapter network", lambda: adapter(condition)),
    ]
    differences: dict[str, float] = {}
    with torch.inference_mode():
        progress("checking outputs (untimed)")
        outputs: dict[str, torch.Tensor] = {}
        for state, step in steps:
            set_ours(state)
            outputs[state] = step()
        for side in ("no adapter", "T2I-Adapter"):
            theirs = outputs[f"diffusers, {side}"]
            differences[side] = max_abs_diff(outputs[f"ours, {side}"], theirs) / theirs.abs().max().item()
        samples: dict[str, list[float]] = {name: [] for name, _ in [*steps, *networks]}
        for index in range(rounds):
            progress(f"round {index + 1}/{rounds}")
            for state, step in [*steps, *networks]:
                set_ours(state)
                start = time.process_time()
                step()
                samples[state].append(time.process_time() - start)
    timings = {name: Timing(tuple(values)) for name, values in samples.items()}
    comparisons = {
        "ours, T2I-Adapter / no adapter": Comparison(timings["ours, T2I-Adapter"], timings["ours, no adapter"], 1),
        "diffusers, T2I-Adapter / no adapter": Comparison(
            timings["diffusers, T2I-Adapter"], timings["diffusers, no adapter"], 1
        ),
        "ours / diffusers, T2I-Adapter step": Comparison(
            timings["ours, T2I-Adapter"], timings["diffusers, T2I-Adapter"], 1
        ),
        "ours / diffusers, adapter network": Comparison(
            timings["ours, adapter network"], timings["diffusers, adapter network"], 1
        ),
    }
    return comparisons, differences


TARGET_RATIOS = {"ours / diffusers, T2I-Adapter step": 1.0, "ours / diffusers, adapter network": 1.0}


def report(comparisons: dict[str, Comparison], differences: dict[str, float], args: argparse.Namespace) -> str:
    rows: list[list[str]] = []
    for name, comparison in comparisons.items():
        low, high = comparison.ratio_median_ci
        target = TARGET_RATIOS.get(name)
        rows.append(
            [
                name,
                f"{comparison.ours.median:.3f} s",
                f"{comparison.reference.median:.3f} s",
                f"{comparison.ratio_median:.3f}x",
                f"{low:.3f}-{high:.3f}",
                f"<= {target:.2f}x" if target else "",
            ]
        )
    table = markdown_table(["case", "time (median)", "baseline (median)", "ratio median", "range", "target"], rows)
    env = environment() | {"repository commit": source_commit()}
    env_table = markdown_table(["", ""], [[key, value] for key, value in env.items()])
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
    parser = unet_step_parser(__doc__ or "", Path("bench/results/t2i_adapter.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    comparisons, differences = measure(args.rounds, args.latent_size)
    text = report(comparisons, differences, args)
    write_report(text, args.output)
    return 0 if all(value <= 1e-4 for value in differences.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
