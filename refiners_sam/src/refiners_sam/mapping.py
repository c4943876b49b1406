"""The official Segment Anything checkpoint layout (`sam_vit_b_01ec64.pth`...): its size and its keys.

The checkpoint is the `state_dict` of segment-anything's `Sam`: `image_encoder.*`, `prompt_encoder.*` and
`mask_decoder.*` keys. Nothing in it records the size, so `detect_config` reads it from the shapes; the three
published sizes differ only in their image encoder (`VIT_B`, `VIT_L`, `VIT_H`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from refiners_core.state_dicts import shape_of
from refiners_core.weights import WeightsError
from refiners_sam.image_encoder import ImageEncoderConfig

BLOCK_KEY = re.compile(r"image_encoder\.blocks\.(\d+)\.")


def detect_config(tensors: Mapping[str, torch.Tensor], *, source: str) -> ImageEncoderConfig:
    """The image encoder's shape, read from an official checkpoint's tensors.

    Width and patch size come from the patch embedding, the grid from the absolute positions, the depth from the
    block indices, the head size from the relative positions, and the global blocks are those whose relative
    positions span the whole grid. Raises WeightsError naming `source` and the key a size is read from when it is
    missing or of the wrong shape.
    """
    try:
        return _detect_config(tensors)
    except ValueError as error:
        raise WeightsError(
            f"{source}: {error}; is it an official Segment Anything checkpoint (the image_encoder.*, "
            "prompt_encoder.*, mask_decoder.* keys of sam_vit_b_01ec64.pth)?"
        ) from error


def _detect_config(tensors: Mapping[str, torch.Tensor]) -> ImageEncoderConfig:
    embedding_dim, _, patch_size, _ = shape_of(tensors, "image_encoder.patch_embed.proj.weight", 4, "the width")
    grid_size = shape_of(tensors, "image_encoder.pos_embed", 4, "the grid size")[1]
    blocks = [int(match.group(1)) for key in tensors if (match := BLOCK_KEY.match(key))]
    if not blocks:
        raise ValueError("no 'image_encoder.blocks.N.*' keys, from which the depth is read")
    num_layers = 1 + max(blocks)
    spans = [
        shape_of(tensors, f"image_encoder.blocks.{index}.attn.rel_pos_h", 2, f"the head size of block {index}")
        for index in range(num_layers)
    ]
    head_dim = spans[0][1]
    if embedding_dim % head_dim or any(span[1] != head_dim for span in spans):
        raise ValueError(
            f"'image_encoder.blocks.N.attn.rel_pos_h' give head sizes {sorted({span[1] for span in spans})}, "
            f"expected one that divides the width {embedding_dim} (from 'image_encoder.patch_embed.proj.weight')"
        )
    global_indices = tuple(index for index, span in enumerate(spans) if span[0] == 2 * grid_size - 1)
    windowed = [span[0] for span in spans if span[0] != 2 * grid_size - 1]
    return ImageEncoderConfig(
        embedding_dim=embedding_dim,
        num_layers=num_layers,
        num_heads=embedding_dim // head_dim,
        global_attention_indices=global_indices,
        window_size=(windowed[0] + 1) // 2 if windowed else 14,
        image_size=grid_size * patch_size,
        patch_size=patch_size,
        output_dim=shape_of(tensors, "image_encoder.neck.0.weight", 4, "output_dim")[0],
    )


def _numbered(name: str, index: int, count: int) -> str:
    """How a Chain names the `index`-th (from 0) of `count` children of one class."""
    return name if count == 1 else f"{name}_{index + 1}"


def _layer(source: str, target: str, bias: bool = True) -> dict[str, str]:
    keys = ("weight", "bias") if bias else ("weight",)
    return {f"{source}.{key}": f"{target}.{key}" for key in keys}


def _attention(source: str, target: str) -> dict[str, str]:
    """segment-anything's `Attention` (q/k/v/out projections) to `fl.Attention`."""
    return {
        **_layer(f"{source}.q_proj", f"{target}.Distribute.Linear_1"),
        **_layer(f"{source}.k_proj", f"{target}.Distribute.Linear_2"),
        **_layer(f"{source}.v_proj", f"{target}.Distribute.Linear_3"),
        **_layer(f"{source}.out_proj", f"{target}.Linear"),
    }


def image_encoder_mapping(config: ImageEncoderConfig) -> dict[str, str]:
    """`ImageEncoderViT` keys (without the `image_encoder.` prefix) to `ImageEncoder` keys."""
    mapping = {
        **_layer("patch_embed.proj", "PatchEncoder.Conv2d"),
        "pos_embed": "PositionalEncoder.weight",
        "neck.0.weight": "Neck.Conv2d_1.weight",
        **_layer("neck.1", "Neck.LayerNorm2d_1"),
        "neck.2.weight": "Neck.Conv2d_2.weight",
        **_layer("neck.3", "Neck.LayerNorm2d_2"),
    }
    for index in range(config.num_layers):
        source = f"blocks.{index}"
        block = f"Transformer.{_numbered('TransformerBlock', index, config.num_layers)}"
        mapping |= {
            **_layer(f"{source}.norm1", f"{block}.AttentionBlock.LayerNorm"),
            **_layer(f"{source}.attn.qkv", f"{block}.AttentionBlock.Linear_1"),
            f"{source}.attn.rel_pos_h": f"{block}.AttentionBlock.RelativePositionAttention.rel_pos_h",
            f"{source}.attn.rel_pos_w": f"{block}.AttentionBlock.RelativePositionAttention.rel_pos_w",
            **_layer(f"{source}.attn.proj", f"{block}.AttentionBlock.Linear_2"),
            **_layer(f"{source}.norm2", f"{block}.FeedForward.LayerNorm"),
            **_layer(f"{source}.mlp.lin1", f"{block}.FeedForward.Linear_1"),
            **_layer(f"{source}.mlp.lin2", f"{block}.FeedForward.Linear_2"),
        }
    return mapping


def prompt_encoder_mapping() -> dict[str, str]:
    """`PromptEncoder` keys (without the `prompt_encoder.` prefix) to `point_encoder.*` and `mask_encoder.*` keys."""
    types = "point_encoder.PointTypeEmbedding"
    return {
        "pe_layer.positional_encoding_gaussian_matrix": "point_encoder.PointPositionalEncoding.gaussian_matrix",
        "not_a_point_embed.weight": f"{types}.padding",
        "point_embeddings.0.weight": f"{types}.background",
        "point_embeddings.1.weight": f"{types}.foreground",
        "point_embeddings.2.weight": f"{types}.box_top_left",
        "point_embeddings.3.weight": f"{types}.box_bottom_right",
        **_layer("mask_downscaling.0", "mask_encoder.Conv2d_1"),
        **_layer("mask_downscaling.1", "mask_encoder.LayerNorm2d_1"),
        **_layer("mask_downscaling.3", "mask_encoder.Conv2d_2"),
        **_layer("mask_downscaling.4", "mask_encoder.LayerNorm2d_2"),
        **_layer("mask_downscaling.6", "mask_encoder.Conv2d_3"),
        "no_mask_embed.weight": "mask_encoder.no_mask_embedding",
    }


def mask_decoder_mapping(num_layers: int = 2, num_mask_tokens: int = 4) -> dict[str, str]:
    """`MaskDecoder` keys (without the `mask_decoder.` prefix) to our `MaskDecoder` keys."""
    masks = "Predictions.MaskPrediction.Parallel"
    final = "TwoWayTransformer.TokenToImageAttention"
    mapping = {
        "iou_token.weight": "OutputTokens.iou_token",
        "mask_tokens.weight": "OutputTokens.mask_tokens",
        **_attention("transformer.final_attn_token_to_image", f"{final}.Parallel.Residual.Attention"),
        **_layer("transformer.norm_final_attn", f"{final}.Distribute.LayerNorm"),
        **_layer("output_upscaling.0", f"{masks}.OutputUpscaling.ConvTranspose2d_1"),
        **_layer("output_upscaling.1", f"{masks}.OutputUpscaling.LayerNorm2d"),
        **_layer("output_upscaling.3", f"{masks}.OutputUpscaling.ConvTranspose2d_2"),
    }
    for index in range(num_layers):
        source = f"transformer.layers.{index}"
        block = f"TwoWayTransformer.{_numbered('TwoWayBlock', index, num_layers)}"
        self_attention = "Chain" if index == 0 else "Residual"
        image_to_token = f"{block}.ImageToTokenAttention.Parallel.Chain"
        mapping |= {
            **_attention(f"{source}.self_attn", f"{block}.TokenSelfAttention.Parallel.{self_attention}.Attention"),
            **_layer(f"{source}.norm1", f"{block}.TokenSelfAttention.Distribute.LayerNorm"),
            **_attention(
                f"{source}.cross_attn_token_to_image", f"{block}.TokenToImageAttention.Parallel.Residual.Attention"
            ),
            **_layer(f"{source}.norm2", f"{block}.TokenToImageAttention.Distribute.LayerNorm"),
            **_layer(f"{source}.mlp.lin1", f"{block}.TokenFeedForward.Distribute.Chain.Residual.Linear_1"),
            **_layer(f"{source}.mlp.lin2", f"{block}.TokenFeedForward.Distribute.Chain.Residual.Linear_2"),
            **_layer(f"{source}.norm3", f"{block}.TokenFeedForward.Distribute.Chain.LayerNorm"),
            **_attention(f"{source}.cross_attn_image_to_token", f"{image_to_token}.Residual.Attention"),
            **_layer(f"{source}.norm4", f"{image_to_token}.LayerNorm"),
        }
    for token in range(num_mask_tokens):
        mlp = f"{masks}.HypernetworkMLPs.{_numbered('Chain', token, num_mask_tokens)}.MultiLinear"
        for layer in range(3):
            mapping |= _layer(f"output_hypernetworks_mlps.{token}.layers.{layer}", f"{mlp}.Linear_{layer + 1}")
    for layer in range(3):
        mapping |= _layer(
            f"iou_prediction_head.layers.{layer}", f"Predictions.IoUPrediction.MultiLinear.Linear_{layer + 1}"
        )
    return mapping


def official_mapping(config: ImageEncoderConfig) -> dict[str, str]:
    """Every key of an official checkpoint of this size to the matching `SegmentAnything` key."""
    return {
        **{f"image_encoder.{key}": f"image_encoder.{ours}" for key, ours in image_encoder_mapping(config).items()},
        **{f"prompt_encoder.{key}": ours for key, ours in prompt_encoder_mapping().items()},
        **{f"mask_decoder.{key}": f"mask_decoder.{ours}" for key, ours in mask_decoder_mapping().items()},
    }
