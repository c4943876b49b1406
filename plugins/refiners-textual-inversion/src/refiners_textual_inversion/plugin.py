"""refiners-textual-inversion's plugin module (entry point `textual-inversion = refiners_textual_inversion.plugin`).

It registers the `textual-inversion` adapter (new tokens for a CLIP text encoder, CLIP-L or CLIP-G) and the
`--embedding` option of `refiners generate` (SD1.5 and SDXL); nothing is built or read here.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, Reference, hookimpl

EMBEDDING_METAVAR = "FILE[:TOKEN]"
EMBEDDING_HELP = (
    "add a textual inversion embedding (A1111 .pt/.safetensors or diffusers learned_embeds; for SDXL a file with "
    "clip_l and clip_g tensors) to the text encoder(s); TOKEN, written in the prompt, defaults to the name the file "
    "gives; repeatable"
)


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="textual-inversion",
            factory=Reference("refiners_textual_inversion.adapter:TextualInversionAdapter"),
            summary=(
                "Textual inversion: new prompt tokens and their embeddings for a CLIP text encoder, "
                "TextualInversionAdapter(text_encoder).load(A1111 or diffusers embedding file); for SDXL's two "
                "encoders SDXLTextualInversion(double_text_encoder).load(file with clip_l and clip_g)"
            ),
            targets=(Reference("refiners_sd15.clip:CLIPTextEncoderL"),),
        )
    )


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    options = "refiners_textual_inversion.options"
    register(
        GenerateOptionSpec(
            flag="--embedding",
            apply=Reference(f"{options}:apply_embedding_option"),
            help=EMBEDDING_HELP,
            metavar=EMBEDDING_METAVAR,
            models=("sd15", "sdxl"),
            validate=Reference(f"{options}:validate_embedding_option"),
        )
    )
