"""`refiners train lora CONFIG.toml [--resume]`: LoRA training from the shell (one process, or many with torchrun).

refiners train lora my-lora.toml
refiners train lora my-lora.toml --resume [--fallback]
torchrun --nproc_per_node=2 -m refiners_training lora my-lora.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN_HELP = "Train adapters: `refiners train lora CONFIG.toml [--resume]` (refiners-training)"


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare `refiners train`'s subcommands (one so far: `lora`)."""
    subcommands = parser.add_subparsers(dest="adapter", metavar="ADAPTER", required=True)
    lora = subcommands.add_parser(
        "lora",
        help="fine-tune a LoRA on Stable Diffusion 1.5 or SDXL from a TOML configuration",
        description="Fine-tune a LoRA on Stable Diffusion 1.5 or SDXL as CONFIG describes (see the README of "
        "refiners-training for every key). Under torchrun, every process trains on its share of each batch.",
    )
    lora.set_defaults(command_prog=lora.prog)  # errors read `refiners train lora: error: ...`
    lora.add_argument("config", type=Path, help="the TOML configuration of the run")
    lora.add_argument("--resume", action="store_true", help="go on from the latest checkpoint in training.output_dir")
    lora.add_argument(
        "--fallback",
        action="store_true",
        help="with --resume: if the latest checkpoint is damaged, go on from the newest one that loads "
        "(a warning names each checkpoint skipped, and why)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `refiners train lora`: 0 once trained, 130 when interrupted (with the command that resumes the run).

    Errors (ConfigError, DatasetError, CheckpointError, TrainingError, and those of the model's loading) propagate to
    `refiners`' `main`, which prints them as one line, `refiners train lora: error: ...`, and exits with code 2
    (`refiners --verbose train lora ...` shows the traceback).
    """
    from refiners_training.config import TrainingConfig
    from refiners_training.trainer import train_lora

    config = TrainingConfig.from_toml(args.config)
    try:
        result = train_lora(config, resume=args.resume, fallback=args.fallback)
    except KeyboardInterrupt:
        print(
            f"\nrefiners train lora: interrupted; continue with `refiners train lora {args.config} --resume`",
            file=sys.stderr,
        )
        return 130
    for format, path in result.exports.items():  # noqa: A001
        print(f"{format}: {path}")
    return 0
