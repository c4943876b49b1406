"""The settings an output of `refiners generate` records (`settings_of`), and the arguments that make it again
(`overrides_of`, for `--from-image`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refiners_sd15.generate_items import OPTION_DEST
from refiners_sd15.generate_outputs import file_record

if TYPE_CHECKING:
    from refiners_sd15.cli import GenerateSettings


def settings_of(args: argparse.Namespace, checked: GenerateSettings, option_flags: Sequence[str]) -> dict[str, Any]:
    """Every setting an image is made with, as JSON values: the prompts, seed, size, steps, guidance, solver, model
    (its kind and dtype), the strength, init image and mask when given, the refiner, and each plugin option's values,
    with the sha256 of the files they name."""
    settings: dict[str, Any] = {
        "prompt": args.prompt,
        "negative": args.negative,
        "seed": checked.seed,
        "size": f"{checked.width}x{checked.height}",
        "steps": checked.solver.num_inference_steps,
        "guidance": checked.guidance,
        "solver": args.solver,
        "model": args.model,
        "model_type": checked.kind,
        "dtype": str(checked.dtype).removeprefix("torch."),
    }
    if args.init_image is not None:
        settings["init_image"] = file_record(str(args.init_image))
        if args.strength is not None:
            settings["strength"] = float(args.strength)
    if args.mask is not None:
        settings["mask"] = file_record(str(args.mask))
    if args.refiner is not None:
        settings["refiner"] = args.refiner
    options = {
        flag: [file_record(value) for value in values]
        for flag in option_flags
        if (values := getattr(args, OPTION_DEST + flag, None))
    }
    if options:
        settings["options"] = options
    return settings


def overrides_of(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of `refiners generate` (argparse destinations) that make again an image recording `settings`."""
    overrides: dict[str, Any] = {
        "prompt": settings["prompt"],
        "negative": settings["negative"],
        "seed": str(settings["seed"]),
        "size": settings["size"],
        "steps": str(settings["steps"]),
        "guidance": str(settings["guidance"]),
        "solver": settings["solver"],
        "model": settings["model"],
        "model_type": settings["model_type"],
        "dtype": settings["dtype"],
        "strength": None if "strength" not in settings else str(settings["strength"]),
        "init_image": None if "init_image" not in settings else Path(settings["init_image"]["value"]),
        "mask": None if "mask" not in settings else Path(settings["mask"]["value"]),
        "refiner": settings.get("refiner"),
    }
    for flag, records in settings.get("options", {}).items():
        overrides[OPTION_DEST + flag] = [record["value"] for record in records]
    return overrides
