"""The Stable Diffusion 1.5 part of `refiners demo`: the whole pipeline at work offline, on a scaled-down model.

It builds SD1.5 with random weights at a small size (the same blocks with fewer channels and layers, so that it
runs in seconds with nothing to download), generates an image with the DPM solver, injects the `lora` adapter of
the plugin registry (refiners-lora) into every attention projection of the UNet, generates again, ejects it and
checks that the same seed gives the same latents as before, bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch

import refiners_core.fluxion as fl
from refiners_core.plugins import registry
from refiners_sd15.autoencoder import SD15_AUTOENCODER, SD1Autoencoder
from refiners_sd15.clip import CLIPTextEncoderConfig, CLIPTextEncoderL
from refiners_sd15.model import StableDiffusion_1
from refiners_sd15.solvers import DPMSolver
from refiners_sd15.unet import SD15_UNET, SD1UNet

PROMPT = "a cute cat"
SIZE = (128, 128)
STEPS = 5
IMAGE_NAME = "refiners-demo-sd15.png"


def small_stable_diffusion(seed: int) -> StableDiffusion_1:
    """SD1.5's architecture scaled down (widths, depths, heads), with random weights."""
    torch.manual_seed(seed)  # pyright: ignore[reportUnknownMemberType]
    return StableDiffusion_1(
        unet=SD1UNet(
            replace(
                SD15_UNET,
                block_out_channels=(32, 64, 64),
                layers_per_block=1,
                attention_head_dim=4,
                cross_attention_dim=64,
                cross_attention_levels=(True, True, False),
            )
        ),
        lda=SD1Autoencoder(replace(SD15_AUTOENCODER, block_out_channels=(32, 32, 32, 32), layers_per_block=1)),
        clip_text_encoder=CLIPTextEncoderL(
            CLIPTextEncoderConfig(embedding_dim=64, num_layers=2, num_attention_heads=2, feedforward_dim=128)
        ),
        solver=DPMSolver(num_inference_steps=STEPS),
        show_progress=False,
    ).eval()


def run_demo(*, seed: int, lora_rank: int, output_dir: Path, quiet: bool) -> Sequence[tuple[str, bool]]:
    """The `ModelSpec.demo` of `sd15`: returns its checks as `(description, passed)` pairs."""
    start = time.perf_counter()
    sd = small_stable_diffusion(seed)
    parameters = sum(parameter.numel() for parameter in sd.parameters())
    print(
        f"Stable Diffusion 1.5 built at a small size with random weights ({parameters / 1e6:.1f} M parameters; the "
        "published model has 1066 M), so nothing is downloaded and the image is noise, not a picture."
    )
    if not quiet:
        print(sd.unet, "\n")
    embedding = sd.compute_clip_text_embedding(PROMPT)
    print(f"prompt {PROMPT!r} -> CLIP text embedding {tuple(embedding.shape)} (negative first)")

    checks: list[tuple[str, bool]] = []
    base = _generate(sd, embedding, seed)
    checks.append(("the same seed gives the same latents", torch.equal(_generate(sd, embedding, seed), base)))

    adapters = registry().adapters
    final = base
    if "lora" not in adapters:
        print("no `lora` adapter is registered (install refiners-lora): generating without one")
    else:
        lora = adapters["lora"]
        injected = [
            lora.create(target=linear, rank=lora_rank).inject(parent)
            for attention in sd.unet.layers(fl.Attention)
            for linear, parent in attention.walk(fl.Linear)
        ]
        wrapped = {id(parameter) for adapter in injected for parameter in adapter.target.parameters()}
        with torch.no_grad():  # stands for training: the LoRAs' own weights move
            for adapter in injected:
                for parameter in cast(fl.Chain, adapter).parameters():
                    if id(parameter) not in wrapped:
                        torch.nn.init.normal_(parameter, std=0.05)
        print(f"injected {len(injected)} LoRA adapters (rank {lora_rank}) into the UNet's attention projections")
        final = _generate(sd, embedding, seed)
        checks.append(("a trained LoRA changes the generated latents", not torch.equal(final, base)))
        for adapter in reversed(injected):
            adapter.eject()
        restored = torch.equal(_generate(sd, embedding, seed), base)
        checks.append(("after eject, the same seed gives the original latents bit for bit", restored))

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / IMAGE_NAME
    sd.lda.latents_to_image(final).save(path, format="PNG")
    size = f"{SIZE[1]}x{SIZE[0]}"
    elapsed = time.perf_counter() - start
    print(f"wrote {path.resolve()} ({size}, {STEPS} DPM-Solver++ steps, seed {seed}) in {elapsed:.1f} s")
    checks.append((f"a {size} PNG is written", path.is_file()))
    return checks


def _generate(sd: StableDiffusion_1, embedding: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        x = sd.init_latents(size=SIZE, seed=seed)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
    return x
