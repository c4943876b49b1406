"""`CLIPImageEncoder`: CLIP's vision transformer, images `(N, 3, S, S)` to projected image embeddings and penultimate
hidden states, as transformers' `CLIPVisionModelWithProjection` computes them (arXiv:2103.00020)."""

from __future__ import annotations

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_clip_vision.config import CLIP_VIT_H_14, CLIPImageEncoderConfig
from refiners_core.fluxion import Device


class PatchEncoder(fl.Chain):
    """Cut the image into `patch_size` patches and embed each: `(N, 3, S, S)` -> `(N, (S // patch_size)**2, D)`."""

    def __init__(self, embedding_dim: int, patch_size: int, device: Device = None, dtype: torch.dtype | None = None):
        super().__init__(
            fl.Conv2d(3, embedding_dim, patch_size, stride=patch_size, use_bias=False, device=device, dtype=dtype),
            fl.Flatten(2),
            fl.Transpose(1, 2),
        )


class PositionalEncoder(fl.Module):
    """One learned vector per token (the class token first), added to every image of the batch."""

    def __init__(self, num_tokens: int, embedding_dim: int, device: Device = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_tokens, embedding_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"CLIPImageEncoder: {x.shape[1]} tokens (class token included), the encoder has "
                f"{self.weight.shape[0]} positions: give images of the encoder's image_size (see preprocess_images)"
            )
        return x + self.weight

    def extra_repr(self) -> str:
        return f"num_tokens={self.weight.shape[0]}, embedding_dim={self.weight.shape[1]}"


class ViTEmbeddings(fl.Chain):
    """The class token followed by the patch embeddings, plus the positions: `(N, 1 + num_patches, D)`."""

    def __init__(self, config: CLIPImageEncoderConfig, device: Device = None, dtype: torch.dtype | None = None):
        dim = config.embedding_dim
        super().__init__(
            fl.Concatenate(
                fl.Parameter(1, dim, device=device, dtype=dtype),
                PatchEncoder(dim, config.patch_size, device=device, dtype=dtype),
                dim=1,
            ),
            PositionalEncoder(config.num_patches + 1, dim, device=device, dtype=dtype),
        )


class SelfAttentionBlock(fl.Residual):
    """`x + attention(norm(x))`: multi-head self-attention over every token (no mask)."""

    def __init__(self, config: CLIPImageEncoderConfig, device: Device = None, dtype: torch.dtype | None = None):
        dim = config.embedding_dim
        super().__init__(
            fl.LayerNorm(dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            fl.SelfAttention(dim, num_heads=config.num_attention_heads, device=device, dtype=dtype),
        )


class FeedForwardBlock(fl.Residual):
    """`x + linear(activation(linear(norm(x))))`, with the exact GeLU or CLIP's QuickGeLU."""

    def __init__(self, config: CLIPImageEncoderConfig, device: Device = None, dtype: torch.dtype | None = None):
        dim = config.embedding_dim
        super().__init__(
            fl.LayerNorm(dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            fl.Linear(dim, config.feedforward_dim, device=device, dtype=dtype),
            fl.QuickGeLU() if config.use_quick_gelu else fl.GeLU(),
            fl.Linear(config.feedforward_dim, dim, device=device, dtype=dtype),
        )


class TransformerLayer(fl.Chain):
    """One pre-norm transformer layer: self-attention, then feed-forward, each residual."""

    def __init__(self, config: CLIPImageEncoderConfig, device: Device = None, dtype: torch.dtype | None = None):
        super().__init__(
            SelfAttentionBlock(config, device=device, dtype=dtype),
            FeedForwardBlock(config, device=device, dtype=dtype),
        )


class ClassToken(fl.Module):
    """The class token's hidden state: `(N, L, D)` -> `(N, D)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class ImageEmbedding(fl.Chain):
    """From the penultimate hidden states: the last layer, the class token, the final norm and the projection
    (a linear map without bias) to `(N, projection_dim)`, transformers' `image_embeds`."""

    def __init__(self, config: CLIPImageEncoderConfig, device: Device = None, dtype: torch.dtype | None = None):
        dim = config.embedding_dim
        super().__init__(
            TransformerLayer(config, device=device, dtype=dtype),
            ClassToken(),
            fl.LayerNorm(dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            fl.Linear(dim, config.projection_dim, bias=False, device=device, dtype=dtype),
        )


class CLIPImageEncoder(fl.Chain):
    """A CLIP image encoder: preprocessed images `(N, 3, S, S)` to the pair `(image_embeds, penultimate)`.

        encoder = CLIPImageEncoder.from_pretrained("h94/IP-Adapter", subfolder="models/image_encoder")
        image_embeds, penultimate = encoder(preprocess_images([image]))  # (1, 1024), (1, 257, 1280)

    `image_embeds` `(N, projection_dim)` is transformers' `CLIPVisionModelWithProjection(...).image_embeds`;
    `penultimate` `(N, 1 + num_patches, embedding_dim)` is its `hidden_states[-2]`, the input of the last layer
    (what IP-Adapter Plus reads). Images must be `config.image_size` pixels a side, normalised as
    `preprocess_images` does. The architecture is `config`, kept as `encoder.config`; every parameter is created on
    `device` with `dtype`. `CLIPImageEncoder()` is ViT-H/14 with random weights.
    """

    def __init__(
        self, config: CLIPImageEncoderConfig = CLIP_VIT_H_14, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        self.config = config
        super().__init__(
            ViTEmbeddings(config, device=device, dtype=dtype),
            fl.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            (TransformerLayer(config, device=device, dtype=dtype) for _ in range(config.num_layers - 1)),
            fl.Parallel(ImageEmbedding(config, device=device, dtype=dtype), fl.Identity()),
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str,
        *,
        subfolder: str | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> CLIPImageEncoder:
        """Load a transformers `CLIPVisionModelWithProjection` folder (local, or a hub id with `subfolder`):
        `config.json` and `model.safetensors` or `pytorch_model.bin` (read by refiners_core's safe loader).

        Raises FileNotFoundError naming the folder when a file is missing, WeightsError naming the file, the
        field or the key for a config or weights that do not describe such an encoder.
        """
        from refiners_clip_vision.loading import load_clip_image_encoder

        return load_clip_image_encoder(cls, path_or_repo_id, subfolder=subfolder, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"embedding_dim={config.embedding_dim}, num_layers={config.num_layers}, "
            f"num_attention_heads={config.num_attention_heads}, projection_dim={config.projection_dim}"
        )
