"""The items of a `refiners generate` run that makes many images: `--num-images N` copies of the command line's
prompt, or one per line of `--prompts FILE` (JSON Lines, or plain text with one prompt per line), each made `N`
times.

An item is the command line's arguments with the settings its line gives (`overrides`, by argparse destination), so
that `refiners generate`'s own checks (`cli.check_arguments`) and the plugins' options apply to it unchanged. A JSON
line has `prompt` and may have `id` (the output's name, `<id>.png`), `negative`, `seed`, `size` ("WIDTHxHEIGHT"),
`steps`, `guidance`, `solver`, `init_image`, `strength`, `mask`, `loras` (a list of `{"file": ..., "scale": ...}`
or "FILE[:SCALE]", the values of `--lora`) and the value (a string, or a list of strings) of any plugin option, named
by its flag without the leading dashes, with `_` for `-` (`controlnet` for `--controlnet`). Relative paths are read
from the current folder, as on the command line.

Seeds: image k of item line j (from 0) has the line's `seed` + k, or else `--seed` (default 0) + j * N + k: any image
can be made again alone. Ids: the line's `id`, else the item's index zero-padded to 5 digits; `-k` is added when
N > 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refiners_sd15.generate_checks import (
    MAX_GUIDANCE,
    MAX_STEPS,
    GenerateError,
    parse_integer,
    parse_number,
    parse_size,
)
from refiners_sd15.latent_diffusion import MAX_SEED

OPTION_DEST = "generate_option:"
"""The prefix of the argparse destination of a plugin option: `generate_option:--lora`."""
MAX_NUM_IMAGES = 1_000_000
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class Item:
    """One image to make: `id` names its output (`<id>.png`), `where` what it comes from (`FILE:LINE`), `overrides`
    the argparse destinations its line sets (the seed always)."""

    index: int
    id: str
    where: str
    overrides: Mapping[str, Any]


def items_from_command_line(num_images: int, seed: int) -> list[Item]:
    """`num_images` images of the command line's prompt, seeds `seed` to `seed + num_images - 1`."""
    return [Item(k, f"{k:05d}", f"image {k}", {"seed": str((seed + k) % (MAX_SEED + 1))}) for k in range(num_images)]


def read_prompts_file(
    path: Path,
    *,
    num_images: int,
    seed: int,
    solvers: Sequence[str],
    option_flags: Sequence[str],
    solver_name: Callable[[str], str],
) -> list[Item]:
    """The items of `path`, each line made `num_images` times. Raises GenerateError, naming the file, the line and the
    field, for an unreadable file, a line that is not a JSON object or a prompt, an unknown key, a value of the wrong
    type or out of range, a solver not in `solvers`, or an id given twice; blank lines are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise GenerateError(f"--prompts {path}: cannot read it: {error}") from None
    options = {flag.lstrip("-").replace("-", "_"): flag for flag in option_flags}
    items: list[Item] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = _fields(where, line)
        overrides = _overrides(where, fields, solvers, options, solver_name)
        line_index = len(items) // num_images
        given_id = fields.get("id")
        for k in range(num_images):
            base = f"{line_index:05d}" if given_id is None else str(given_id)
            item_id = base if num_images == 1 else f"{base}-{k}"
            if item_id in first_line_of:
                raise GenerateError(f"{where}: 'id': {item_id!r} is already the id of line {first_line_of[item_id]}")
            first_line_of[item_id] = number
            if "seed" in fields:
                item_seed = int(fields["seed"]) + k
            else:
                item_seed = seed + line_index * num_images + k
            seeded = {**overrides, "seed": str(item_seed % (MAX_SEED + 1))}
            items.append(Item(len(items), item_id, where, seeded))
    if not items:
        raise GenerateError(f"--prompts {path}: no prompt in it")
    return items


def _fields(where: str, line: str) -> dict[str, Any]:
    """A line as JSON fields: a JSON object, or the line itself as the prompt."""
    if not line.lstrip().startswith("{"):
        return {"prompt": line.strip()}
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as error:
        raise GenerateError(f"{where}: not valid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(fields, dict):
        raise GenerateError(f"{where}: a JSON line must be an object")
    return fields  # pyright: ignore[reportUnknownVariableType]


def _overrides(
    where: str,
    fields: Mapping[str, Any],
    solvers: Sequence[str],
    options: Mapping[str, str],
    solver_name: Callable[[str], str],
) -> dict[str, Any]:
    """The argparse destinations a line's fields set, each checked."""
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerateError(f"{where}: 'prompt': a non-empty string is required")
    overrides: dict[str, Any] = {"prompt": prompt}
    for key, value in fields.items():
        field = f"{where}: {key!r}"
        if key == "prompt":
            continue
        if key == "id":
            if not isinstance(value, str) or not _ID.fullmatch(value):
                raise GenerateError(
                    f"{field}: an id is a file name of letters, digits, '.', '_' and '-', got {value!r}"
                )
        elif key == "negative":
            overrides["negative"] = _string(field, value)
        elif key == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
                raise GenerateError(f"{field}: an integer from 0 to 2**64-1 is required, got {value!r}")
        elif key == "size":
            overrides["size"] = _checked(field, _string(field, value), parse_size)
        elif key == "steps":
            overrides["steps"] = _checked(
                field, _number_text(field, value), lambda t: parse_integer("steps", t, 1, MAX_STEPS)
            )
        elif key == "guidance":
            text = _number_text(field, value)
            overrides["guidance"] = _checked(field, text, lambda t: parse_number("guidance", t, 0.0, MAX_GUIDANCE))
        elif key == "strength":
            text = _number_text(field, value)
            overrides["strength"] = _checked(
                field, text, lambda t: parse_number("strength", t, 0.0, 1.0, low_open=True)
            )
        elif key == "solver":
            name = solver_name(_string(field, value))
            if name not in solvers:
                raise GenerateError(f"{field}: {value!r} is not a solver: use one of {', '.join(solvers)}")
            overrides["solver"] = name
        elif key in ("init_image", "mask"):
            overrides[key] = Path(_string(field, value))
        elif key == "loras" and "lora" in options:
            overrides[OPTION_DEST + options["lora"]] = _loras(field, value)
        elif key in options:
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):  # pyright: ignore[reportUnknownVariableType]
                raise GenerateError(f"{field}: a string or a list of strings is required, got {value!r}")
            overrides[OPTION_DEST + options[key]] = list(values)  # pyright: ignore[reportUnknownArgumentType]
        else:
            known = ["prompt", "id", "negative", "seed", "size", "steps", "guidance", "solver", "init_image"]
            known += ["strength", "mask", *(["loras"] if "lora" in options else []), *sorted(options)]
            raise GenerateError(f"{field}: unknown key (known: {', '.join(known)})")
    return overrides


def _string(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise GenerateError(f"{field}: a string is required, got {value!r}")
    return value


def _number_text(field: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise GenerateError(f"{field}: a number is required, got {value!r}")
    return str(value)


def _checked(field: str, text: str, parse: Callable[[str], object]) -> str:
    """`text`, once `parse` accepts it; its GenerateError prefixed with the field."""
    try:
        parse(text)
    except GenerateError as error:
        raise GenerateError(f"{field}: {error}") from None
    return text


def _loras(field: str, value: object) -> list[str]:
    """`loras` as `--lora` values: `FILE` or `FILE:SCALE` strings, or `{"file": ..., "scale": ...}` objects."""
    if not isinstance(value, list):
        raise GenerateError(f"{field}: a list of {{'file': ..., 'scale': ...}} objects is required, got {value!r}")
    values: list[str] = []
    for entry in value:  # pyright: ignore[reportUnknownVariableType]
        if isinstance(entry, str):
            values.append(entry)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or set(entry) - {"file", "scale"}:  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
            raise GenerateError(f"{field}: each LoRA is {{'file': PATH, 'scale': NUMBER}}, got {entry!r}")
        scale = entry.get("scale")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if scale is None:
            values.append(str(entry["file"]))  # pyright: ignore[reportUnknownArgumentType]
        else:
            values.append(f"{entry['file']}:{_number_text(field, scale)}")  # pyright: ignore[reportUnknownArgumentType]
    return values
