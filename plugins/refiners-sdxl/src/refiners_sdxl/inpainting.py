"""`StableDiffusion_XL_Inpainting`: SDXL's inpainting model (the SDXL UNet with 9 input channels)."""

from __future__ import annotations

from typing import ClassVar

import torch
from PIL import Image

from refiners_sd15 import compute_inpainting_conditions, concatenate_inpainting_conditions
from refiners_sd15.unet import UNetConfig
from refiners_sdxl.config import SDXL_INPAINTING_UNET
from refiners_sdxl.folder import BASE_PIPELINE, INPAINT_PIPELINE
from refiners_sdxl.model import StableDiffusion_XL


class StableDiffusion_XL_Inpainting(StableDiffusion_XL):
    """SDXL inpainting: the UNet also gets the mask and the latents of the masked target image, as refiners-sd15's
    `StableDiffusion_1_Inpainting` and diffusers' `StableDiffusionXLInpaintPipeline` (at strength 1).

        sdxl = StableDiffusion_XL_Inpainting.from_pretrained("diffusers/stable-diffusion-xl-1.0-inpainting-0.1")
        sdxl.set_inpainting_conditions(target_image, mask)  # white in the mask: what to repaint
        x = sdxl.init_latents(size=(target_image.height, target_image.width), seed=2)
        for step in sdxl.steps:
            x = sdxl(x, step=step, clip_text_embedding=..., pooled_text_embedding=..., time_ids=...)

    The UNet's input is the (scaled) latents, the mask at latent resolution (nearest) and the latents of the target
    image with the masked area set to 0 (mid grey), concatenated on channels. `from_pretrained` reads a
    `StableDiffusionXLInpaintPipeline` folder (or a `StableDiffusionXLPipeline` one with a 9-channel UNet). Raises
    ValueError if the UNet does not take 9 channels.
    """

    pipelines: ClassVar[tuple[str, ...]] = (INPAINT_PIPELINE, BASE_PIPELINE)
    unet_in_channels: ClassVar[int] = SDXL_INPAINTING_UNET.in_channels
    default_unet: ClassVar[UNetConfig] = SDXL_INPAINTING_UNET
    mask_latents: torch.Tensor | None = None
    """The mask at latent resolution `(1, 1, h, w)` that `set_inpainting_conditions` sets."""
    target_image_latents: torch.Tensor | None = None
    """The latents of the masked target image that `set_inpainting_conditions` sets."""

    @torch.no_grad()
    def set_inpainting_conditions(
        self, target_image: Image.Image, mask: Image.Image
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set what to inpaint: `mask` (white, or any value >= 50 %, marks the area to repaint) over `target_image`
        (see refiners-sd15's `compute_inpainting_conditions`). Returns the mask at latent resolution `(1, 1, h, w)`
        and the masked image's latents."""
        self.mask_latents, self.target_image_latents = compute_inpainting_conditions(
            self.lda, target_image, mask, device=self.unet.device, dtype=self.unet.dtype
        )
        return self.mask_latents, self.target_image_latents

    def unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """`[latents, mask, masked image latents]` on channels. Raises ValueError before `set_inpainting_conditions`."""
        return concatenate_inpainting_conditions(latents, self.mask_latents, self.target_image_latents)
