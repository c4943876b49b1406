# pyright: reportPrivateImportUsage=false
"""A whole Stable Diffusion 1.5 generation, ours (`StableDiffusion_1`) against diffusers' `StableDiffusionPipeline`.

    python bench/sd15_generate.py [--size 512] [--steps 3] [--rounds 2] [--solver dpm] [--threads 1]
        [--device cpu|cuda] [--dtype float32|float16] [--output bench/results/sd15_generate.md]

Full published SD1.5 UNet, VAE and CLIP text encoder with random weights, written in the diffusers layout by the
references' `save_pretrained` (see `sd15_components.py`) and loaded by both sides from that folder. One generation
is: starting noise from a seed, `--steps` denoising steps with classifier-free guidance (batch 2) and the solver
(ours) or the diffusers scheduler it reproduces, then decoding to a PIL image. Both sides get the same text
embeddings (`prompt_embeds`/`negative_prompt_embeds` for diffusers), computed once and not timed. Each denoising step
and the decode are timed inside the generation (diffusers through `callback_on_step_end`); generations alternate
between the sides, round after round (which goes first alternates too). The final latents of both sides are
compared before anything is reported.

On the CPU the clock is the process CPU time (one thread by default, see `timing.py`); on CUDA it is wall-clock
time with a synchronisation at each mark, and `--dtype float16` runs both sides in half precision with PyTorch's
scaled dot-product attention (which both use by default).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sd15_components import reference_pipeline, save_text_encoder, save_unet, save_vae, versions
from timing import (
    TIMING_HEADERS,
    Comparison,
    Timing,
    bench_parser,
    environment,
    environment_section,
    markdown_table,
    max_abs_diff,
    progress,
    timing_cells,
    write_report,
)

from refiners_sd15.testing import diffusers_reference_scheduler

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"
GUIDANCE = 7.5
SEED = 2


@dataclass(frozen=True)
class Run:
    """The clock marks of one generation: after each denoising step, then after decoding."""

    steps: tuple[float, ...]  # seconds per step
    decode: float  # seconds, the last step's end to the PIL image

    @property
    def step_mean(self) -> float:
        return sum(self.steps) / len(self.steps)

    @property
    def total(self) -> float:
        return sum(self.steps) + self.decode


class Clock:
    """Marks on the process CPU time (CPU) or on the wall clock after a CUDA synchronisation (GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[float] = []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()

    def start(self) -> None:
        self.marks = [self.now()]

    def mark(self) -> None:
        self.marks.append(self.now())

    def run(self) -> Run:
        intervals = [later - earlier for earlier, later in zip(self.marks, self.marks[1:], strict=False)]
        return Run(steps=tuple(intervals[:-1]), decode=intervals[-1])


def ours_side(folder: Path, args: argparse.Namespace, dtype: torch.dtype) -> tuple[Callable[[Clock], Any], Any]:
    from refiners_core.plugins import registry
    from refiners_sd15 import StableDiffusion_1

    sd = StableDiffusion_1.from_pretrained(folder, device=args.device, dtype=dtype).eval()
    sd.show_progress = False
    embedding = sd.compute_clip_text_embedding(PROMPT, negative_text=NEGATIVE)
    solver_factory = registry().solvers[args.solver].factory
    height = width = args.size

    def generate(clock: Clock) -> torch.Tensor:
        sd.solver = solver_factory(num_inference_steps=args.steps)
        clock.start()
        x = sd.init_latents(size=(height, width), seed=SEED)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=GUIDANCE)
            clock.mark()
        sd.lda.latents_to_image(x)
        clock.mark()
        return x

    return generate, embedding


def reference_side(
    folder: Path, args: argparse.Namespace, dtype: torch.dtype, embedding: torch.Tensor
) -> Callable[[Clock], Any]:
    pipe = reference_pipeline(folder, diffusers_reference_scheduler(args.solver), dtype).to(args.device)
    negative, positive = embedding.chunk(2)

    def generate(clock: Clock) -> torch.Tensor:
        final: list[torch.Tensor] = []

        def on_step_end(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            clock.mark()
            final[:] = [kwargs["latents"]]
            return kwargs

        clock.start()
        pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(SEED),
            output_type="pil",
            callback_on_step_end=on_step_end,  # pyright: ignore[reportArgumentType]
        )
        clock.mark()
        return final[0]

    return generate


def measure(args: argparse.Namespace) -> tuple[list[Run], list[Run], float, float]:
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="sd15_generate_") as folder:
        progress("writing the references' random weights (unet, vae, text_encoder)")
        for save in (save_unet, save_vae, save_text_encoder):
            save(Path(folder))
            gc.collect()
        with torch.inference_mode():
            progress("loading both sides")
            ours, embedding = ours_side(Path(folder), args, dtype)
            reference = reference_side(Path(folder), args, dtype, embedding)
    runs: dict[str, list[Run]] = {"ours": [], "reference": []}
    first_latents: dict[str, torch.Tensor] = {}
    clock = Clock(device)
    with torch.inference_mode():
        for index in range(args.rounds):
            order = [("ours", ours), ("reference", reference)]
            for side, generate in order if index % 2 == 0 else order[::-1]:
                progress(f"round {index + 1}/{args.rounds}: {side}")
                latents = generate(clock)
                runs[side].append(clock.run())
                first_latents.setdefault(side, latents)
    diff = max_abs_diff(first_latents["ours"], first_latents["reference"])
    scale = first_latents["reference"].abs().max().item()
    return runs["ours"], runs["reference"], diff, scale


def report(
    args: argparse.Namespace, ours: list[Run], reference: list[Run], diff: float, scale: float, env: dict[str, str]
) -> str:
    def comparison(value: Callable[[Run], float]) -> Comparison:
        return Comparison(Timing(tuple(map(value, ours))), Timing(tuple(map(value, reference))), 1)

    rows: list[list[str]] = []
    for title, value in [
        ("one denoising step (mean of the run)", lambda run: run.step_mean),
        ("decode to a PIL image", lambda run: run.decode),
        (f"whole generation ({args.steps} steps + decode)", lambda run: run.total),
    ]:
        rows.append([title, *timing_cells(comparison(value))])
    step_rows = [
        [side, str(index + 1), " ".join(f"{seconds:.3f}" for seconds in run.steps), f"{run.decode:.3f}"]
        for side, runs in (("ours", ours), ("reference", reference))
        for index, run in enumerate(runs)
    ]
    clock = "process CPU time" if args.device == "cpu" else "wall-clock time, synchronised"
    relative = diff / scale if scale else float("nan")
    headers = ["", *TIMING_HEADERS]
    return "\n".join(
        [
            "# Stable Diffusion 1.5 generation: `StableDiffusion_1` vs diffusers `StableDiffusionPipeline`",
            "",
            f"{args.size}x{args.size}, {args.steps} `{args.solver}` steps with classifier-free guidance {GUIDANCE}"
            " (batch 2 through the UNet), then decoding;",
            f"{args.dtype} on {args.device}. Published SD1.5 architecture with random weights, written by the"
            " references'",
            "`save_pretrained` and loaded by both sides from that folder. Text embeddings are computed once and given"
            " to both",
            f"sides (not timed). {args.rounds} rounds, generations alternating between the sides; {clock}.",
            "The first round includes each side's warm-up. Ratio = ours / reference, above 1 means ours is slower.",
            "",
            markdown_table(headers, rows, align="lrrrrrrr"),
            "",
            "## Every run",
            "",
            markdown_table(["side", "round", "seconds per step", "decode (s)"], step_rows, align="lrlr"),
            "",
            "## Accuracy",
            "",
            f"Final latents of the first round: max |ours - reference| = {diff:.2e}, max |reference| = {scale:.3g},"
            f" relative {relative:.1e}.",
            "",
            *environment_section(env),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--size", type=int, default=512, help="image height and width (default: 512)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per generation (default: 3)")
    parser.add_argument("--rounds", type=int, default=2, help="generations per side (default: 2)")
    parser.add_argument("--solver", choices=("ddim", "dpm", "euler"), default="dpm", help="(default: dpm)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="(default: float32)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/sd15_generate.md"))
    args = parser.parse_args(argv)
    if args.size < 64 or args.size % 64:
        parser.error(f"--size must be a multiple of 64, got {args.size}")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    if args.dtype == "float16" and args.device == "cpu":
        parser.error("--dtype float16 is for --device cuda")
    torch.set_num_threads(args.threads)
    env = {**environment(), **versions()}
    if args.device != "cpu":
        env["GPU"] = torch.cuda.get_device_name(torch.device(args.device))
    ours, reference, diff, scale = measure(args)
    tolerance = 1e-3 if args.dtype == "float32" else 5e-2
    text = report(args, ours, reference, diff, scale, env)
    write_report(text, args.output)
    if not diff <= tolerance * scale:
        progress(
            f"the final latents differ by {diff:.3g} (> {tolerance} x {scale:.3g}): the timings compare different work"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
