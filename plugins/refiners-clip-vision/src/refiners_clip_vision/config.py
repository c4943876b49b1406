"""`CLIPImageEncoderConfig`: the shape of a CLIP vision transformer, with the published ViT-H/14 and ViT-bigG/14, and
its reader for a transformers `CLIPVisionModelWithProjection` config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, kw_only=True)
class CLIPImageEncoderConfig:
    """The shape of a CLIP image encoder (a vision transformer with a projection), as transformers'
    `CLIPVisionConfig` describes it.

    Images of `image_size` pixels a side are cut into `patch_size` patches, embedded to `embedding_dim`, with a
    class token and learned positions; `num_layers` pre-norm transformer layers (`num_attention_heads` heads,
    `feedforward_dim` wide, exact GeLU or QuickGeLU with `use_quick_gelu`) follow; the class token, normalised, is
    projected to `projection_dim`.

    Raises ValueError naming the field for a size that is not a positive integer, a `layer_norm_eps` that is not a
    positive finite number, or `num_attention_heads` not dividing `embedding_dim`.
    """

    embedding_dim: int
    num_layers: int
    num_attention_heads: int
    feedforward_dim: int
    projection_dim: int
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    use_quick_gelu: bool = False

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "use_quick_gelu":
                if not isinstance(value, bool):
                    raise ValueError(f"CLIPImageEncoderConfig: use_quick_gelu must be true or false, got {value!r}")
            elif field.name == "layer_norm_eps":
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                    raise ValueError(f"CLIPImageEncoderConfig: layer_norm_eps must be a positive number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPImageEncoderConfig: {field.name} must be a positive integer, got {value!r}")
        if self.embedding_dim % self.num_attention_heads:
            raise ValueError(
                f"CLIPImageEncoderConfig: num_attention_heads={self.num_attention_heads} does not divide "
                f"embedding_dim={self.embedding_dim}"
            )
        if self.patch_size > self.image_size:
            raise ValueError(
                f"CLIPImageEncoderConfig: patch_size={self.patch_size} is larger than image_size={self.image_size}"
            )

    @property
    def num_patches(self) -> int:
        """Patches per image: `(image_size // patch_size) ** 2` (the tokens, the class token left out)."""
        return (self.image_size // self.patch_size) ** 2


CLIP_VIT_H_14 = CLIPImageEncoderConfig(
    embedding_dim=1280, num_layers=32, num_attention_heads=16, feedforward_dim=5120, projection_dim=1024
)
"""OpenCLIP ViT-H/14 (laion2B), the `models/image_encoder/` of h94/IP-Adapter: 632M parameters."""

CLIP_VIT_BIGG_14 = CLIPImageEncoderConfig(
    embedding_dim=1664, num_layers=48, num_attention_heads=16, feedforward_dim=8192, projection_dim=1280
)
"""OpenCLIP ViT-bigG/14 (laion2B), the `sdxl_models/image_encoder/` of h94/IP-Adapter: 1.8B parameters."""

_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
"""transformers' `CLIPVisionConfig` defaults, for the fields a config.json leaves out."""

_ACTIVATIONS = {"quick_gelu": True, "gelu": False}


def clip_image_config_from_transformers(config: dict[str, Any]) -> CLIPImageEncoderConfig:
    """The `CLIPImageEncoderConfig` of a transformers `CLIPVisionModelWithProjection` config.json (the
    `image_encoder/` folder IP-Adapter releases ship). Absent fields take transformers' defaults.

    Raises ValueError naming the field for another model type or architecture, an activation other than
    `quick_gelu` or `gelu`, images of other than 3 channels, or a size the config refuses.
    """
    model_type = config.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise ValueError(f"'model_type' is {model_type!r}, expected 'clip_vision_model'")
    architectures = config.get("architectures") or ["CLIPVisionModelWithProjection"]
    if architectures != ["CLIPVisionModelWithProjection"]:
        raise ValueError(
            f"'architectures' is {architectures!r}, expected ['CLIPVisionModelWithProjection'] (the image encoder "
            "needs its visual projection)"
        )
    values = _DEFAULTS | {key: config[key] for key in _DEFAULTS if key in config}
    if values["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"'hidden_act' is {values['hidden_act']!r}, supported: 'quick_gelu' or 'gelu'")
    if values["num_channels"] != 3:
        raise ValueError(f"'num_channels' is {values['num_channels']!r}, expected 3 (RGB images)")
    return CLIPImageEncoderConfig(
        embedding_dim=values["hidden_size"],
        num_layers=values["num_hidden_layers"],
        num_attention_heads=values["num_attention_heads"],
        feedforward_dim=values["intermediate_size"],
        projection_dim=values["projection_dim"],
        image_size=values["image_size"],
        patch_size=values["patch_size"],
        layer_norm_eps=values["layer_norm_eps"],
        use_quick_gelu=_ACTIVATIONS[values["hidden_act"]],
    )
