"""refiners-textual-inversion's plugin module (entry point `textual-inversion = refiners_textual_inversion.plugin`).

It registers the `textual-inversion` adapter (new tokens for a CLIP text encoder, CLIP-L or CLIP-G) and the
`--embedding` option of `refiners generate` (SD1.5 and SDXL); nothing is built or read here.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, hookimpl


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    from refiners_sd15.clip import CLIPTextEncoderL
    from refiners_textual_inversion.adapter import TextualInversionAdapter

    register(
        AdapterSpec(
            name="textual-inversion",
            factory=TextualInversionAdapter,
            summary=(
                "Textual inversion: new prompt tokens and their embeddings for a CLIP text encoder, "
                "TextualInversionAdapter(text_encoder).load(A1111 or diffusers embedding file); for SDXL's two "
                "encoders SDXLTextualInversion(double_text_encoder).load(file with clip_l and clip_g)"
            ),
            targets=(CLIPTextEncoderL,),
        )
    )


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    from refiners_textual_inversion.options import (
        EMBEDDING_HELP,
        EMBEDDING_METAVAR,
        apply_embedding_option,
        validate_embedding_option,
    )

    register(
        GenerateOptionSpec(
            flag="--embedding",
            apply=apply_embedding_option,
            help=EMBEDDING_HELP,
            metavar=EMBEDDING_METAVAR,
            models=("sd15", "sdxl"),
            validate=validate_embedding_option,
        )
    )
