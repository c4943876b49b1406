"""The full published ViT-H/14 (632M parameters) against transformers' `CLIPVisionModelWithProjection` of the same
config, random weights, one 224x224 image, float32: image embeddings and penultimate hidden states within
max |ours - reference| <= 1e-4 * max |reference|. Our encoder, built on the meta device, takes the reference's tensors
through `transformers_clip_image_mapping` (the storage is shared: 2.5 GB in all)."""

from __future__ import annotations

import torch

from refiners_clip_vision import CLIP_VIT_H_14, CLIPImageEncoder, transformers_clip_image_mapping
from refiners_clip_vision.loading import IGNORED_KEYS, class_embedding_tensors
from refiners_clip_vision.testing import reference_encoder
from refiners_core.state_dicts import load_state_dict_checked


def test_published_vit_h_matches_transformers() -> None:
    reference = reference_encoder(CLIP_VIT_H_14, seed=0)
    ours = CLIPImageEncoder(CLIP_VIT_H_14, device="meta")
    load_state_dict_checked(
        ours,
        class_embedding_tensors(dict(reference.state_dict())),
        source="reference",
        mapping=transformers_clip_image_mapping(CLIP_VIT_H_14),
        ignore=IGNORED_KEYS,
        assign_to_device="cpu",
    )
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        image_embeds, penultimate = ours(pixels)
    for mine, theirs in ((image_embeds, expected.image_embeds), (penultimate, expected.hidden_states[-2])):
        assert mine.shape == theirs.shape
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert image_embeds.shape == (1, 1024) and penultimate.shape == (1, 257, 1280)
