# pyright: reportPrivateImportUsage=false
"""Images per second when generating many: ours (`refiners generate --batch-size`'s `generate_batch_sd15`, one image
with `generate_sd15`) against diffusers' `StableDiffusionPipeline`, at batch 1 and batch 4.

    python bench/generate_many.py [--size 128] [--steps 2] [--images 4] [--threads 1]
        [--output bench/results/generate_many.md]

Full published SD1.5 UNet, VAE and CLIP text encoder with random weights in the diffusers layout (as
`sd15_generate.py`), loaded once by each side. One run makes `--images` images of `--size` pixels with `--steps` DDIM
steps and guidance 7.5, in batches of B: both sides encode the prompts (ours with its text encoder, diffusers' with
transformers' `CLIPTextModel` on our tokenizer's ids: no tokenizer files are downloaded), draw image i's noise from its
own generator seeded `SEED + i`, denoise and decode to PIL images. The clock is the process CPU time (one thread by
default); each side runs once untimed first. The first image of both sides is compared before anything is reported.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sd15_components import reference_pipeline, save_text_encoder, save_unet, save_vae, versions
from timing import bench_parser, environment, environment_table, markdown_table, progress, write_report

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"
GUIDANCE = 7.5
SEED = 2
BATCH_SIZES = (1, 4)

Side = Callable[[int, int], list[Any]]  # (first image, batch size) -> PIL images


def ours_side(folder: Path, args: argparse.Namespace) -> Side:
    from refiners_sd15 import DDIM, StableDiffusion_1
    from refiners_sd15.batch_generation import generate_batch_sd15
    from refiners_sd15.generation import generate_sd15

    sd = StableDiffusion_1.from_pretrained(folder).eval()
    sd.show_progress = False

    def generate(first: int, batch: int) -> list[Any]:
        common: dict[str, Any] = {
            "make_solver": lambda: DDIM(num_inference_steps=args.steps),
            "size": (args.size, args.size),
            "guidance": GUIDANCE,
            "after_step": lambda step, x: None,
        }
        if batch == 1:
            image = generate_sd15(
                sd, prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED + first, init_image=None, **common
            )
            return [image]
        return generate_batch_sd15(
            sd,
            prompts=[PROMPT] * batch,
            negative_prompts=[NEGATIVE] * batch,
            seeds=[SEED + first + i for i in range(batch)],
            init_images=[None] * batch,
            **common,
        )

    return generate


def reference_side(folder: Path, args: argparse.Namespace) -> Side:
    from transformers import CLIPTextModel

    from refiners_sd15.clip import CLIPTokenizer
    from refiners_sd15.testing import diffusers_reference_scheduler

    tokenizer = CLIPTokenizer()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    pipe = reference_pipeline(folder, diffusers_reference_scheduler("ddim"))

    def generate(first: int, batch: int) -> list[Any]:
        ids = tokenizer([NEGATIVE] * batch + [PROMPT] * batch)
        negative, positive = text_encoder(ids).last_hidden_state.chunk(2)
        output: Any = pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(SEED + first + i) for i in range(batch)],
            output_type="pil",
        )
        return output.images

    return generate


def images_per_second(generate: Side, images: int, batch: int) -> float:
    generate(0, batch)  # untimed: first-call allocations
    start = time.process_time()
    for first in range(0, images, batch):
        generate(first, min(batch, images - first))
    return images / (time.process_time() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--size", type=int, default=128, help="image height and width (default: 128)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default: 2)")
    parser.add_argument("--images", type=int, default=4, help="images per measurement (default: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/generate_many.md"))
    args = parser.parse_args(argv)
    if args.size < 64 or args.size % 64 or args.steps < 1 or args.images < max(BATCH_SIZES):
        parser.error(f"--size must be a multiple of 64, --steps at least 1, --images at least {max(BATCH_SIZES)}")
    torch.set_num_threads(args.threads)
    env = {**environment(), **versions()}
    with tempfile.TemporaryDirectory(prefix="generate_many_") as folder, torch.inference_mode():
        progress("writing the references' random weights (unet, vae, text_encoder)")
        for save in (save_unet, save_vae, save_text_encoder):
            save(Path(folder))
            gc.collect()
        sides = {"ours": ours_side(Path(folder), args), "diffusers": reference_side(Path(folder), args)}
        first = {name: np.asarray(side(0, 1)[0], dtype=np.int16) for name, side in sides.items()}
        difference = int(np.abs(first["ours"] - first["diffusers"]).max())
        rates: dict[tuple[str, int], float] = {}
        for batch in BATCH_SIZES:
            for name, side in sides.items():
                progress(f"{name}, batch {batch}")
                rates[name, batch] = images_per_second(side, args.images, batch)
    rows = [
        [f"batch {batch}", f"{rates['diffusers', batch]:.3f}", f"{rates['ours', batch]:.3f}",
         f"**{rates['diffusers', batch] / rates['ours', batch]:.3f}x**"]
        for batch in BATCH_SIZES
    ]  # fmt: skip
    text = "\n\n".join(
        [
            "# Generating many images: images per second, ours vs diffusers' `StableDiffusionPipeline`",
            f"SD1.5 (published sizes, random weights), {args.size}x{args.size}, {args.steps} DDIM steps, "
            f"{args.images} images per measurement, CPU, {args.threads} thread(s), process CPU time.",
            markdown_table(["", "diffusers (images/s)", "ours (images/s)", "ratio median"], rows, "lrrr"),
            "ratio: ours' seconds per image / diffusers' (below 1: ours is faster), from one measurement per cell.",
            f"First image, ours against diffusers: max difference {difference} (8-bit levels).",
            environment_table(env),
        ]
    )
    write_report(text + "\n", args.output)
    return 0 if difference <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
