"""refiners-lora's plugin module, registered under the `refiners` entry point group.

Nothing is imported here but refiners_core.plugins: the references are imported on first use, so the plugin
registers without torch.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, CommandRegistrar, GenerateOptionSpec, Reference, hookimpl


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="lora",
            factory=Reference("refiners_lora.adapter:LoraAdapter"),
            summary="Low-rank adaptation (LoRA) of Linear and Conv2d layers: LoraAdapter(target, rank, scale)",
            targets=(Reference("refiners_core.fluxion:Linear"), Reference("refiners_core.fluxion:Conv2d")),
        )
    )


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    register(
        GenerateOptionSpec(
            flag="--lora",
            apply=Reference("refiners_lora.options:apply_lora_option"),
            help="load a LoRA file (kohya, diffusers / PEFT or refiners keys) with an optional scale; repeatable",
            metavar="FILE[:SCALE]",
            models=("sd15", "sdxl"),  # the models that name their layers the kohya and diffusers way
            validate=Reference("refiners_lora.options:validate_lora_option"),
        )
    )


@hookimpl
def refiners_register_commands(cli: CommandRegistrar) -> None:
    cli.add_command(
        "lora",
        Reference("refiners_lora.inspect_command:run"),
        help="Inspect LoRA files: format, families, ranks, alphas, and the keys a model would not load",
        configure=Reference("refiners_lora.inspect_command:configure"),
    )
