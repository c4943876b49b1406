"""`StableDiffusion_1_Inpainting`: Stable Diffusion 1.5's inpainting model (a UNet with 9 input channels)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from refiners_core.images import to_mask
from refiners_sd15.autoencoder import SD1Autoencoder
from refiners_sd15.autoencoder.autoencoder import image_to_tensor
from refiners_sd15.clip import CLIPTextEncoderL
from refiners_sd15.latent_diffusion import check_image_size, check_input_image
from refiners_sd15.model import StableDiffusion_1
from refiners_sd15.solvers import Solver
from refiners_sd15.unet import SD15_INPAINTING_UNET, SD1UNet

INPAINTING_CHANNELS = SD15_INPAINTING_UNET.in_channels


class StableDiffusion_1_Inpainting(StableDiffusion_1):
    """Stable Diffusion 1.5 inpainting: the UNet also gets the mask and the latents of the masked target image.

        sd = StableDiffusion_1_Inpainting.from_pretrained("stable-diffusion-v1-5/stable-diffusion-inpainting")
        sd.set_inpainting_conditions(target_image, mask)  # white in the mask: what to repaint
        x = sd.init_latents(size=(target_image.height, target_image.width))
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding)

    As diffusers' `StableDiffusionInpaintPipeline`: the UNet's input is the (scaled) latents, the mask at latent
    resolution (nearest) and the latents of the target image with the masked area set to 0 (mid grey), concatenated
    on channels. Raises ValueError if the UNet does not take 9 channels.
    """

    def __init__(
        self,
        unet: SD1UNet | None = None,
        lda: SD1Autoencoder | None = None,
        clip_text_encoder: CLIPTextEncoderL | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        solver: Solver | None = None,
        solver_defaults: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        if unet is None:
            unet = SD1UNet(SD15_INPAINTING_UNET, device=device, dtype=dtype)
        if unet.config.in_channels != INPAINTING_CHANNELS:
            raise ValueError(
                f"StableDiffusion_1_Inpainting needs a UNet with {INPAINTING_CHANNELS} input channels (latents, mask, "
                f"masked image latents), got {unet.config.in_channels}: load an inpainting checkpoint"
            )
        super().__init__(
            unet,
            lda,
            clip_text_encoder,
            device,
            dtype,
            solver=solver,
            solver_defaults=solver_defaults,
            show_progress=show_progress,
        )
        self.mask_latents: torch.Tensor | None = None
        self.target_image_latents: torch.Tensor | None = None

    @torch.no_grad()
    def set_inpainting_conditions(
        self, target_image: Image.Image, mask: Image.Image
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set what to inpaint: `mask` (white, or any value >= 50 %, marks the area to repaint) over `target_image`
        (see `compute_inpainting_conditions`). Returns the mask at latent resolution `(1, 1, h, w)` and the masked
        image's latents."""
        self.mask_latents, self.target_image_latents = compute_inpainting_conditions(
            self.lda, target_image, mask, device=self.unet.device, dtype=self.unet.dtype
        )
        return self.mask_latents, self.target_image_latents

    def unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """`[latents, mask, masked image latents]` on channels. Raises ValueError before `set_inpainting_conditions`."""
        return concatenate_inpainting_conditions(latents, self.mask_latents, self.target_image_latents)


@torch.no_grad()
def compute_inpainting_conditions(
    lda: SD1Autoencoder,
    target_image: Image.Image,
    mask: Image.Image,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditions of an inpainting UNet (SD1.5's, SDXL's), as diffusers' inpainting pipelines compute them: the
    mask at latent resolution `(1, 1, h, w)` (nearest) and the latents of `target_image` with the masked area set to
    0 (mid grey), on `device` with `dtype`.

    `mask` (white, or any value >= 50 %, marks the area to repaint) and `target_image` are read by meaning
    (`refiners_core.images`): the mask with `to_mask`, so a mask drawn on a transparent layer masks what is painted
    (its alpha channel) and a 16-bit or float mask is scaled, not clipped; the image with `to_rgb`. The mask is
    resized to the image's size and binarized; the image's size must be a multiple of 8 within `check_image_size`'s
    bounds and the mask's sides at most `MAX_IMAGE_SIDE` (ValueError otherwise, TypeError if either is not a PIL
    image).
    """
    check_input_image(target_image, "target image")
    check_input_image(mask, "mask")
    width, height = target_image.size
    check_image_size(width, height, "target image size")
    factor = lda.downscale_factor
    if width % factor or height % factor:
        raise ValueError(
            f"target image size {width}x{height} (width x height) is not a multiple of {factor}: resize or crop it"
        )
    gray = to_mask(mask)
    if gray.size != target_image.size:
        gray = gray.resize((width, height), Image.Resampling.LANCZOS)
    values = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(1, 1, height, width)
    binary_mask = (values.float() / 255 >= 0.5).float()
    masked_image = image_to_tensor(target_image).unsqueeze(0) * (binary_mask < 0.5)
    target_image_latents = lda.encode(masked_image.to(device=lda.device, dtype=lda.dtype)).to(
        device=device, dtype=dtype
    )
    mask_latents = torch.nn.functional.interpolate(binary_mask, size=(height // factor, width // factor)).to(
        device=device, dtype=dtype
    )
    return mask_latents, target_image_latents


def concatenate_inpainting_conditions(
    latents: torch.Tensor, mask_latents: torch.Tensor | None, target_image_latents: torch.Tensor | None
) -> torch.Tensor:
    """`[latents, mask, masked image latents]` on channels, the conditions repeated over the batch: an inpainting
    UNet's input. Raises ValueError when the conditions are not set yet (None) or are for latents of another size."""
    if mask_latents is None or target_image_latents is None:
        raise ValueError("call set_inpainting_conditions(target_image, mask) before denoising")
    if mask_latents.shape[-2:] != latents.shape[-2:]:
        raise ValueError(
            f"the inpainting conditions are for latents of size {tuple(mask_latents.shape[-2:])}, the latents "
            f"have size {tuple(latents.shape[-2:])}: init_latents needs the target image's size"
        )
    batch = latents.shape[0]
    return torch.cat(
        [latents, mask_latents.expand(batch, -1, -1, -1), target_image_latents.expand(batch, -1, -1, -1)], dim=1
    )
