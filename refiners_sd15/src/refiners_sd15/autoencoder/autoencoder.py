"""The Stable Diffusion 1.5 autoencoder ("lda"): images to latents and back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

import refiners_core.fluxion as fl
from refiners_core.checks import check_finite_tensor
from refiners_core.fluxion import Device
from refiners_core.images import to_rgb
from refiners_sd15.autoencoder.blocks import DownBlock, MidBlock, OutputBlock, PosteriorMean, UpBlock
from refiners_sd15.autoencoder.config import SD15_AUTOENCODER, AutoencoderConfig
from refiners_sd15.autoencoder.mapping import AUTOENCODER_FORMAT
from refiners_sd15.loading import PretrainedComponent


class Encoder(fl.Chain):
    """Image `(B, 3, H, W)` in [-1, 1] -> scaled latents `(B, latent_channels, H / 8, W / 8)` (posterior mean)."""

    def __init__(
        self, config: AutoencoderConfig = SD15_AUTOENCODER, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        channels = list(config.block_out_channels)
        layers_per_block, latent_channels = config.layers_per_block, config.latent_channels
        norm_num_groups, scaling_factor = config.norm_num_groups, config.scaling_factor
        super().__init__(
            fl.Conv2d(3, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype),
            (
                DownBlock(
                    channels[max(i - 1, 0)],
                    out_channels,
                    num_layers=layers_per_block,
                    downsample=i < len(channels) - 1,
                    num_groups=norm_num_groups,
                    device=device,
                    dtype=dtype,
                )
                for i, out_channels in enumerate(channels)
            ),
            MidBlock(channels[-1], norm_num_groups, device=device, dtype=dtype),
            OutputBlock(channels[-1], 2 * latent_channels, norm_num_groups, device=device, dtype=dtype),
            PosteriorMean(latent_channels, device=device, dtype=dtype),
            fl.Multiply(scale=scaling_factor),
        )


class Decoder(fl.Chain):
    """Scaled latents `(B, latent_channels, h, w)` -> image `(B, 3, 8h, 8w)`, nominally in [-1, 1] (not clamped)."""

    def __init__(
        self, config: AutoencoderConfig = SD15_AUTOENCODER, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        channels = list(reversed(config.block_out_channels))
        layers_per_block, latent_channels = config.layers_per_block, config.latent_channels
        norm_num_groups, scaling_factor = config.norm_num_groups, config.scaling_factor
        super().__init__(
            fl.Multiply(scale=1 / scaling_factor),
            fl.Conv2d(latent_channels, latent_channels, kernel_size=1, device=device, dtype=dtype),
            fl.Conv2d(latent_channels, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype),
            MidBlock(channels[0], norm_num_groups, device=device, dtype=dtype),
            (
                UpBlock(
                    channels[max(i - 1, 0)],
                    out_channels,
                    num_layers=layers_per_block + 1,
                    upsample=i < len(channels) - 1,
                    num_groups=norm_num_groups,
                    device=device,
                    dtype=dtype,
                )
                for i, out_channels in enumerate(channels)
            ),
            OutputBlock(channels[-1], 3, norm_num_groups, device=device, dtype=dtype),
        )


class SD1Autoencoder(PretrainedComponent, fl.Chain):
    """The Stable Diffusion 1.5 variational autoencoder (diffusers' `AutoencoderKL`), an `Encoder` and a `Decoder`.

    `SD1Autoencoder()` has the published SD1.5 architecture (`SD15_AUTOENCODER`); another `AutoencoderConfig`
    describes other `AutoencoderKL`s of the same family (e.g. SDXL's, `scaling_factor=0.13025`). The config is kept
    as `autoencoder.config`. Calling the model encodes then decodes. Latents are scaled by `scaling_factor` as the
    diffusion model expects them.
    """

    component_format = AUTOENCODER_FORMAT

    def __init__(
        self, config: AutoencoderConfig = SD15_AUTOENCODER, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        self.config = config
        super().__init__(Encoder(config, device=device, dtype=dtype), Decoder(config, device=device, dtype=dtype))

    @property
    def downscale_factor(self) -> int:
        """How many pixels one latent covers in each direction: 2 per level after the first (8 for SD1.5)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] -> latents (posterior mean times `scaling_factor`, no sampling)."""
        return self["Encoder"](x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images `(B, 3, H, W)`, nominally in [-1, 1] but not clamped."""
        return self["Decoder"](latents)

    def image_to_latents(self, image: Image.Image) -> torch.Tensor:
        """Encode one image (converted to RGB) into latents `(1, latent_channels, H / 8, W / 8)`, without gradients.

        Raises ValueError if the width or height is not a multiple of 8 (`downscale_factor`).
        """
        return self.images_to_latents([image])

    @torch.no_grad()
    def images_to_latents(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Encode images of the same size (converted to RGB) into a batch of latents, without gradients.

        Raises ValueError if there is no image, if their sizes differ or are not multiples of 8 (`downscale_factor`).
        """
        if not images:
            raise ValueError("images_to_latents needs at least one image")
        sizes = {image.size for image in images}
        if len(sizes) > 1:
            raise ValueError(f"images_to_latents needs images of the same size, got sizes (width, height) {sizes}")
        width, height = images[0].size
        factor = self.downscale_factor
        if width % factor or height % factor:
            raise ValueError(
                f"image size {width}x{height} (width x height) is not a multiple of {factor}: resize or crop it, "
                f"e.g. to {width // factor * factor}x{height // factor * factor}"
            )
        batch = torch.stack([image_to_tensor(image) for image in images])
        return self.encode(batch.to(device=self.device, dtype=self.dtype))

    def latents_to_image(self, latents: torch.Tensor) -> Image.Image:
        """Decode latents of batch size 1 into an RGB image. Raises ValueError for a larger batch."""
        if latents.shape[0] != 1:
            raise ValueError(
                f"latents_to_image decodes one image, got a batch of {latents.shape[0]}: use latents_to_images"
            )
        return self.latents_to_images(latents)[0]

    @torch.no_grad()
    def latents_to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decode a batch of latents into RGB images (clamped to [-1, 1], rounded to 8 bits), without gradients.

        Raises ValueError if the latents, or what the decoder makes of them (float16 can overflow), have NaN or
        infinite values: they would be written as black pixels.
        """
        check_finite_tensor("latents_to_images: the latents", latents)
        decoded = self.decode(latents)
        check_finite_tensor(f"latents_to_images: the decoded images ({decoded.dtype})", decoded)
        return [tensor_to_image(image) for image in decoded]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as a float32 `(3, H, W)` tensor in [-1, 1], computed as diffusers does, after `to_rgb`: pixels are
    read by meaning (16-bit and float images scaled, not clipped to white or black; the alpha channel dropped)."""
    rgb = to_rgb(image)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return pixels.permute(2, 0, 1).float().div_(255).mul_(2).sub_(1)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """A `(3, H, W)` tensor in [-1, 1] (clamped) as an RGB image, rounded as diffusers' `VaeImageProcessor` does."""
    unit = (tensor.detach().float() * 0.5 + 0.5).clamp_(0, 1)
    pixels = unit.mul_(255).round_().to(device="cpu", dtype=torch.uint8)
    _, height, width = pixels.shape
    buffer = bytearray(height * width * 3)
    torch.frombuffer(buffer, dtype=torch.uint8).view(height, width, 3).copy_(pixels.permute(1, 2, 0))
    return Image.frombytes("RGB", (width, height), buffer)
