"""refiners-training's plugin module, registered under the `refiners` entry point group: the `refiners train`
command. Nothing heavy is imported here: torch and the models load when the command runs."""

from __future__ import annotations

from refiners_core.plugins import CommandRegistrar, hookimpl


@hookimpl
def refiners_register_commands(cli: CommandRegistrar) -> None:
    from refiners_training import cli as train

    cli.add_command("train", train.run, help=train.TRAIN_HELP, configure=train.configure)
