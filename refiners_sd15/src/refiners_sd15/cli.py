"""`refiners generate`: text-to-image, image-to-image and inpainting with Stable Diffusion 1.5 from the shell.

    refiners generate "a cute cat" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --negative "blurry" \\
        --steps 30 --solver dpm --seed 2 --size 512x512 --out cat.png

`--init-image` (with `--strength`) starts from an image, `--mask` (white: what to repaint) inpaints it with an
inpainting checkpoint. Plugins add options through the `refiners_register_generate_options` hook (refiners-lora
adds `--lora FILE[:SCALE]`); they are applied to the model once it is loaded.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from refiners_core.plugins import GenerateOptionSpec, registry
from refiners_core.weights import WeightsError
from refiners_sd15.inpainting import StableDiffusion_1_Inpainting
from refiners_sd15.model import StableDiffusion_1
from refiners_sd15.solvers import Solver

MODEL_NAME = "sd15"
"""The registered model name whose generate options this command offers."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_OPTION_DEST = "generate_option:"


class GenerateError(Exception):
    """A problem with the command's input, reported as `refiners generate: error: ...` with exit code 2."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of `refiners generate`, including those plugins register for the `sd15` model."""
    parser.add_argument("prompt", help="what to generate")
    parser.add_argument(
        "--model",
        required=True,
        help="a diffusers folder, a Hugging Face hub id, a folder written by save_pretrained or a single-file "
        "checkpoint (.safetensors/.ckpt); an inpainting model with --mask",
    )
    parser.add_argument("--negative", default="", help="negative prompt (default: none)")
    parser.add_argument("--steps", type=int, default=30, help="number of denoising steps (default: 30)")
    solvers = sorted(registry().solvers)
    parser.add_argument(
        "--solver", default="dpm", choices=solvers, help="diffusion solver, from the plugin registry (default: dpm)"
    )
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: drawn, and printed)")
    parser.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="WIDTHxHEIGHT",
        help="image size, multiples of 8 (default: 512x512, or the init image's size)",
    )
    parser.add_argument("--out", type=Path, default=Path("generated.png"), help="output PNG (default: generated.png)")
    parser.add_argument("--init-image", type=Path, default=None, help="image to start from (image-to-image)")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how much of the init image to repaint, in (0, 1] (default: 0.8 for image-to-image, 1 to inpaint)",
    )
    parser.add_argument(
        "--mask", type=Path, default=None, help="mask of the init image to repaint (white), with an inpainting model"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: float16 on cuda, else float32)"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    plugin_options = parser.add_argument_group("options added by plugins (refiners_register_generate_options)")
    for spec in _plugin_options():
        try:
            plugin_options.add_argument(
                spec.flag,
                action="append",
                dest=_OPTION_DEST + spec.flag,
                metavar=spec.metavar,
                help=spec.help,
            )
        except argparse.ArgumentError:
            print(
                f"refiners generate: warning: the plugin option {spec.flag} clashes with an option of the command; "
                "it is ignored",
                file=sys.stderr,
            )


def run(args: argparse.Namespace) -> int:
    """Generate and write the image. Input problems are reported on stderr with exit code 2, never a traceback."""
    try:
        return _generate(args)
    except GenerateError as error:
        print(f"refiners generate: error: {error}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    inpainting = args.mask is not None
    if inpainting and args.init_image is None:
        raise GenerateError("--mask needs --init-image: the image to inpaint")
    if args.strength is not None and args.init_image is None:
        raise GenerateError("--strength needs --init-image")
    init_image = _open_image(args.init_image, "--init-image") if args.init_image is not None else None
    mask = _open_image(args.mask, "--mask") if args.mask is not None else None
    width, height = args.size or (_multiple_of_8(init_image.size) if init_image is not None else (512, 512))
    strength = args.strength if args.strength is not None else (1.0 if inpainting or init_image is None else 0.8)
    first_step = _first_step(args.steps, strength)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    sd = _load(args.model, inpainting=inpainting, device=device, dtype=dtype)
    _apply_plugin_options(sd, args)
    sd.solver = _solver(args.solver, args.steps, first_step)
    sd.show_progress = not args.no_progress
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding(args.prompt, negative_text=args.negative)
        if isinstance(sd, StableDiffusion_1_Inpainting):
            assert init_image is not None and mask is not None
            sd.set_inpainting_conditions(init_image.resize((width, height), Image.Resampling.LANCZOS), mask)
        # as diffusers: image-to-image noises the image's latents; inpainting from scratch starts from noise
        start_image = init_image if not inpainting or first_step > 0 else None
        x = sd.init_latents(size=(height, width), init_image=start_image, seed=seed)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=args.guidance)
        image = sd.lda.latents_to_image(x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, format="PNG")
    steps = len(sd.solver.inference_steps)
    print(
        f"wrote {args.out} ({width}x{height}, {steps} {args.solver} steps, seed {seed}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _plugin_options() -> list[GenerateOptionSpec]:
    return [spec for spec in registry().generate_options.values() if spec.applies_to(MODEL_NAME)]


def _apply_plugin_options(sd: StableDiffusion_1, args: argparse.Namespace) -> None:
    for spec in _plugin_options():
        values: list[str] | None = getattr(args, _OPTION_DEST + spec.flag, None)
        if not values:
            continue
        try:
            spec.apply(sd, values)
        except Exception as error:  # a plugin's code: whatever it raises is reported the same way
            message = str(error)
            if not message.startswith(spec.flag):
                message = f"{spec.flag} {' '.join(values)}: {message}"
            raise GenerateError(message) from error


def _load(model: str, *, inpainting: bool, device: torch.device, dtype: torch.dtype) -> StableDiffusion_1:
    model_class = StableDiffusion_1_Inpainting if inpainting else StableDiffusion_1
    local = Path(model).expanduser()
    if not local.exists() and not _HUB_ID.match(model):
        raise GenerateError(f"--model {model}: no such file or folder")
    try:
        return model_class.from_pretrained(model, device=device, dtype=dtype)
    except (OSError, ValueError, WeightsError) as error:
        where = "" if local.exists() else " (not a local file or folder, so read as a Hugging Face hub id)"
        raise GenerateError(f"--model {model}{where}: {error}") from error


def _solver(name: str, steps: int, first_step: int) -> Solver:
    try:
        solver = registry().solvers[name].factory(num_inference_steps=steps, first_inference_step=first_step)
    except ValueError as error:
        raise GenerateError(f"--solver {name}: {error}") from error
    if not isinstance(solver, Solver):
        raise GenerateError(f"--solver {name}: the registered factory built a {type(solver).__name__}, not a Solver")
    return solver


def _first_step(steps: int, strength: float) -> int:
    """The first inference step for `strength`, as diffusers' image-to-image pipelines compute it."""
    if steps < 1:
        raise GenerateError(f"--steps must be at least 1, got {steps}")
    if not 0 < strength <= 1:
        raise GenerateError(f"--strength must be in (0, 1], got {strength}")
    repainted = min(int(steps * strength), steps)
    if repainted < 1:
        raise GenerateError(f"--strength {strength} with --steps {steps} leaves no step to run: raise either")
    return steps - repainted


def _open_image(path: Path, option: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise GenerateError(f"{option} {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise GenerateError(f"{option} {path}: cannot read it as an image: {error}") from error


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x512, got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text!r}")
    return width, height


def _multiple_of_8(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if width < 8 or height < 8:
        raise GenerateError(f"the init image is {width}x{height}: it needs at least 8x8 pixels")
    return width // 8 * 8, height // 8 * 8
