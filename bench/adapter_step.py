"""The SD1.5 UNet step that the adapter benchmarks (`lora.py`, `lycoris.py`, `ip_adapter.py`, `t2i_adapter.py`) time
with and without an adapter: ours (`SD1UNet`) and diffusers' `UNet2DConditionModel`, loaded from the same diffusers
folder of the published SD1.5 UNet with random weights (`sd15_components.save_unet`), and the inputs of one step.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sd15_components import save_unet
from timing import progress

from refiners_sd15 import SD1UNet

TIMESTEP = 500


@dataclass(frozen=True)
class UNetStep:
    """Both UNets, holding the same weights, and the inputs of one step: batch 2, text (2, 77, 768)."""

    ours: SD1UNet
    reference: Any  # diffusers' UNet2DConditionModel
    latents: torch.Tensor
    embedding: torch.Tensor
    timestep: torch.Tensor
    generator: torch.Generator  # seed 0, after drawing the latents and the text: for a benchmark's further inputs
    folder: Path  # the diffusers folder both were loaded from, deleted when the `with` of `sd15_unet_step` ends

    def ours_step(self) -> torch.Tensor:
        """One step of ours, setting the timestep and the text as a denoising loop does at each step."""
        self.ours.set_timestep(self.timestep)
        self.ours.set_clip_text_embedding(self.embedding)
        return self.ours(self.latents)

    def reference_step(self, **kwargs: Any) -> torch.Tensor:
        """One step of diffusers' UNet, with `kwargs` added to its call."""
        return self.reference(self.latents, self.timestep, encoder_hidden_states=self.embedding, **kwargs).sample


@contextmanager
def sd15_unet_step(latent_size: int) -> Iterator[UNetStep]:
    """Write the reference UNet into a temporary folder, load both sides from it and yield them with latents
    (2, 4, `latent_size`, `latent_size`). The folder is deleted when the `with` ends; the step stays usable."""
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=generator)
    embedding = torch.randn(2, 77, 768, generator=generator)
    timestep = torch.tensor([TIMESTEP])
    with tempfile.TemporaryDirectory() as folder:
        progress("writing the reference UNet")
        save_unet(Path(folder))
        progress("loading both sides")
        ours = SD1UNet.from_pretrained(folder).eval()
        reference: Any = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
        yield UNetStep(ours, reference.eval(), latents, embedding, timestep, generator, Path(folder))
