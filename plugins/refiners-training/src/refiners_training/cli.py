"""`refiners train lora CONFIG.toml [--resume]`: LoRA training from the shell (one process, or many with torchrun).

refiners train lora my-lora.toml
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
        help="fine-tune a LoRA on Stable Diffusion 1.5 from a TOML configuration",
        description="Fine-tune a LoRA on Stable Diffusion 1.5 as CONFIG describes (see the README of "
        "refiners-training for every key). Under torchrun, every process trains on its share of each batch.",
    )
    lora.add_argument("config", type=Path, help="the TOML configuration of the run")
    lora.add_argument("--resume", action="store_true", help="go on from the latest checkpoint in training.output_dir")


def run(args: argparse.Namespace) -> int:
    """Run `refiners train lora`: 0 once trained, 2 for a bad configuration or dataset, 130 when interrupted."""
    from refiners_training.checkpoint import CheckpointError
    from refiners_training.config import ConfigError, TrainingConfig
    from refiners_training.dataset import DatasetError
    from refiners_training.trainer import TrainingError, train_lora

    try:
        config = TrainingConfig.from_toml(args.config)
        result = train_lora(config, resume=args.resume)
    except (FileNotFoundError, ConfigError, DatasetError, CheckpointError, TrainingError) as error:
        print(f"refiners train lora: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nrefiners train lora: interrupted; continue with `refiners train lora {args.config} --resume`",
            file=sys.stderr,
        )
        return 130
    for format, path in result.exports.items():  # noqa: A001
        print(f"{format}: {path}")
    return 0
