"""`refiners lora inspect FILE [--model sd15|sdxl|PATH] [--json]`: what a LoRA file holds and whether every key of it
would load onto the model, before anything is loaded (`refiners_lora.inspection`). Exit code 0 when it would, 1 when
a key would not (each listed with the reason), 2 for bad input (a missing file, not safetensors, not a LoRA, an unknown
model), reported by the CLI as one line.

This module imports neither torch nor the models: `refiners_lora.plugin` registers it, and `refiners --help` imports
the plugin only.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from refiners_lora.inspection import LoraReport

PROBLEMS_SHOWN = 20
"""The keys shown per problem in the text output (`--json` lists them all)."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `inspect` subcommand to `refiners lora`'s parser."""
    commands = parser.add_subparsers(title="commands", dest="lora_command", metavar="COMMAND", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="tell what a LoRA file holds and whether it would load, without loading it",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    inspect.add_argument("file", metavar="FILE", help="a LoRA .safetensors file")
    inspect.add_argument(
        "--model",
        metavar="sd15|sdxl|PATH",
        help="the model to check it against: a model kind (published architecture) or a model folder or file "
        "(built from its configs); default: the kind the file's keys show",
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON (see refiners-lora's README)")
    inspect.set_defaults(command_prog=inspect.prog)


def run(args: argparse.Namespace) -> int:
    """Run `refiners lora inspect`: print the report, return 1 when a key would not load, else 0."""
    from refiners_lora.inspection import inspect_lora

    report = inspect_lora(args.file, args.model)
    print(json.dumps(report.to_json(), indent=2) if args.json else render(report))
    return 0 if report.loads else 1


def render(report: LoraReport) -> str:
    """The report as `refiners lora inspect` prints it without `--json`."""
    data = report.to_json()
    model = data["model"]
    where = f" built from {model['source']}" if model["source"] else " (published architecture)"
    guessed = f", guessed from the keys: {model['guessed_from']}" if model["guessed_from"] else ""
    families = ", ".join(f"{family} ({n})" for family, n in data["families"].items()) or "none"
    ranks = ", ".join(f"{entry['rank']} ({entry['modules']})" for entry in data["ranks"]) or "none"
    alphas = ", ".join(f"{_alpha(entry['alpha'])} ({entry['modules']})" for entry in data["alphas"])
    lines = [
        f"{data['file']}: {data['format']} LoRA, {data['modules']} module(s), {data['modules_matched']} fit a layer",
        f"model: {model['kind']} ({model['class']}){where}{guessed}",
        f"families: {families}",
        f"ranks: {ranks}",
        f"alphas: {alphas or 'none'}",
        "components: "
        + (", ".join(f"{c['name']} {c['patched']} of {c['layers']} layers" for c in data["components"]) or "none"),
    ]
    if report.loads:
        lines.append("every key would load")
        return "\n".join(lines)
    keys = sum(len(problem.keys) for problem in report.problems)
    lines.append(f"{keys} key(s) would not load:")
    for problem in report.problems:
        if not problem.keys:
            lines.append(f"  the whole file: {problem.reason}")
            continue
        shown = ", ".join(f"'{key}'" for key in problem.keys[:PROBLEMS_SHOWN])
        more = f" and {len(problem.keys) - PROBLEMS_SHOWN} more" if len(problem.keys) > PROBLEMS_SHOWN else ""
        lines.append(f"  {shown}{more}: {problem.reason}")
    return "\n".join(lines)


def _alpha(alpha: float | None) -> str:
    return "none (alpha = rank)" if alpha is None else f"{alpha:g}"
