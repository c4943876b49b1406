"""Stable Diffusion XL, ours (`refiners_sdxl`) against diffusers, fp32 on CPU: a UNet step, a VAE decode, and loading
the whole model.

    python bench/sdxl.py [--components unet,vae,load] [--rounds N] [--latent-size N] [--repeats N] [--threads N]
        [--folder DIR] [--output bench/results/sdxl.md]

The folder is a diffusers `StableDiffusionXLPipeline` folder of the published SDXL base architecture with random
weights (`refiners_sdxl.testing.write_published_sdxl_folder`: `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`,
`scheduler/`, float32, 14 GB), written into a temporary folder and deleted at the end, or into `--folder` and kept
(an existing one is reused). Written once, it serves every measurement:

- unet: one denoising step of the full SDXL base UNet, batch 2 (classifier-free guidance), latents (2, 4, N, N), text
  (2, 77, 2048), pooled text (2, 1280) and time ids (2, 6). Ours is `SDXLUNet.from_pretrained(folder)`; the reference,
  diffusers' `UNet2DConditionModel`, is built on the meta device and takes our loaded tensors as its parameters
  (through our key mapping): the two sides share one copy of the 10 GB of weights, since two would not fit in this
  machine's memory next to everything else. The outputs are compared before timing, so a wrong mapping would show.
- vae: decoding one latent (1, 4, N, N) into an 8N x 8N image, each side loaded by its own `from_pretrained`.
- load: `StableDiffusion_XL.from_pretrained(folder)`, by default (copy-on-load) and with `mmap=True` (memory-mapped),
  against `StableDiffusionXLPipeline.from_pretrained(folder)`, each load in a fresh process (time and peak RSS, before
  and after reading every weight once; see `sd15_load.py`).

N is `--latent-size` (default 64: 512x512 images; the published 1024x1024, N = 128, takes minutes per step on one
core). The UNet and VAE are timed in interleaved rounds (`timing.compare`, process CPU time).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, get_args

import torch
from sd15_components import PROMPT_IDS, versions
from sd15_load import (
    ACCURACY_HEADERS,
    CONTRACTS,
    LOAD_HEADERS,
    OURS,
    Differences,
    Probe,
    Probes,
    Side,
    accuracy_rows,
    load_rows,
    measure_sides,
    probe_loader,
    read_files_once,
    run_probe,
    verdict,
)
from timing import Comparison, compare, environment, markdown_table, max_abs_diff, timing_cells, write_report

Forward = Callable[[], torch.Tensor]
Outputs = dict[str, torch.Tensor]

COMPONENTS = ("unet", "vae", "load")
VAE_SCALING_FACTOR = 0.13025
TIMESTEP = 500
TIME_IDS = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]  # original size, crop top-left, target size
TARGETS = {"unet": 0.95, "vae": 0.95, "load time": 0.95, "load memory": 1.0}
START = time.monotonic()


@dataclass(frozen=True)
class Timed:
    """One timed component: its comparison and how far apart the two sides' outputs were."""

    name: str
    title: str
    inputs: str
    comparison: Comparison
    max_abs_diff: float
    max_abs_reference: float


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:5.0f} s] {message}", file=sys.stderr, flush=True)


def unet_inputs(latent_size: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, latent_size, latent_size, generator=generator)
    text = torch.randn(batch, 77, 2048, generator=generator)
    pooled = torch.randn(batch, 1280, generator=generator)
    return latents, torch.tensor([TIMESTEP]), text, pooled, torch.tensor([TIME_IDS] * batch)


def unet_sides(folder: Path, latent_size: int) -> tuple[Forward, Forward]:
    """Ours loaded from `folder`, and diffusers' UNet holding the very same tensors (one copy of the weights)."""
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    from refiners_sdxl import SDXLUNet, diffusers_sdxl_unet_mapping

    ours = SDXLUNet.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.device("meta"):
        config: Any = UNet2DConditionModel.load_config(folder, subfolder="unet")  # pyright: ignore[reportUnknownMemberType]
        reference: Any = UNet2DConditionModel.from_config(config)  # pyright: ignore[reportUnknownMemberType]
    own = ours.state_dict()
    shared = {theirs: own[key] for theirs, key in diffusers_sdxl_unet_mapping(ours.config).items()}
    reference.load_state_dict(shared, strict=True, assign=True)
    reference.eval()
    latents, timestep, text, pooled, time_ids = unet_inputs(latent_size)

    def ours_step() -> torch.Tensor:
        ours.set_timestep(timestep)
        ours.set_clip_text_embedding(text)
        ours.set_pooled_text_embedding(pooled)
        ours.set_time_ids(time_ids)
        return ours(latents)

    added = {"text_embeds": pooled, "time_ids": time_ids}
    return ours_step, lambda: reference(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample


def vae_sides(folder: Path, latent_size: int) -> tuple[Forward, Forward]:
    from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]

    from refiners_sd15 import SD1Autoencoder

    latents = torch.randn(1, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    ours = SD1Autoencoder.from_pretrained(folder, dtype=torch.float32).eval()
    reference: Any = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    return lambda: ours.decode(latents), lambda: reference.decode(latents / VAE_SCALING_FACTOR).sample


def time_component(name: str, folder: Path, latent_size: int, rounds: int) -> Timed:
    n = latent_size
    if name == "unet":
        title, inputs, sides = (
            "UNet step",
            f"latents (2, 4, {n}, {n}), text (2, 77, 2048), pooled (2, 1280)",
            unet_sides,
        )
    else:
        title, inputs, sides = "VAE decode", f"latents (1, 4, {n}, {n}) -> image {8 * n}x{8 * n}", vae_sides
    with torch.inference_mode():
        log(f"{name}: loading both sides")
        ours, reference = sides(folder, latent_size)
        log(f"{name}: one untimed call per side, whose outputs are compared")
        expected = reference()
        diff = max_abs_diff(ours(), expected)
        scale = expected.abs().max().item()
        del expected
        if diff > 1e-4 * scale:
            raise RuntimeError(f"{name}: the outputs differ by {diff:.3g} (max |reference| {scale:.3g}): not timed")
        log(f"{name}: timing {rounds} rounds")
        comparison = compare(ours, reference, rounds=rounds, warmup_rounds=0, calls_per_round=1)
    del ours, reference
    gc.collect()
    return Timed(name, title, inputs, comparison, diff, scale)


# Loading, each side in a fresh process


def load_ours(folder: Path, *, mmap: bool) -> tuple[list[torch.nn.Module], Callable[[], Outputs]]:
    from refiners_sdxl import StableDiffusion_XL

    sdxl = StableDiffusion_XL.from_pretrained(folder, dtype=torch.float32, mmap=mmap)

    def outputs() -> Outputs:
        latents, timestep, text, pooled, time_ids = unet_inputs(8)
        token_ids = torch.tensor([PROMPT_IDS])
        sdxl.unet.set_timestep(timestep)
        sdxl.unet.set_clip_text_embedding(text)
        sdxl.unet.set_pooled_text_embedding(pooled)
        sdxl.unet.set_time_ids(time_ids)
        text_l, _ = sdxl.clip_text_encoder.text_encoder_l(token_ids)
        text_g, pooled_g = sdxl.clip_text_encoder.text_encoder_g(token_ids)
        return {
            "unet": sdxl.unet(latents),
            "vae": sdxl.lda.decode(latents[:1]),
            "text_encoder": text_l,
            "text_encoder_2": text_g,
            "text_encoder_2 pooled": pooled_g,
        }

    return [sdxl.unet, sdxl.lda, sdxl.clip_text_encoder], outputs


def load_reference(folder: Path) -> tuple[list[torch.nn.Module], Callable[[], Outputs]]:
    from diffusers import StableDiffusionXLPipeline  # pyright: ignore[reportPrivateImportUsage]

    pipeline: Any = StableDiffusionXLPipeline.from_pretrained(  # pyright: ignore[reportUnknownMemberType]
        folder, torch_dtype=torch.float32, tokenizer=None, tokenizer_2=None, add_watermarker=False
    )

    def outputs() -> Outputs:
        latents, timestep, text, pooled, time_ids = unet_inputs(8)
        token_ids = torch.tensor([PROMPT_IDS])
        added = {"text_embeds": pooled, "time_ids": time_ids}
        encoded_l = pipeline.text_encoder(token_ids, output_hidden_states=True)
        encoded_g = pipeline.text_encoder_2(token_ids, output_hidden_states=True)
        return {
            "unet": pipeline.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample,
            "vae": pipeline.vae.decode(latents[:1] / VAE_SCALING_FACTOR).sample,
            "text_encoder": encoded_l.hidden_states[-2],
            "text_encoder_2": encoded_g.hidden_states[-2],
            "text_encoder_2 pooled": encoded_g.text_embeds,
        }

    return [pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2], outputs


def probe(side: Side, folder: Path, outputs_path: Path | None) -> Probe:
    """Load one side and read every weight once, timing both (meant to run in a fresh process)."""
    if side in OURS:
        import refiners_sdxl  # noqa: F401  # pyright: ignore[reportUnusedImport]
    else:
        import diffusers  # noqa: F401  # pyright: ignore[reportUnusedImport]
        import transformers  # noqa: F401  # pyright: ignore[reportUnusedImport]
    loader = partial(load_ours, mmap=side == "ours-mmap") if side in OURS else load_reference
    return probe_loader(loader, folder, outputs_path)


class Loads(NamedTuple):
    probes: Probes
    differences: Differences


def measure_loads(folder: Path, repeats: int, threads: int) -> Loads:
    command = [sys.executable, __file__, "--folder", str(folder), "--threads", str(threads), "--probe"]
    # 14 GB of files and a 14 GB model do not both fit in memory: bring the files back into the page cache before
    # each load, so that no load reads from the disk what the one before evicted.
    probes, differences = measure_sides(
        repeats,
        lambda side, outputs: run_probe([*command, side], side, outputs),
        before_each=lambda: read_files_once(folder),
    )
    return Loads(probes, differences)


# Report


def timed_section(results: Sequence[Timed]) -> list[str]:
    rows: list[list[str]] = []
    lines: list[str] = []
    for result in results:
        c = result.comparison
        low, high = c.ratio_median_ci
        target = TARGETS[result.name]
        rows.append(
            [
                result.title,
                str(len(c.ours.samples)),
                *timing_cells(c),
                f"<= {target:.2f}x {verdict(low, high, target)}",
            ]
        )
        lines.append(f"- {result.title}: {result.inputs}.")
    headers = ["component", "rounds", "reference min (s)", "ours min (s)", "ratio min", "reference median (s)"]
    headers += ["ours median (s)", "ratio median", "95% CI", "target"]
    accuracy = [
        [r.title, f"{r.max_abs_diff:.2e}", f"{r.max_abs_reference:.3g}", f"{r.max_abs_diff / r.max_abs_reference:.1e}"]
        for r in results
    ]
    return [
        "## Time",
        "",
        "Process CPU time per call, in interleaved rounds of one call per side, after one untimed call per side (the",
        "one whose outputs are compared). With fewer than 11 rounds the 95% CI of the ratio median is the whole range",
        "of the per-round ratios. Ratio = ours / reference, above 1 means ours is slower.",
        "",
        *lines,
        "",
        markdown_table(headers, rows, align="lrrrrrrrrl"),
        "",
        "## Accuracy",
        "",
        markdown_table(["component", "max abs diff", "max abs reference", "relative"], accuracy, "lrrr"),
        "",
    ]


def load_section(loads: Loads) -> list[str]:
    mib = float(2**20)
    probes, time_target, memory_target = loads.probes, TARGETS["load time"], TARGETS["load memory"]
    time_rows = [
        *load_rows(probes, "load (wall, s)", lambda p: p.load_wall, 1.0, None),
        *load_rows(probes, "load (CPU, s)", lambda p: p.load_cpu, 1.0, None),
        *load_rows(probes, "load + read every weight (wall, s)", lambda p: p.read_wall, 1.0, time_target),
        *load_rows(probes, "load + read every weight (CPU, s)", lambda p: p.read_cpu, 1.0, None),
    ]
    memory_rows = [
        *load_rows(probes, "after imports (MiB)", lambda p: p.rss_imported, mib, None),
        *load_rows(probes, "after loading (MiB)", lambda p: p.rss_loaded, mib, None),
        *load_rows(probes, "after reading every weight (MiB)", lambda p: p.rss_read, mib, memory_target),
    ]
    repeats = len(loads.probes["ours"])
    return [
        "## Loading",
        "",
        "`StableDiffusion_XL.from_pretrained(folder, dtype=torch.float32)`, and the same with `mmap=True`, against",
        "diffusers' `StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)` (no tokenizers: the",
        f"folder has none, and ours ship with refiners-sd15), each load in a fresh process, {repeats} repeat(s) per",
        "side, the sides taking turns going first, the files brought into the page cache before each load.",
        "",
        *CONTRACTS,
        "",
        "diffusers and transformers, like ours with `mmap=True`, leave the weights memory-mapped, read from the file",
        "when first used; ours by default reads them into the process's memory during `from_pretrained`. So the time",
        "and peak RSS are also taken after reading every weight once (`tensor.sum()` over every parameter and buffer):",
        "that is when a model can compute without touching the files, and the first denoising step of a lazily mapped",
        "model pays the difference. The targets are judged there.",
        "",
        "### Time",
        "",
        markdown_table(LOAD_HEADERS, time_rows, "llrrrrrrl"),
        "",
        "### Memory",
        "",
        "Peak resident set size (`VmHWM`) of the loading process.",
        "",
        markdown_table(LOAD_HEADERS, memory_rows, "llrrrrrrl"),
        "",
        "### Loaded models' outputs",
        "",
        "After the measurements of the first repeat: UNet on latents (2, 4, 8, 8) at timestep 500, VAE decode of",
        "latents (1, 4, 8, 8), both text encoders (penultimate hidden states, CLIP-G's projected pooled embedding) on",
        "one prompt's token ids.",
        "",
        markdown_table(ACCURACY_HEADERS, accuracy_rows(loads.differences), "llrrr"),
        "",
    ]


def report(timed: Sequence[Timed], loads: Loads | None, latent_size: int, env: dict[str, str]) -> str:
    return "\n".join(
        [
            "# Stable Diffusion XL: `refiners_sdxl` vs diffusers",
            "",
            "The published SDXL base architecture (UNet 2.6 B parameters, VAE, CLIP-L, CLIP-G) with random weights,",
            "written once in the diffusers folder layout and read by both sides; float32, CPU,",
            f"`torch.inference_mode()`. Latent size {latent_size} ({8 * latent_size}x{8 * latent_size} images); the",
            f"UNet step runs batch 2 (classifier-free guidance) at timestep {TIMESTEP}; our side sets the timestep,",
            "the text and pooled embeddings and the time ids inside the timed call, as a denoising loop does at each",
            "step. The two UNets share one copy of the weights (see `bench/README.md`).",
            "",
            *(timed_section(timed) if timed else []),
            *(load_section(loads) if loads else []),
            "## Environment",
            "",
            markdown_table(["", ""], [[key, value] for key, value in env.items()]),
            "",
        ]
    )


def run(args: argparse.Namespace, names: list[str], folder: Path) -> tuple[list[Timed], Loads | None]:
    if not (folder / "model_index.json").is_file():
        from refiners_sdxl.testing import write_published_sdxl_folder

        log(f"writing the published SDXL architecture with random weights into {folder}")
        write_published_sdxl_folder(folder)
    timed = [time_component(name, folder, args.latent_size, args.rounds) for name in names if name != "load"]
    loads = measure_loads(folder, args.repeats, args.threads) if "load" in names else None
    return timed, loads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--components", default=",".join(COMPONENTS), help="comma-separated (default: unet,vae,load)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the UNet and the VAE (default: 3)")
    parser.add_argument("--latent-size", type=int, default=64, help="latent height and width (default: 64)")
    parser.add_argument("--repeats", type=int, default=2, help="loads per side, each in a fresh process (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--folder", type=Path, help="the SDXL folder, written there if absent and kept (default: temp)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/sdxl.md"))
    parser.add_argument("--probe", choices=get_args(Side), help=argparse.SUPPRESS)
    parser.add_argument("--outputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(args.probe, args.folder, args.outputs)))
        return 0
    names = [name.strip() for name in args.components.split(",") if name.strip()]
    if not names or set(names) - set(COMPONENTS):
        parser.error(f"--components takes a comma-separated subset of {', '.join(COMPONENTS)}, got {args.components!r}")
    if args.latent_size < 8 or args.latent_size % 8:
        parser.error(f"--latent-size must be a multiple of 8, got {args.latent_size}")
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats must be at least 1, got {args.rounds} and {args.repeats}")
    env = {**environment(), **versions()}
    if args.folder is not None:
        timed, loads = run(args, names, args.folder)
    else:
        with tempfile.TemporaryDirectory(prefix="sdxl_bench_") as folder:
            timed, loads = run(args, names, Path(folder))
    text = report(timed, loads, args.latent_size, env)
    write_report(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
