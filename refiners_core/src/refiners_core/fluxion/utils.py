"""The tensor and image helpers of Refiners 0.4's `refiners.fluxion.utils`, with the same signatures.

    from refiners_core.fluxion.utils import image_to_tensor, manual_seed, no_grad, tensor_to_image

Images are `[0, 1]` tensors of shape `(1, C, H, W)` here, as in Refiners; the `[-1, 1]` tensors that the SD1.5
autoencoder reads are made by `refiners_sd15.autoencoder.image_to_tensor`, a different function.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import no_grad
from torch.nn import functional as F

from refiners_core.fluxion.module import Device

__all__ = [
    "gaussian_blur",
    "image_to_tensor",
    "interpolate",
    "manual_seed",
    "no_grad",
    "normalize",
    "summarize_tensor",
    "tensor_to_image",
]

_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}


def manual_seed(seed: int) -> None:
    """Seed torch's random generators (CPU and every device), as `torch.manual_seed`."""
    torch.manual_seed(seed)  # pyright: ignore[reportUnknownMemberType]


def image_to_tensor(image: Image.Image, device: Device = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An `L`, `RGB` or `RGBA` image as a `(1, C, H, W)` tensor with values in `[0, 1]` (C = 1, 3 or 4).

    Raises ValueError naming the mode for any other image (convert it first, e.g. with `refiners_core.images.to_rgb`,
    which reads 16-bit and float images by their range).
    """
    if image.mode not in _CHANNELS:
        raise ValueError(
            f"image_to_tensor reads L, RGB and RGBA images, got a {image.mode} image: convert it first "
            "(refiners_core.images.to_rgb keeps the meaning of 16-bit and float pixels)"
        )
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).div_(255)  # pyright: ignore[reportUnknownMemberType]
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(-1)
    return pixels.permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """A `(1, C, H, W)` tensor with values in `[0, 1]` (clamped) as an `L`, `RGB` or `RGBA` image (C = 1, 3 or 4).

    Values are rounded to the nearest 8-bit level, so `tensor_to_image(image_to_tensor(image))` gives the image back.
    Raises ValueError naming the shape for any other shape.
    """
    if tensor.dim() != 4 or tensor.shape[0] != 1 or tensor.shape[1] not in _CHANNELS.values():
        raise ValueError(
            f"tensor_to_image takes a (1, C, H, W) tensor with C = 1, 3 or 4, got shape {tuple(tensor.shape)}"
        )
    levels = tensor[0].detach().float().clamp(0, 1).mul(255).round().to(device="cpu", dtype=torch.uint8)
    pixels = levels.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels[..., 0] if tensor.shape[1] == 1 else pixels)  # L, RGB or RGBA by shape


def normalize(tensor: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """`(tensor - mean) / std` per channel, for a floating point `(..., C, H, W)` tensor.

    Raises ValueError for an integer tensor, fewer than 3 dimensions, or a standard deviation that is zero in the
    tensor's dtype.
    """
    if not tensor.is_floating_point() or tensor.dim() < 3:
        raise ValueError(
            f"normalize takes a floating point (..., C, H, W) tensor, got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    pixel_mean = torch.tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    pixel_std = torch.tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    if (pixel_std == 0).any():
        raise ValueError(f"normalize: std {std} has a zero in {tensor.dtype}, which would divide by zero")
    return (tensor - pixel_mean) / pixel_std


def gaussian_blur(
    tensor: torch.Tensor,
    kernel_size: int | tuple[int, int],
    sigma: float | tuple[float, float] | None = None,
) -> torch.Tensor:
    """Blur a floating point `(..., C, H, W)` tensor with a Gaussian kernel, each channel on its own.

    `kernel_size` and `sigma` are one value or `(x, y)`; the default sigma is `0.15 * k + 0.35` (Refiners' and
    OpenCV's). Borders are reflected, so the size is kept. Raises ValueError for an integer tensor, fewer than 3
    dimensions, or a kernel size that is not a positive odd number.
    """
    if not tensor.is_floating_point() or tensor.dim() < 3:
        raise ValueError(
            "gaussian_blur takes a floating point (..., C, H, W) tensor, "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    size_x, size_y = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if size_x <= 0 or size_y <= 0 or size_x % 2 == 0 or size_y % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be positive and odd, got {kernel_size}")
    if sigma is None:
        sigma_x, sigma_y = 0.15 * size_x + 0.35, 0.15 * size_y + 0.35
    elif isinstance(sigma, (int, float)):
        sigma_x = sigma_y = float(sigma)
    else:
        sigma_x, sigma_y = sigma
    kernel_x = _gaussian_kernel(size_x, sigma_x, tensor)
    kernel_y = _gaussian_kernel(size_y, sigma_y, tensor)
    channels = tensor.shape[-3]
    kernel = torch.outer(kernel_y, kernel_x).expand(channels, 1, size_y, size_x)
    batch_shape = tensor.shape[:-3]
    flat = tensor.reshape(-1, *tensor.shape[-3:])
    padded = F.pad(flat, (size_x // 2, size_x // 2, size_y // 2, size_y // 2), mode="reflect")
    return F.conv2d(padded, kernel, groups=channels).reshape(*batch_shape, *tensor.shape[-3:])


def _gaussian_kernel(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, device=like.device, dtype=like.dtype)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def interpolate(x: torch.Tensor, factor: float | torch.Size, mode: str = "nearest") -> torch.Tensor:
    """Resize `x` by a scale `factor` (a number) or to a size (a `torch.Size` of the spatial dimensions)."""
    if isinstance(factor, torch.Size):
        return F.interpolate(x, size=tuple(factor), mode=mode)
    return F.interpolate(x, scale_factor=factor, mode=mode)


def summarize_tensor(tensor: torch.Tensor, /) -> str:
    """One line describing a tensor: shape, dtype, device, min, max, mean, std, norm and whether it needs grad.

    min and max are left out for complex and empty tensors (the statistics of a complex tensor are those of its
    real part).
    """
    parts = [
        f"shape=({', '.join(map(str, tensor.shape))})",
        f"dtype={str(tensor.dtype).removeprefix('torch.')}",
        f"device={tensor.device}",
    ]
    values = tensor.detach()
    if values.is_complex():
        values = values.real
    elif values.numel() > 0:
        parts += [f"min={values.min().item():.2f}", f"max={values.max().item():.2f}"]
    values = values.float()
    parts += [
        f"mean={values.mean().item():.2f}",
        f"std={values.std().item():.2f}",
        f"norm={values.pow(2).sum().sqrt().item():.2f}",
        f"grad={tensor.requires_grad}",
    ]
    return "Tensor(" + ", ".join(parts) + ")"
