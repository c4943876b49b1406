"""`IPAdapter`: prompt a Stable Diffusion UNet with reference images (arXiv:2308.06721).

Injecting puts an `ImageCrossAttention` in each text cross-attention of the UNet (see `refiners_ip_adapter.attention`);
the image tokens reach them through the IP-Adapter's own context, which `set_image_embedding` fills. The image encoder
and the image projection stay outside the UNet: `compute_image_embedding` runs them once per set of reference images.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import torch
from PIL import Image
from torch import nn

import refiners_core.fluxion as fl
from refiners_clip_vision import CLIPImageEncoder, preprocess_images
from refiners_core.checks import check_finite, check_finite_tensor
from refiners_ip_adapter.attention import ImageCrossAttention
from refiners_ip_adapter.image_proj import ImageProjection, PerceiverResampler
from refiners_ip_adapter.weights import IPAdapterWeights

_CONTEXT_NAMES = itertools.count(1)


class IPAdapter(fl.Module, fl.Adapter[fl.Chain]):
    """IP-Adapter on a `SD1UNet` or `SDXLUNet`, built by `IPAdapter.from_pretrained(unet, weights, ...)`.

        ip = IPAdapter.from_pretrained(sd.unet, "ip-adapter-plus_sd15.safetensors", image_encoder="image_encoder")
        ip.inject()
        ip.set_image_embedding(ip.compute_image_embedding([Image.open("ref.png")]))  # negative half first
        ip.scale = 0.8  # no rebuild
        ip.eject()  # the UNet is exactly as before

    It holds the image encoder, the image projection and one `ImageCrossAttention` per text cross-attention of the
    UNet, built by `from_pretrained` from the released weights (see `refiners_ip_adapter.weights`).
    """

    def __init__(
        self,
        target: fl.Chain,
        weights: IPAdapterWeights,
        image_encoder: CLIPImageEncoder,
        attentions: Sequence[fl.Attention],
        scale: float = 1.0,
        device: fl.Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the adapter for `target`'s text cross-`attentions` (with random weights: `from_pretrained` loads
        them), of the shape `weights` describes. Raises ValueError if `scale` is NaN or infinite."""
        scale = check_finite("IP-Adapter scale", scale)
        with self.setup_adapter(target):
            super().__init__()
        self.weights = weights
        self.context_name = f"ip_adapter_{next(_CONTEXT_NAMES)}"
        """The UNet context holding this adapter's image tokens (key `image_embedding`)."""
        self.image_encoder = image_encoder
        self.image_proj: ImageProjection | PerceiverResampler
        if weights.perceiver is None:
            self.image_proj = ImageProjection(
                weights.image_embedding_dim, weights.cross_attention_dim, weights.num_tokens, device=device, dtype=dtype
            )
        else:
            self.image_proj = PerceiverResampler(
                weights.image_embedding_dim, weights.cross_attention_dim, weights.perceiver, device=device, dtype=dtype
            )
        self.cross_attentions = nn.ModuleList(
            ImageCrossAttention(
                attention.ensure_find(fl.ScaledDotProductAttention),
                self.context_name,
                weights.cross_attention_dim,
                attention.inner_dim,
                scale,
                device=device,
                dtype=dtype,
            )
            for attention in attentions
        )
        self._image_embedding: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls,
        unet: fl.Chain,
        weights: str | Path,
        *,
        image_encoder: str | Path | CLIPImageEncoder | None = None,
        scale: float = 1.0,
    ) -> IPAdapter:
        """The IP-Adapter of the weights file `weights` (`.safetensors` or `.bin`, the released `image_proj.*` /
        `ip_adapter.*` layout) for `unet`, with its image encoder: a `CLIPImageEncoder`, a transformers
        `CLIPVisionModelWithProjection` folder (or hub id), or by default the `image_encoder/` folder beside the
        weights or beside their folder (as h94/IP-Adapter lays them out). On the UNet's device, with its dtype; not
        injected.

        Everything is checked before the UNet is touched (it never is until `inject`): raises TypeError for a
        UNet other than `SD1UNet` / `SDXLUNet`, WeightsError naming the file and key for weights that are not
        IP-Adapter weights or do not fit the UNet (SD1.5 weights on an SDXL UNet and the reverse) or the image
        encoder, FileNotFoundError naming what is missing, ValueError for a NaN or infinite scale.
        """
        from refiners_ip_adapter.loading import load_ip_adapter

        return load_ip_adapter(cls, unet, weights, image_encoder=image_encoder, scale=scale)

    @property
    def scale(self) -> float:
        """The weight of the attention to the images (diffusers' `set_ip_adapter_scale`); set it at any time."""
        attention = self.cross_attentions[0]
        assert isinstance(attention, ImageCrossAttention)
        return attention.scale

    @scale.setter
    def scale(self, value: float) -> None:
        value = check_finite("IP-Adapter scale", value)
        for attention in self.cross_attentions:
            assert isinstance(attention, ImageCrossAttention)
            attention.scale = value

    @torch.no_grad()
    def compute_image_embedding(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """The image tokens of one or several reference images: `(2, N * T, cross_attention_dim)` for N images of
        T tokens each, the negative (unconditional) half first, as diffusers computes them for classifier-free
        guidance. Several images are combined as diffusers combines them: their tokens side by side.

        The negative half is the projection of a zero image embedding (IP-Adapter), or of the penultimate hidden
        states of all-zero (normalised) pixels (IP-Adapter Plus). Raises TypeError or ValueError
        naming `images[i]` for an image that cannot be used.
        """
        encoder = self.image_encoder
        pixels = preprocess_images(
            [images] if isinstance(images, Image.Image) else images, size=encoder.config.image_size
        ).to(device=encoder.device, dtype=encoder.dtype)
        if self.weights.perceiver is None:
            positive = encoder(pixels)[0]
            negative = torch.zeros_like(positive)
        else:
            positive = encoder(pixels)[1]
            negative = encoder(torch.zeros_like(pixels))[1]
        projection = self.image_proj
        tokens = projection(torch.cat((negative, positive)).to(dtype=projection.dtype))
        return tokens.reshape(2, -1, tokens.shape[-1])

    def set_image_embedding(self, image_embedding: torch.Tensor) -> Self:
        """Set the image tokens the UNet attends to, `(B, tokens, cross_attention_dim)` (`compute_image_embedding`'s
        output, or several concatenated along the tokens); B is 2 with classifier-free guidance (negative first), or
        divides the UNet's batch. Raises ValueError for another shape or NaN or infinite values."""
        width = self.weights.cross_attention_dim
        if image_embedding.dim() != 3 or image_embedding.shape[-1] != width:
            raise ValueError(
                f"IP-Adapter: the image embedding must be (B, tokens, {width}), got {tuple(image_embedding.shape)}"
            )
        check_finite_tensor("the IP-Adapter image embedding", image_embedding)
        self._image_embedding = image_embedding
        if self.is_injected:
            self.target.set_context(self.context_name, {"image_embedding": image_embedding})
        return self

    @property
    def is_injected(self) -> bool:
        first = self.cross_attentions[0] if len(self.cross_attentions) else None
        return isinstance(first, ImageCrossAttention) and first.is_injected

    def inject(self, parent: fl.Chain | None = None) -> Self:
        """Put an `ImageCrossAttention` in each text cross-attention of the UNet. `parent`, if given, must be the UNet.

        Raises AdapterError if already injected or the UNet was edited so that a cross-attention is gone; the UNet
        is then left unchanged.
        """
        unet = self.target
        self.check_in_place_injection(parent, "UNet")
        done: list[ImageCrossAttention] = []
        try:
            for attention in self.cross_attentions:
                assert isinstance(attention, ImageCrossAttention)
                done.append(attention.inject())
        except fl.AdapterError:
            for attention in reversed(done):
                attention.eject()
            raise
        embedding = self._image_embedding
        unet.set_context(self.context_name, {} if embedding is None else {"image_embedding": embedding})
        return self

    def eject(self) -> None:
        """Take the image cross-attentions out: the UNet is then exactly as before `inject` (layers, weights and
        contexts). The image embedding stays with the adapter for a later `inject`. Raises AdapterError if the
        adapter is not injected."""
        unet = self.target
        if not self.is_injected:
            raise fl.AdapterError(f"cannot eject this IPAdapter from `{unet.get_path()}`: it is not injected")
        for attention in reversed(list(self.cross_attentions)):
            assert isinstance(attention, ImageCrossAttention)
            attention.eject()
        root = unet.root
        if isinstance(root, fl.Chain):
            root.provider.contexts.pop(self.context_name, None)
