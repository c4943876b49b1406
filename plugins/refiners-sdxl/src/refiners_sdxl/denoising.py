"""`SDXLDenoisingModel`: the denoising step the SDXL models share (base, inpainting, refiner), a solver driving the
SDXL UNet with classifier-free guidance on text, pooled text and time ids."""

from __future__ import annotations

import torch

from refiners_sd15.latent_diffusion import LatentDiffusionModel
from refiners_sdxl.unet import SDXLUNet


class SDXLDenoisingModel(LatentDiffusionModel[SDXLUNet]):
    """An SDXL UNet denoising latents step by step with `solver`: `forward` is one step with classifier-free guidance.

    `StableDiffusion_XL` (and its inpainting model) and `StableDiffusion_XL_Refiner` add their text encoders and
    time ids; `unet_input` is where a model adds its own conditions to the latents (the inpainting model's mask).
    """

    def forward(
        self,
        x: torch.Tensor,
        step: int,
        *,
        clip_text_embedding: torch.Tensor,
        pooled_text_embedding: torch.Tensor,
        time_ids: torch.Tensor,
        condition_scale: float = 5.0,
    ) -> torch.Tensor:
        """One denoising step: the solver's next latents after the UNet's noise prediction at `step`.

        Classifier-free guidance: the UNet runs once on the batch `[x, x]` with the embeddings and time ids of
        `compute_clip_text_embedding` and `time_ids` (negative first); the predictions are combined as
        `negative + condition_scale * (positive - negative)`. Raises ValueError when the conditions do not hold a
        negative and a positive row per latent.
        """
        timestep = self.solver.timesteps[step]
        unet_input = self.solver.scale_model_input(x, step)
        predicted_noise = self.compute_noise(
            unet_input, timestep, clip_text_embedding, pooled_text_embedding, time_ids, condition_scale
        )
        return self.solver.step(x, predicted_noise, step)

    def compute_noise(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        clip_text_embedding: torch.Tensor,
        pooled_text_embedding: torch.Tensor,
        time_ids: torch.Tensor,
        condition_scale: float,
    ) -> torch.Tensor:
        """The noise predicted in the (already scaled) latents `x` at `timestep`, with classifier-free guidance."""
        for name, condition in (
            ("clip_text_embedding", clip_text_embedding),
            ("pooled_text_embedding", pooled_text_embedding),
            ("time_ids", time_ids),
        ):
            if condition.shape[0] != 2 * x.shape[0]:
                raise ValueError(
                    f"{name} must hold a negative and a positive row per latent: {2 * x.shape[0]} for "
                    f"{x.shape[0]} latents, got {condition.shape[0]}"
                )
        self.unet.set_timestep(timestep)
        self.unet.set_clip_text_embedding(clip_text_embedding)
        self.unet.set_pooled_text_embedding(pooled_text_embedding)
        self.unet.set_time_ids(time_ids)
        negative, positive = self.unet(self.unet_input(torch.cat([x, x]))).chunk(2)
        return negative + condition_scale * (positive - negative)

    def unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the UNet gets for `latents` (themselves; the inpainting model adds its conditions)."""
        return latents
