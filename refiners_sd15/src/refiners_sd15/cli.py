"""`refiners generate`: text-to-image, image-to-image and inpainting from the shell, with any installed model kind
that registers what generation needs (`ModelSpec.detect`, `default_size`, `generate`): `sd15` here, `sdxl` with
refiners-sdxl.

    refiners generate "a cute cat" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --negative "blurry" \\
        --steps 30 --solver dpm --seed 2 --size 512x512 --out cat.png

The model kind is told from what `--model` holds (each registered model's `detect`: `model_index.json`, a UNet
config, a single file's keys); `--model-type KIND` forces it, and a model nothing recognizes (a hub id not in the
cache, an unknown file) is an error asking for it. The default size and guidance are the kind's (512x512 and 7.5 for
SD1.5, 1024x1024 and 5 for SDXL; the init image's size when there is one).

`--refiner MODEL[:FRACTION]` runs the kind's refiner (`ModelSpec.refiner`: SDXL's) on the last FRACTION of the steps
(default `DEFAULT_REFINER_FRACTION`, 0.2: diffusers' `denoising_end=0.8`), after the base model on the first ones.

`--init-image` (with `--strength`) starts from an image, `--mask` (white: what to repaint) inpaints it with an
SD1.5 inpainting checkpoint. Plugins add options through the `refiners_register_generate_options` hook (refiners-lora
adds `--lora FILE[:SCALE]`); they are validated right after parsing and applied to the model once it is loaded.

Everything that can be checked without the model is checked before it is loaded (`check_arguments`, with the
checks of `generate_checks`): the prompts, every number (finite, in range), the size (`check_image_size`), the
images' declared sizes, the device, the output path, the model's kind and the plugins' options
(`GenerateOptionSpec.validate`, and that the option applies to that kind).
Latents that become NaN or infinite stop the run, naming the step. The image is written atomically: to a
temporary file in the output's folder, then renamed over `--out`, so an existing file is replaced whole or not at
all; a PNG records every setting in its text chunks (`generate_outputs`).

Many images (`--num-images`, `--batch-size`, `--prompts`, `--out-dir`) and `--from-image` are run by
`generate_many`, the command's entry point, with the functions here.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from refiners_core.model_kinds import detect_model
from refiners_core.plugins import GenerateOptionSpec, ModelSpec, registry
from refiners_core.weights import WeightsError
from refiners_sd15.adapter_options import HUB_ID
from refiners_sd15.generate_checks import (
    MAX_GUIDANCE,
    MAX_STEPS,
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
from refiners_sd15.generate_items import OPTION_DEST
from refiners_sd15.generate_outputs import write_atomically
from refiners_sd15.generate_record import settings_of
from refiners_sd15.inpainting import StableDiffusion_1_Inpainting
from refiners_sd15.latent_diffusion import MAX_IMAGE_SIDE, MAX_SEED, check_image_size
from refiners_sd15.solvers import Solver, StochasticSolver, denoising_end_step

MODEL_NAME = "sd15"
"""The only model kind that inpaints, with `--mask`."""
DEFAULT_GUIDANCE = 7.5
"""The guidance scale of a kind that gives no `ModelSpec.default_guidance`."""
DEFAULT_REFINER_FRACTION = 0.2
"""The part of the steps `--refiner MODEL` runs the refiner on: the last 20%, as diffusers' SDXL docs do with
`denoising_end=0.8` / `denoising_start=0.8`."""
DEFAULT_OUT = Path("generated.png")
"""`--out` when not given."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of `refiners generate`, including those plugins register for the models it can run.

    Numbers are declared as strings and checked by `check_arguments`, so that a bad one is a one-line error.
    """
    parser.add_argument("prompt", nargs="?", default=None, help="what to generate (or --prompts FILE)")
    parser.add_argument(
        "--model",
        default=None,
        help="a diffusers folder, a Hugging Face hub id, a folder written by save_pretrained or a single-file "
        "checkpoint (.safetensors/.ckpt); an inpainting model with --mask (required, except with --from-image)",
    )
    parser.add_argument(
        "--model-type",
        default=None,
        metavar="KIND",
        help=f"the model's kind, one of {', '.join(sorted(generate_kinds()))} (default: told from what --model holds)",
    )
    parser.add_argument("--negative", default="", help="negative prompt (default: none)")
    parser.add_argument("--steps", default="30", metavar="N", help=f"denoising steps, 1 to {MAX_STEPS} (default: 30)")
    solvers = sorted(registry().solvers)
    parser.add_argument(
        "--solver",
        default="dpm",
        type=solver_name,
        choices=solvers,
        metavar="NAME",
        help=f"diffusion solver, from the plugin registry: {', '.join(solvers)}; A1111 names too, case and spaces "
        "ignored ('DPM++ 2M Karras', 'Euler a') (default: dpm)",
    )
    guidances = ", ".join(f"{guidance:g} for {name}" for name, guidance in _default_guidances())
    parser.add_argument(
        "--guidance",
        default=None,
        metavar="SCALE",
        help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g} (default: the model's, {guidances})",
    )
    refiners = ", ".join(f"{name} ({spec.refiner})" for name, spec in sorted(generate_kinds().items()) if spec.refiner)
    parser.add_argument(
        "--refiner",
        default=None,
        metavar="MODEL[:FRACTION]",
        help=f"a refiner model (folder or hub id) run after the base model on the last FRACTION of the steps, in "
        f"(0, 1) (default: {DEFAULT_REFINER_FRACTION:g}, as diffusers' denoising_end=0.8); for "
        f"{refiners or 'no installed kind'}",
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
        default=DEFAULT_OUT,
        help="output image, .png, .jpg or .webp, written atomically (default: generated.png)",
    )
    many = parser.add_argument_group("many images (one model load; resumes: complete outputs are skipped)")
    many.add_argument("--num-images", default=None, metavar="N", help="images per prompt, seeds SEED to SEED+N-1")
    many.add_argument("--batch-size", default=None, metavar="B", help="images denoised together (default: 1)")
    many.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help="JSON Lines (prompt, id, negative, seed, size, steps, guidance, solver, loras, init_image, strength, "
        "mask, plugin options) or one prompt per line; what a line leaves out comes from the command line",
    )
    many.add_argument(
        "--out-dir", type=Path, default=None, metavar="DIR", help="where <id>.png are written (default: generated)"
    )
    many.add_argument(
        "--from-image", type=Path, default=None, metavar="PNG", help="make again the image a PNG of ours records"
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
    group = parser.add_argument_group("options added by plugins (refiners_register_generate_options)")
    for spec in plugin_options():
        try:
            group.add_argument(
                spec.flag,
                action="append",
                dest=OPTION_DEST + spec.flag,
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
    extra: dict[str, Any] = {}
    if checked.refiner is not None:  # first: its configs are checked before the base model's weights are read
        refiner = load_refiner(checked.refiner, device=checked.device, dtype=checked.dtype)
        refiner.show_progress = not args.no_progress
        extra = {"refiner": refiner, "refiner_fraction": checked.refiner.fraction}
    model = load_model(
        checked.kind, args.model, inpainting=checked.mask is not None, device=checked.device, dtype=checked.dtype
    )
    apply_plugin_options(model, args)
    model.show_progress = not args.no_progress
    image = generate_image(model, checked, args, **extra)
    settings = settings_of(args, checked, [spec.flag for spec in plugin_options()])
    write_atomically(image, args.out, checked.image_format, settings=settings)
    print(
        f"wrote {_printable(str(args.out))} ({checked.width}x{checked.height}, {_steps_run(checked.solver)} "
        f"{args.solver} steps, seed {checked.seed}, {checked.kind} model{_refined(checked)}) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


@dataclass(frozen=True)
class RefinerSettings:
    """`--refiner MODEL[:FRACTION]`, checked: the refiner's registered kind, where it is, the part of the steps it
    runs and the step where it starts."""

    kind: str
    source: str
    fraction: float
    first_step: int


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
    refiner: RefinerSettings | None = None


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
    guidance = None if args.guidance is None else parse_number("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    refiner = None if args.refiner is None else parse_refiner(args.refiner, DEFAULT_REFINER_FRACTION)
    seed = None if args.seed is None else parse_integer("--seed", args.seed, 0, MAX_SEED, bounds="from 0 to 2**64-1")
    size = None if args.size is None else parse_size(args.size)
    strength = 1.0 if inpainting or args.init_image is None else 0.8
    if args.strength is not None:
        strength = parse_number("--strength", args.strength, 0.0, 1.0, low_open=True)
    image_format = check_out(args.out)
    device = parse_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    kind = model_kind(args.model, args.model_type)
    spec = generate_kinds()[kind]
    solver = make_solver(args.solver, steps, first_inference_step=first_step(steps, strength))
    solver = solver.with_defaults(spec.solver_defaults or {})  # the model's published settings, until it is loaded
    refiner_settings = None if refiner is None else _check_refiner(kind, *refiner, solver)
    check_options_apply_to(kind, args)
    if args.mask is not None and kind != MODEL_NAME:
        raise GenerateError(f"--mask: inpainting is not supported with an {kind} model yet (only with {MODEL_NAME})")
    validate_plugin_options(args)
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
    _check_model("--model", args.model)  # last: an error about the model means every other argument is fine
    if refiner_settings is not None:
        _check_model("--refiner", refiner_settings.source)
    width, height = size or spec.default_size or (512, 512)
    seed = seed if seed is not None else random.randrange(2**32)
    return GenerateSettings(
        kind,
        init_image,
        mask,
        width,
        height,
        solver,
        _guidance(spec) if guidance is None else guidance,
        device,
        dtype,
        seed,
        image_format,
        refiner_settings,
    )


def model_kind(model: str, model_type: str | None) -> str:
    """The registered model kind `refiners generate` runs `model` as: the first whose `detect` recognizes what it
    holds; `model_type` (`--model-type`) forces it. A `model` that is neither a local path nor a hub id is read as
    `MODEL_NAME` (the error about it comes last, after every other argument is checked). Raises GenerateError for a
    `model_type` that no installed plugin registers for generation (listing those that are), one that `model` does
    not hold (naming what it holds and what shows it), a model that `refiners generate` cannot run as `--model` (a
    refiner), or one that nothing recognizes without `model_type` (a hub id not in the cache, an unknown file)."""
    kinds = generate_kinds()
    if model_type is not None and model_type not in kinds:
        raise GenerateError(
            f"--model-type {model_type!r} is not an installed model kind: use one of {', '.join(sorted(kinds))}"
        )
    found = _detected(model)
    if found is not None and found[0] not in kinds:
        users = [name for name, spec in sorted(kinds.items()) if spec.refiner == found[0]]
        how = f"pass it as --refiner with an {' or '.join(users)} model" if users else "refiners generate cannot run it"
        raise GenerateError(f"--model {model} holds an {found[0]} model ({found[1]}): {how}")
    if model_type is None:
        if found is not None:
            return found[0]
        if Path(model).expanduser().exists():
            why = "no installed model kind recognizes what it holds"
        elif HUB_ID.match(model):
            why = "a hub id whose model_index.json is not in the Hugging Face cache"
        else:
            return MODEL_NAME
        raise GenerateError(
            f"--model {model}: cannot tell its model kind ({why}): pass --model-type {'|'.join(sorted(kinds))}"
        )
    if found is not None and found[0] != model_type:
        raise GenerateError(
            f"--model-type {model_type}: --model {model} holds an {found[0]} model, not an {model_type} one "
            f"({found[1]})"
        )
    return model_type


def parse_refiner(text: str, default_fraction: float) -> tuple[str, float]:
    """`--refiner MODEL[:FRACTION]` -> (model, fraction), the fraction `default_fraction` when not given. A colon
    followed by something that is not a number belongs to the model when it is a drive letter (`C:\\models\\x`).
    Raises GenerateError naming the value for an empty model or a fraction that is not a number in (0, 1)."""
    head, colon, tail = text.rpartition(":")
    if not colon or Path(text).expanduser().exists() or (len(head) == 1 and head.isalpha()):
        model, fraction = text, default_fraction
    else:
        model = head
        fraction = parse_number(f"--refiner {text}: the fraction", tail, 0.0, 1.0, low_open=True, high_open=True)
    if not model.strip():
        raise GenerateError(f"--refiner {text!r}: no model before the fraction (expected MODEL or MODEL:FRACTION)")
    return model, fraction


def _check_refiner(kind: str, source: str, fraction: float, solver: Solver) -> RefinerSettings:
    """`--refiner`, checked against the base model's kind, what `source` holds and `solver`'s steps."""
    shown = f"--refiner {source}"
    refiner_kind = generate_kinds()[kind].refiner
    if refiner_kind is None or refiner_kind not in registry().models:
        with_refiner = [name for name, spec in sorted(generate_kinds().items()) if spec.refiner in registry().models]
        raise GenerateError(
            f"--refiner: an {kind} model has no refiner (refiners run after {', '.join(with_refiner) or 'no kind'})"
        )
    found = _detected(source)
    if found is not None and found[0] != refiner_kind:
        raise GenerateError(f"{shown} holds an {found[0]} model, not an {refiner_kind} one ({found[1]})")
    try:
        step = denoising_end_step(solver, 1.0 - fraction)
    except ValueError as error:
        raise GenerateError(
            f"{shown}, the base model denoising the first {1.0 - fraction:g} of the schedule: {error}"
        ) from None
    return RefinerSettings(refiner_kind, source, fraction, step)


def _refined(checked: GenerateSettings) -> str:
    refiner = checked.refiner
    if refiner is None:
        return ""
    steps = checked.solver.num_inference_steps - refiner.first_step
    return f", the last {steps} by the {refiner.kind} model"


def _detected(model: str) -> tuple[str, str] | None:
    """The first registered model (any, `--model` kinds or not) whose `detect` recognizes `model`, and why."""
    return detect_model(model)


def _default_guidances() -> list[tuple[str, float]]:
    """Each kind's default guidance scale, by name."""
    return [(name, _guidance(spec)) for name, spec in sorted(generate_kinds().items())]


def _guidance(spec: ModelSpec) -> float:
    return DEFAULT_GUIDANCE if spec.default_guidance is None else spec.default_guidance


def generate_kinds() -> dict[str, ModelSpec]:
    """The registered models `refiners generate` can run (those with a `generate`), by name."""
    return {name: spec for name, spec in registry().models.items() if spec.generate is not None}


def _default_sizes() -> list[tuple[str, tuple[int, int]]]:
    """Each kind's default (width, height), by name."""
    return [
        (name, spec.default_size) for name, spec in sorted(generate_kinds().items()) if spec.default_size is not None
    ]


def finite_latents_check(dtype: torch.dtype) -> Any:
    """The `after_step(step, latents)` of `ModelSpec.generate`: raise GenerateError, so that nothing is written, when
    the latents stop being finite."""

    def after_step(step: int, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise GenerateError(
                f"the latents have NaN or infinite values after step {step}: with these options the model "
                f"overflows {dtype} (lower --guidance or the plugins' scales, or use --dtype float32); "
                "nothing was written"
            )

    return after_step


def solver_factory(name: str, checked: GenerateSettings) -> Any:
    """The `make_solver` of `ModelSpec.generate`: the solver `name` with `checked`'s steps, first step and seed."""
    solver = checked.solver
    return functools.partial(
        make_solver,
        name,
        solver.num_inference_steps,
        seed=checked.seed,
        first_inference_step=solver.first_inference_step,
    )


def generate_image(model: Any, checked: GenerateSettings, args: argparse.Namespace, **extra: Any) -> Image.Image:
    """Run the kind's `generate` with `args`' prompts and solver; raise GenerateError, writing nothing, if the latents
    stop being finite."""
    if checked.mask is not None:
        extra["mask"] = checked.mask
    generate = generate_kinds()[checked.kind].generate
    assert generate is not None
    try:
        with torch.no_grad():
            return generate(
                model,
                prompt=args.prompt,
                negative_prompt=args.negative,
                make_solver=solver_factory(args.solver, checked),
                size=(checked.width, checked.height),
                guidance=checked.guidance,
                seed=checked.seed,
                init_image=checked.init_image,
                after_step=finite_latents_check(checked.dtype),
                **extra,
            )
    except ValueError as error:
        raise GenerateError(f"{error}: nothing was written (try --dtype float32)") from error


def _printable(text: str) -> str:
    """`text` with what stdout cannot encode (lone surrogates of a non-UTF-8 path) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def plugin_options() -> list[GenerateOptionSpec]:
    """The plugins' options for any model this command runs."""
    kinds = generate_kinds()
    return [spec for spec in registry().generate_options.values() if any(spec.applies_to(kind) for kind in kinds)]


def check_options_apply_to(kind: str, args: argparse.Namespace) -> None:
    """Raise GenerateError for a plugin option given in `args` that does not apply to the model kind `kind`."""
    for spec in plugin_options():
        if getattr(args, OPTION_DEST + spec.flag, None) and not spec.applies_to(kind):
            supported = ", ".join(spec.models or ())
            raise GenerateError(f"{spec.flag} is not supported with an {kind} model yet (only with {supported})")


def validate_plugin_options(args: argparse.Namespace) -> None:
    """Call the `validate` of each plugin option given in `args`; what it raises is a GenerateError naming the flag."""
    for spec in plugin_options():
        values: list[str] | None = getattr(args, OPTION_DEST + spec.flag, None)
        if values and spec.validate is not None:
            _run_plugin(spec, values, spec.validate, values)


def apply_plugin_options(sd: Any, args: argparse.Namespace) -> None:
    """Call the `apply` of each plugin option given in `args` on the loaded model `sd`, in the registry's order."""
    for spec in plugin_options():
        values: list[str] | None = getattr(args, OPTION_DEST + spec.flag, None)
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


def _check_model(option: str, model: str) -> None:
    if not Path(model).expanduser().exists() and not HUB_ID.match(model):
        raise GenerateError(f"{option} {model}: no such file or folder")


def load_model(kind: str, model: str, *, inpainting: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """The `kind` model at `model` (an SD1.5 inpainting one when `inpainting`); GenerateError naming it if it fails."""
    loader = StableDiffusion_1_Inpainting.from_pretrained if inpainting else generate_kinds()[kind].loader
    return _call_loader("--model", loader, model, device=device, dtype=dtype)


def load_refiner(refiner: RefinerSettings, *, device: torch.device, dtype: torch.dtype) -> Any:
    """The `--refiner` model; GenerateError naming it if it fails to load."""
    loader = registry().models[refiner.kind].loader
    return _call_loader("--refiner", loader, refiner.source, device=device, dtype=dtype)


def _call_loader(option: str, loader: Any, model: str, *, device: torch.device, dtype: torch.dtype) -> Any:
    try:
        return loader(model, device=device, dtype=dtype)
    except (OSError, ValueError, WeightsError) as error:
        local = Path(model).expanduser()
        where = "" if local.exists() else " (not a local file or folder, so read as a Hugging Face hub id)"
        raise GenerateError(f"{option} {model}{where}: {error}") from error


def _steps_run(solver: Solver) -> int:
    """The steps a run of `solver` makes (Heun's evaluate the model twice)."""
    return solver.num_inference_steps - solver.first_inference_step


def solver_name(text: str) -> str:
    """The registry name `--solver` reads `text` as: lowercased, its words joined by '-' (A1111's "DPM++ 2M Karras"
    is `dpm++-2m-karras`, an alias of `dpm++2m-karras`)."""
    return "-".join(text.lower().split())


def make_solver(name: str, steps: int, *, seed: int | None = None, **settings: Any) -> Solver:
    """The registered solver `name` with `steps` steps; `settings` are its other keyword arguments (the first step,
    a refiner's). A stochastic solver draws its noise from a generator seeded with `seed + 1` when given (the
    starting noise is drawn with `seed`)."""
    try:
        solver = registry().solvers[name].factory(num_inference_steps=steps, **settings)
    except ValueError as error:
        raise GenerateError(f"--solver {name}: {error}") from error
    if not isinstance(solver, Solver):
        raise GenerateError(f"--solver {name}: the registered factory built a {type(solver).__name__}, not a Solver")
    if seed is not None and isinstance(solver, StochasticSolver):
        solver = solver.with_settings(generator=torch.Generator().manual_seed((seed + 1) % (MAX_SEED + 1)))
    return solver
