"""`refiners generate`: text-to-image, image-to-image and inpainting from the shell, with any installed model kind
that registers what generation needs (`ModelSpec.detect`, `default_size`, `generate`): `sd15` here, `sdxl` with
refiners-sdxl.

    refiners generate "a cute cat" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --negative "blurry" \\
        --steps 30 --solver dpm --seed 2 --size 512x512 --out cat.png

The model kind is told from what `--model` holds (each registered model's `detect`: `model_index.json`, a UNet
config, a single file's keys); `--model-type KIND` forces it, and a model nothing recognizes is read as `sd15`. The
default size is the kind's (512x512 for SD1.5, 1024x1024 for SDXL), or the init image's.

`--init-image` (with `--strength`) starts from an image, `--mask` (white: what to repaint) inpaints it with an
SD1.5 inpainting checkpoint. Plugins add options through the `refiners_register_generate_options` hook (refiners-lora
adds `--lora FILE[:SCALE]`); they are validated right after parsing and applied to the model once it is loaded.

Everything that can be checked without the model is checked before it is loaded (`check_arguments`, with the
checks of `generate_checks`): the prompts, every number (finite, in range), the size (`check_image_size`), the
images' declared sizes, the device, the output path, the model's kind and the plugins' options
(`GenerateOptionSpec.validate`, and that the option applies to that kind).
Latents that become NaN or infinite stop the run, naming the step. The image is written atomically: to a
temporary file in the output's folder, then renamed over `--out`, so an existing file is replaced whole or not at
all.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from refiners_core.plugins import GenerateOptionSpec, ModelSpec, registry
from refiners_core.weights import WeightsError
from refiners_sd15.generate_checks import (
    MAX_GUIDANCE,
    MAX_STEPS,
    TEMPORARY_PREFIX,
    GenerateError,
    check_out,
    check_text,
    dropped_tokens_warning,
    first_step,
    multiple_of_8,
    open_image,
    parse_device,
    parse_integer,
    parse_number,
    parse_size,
)
from refiners_sd15.inpainting import StableDiffusion_1_Inpainting
from refiners_sd15.latent_diffusion import MAX_IMAGE_SIDE, MAX_SEED, check_image_size
from refiners_sd15.solvers import Solver

MODEL_NAME = "sd15"
"""The model kind read when nothing recognizes `--model` (and the only one that inpaints, with `--mask`)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_OPTION_DEST = "generate_option:"


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of `refiners generate`, including those plugins register for the models it can run.

    Numbers are declared as strings and checked by `check_arguments`, so that a bad one is a one-line error.
    """
    parser.add_argument("prompt", help="what to generate")
    parser.add_argument(
        "--model",
        required=True,
        help="a diffusers folder, a Hugging Face hub id, a folder written by save_pretrained or a single-file "
        "checkpoint (.safetensors/.ckpt); an inpainting model with --mask",
    )
    parser.add_argument(
        "--model-type",
        default=None,
        metavar="KIND",
        help=f"the model's kind, one of {', '.join(sorted(_kinds()))} (default: told from what --model holds)",
    )
    parser.add_argument("--negative", default="", help="negative prompt (default: none)")
    parser.add_argument("--steps", default="30", metavar="N", help=f"denoising steps, 1 to {MAX_STEPS} (default: 30)")
    solvers = sorted(registry().solvers)
    parser.add_argument(
        "--solver", default="dpm", choices=solvers, help="diffusion solver, from the plugin registry (default: dpm)"
    )
    parser.add_argument(
        "--guidance",
        default="7.5",
        metavar="SCALE",
        help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g} (default: 7.5)",
    )
    parser.add_argument("--seed", default=None, help="random seed, 0 to 2**64-1 (default: drawn, and printed)")
    sizes = ", ".join(f"{width}x{height} for {name}" for name, (width, height) in _default_sizes())
    parser.add_argument(
        "--size",
        default=None,
        metavar="WIDTHxHEIGHT",
        help=f"image size, multiples of 8, each side at most {MAX_IMAGE_SIDE} and at most 4096x4096 pixels in all "
        f"(default: the model's, {sizes}; or the init image's size)",
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
        default=None,
        help="how much of the init image to repaint, in (0, 1] (default: 0.8 for image-to-image, 1 to inpaint)",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="mask of the init image to repaint (white, or what is painted on a transparent layer), with an "
        "inpainting model",
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
    """Generate and write the image; returns 0.

    Input problems raise `GenerateError` before the model is loaded (the `refiners` CLI prints it as one line,
    `refiners generate: error: ...`, and exits with code 2; `refiners --verbose` shows the traceback).
    """
    start = time.perf_counter()
    checked = check_arguments(args)
    model = _load(
        checked.kind, args.model, inpainting=checked.mask is not None, device=checked.device, dtype=checked.dtype
    )
    _apply_plugin_options(model, args)
    model.show_progress = not args.no_progress
    image = _denoise(model, checked, args)
    _write_atomically(image, args.out, checked.image_format)
    print(
        f"wrote {_printable(str(args.out))} ({checked.width}x{checked.height}, {len(checked.solver.inference_steps)} "
        f"{args.solver} steps, seed {checked.seed}, {checked.kind} model) in {time.perf_counter() - start:.1f} s"
    )
    return 0


@dataclass(frozen=True)
class GenerateSettings:
    """What `check_arguments` derived from the arguments, before anything is loaded."""

    kind: str
    init_image: Image.Image | None
    mask: Image.Image | None
    width: int
    height: int
    solver: Solver
    guidance: float
    device: torch.device
    dtype: torch.dtype
    seed: int
    image_format: str


def check_arguments(args: argparse.Namespace) -> GenerateSettings:
    """Check every argument of `refiners generate` that can be checked without the model, tell the model's kind
    (`model_kind`), and check the plugins' options (their `validate`, and that each applies to that kind); print a
    warning for prompts longer than the text encoder reads. Raises GenerateError naming the argument at fault. Loads
    nothing but the init image and mask, after their declared sizes are checked.
    """
    for option, text in (("the prompt", args.prompt), ("--negative", args.negative)):
        check_text(option, text)
    inpainting = args.mask is not None
    if inpainting and args.init_image is None:
        raise GenerateError("--mask needs --init-image: the image to inpaint")
    if args.strength is not None and args.init_image is None:
        raise GenerateError("--strength needs --init-image")
    steps = parse_integer("--steps", args.steps, 1, MAX_STEPS)
    guidance = parse_number("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    seed = None if args.seed is None else parse_integer("--seed", args.seed, 0, MAX_SEED, bounds="from 0 to 2**64-1")
    size = None if args.size is None else parse_size(args.size)
    strength = 1.0 if inpainting or args.init_image is None else 0.8
    if args.strength is not None:
        strength = parse_number("--strength", args.strength, 0.0, 1.0, low_open=True)
    image_format = check_out(args.out)
    device = parse_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    solver = _solver(args.solver, steps, first_step(steps, strength))
    kind = model_kind(args.model, args.model_type)
    _check_options_apply_to(kind, args)
    if args.mask is not None and kind != MODEL_NAME:
        raise GenerateError(f"--mask: inpainting is not supported with an {kind} model yet (only with {MODEL_NAME})")
    _validate_plugin_options(args)
    init_image = open_image(args.init_image, "--init-image") if args.init_image is not None else None
    mask = open_image(args.mask, "--mask") if args.mask is not None else None
    if size is None and init_image is not None:
        size = multiple_of_8(init_image.size)
        try:
            check_image_size(*size, "the size (the init image's, rounded to 8)")
        except ValueError as error:
            raise GenerateError(f"{error}: pass a smaller --size") from None
    for option, text in (("the prompt", args.prompt), ("--negative", args.negative)):
        warning = dropped_tokens_warning(option, text)
        if warning is not None:
            print(f"refiners generate: warning: {warning}", file=sys.stderr)
    _check_model(args.model)  # last: an error about the model means every other argument is fine
    width, height = size or _kinds()[kind].default_size or (512, 512)
    seed = seed if seed is not None else random.randrange(2**32)
    return GenerateSettings(kind, init_image, mask, width, height, solver, guidance, device, dtype, seed, image_format)


def model_kind(model: str, model_type: str | None) -> str:
    """The registered model kind `refiners generate` runs `model` as: the first whose `detect` recognizes what it
    holds, else `MODEL_NAME`; `model_type` (`--model-type`) forces it. Raises GenerateError for a `model_type` that no
    installed plugin registers for generation (listing those that are), or one that `model` does not hold (naming
    what it holds and what shows it)."""
    kinds = _kinds()
    if model_type is not None and model_type not in kinds:
        raise GenerateError(
            f"--model-type {model_type!r} is not an installed model kind: use one of {', '.join(sorted(kinds))}"
        )
    found = next(((name, why) for name, spec in kinds.items() if (why := _detect(spec, model)) is not None), None)
    if model_type is None:
        return found[0] if found is not None else MODEL_NAME
    if found is not None and found[0] != model_type:
        raise GenerateError(
            f"--model-type {model_type}: --model {model} holds an {found[0]} model, not an {model_type} one "
            f"({found[1]})"
        )
    return model_type


def _kinds() -> dict[str, ModelSpec]:
    """The registered models `refiners generate` can run (those with a `generate`), by name."""
    return {name: spec for name, spec in registry().models.items() if spec.generate is not None}


def _default_sizes() -> list[tuple[str, tuple[int, int]]]:
    """Each kind's default (width, height), by name."""
    return [(name, spec.default_size) for name, spec in sorted(_kinds().items()) if spec.default_size is not None]


def _detect(spec: ModelSpec, model: str) -> str | None:
    if spec.detect is None:
        return None
    try:
        return spec.detect(model)
    except Exception:  # noqa: BLE001 - a plugin's detect that breaks its contract only fails to recognize
        return None


def _denoise(model: Any, checked: GenerateSettings, args: argparse.Namespace) -> Image.Image:
    """Run the kind's `generate`; raise GenerateError, writing nothing, if the latents stop being finite."""

    def after_step(step: int, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise GenerateError(
                f"the latents have NaN or infinite values after step {step}: with these options the model "
                f"overflows {checked.dtype} (lower --guidance or the plugins' scales, or use --dtype float32); "
                "nothing was written"
            )

    solver = checked.solver
    extra: dict[str, Any] = {"mask": checked.mask} if checked.mask is not None else {}
    generate = _kinds()[checked.kind].generate
    assert generate is not None
    try:
        with torch.no_grad():
            return generate(
                model,
                prompt=args.prompt,
                negative_prompt=args.negative,
                make_solver=functools.partial(
                    _solver, args.solver, solver.num_inference_steps, solver.first_inference_step
                ),
                size=(checked.width, checked.height),
                guidance=checked.guidance,
                seed=checked.seed,
                init_image=checked.init_image,
                after_step=after_step,
                **extra,
            )
    except ValueError as error:
        raise GenerateError(f"{error}: nothing was written (try --dtype float32)") from error


def _printable(text: str) -> str:
    """`text` with what stdout cannot encode (lone surrogates of a non-UTF-8 path) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _write_atomically(image: Image.Image, out: Path, image_format: str) -> None:
    """Write `image` to a temporary file beside `out`, then rename it over `out`: all or nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=out.parent, prefix=TEMPORARY_PREFIX, suffix=".tmp")
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


def _plugin_options() -> list[GenerateOptionSpec]:
    """The plugins' options for any model this command runs."""
    kinds = _kinds()
    return [spec for spec in registry().generate_options.values() if any(spec.applies_to(kind) for kind in kinds)]


def _check_options_apply_to(kind: str, args: argparse.Namespace) -> None:
    for spec in _plugin_options():
        if getattr(args, _OPTION_DEST + spec.flag, None) and not spec.applies_to(kind):
            supported = ", ".join(spec.models or ())
            raise GenerateError(f"{spec.flag} is not supported with an {kind} model yet (only with {supported})")


def _validate_plugin_options(args: argparse.Namespace) -> None:
    for spec in _plugin_options():
        values: list[str] | None = getattr(args, _OPTION_DEST + spec.flag, None)
        if values and spec.validate is not None:
            _run_plugin(spec, values, spec.validate, values)


def _apply_plugin_options(sd: Any, args: argparse.Namespace) -> None:
    for spec in _plugin_options():
        values: list[str] | None = getattr(args, _OPTION_DEST + spec.flag, None)
        if values:
            _run_plugin(spec, values, spec.apply, sd, values)


def _run_plugin(spec: GenerateOptionSpec, values: list[str], function: Any, *arguments: Any) -> None:
    """Call a plugin's `validate` or `apply`: whatever it raises, `SystemExit` included, is a GenerateError naming
    the option (a plugin cannot end the command, with exit code 0 and no image); Ctrl-C stays an interrupt."""
    try:
        function(*arguments)
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        if isinstance(error, Exception) and str(error):
            message = " ".join(str(error).split())
        else:
            arguments_shown = ", ".join(repr(argument) for argument in error.args)
            message = f"the plugin's code raised {type(error).__name__}({arguments_shown:.100})"
        if not message.startswith(spec.flag):
            message = f"{spec.flag} {' '.join(values)}: {message}"
        raise GenerateError(message) from error


def _check_model(model: str) -> None:
    if not Path(model).expanduser().exists() and not _HUB_ID.match(model):
        raise GenerateError(f"--model {model}: no such file or folder")


def _load(kind: str, model: str, *, inpainting: bool, device: torch.device, dtype: torch.dtype) -> Any:
    loader = StableDiffusion_1_Inpainting.from_pretrained if inpainting else _kinds()[kind].loader
    local = Path(model).expanduser()
    try:
        return loader(model, device=device, dtype=dtype)
    except (OSError, ValueError, WeightsError) as error:
        where = "" if local.exists() else " (not a local file or folder, so read as a Hugging Face hub id)"
        raise GenerateError(f"--model {model}{where}: {error}") from error


def _solver(name: str, steps: int, first_step: int, **settings: Any) -> Solver:
    """The registered solver `name`; `settings` are a model's own (e.g. SDXL's timestep spacing)."""
    try:
        solver = (
            registry().solvers[name].factory(num_inference_steps=steps, first_inference_step=first_step, **settings)
        )
    except ValueError as error:
        raise GenerateError(f"--solver {name}: {error}") from error
    if not isinstance(solver, Solver):
        raise GenerateError(f"--solver {name}: the registered factory built a {type(solver).__name__}, not a Solver")
    return solver
