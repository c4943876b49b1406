"""`refiners generate`: text-to-image, image-to-image and inpainting with Stable Diffusion 1.5 from the shell.

    refiners generate "a cute cat" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --negative "blurry" \\
        --steps 30 --solver dpm --seed 2 --size 512x512 --out cat.png

`--init-image` (with `--strength`) starts from an image, `--mask` (white: what to repaint) inpaints it with an
inpainting checkpoint. Plugins add options through the `refiners_register_generate_options` hook (refiners-lora
adds `--lora FILE[:SCALE]`); they are validated right after parsing and applied to the model once it is loaded.

Everything that can be checked without the model is checked before it is loaded: the prompts, every number
(finite, in range), the size (`check_image_size`), the images' declared sizes, the device, the output path and
the plugins' options. The image is written atomically: to a temporary file in the output's folder, then renamed
over `--out`, so an existing file is replaced whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from refiners_core.checks import check_finite
from refiners_core.plugins import GenerateOptionSpec, registry
from refiners_core.weights import WeightsError
from refiners_sd15.clip import CLIPTokenizer
from refiners_sd15.inpainting import StableDiffusion_1_Inpainting
from refiners_sd15.model import MAX_IMAGE_SIDE, StableDiffusion_1, check_image_size
from refiners_sd15.solvers import Solver

MODEL_NAME = "sd15"
"""The registered model name whose generate options this command offers."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_OPTION_DEST = "generate_option:"
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""The `--out` extensions and the format each is written in."""
MAX_SEED = 2**64 - 1
MAX_STEPS = 1000
"""The most denoising steps: SD1.5's noise schedule has 1000 timesteps."""
_COUNTED_TOKENS = 1000  # tokens of a prompt counted for the warning about what the text encoder drops


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
        help=f"image size, multiples of 8, each side at most {MAX_IMAGE_SIDE} and at most 4096x4096 pixels in all "
        "(default: 512x512, or the init image's size)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("generated.png"),
        help="output image, .png, .jpg or .webp, written atomically (default: generated.png)",
    )
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


@dataclass(frozen=True)
class _Checked:
    """What `_check` derived from the arguments, before anything is loaded."""

    init_image: Image.Image | None
    mask: Image.Image | None
    width: int
    height: int
    solver: Solver
    device: torch.device
    dtype: torch.dtype
    seed: int
    image_format: str


def _generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    checked = _check(args)
    inpainting = checked.mask is not None
    sd = _load(args.model, inpainting=inpainting, device=checked.device, dtype=checked.dtype)
    _apply_plugin_options(sd, args)
    sd.solver = checked.solver
    sd.show_progress = not args.no_progress
    width, height, init_image = checked.width, checked.height, checked.init_image
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding(args.prompt, negative_text=args.negative)
        if isinstance(sd, StableDiffusion_1_Inpainting):
            assert init_image is not None and checked.mask is not None
            sd.set_inpainting_conditions(init_image.resize((width, height), Image.Resampling.LANCZOS), checked.mask)
        # as diffusers: image-to-image noises the image's latents; inpainting from scratch starts from noise
        start_image = init_image if not inpainting or checked.solver.first_inference_step > 0 else None
        x = sd.init_latents(size=(height, width), init_image=start_image, seed=checked.seed)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=args.guidance)
        image = sd.lda.latents_to_image(x)
    _write_atomically(image, args.out, checked.image_format)
    steps = len(sd.solver.inference_steps)
    print(
        f"wrote {args.out} ({width}x{height}, {steps} {args.solver} steps, seed {checked.seed}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _check(args: argparse.Namespace) -> _Checked:
    """Check every argument that can be checked without the model, and the plugins' options; raise GenerateError."""
    for option, text in (("the prompt", args.prompt), ("--negative", args.negative)):
        _check_text(option, text)
    inpainting = args.mask is not None
    if inpainting and args.init_image is None:
        raise GenerateError("--mask needs --init-image: the image to inpaint")
    if args.strength is not None and args.init_image is None:
        raise GenerateError("--strength needs --init-image")
    try:
        check_finite("--guidance", args.guidance)
    except ValueError as error:
        raise GenerateError(str(error)) from None
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise GenerateError(f"--seed must be from 0 to 2**64-1 ({MAX_SEED}), got {args.seed}")
    image_format = _check_out(args.out)
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    strength = args.strength if args.strength is not None else (1.0 if inpainting or args.init_image is None else 0.8)
    first_step = _first_step(args.steps, strength)
    solver = _solver(args.solver, args.steps, first_step)
    _validate_plugin_options(args)
    init_image = _open_image(args.init_image, "--init-image") if args.init_image is not None else None
    mask = _open_image(args.mask, "--mask") if args.mask is not None else None
    width, height = args.size or (_multiple_of_8(init_image.size) if init_image is not None else (512, 512))
    try:
        check_image_size(width, height, "--size" if args.size else "the size (the init image's, rounded to 8)")
    except ValueError as error:
        hint = "" if args.size else ": pass a smaller --size"
        raise GenerateError(f"{error}{hint}") from None
    for option, text in (("the prompt", args.prompt), ("--negative", args.negative)):
        _warn_if_truncated(option, text)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    return _Checked(init_image, mask, width, height, solver, device, dtype, seed, image_format)


def _check_text(option: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        raise GenerateError(
            f"{option} is not valid text: character {error.start} is U+{ord(bad):04X}, a lone surrogate (text that "
            "was not UTF-8: check the shell's locale)"
        ) from None


def _warn_if_truncated(option: str, text: str) -> None:
    tokenizer = _tokenizer()
    window = tokenizer.sequence_length - 2
    count = tokenizer.count_tokens(text, limit=_COUNTED_TOKENS)
    if count > window:
        counted = f"more than {count - window}" if count >= _COUNTED_TOKENS else str(count - window)
        print(
            f"refiners generate: warning: {option} has {'more than ' if count >= _COUNTED_TOKENS else ''}{count} "
            f"tokens and the text encoder reads {window}: the last {counted} are dropped",
            file=sys.stderr,
        )


_TOKENIZERS: list[CLIPTokenizer] = []


def _tokenizer() -> CLIPTokenizer:
    if not _TOKENIZERS:
        _TOKENIZERS.append(CLIPTokenizer())
    return _TOKENIZERS[0]


def _check_out(out: Path) -> str:
    """The format `out` is written in; GenerateError unless its extension is known and its folder writable."""
    image_format = IMAGE_FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise GenerateError(
            f"--out {out}: unknown image extension {out.suffix or '(none)'!r}: use {', '.join(IMAGE_FORMATS)}"
        )
    if out.is_dir():
        raise GenerateError(f"--out {out} is a folder: name the image file to write")
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise GenerateError(f"--out {out}: {folder} is a file, so it cannot hold the image's folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GenerateError(f"--out {out}: the folder {folder} is not writable")
    return image_format


def _write_atomically(image: Image.Image, out: Path, image_format: str) -> None:
    """Write `image` to a temporary file beside `out`, then rename it over `out`: all or nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            image.save(file, format=image_format)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise GenerateError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerateError(f"--device {name}: CUDA is not available here (torch {torch.__version__}): use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GenerateError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise GenerateError(f"--device {name}: MPS is not available here: use cpu")
        return device
    raise GenerateError(f"--device {name}: generation runs on cpu, cuda or mps, not {device.type}")


def _plugin_options() -> list[GenerateOptionSpec]:
    return [spec for spec in registry().generate_options.values() if spec.applies_to(MODEL_NAME)]


def _validate_plugin_options(args: argparse.Namespace) -> None:
    for spec in _plugin_options():
        values: list[str] | None = getattr(args, _OPTION_DEST + spec.flag, None)
        if values and spec.validate is not None:
            _run_plugin(spec, values, spec.validate, values)


def _apply_plugin_options(sd: StableDiffusion_1, args: argparse.Namespace) -> None:
    for spec in _plugin_options():
        values: list[str] | None = getattr(args, _OPTION_DEST + spec.flag, None)
        if values:
            _run_plugin(spec, values, spec.apply, sd, values)


def _run_plugin(spec: GenerateOptionSpec, values: list[str], function: Any, *arguments: Any) -> None:
    try:
        function(*arguments)
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
    if not 1 <= steps <= MAX_STEPS:
        raise GenerateError(f"--steps must be from 1 to {MAX_STEPS} (the noise schedule's timesteps), got {steps}")
    if not 0 < strength <= 1:
        raise GenerateError(f"--strength must be in (0, 1], got {strength}")
    repainted = min(int(steps * strength), steps)
    if repainted < 1:
        raise GenerateError(f"--strength {strength} with --steps {steps} leaves no step to run: raise either")
    return steps - repainted


def _open_image(path: Path, option: str) -> Image.Image:
    """The image at `path`, its declared size checked (each side at most `MAX_IMAGE_SIDE`) before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
                raise GenerateError(
                    f"{option} {path} is {width}x{height}: each side must be at most {MAX_IMAGE_SIDE} pixels"
                )
            image.load()
            return image
    except FileNotFoundError:
        raise GenerateError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise GenerateError(f"{option} {path} is a folder, not an image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
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
