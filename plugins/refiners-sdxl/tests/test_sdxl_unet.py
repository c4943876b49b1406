"""SDXLUNet against its reference, diffusers' `UNet2DConditionModel`, built offline from SDXL's published configs.

Reference models get random weights, every parameter perturbed (norms and biases included) so that a swapped or
missing key cannot hide behind an initial value; they are written with diffusers' `save_pretrained` in the layout of
a published repository (`unet/config.json`, `unet/diffusion_pytorch_model.safetensors`) and read back with
`SDXLUNet.from_pretrained`, our real loading path. Parity is checked in float32 on the noise prediction:
max |ours - reference| <= 1e-4 * max |reference|.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

import refiners_core.fluxion as fl
from refiners_core.state_dicts import compose, invert
from refiners_core.testing import assert_relative_close
from refiners_core.weights import load_tensors, save_tensors
from refiners_sd15.loading import load_single_file_component
from refiners_sd15.testing import random_diffusers_unet
from refiners_sd15.unet import CrossAttentionBlock2d, SD1UNet, unet_config_from_diffusers, unet_config_from_ldm
from refiners_sdxl import (
    SDXL_BASE_UNET,
    SDXL_INPAINTING_UNET,
    SDXL_REFINER_UNET,
    SDXL_UNET_FORMAT,
    SDXLUNet,
    TextTimeEmbedding,
    diffusers_sdxl_unet_mapping,
    ldm_sdxl_unet_mapping,
)
from refiners_sdxl.testing import SDXL_BASE_UNET_CONFIG

TOLERANCE = 1e-4
LDM_PREFIX = "model.diffusion_model."

# stabilityai/stable-diffusion-xl-refiner-1.0, unet/config.json: the fields it sets apart from the base's (the others
# are equal), as diffusers' converter also gives them for the original sd_xl_refiner.yaml (model_channels 384,
# channel_mult [1, 2, 4, 4], attention_resolutions [4, 2], 64 channels per head, transformer_depth 4, context_dim 1280,
# adm_in_channels 2560).
SDXL_REFINER_UNET_CONFIG: dict[str, Any] = {
    **SDXL_BASE_UNET_CONFIG,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
# diffusers/stable-diffusion-xl-1.0-inpainting-0.1, unet/config.json
SDXL_INPAINTING_UNET_CONFIG: dict[str, Any] = {**SDXL_BASE_UNET_CONFIG, "in_channels": 9}

# A small SDXL-like UNet: no attention on the first level, heads and transformer depths per level (the first
# level's depth unused, as in SDXL), linear projections, a 16-wide pooled embedding and six 8-wide time ids.
POOLED_DIM, TIME_IDS_DIM = 16, 8
SMALL_SDXL_UNET_CONFIG: dict[str, Any] = {
    **SDXL_BASE_UNET_CONFIG,
    "addition_time_embed_dim": TIME_IDS_DIM,
    "attention_head_dim": [2, 4, 8],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 48,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": POOLED_DIM + 6 * TIME_IDS_DIM,
    "sample_size": 16,
    "transformer_layers_per_block": [1, 2, 3],
}
# A small refiner-like UNet: four levels, attention on the middle two, one depth for all, five time ids.
SMALL_REFINER_UNET_CONFIG: dict[str, Any] = {
    **SDXL_REFINER_UNET_CONFIG,
    "addition_time_embed_dim": TIME_IDS_DIM,
    "attention_head_dim": [2, 4, 4, 4],
    "block_out_channels": [24, 32, 64, 64],
    "cross_attention_dim": 40,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": POOLED_DIM + 5 * TIME_IDS_DIM,
    "sample_size": 16,
    "transformer_layers_per_block": 2,
}


def save_in_the_published_layout(reference: UNet2DConditionModel, folder: Path, **kwargs: Any) -> Path:
    """Write `reference` as a published repository holds it: `folder/unet/{config.json, weights}`."""
    reference.save_pretrained(folder / "unet", safe_serialization=True, **kwargs)  # pyright: ignore[reportUnknownMemberType]
    return folder


class Inputs:
    """A latent, timesteps and the three conditionings: text `(B, 77, text_dim)`, pooled text `(B, pooled_dim)` and
    `time_ids` ids per sample (sizes and crops as the pipelines give them)."""

    def __init__(
        self,
        batch: int,
        channels: int,
        size: tuple[int, int],
        *,
        text_dim: int,
        time_ids: int,
        seed: int,
        pooled_dim: int = POOLED_DIM,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, channels, *size, generator=generator)
        self.timestep = torch.tensor([999.0]) if batch == 1 else torch.linspace(10.0, 900.0, batch)
        self.text = torch.randn(batch, 77, text_dim, generator=generator)
        self.pooled = torch.randn(batch, pooled_dim, generator=generator)
        sizes = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0, 6.0])[:time_ids]
        self.time_ids = sizes + torch.randint(0, 64, (batch, time_ids), generator=generator) * 8.0

    def reference(self, unet: UNet2DConditionModel) -> torch.Tensor:
        added = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        with torch.no_grad():
            return unet(self.x, self.timestep, encoder_hidden_states=self.text, added_cond_kwargs=added).sample  # pyright: ignore[reportUnknownMemberType]

    def ours(self, unet: SDXLUNet) -> torch.Tensor:
        unet.set_timestep(self.timestep)
        unet.set_clip_text_embedding(self.text)
        unet.set_pooled_text_embedding(self.pooled)
        unet.set_time_ids(self.time_ids)
        with torch.no_grad():
            return unet(self.x)


@pytest.fixture(scope="module")
def small_reference() -> UNet2DConditionModel:
    return random_diffusers_unet(SMALL_SDXL_UNET_CONFIG)


@pytest.fixture(scope="module")
def small_unet(small_reference: UNet2DConditionModel, tmp_path_factory: pytest.TempPathFactory) -> SDXLUNet:
    folder = save_in_the_published_layout(small_reference, tmp_path_factory.mktemp("small_sdxl"))
    return SDXLUNet.from_pretrained(folder).eval()


# Parity


@pytest.mark.parametrize(
    "batch, size",
    [
        (1, (16, 16)),
        (2, (16, 16)),  # one timestep, pooled embedding and set of time ids per sample
        (2, (20, 12)),
        (2, (13, 7)),  # odd sizes: the up path matches the skip connections' sizes
    ],
)
def test_small_sdxl_unet_matches_diffusers(
    small_reference: UNet2DConditionModel, small_unet: SDXLUNet, batch: int, size: tuple[int, int]
) -> None:
    inputs = Inputs(batch, 4, size, text_dim=48, time_ids=6, seed=batch + size[0])
    assert_relative_close(inputs.ours(small_unet), inputs.reference(small_reference), TOLERANCE)


def test_small_sdxl_unet_has_the_architecture_of_its_config(small_unet: SDXLUNet) -> None:
    config = small_unet.config
    assert config == replace(
        SDXL_BASE_UNET,
        block_out_channels=(32, 64, 64),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=48,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 2, 3),
        addition_time_embed_dim=TIME_IDS_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_IDS_DIM,
    )
    blocks = list(small_unet.layers(CrossAttentionBlock2d))
    # no attention on the first level: 2 down + 3 up blocks on each of the two other levels, and the middle block
    assert [(block.channels, block.num_heads, block.depth) for block in blocks] == (
        [(64, 4, 2)] * 2 + [(64, 8, 3)] * 2 + [(64, 8, 3)] + [(64, 8, 3)] * 3 + [(64, 4, 2)] * 3
    )


def test_added_embedding_reaches_the_output(small_reference: UNet2DConditionModel, small_unet: SDXLUNet) -> None:
    """The pooled text embedding and the time ids change the prediction, as they do the reference's."""
    inputs = Inputs(1, 4, (16, 16), text_dim=48, time_ids=6, seed=7)
    before = inputs.ours(small_unet)
    inputs.time_ids = inputs.time_ids + torch.tensor([[0.0, 0.0, 64.0, 0.0, 0.0, 0.0]])  # another crop
    after = inputs.ours(small_unet)
    assert (after - before).abs().max() > 1e-2 * before.abs().max()
    assert_relative_close(after, inputs.reference(small_reference), TOLERANCE)
    inputs.pooled = torch.zeros_like(inputs.pooled)
    assert_relative_close(inputs.ours(small_unet), inputs.reference(small_reference), TOLERANCE)


def test_small_refiner_unet_with_five_time_ids_matches_diffusers(tmp_path: Path) -> None:
    reference = random_diffusers_unet(SMALL_REFINER_UNET_CONFIG, seed=1)
    unet = SDXLUNet.from_pretrained(save_in_the_published_layout(reference, tmp_path)).eval()
    assert unet.config.cross_attention_levels == (False, True, True, False)
    assert unet.config.transformer_layers_per_block == 2
    inputs = Inputs(2, 4, (16, 16), text_dim=40, time_ids=5, seed=3)
    assert_relative_close(inputs.ours(unet), inputs.reference(reference), TOLERANCE)


def test_small_inpainting_unet_with_nine_input_channels_matches_diffusers(tmp_path: Path) -> None:
    reference = random_diffusers_unet({**SMALL_SDXL_UNET_CONFIG, "in_channels": 9}, seed=2)
    unet = SDXLUNet.from_pretrained(save_in_the_published_layout(reference, tmp_path)).eval()
    assert unet.config.in_channels == 9
    inputs = Inputs(2, 9, (16, 16), text_dim=48, time_ids=6, seed=4)
    assert_relative_close(inputs.ours(unet), inputs.reference(reference), TOLERANCE)


def test_own_format_round_trip_keeps_config_and_weights(small_unet: SDXLUNet, tmp_path: Path) -> None:
    small_unet.save(tmp_path / "unet.safetensors")
    loaded = SDXLUNet.from_pretrained(tmp_path / "unet.safetensors")
    assert loaded.config == small_unet.config
    expected = small_unet.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_sdxl_unet_without_time_ids_names_the_missing_context() -> None:
    unet = SDXLUNet(unet_config_from_diffusers(SMALL_SDXL_UNET_CONFIG))
    unet.set_timestep(torch.tensor([1]))
    unet.set_clip_text_embedding(torch.randn(1, 77, 48))
    unet.set_pooled_text_embedding(torch.randn(1, POOLED_DIM))
    with pytest.raises(fl.ContextError, match="time_ids"):
        unet(torch.randn(1, 4, 8, 8))


# Published configs and mappings


def test_published_configs_give_the_sdxl_constants() -> None:
    assert unet_config_from_diffusers(SDXL_BASE_UNET_CONFIG) == SDXL_BASE_UNET
    assert unet_config_from_diffusers(SDXL_REFINER_UNET_CONFIG) == SDXL_REFINER_UNET
    assert unet_config_from_diffusers(SDXL_INPAINTING_UNET_CONFIG) == SDXL_INPAINTING_UNET


PUBLISHED = {
    "base": (SDXL_BASE_UNET_CONFIG, SDXL_BASE_UNET),
    "refiner": (SDXL_REFINER_UNET_CONFIG, SDXL_REFINER_UNET),
    "inpainting": (SDXL_INPAINTING_UNET_CONFIG, SDXL_INPAINTING_UNET),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_diffusers_mapping_covers_every_key_one_to_one_with_the_same_shapes(name: str) -> None:
    config, unet_config = PUBLISHED[name]
    with torch.device("meta"):
        reference = cast(UNet2DConditionModel, UNet2DConditionModel.from_config(config)).state_dict()  # pyright: ignore[reportUnknownMemberType]
    ours = SDXLUNet(unet_config, device="meta").state_dict()
    mapping = diffusers_sdxl_unet_mapping(unet_config)
    assert set(mapping) == set(reference)
    assert sorted(mapping.values()) == sorted(ours)
    invert(mapping)  # raises if two file keys map to one of ours
    assert {key: tuple(reference[key].shape) for key in mapping} == {
        key: tuple(ours[value].shape) for key, value in mapping.items()
    }


def meta_state_dict(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return cast(UNet2DConditionModel, UNet2DConditionModel.from_config(config)).state_dict()  # pyright: ignore[reportUnknownMemberType]


def ldm_to_diffusers(config: dict[str, Any]) -> dict[str, str]:
    """Original checkpoint key (without its prefix) -> diffusers key, through our two mappings."""
    unet_config = unet_config_from_diffusers(config)
    return compose(ldm_sdxl_unet_mapping(unet_config), invert(diffusers_sdxl_unet_mapping(unet_config)))


@pytest.mark.parametrize("name", PUBLISHED)
def test_ldm_mapping_agrees_with_the_diffusers_converter(name: str) -> None:
    """Rename a diffusers state dict to the original layout through our mappings; diffusers must convert it back."""
    config, _ = PUBLISHED[name]
    renames = ldm_to_diffusers(config)
    diffusers_keys = list(meta_state_dict(config))
    assert sorted(renames.values()) == sorted(diffusers_keys)
    diffusers_tensors = {key: torch.full((1,), float(index)) for index, key in enumerate(diffusers_keys)}
    checkpoint = {LDM_PREFIX + ldm: diffusers_tensors[diffusers] for ldm, diffusers in renames.items()}

    converted = convert_ldm_unet_checkpoint(checkpoint, config)

    assert set(converted) == set(diffusers_tensors)
    assert all(torch.equal(converted[key], tensor) for key, tensor in diffusers_tensors.items())


@pytest.mark.parametrize("name", PUBLISHED)
def test_config_read_from_ldm_tensors_is_the_published_one(name: str) -> None:
    """Heads (64 channels each), transformer depths, linear projections and the added embedding, from shapes."""
    config, unet_config = PUBLISHED[name]
    shapes = meta_state_dict(config)
    assert unet_config_from_ldm({ldm: shapes[key] for ldm, key in ldm_to_diffusers(config).items()}) == unet_config


def test_sdxl_unet_from_a_single_file_checkpoint_matches_diffusers(tmp_path: Path) -> None:
    """An original-layout checkpoint (`model.diffusion_model.*`, `label_emb.0.*`) through the single-file loading,
    its config read from the tensors' shapes. What they do not hold is SDXL's: heads of 64 channels (here 1, 2 and
    2 per level), 256 sinusoids per time id, 32 normalisation groups."""
    config = {
        **SMALL_SDXL_UNET_CONFIG,
        "norm_num_groups": 32,
        "block_out_channels": [64, 128, 128],
        "attention_head_dim": [1, 2, 2],
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": POOLED_DIM + 6 * 256,
    }
    reference = random_diffusers_unet(config, seed=4)
    tensors = reference.state_dict()
    path = tmp_path / "sdxl.safetensors"
    save_tensors(path, {LDM_PREFIX + ldm: tensors[key] for ldm, key in ldm_to_diffusers(config).items()})
    del tensors

    unet = load_single_file_component(SDXLUNet, SDXL_UNET_FORMAT, source=path, tensors=load_tensors(path)).eval()

    assert unet.config == unet_config_from_diffusers(config)
    inputs = Inputs(2, 4, (16, 16), text_dim=48, time_ids=6, seed=6)
    assert_relative_close(inputs.ours(unet), inputs.reference(reference), TOLERANCE)


def test_added_embedding_keys() -> None:
    mapping = diffusers_sdxl_unet_mapping()
    assert mapping["add_embedding.linear_1.weight"] == "TextTimeEmbedding.Residual.Linear_1.weight"
    assert mapping["add_embedding.linear_2.bias"] == "TextTimeEmbedding.Residual.Linear_2.bias"
    assert (
        mapping["mid_block.attentions.0.transformer_blocks.9.attn2.to_k.weight"]
        == "MiddleBlock.CrossAttentionBlock2d.Tokens.TransformerBlock_10.Residual_2.CrossAttention.Attention"
        ".Distribute.Linear_2.weight"
    )


def test_sdxl_unet_tree_reads_like_the_architecture() -> None:
    unet = SDXLUNet(device="meta")
    assert [type(layer).__name__ for layer in unet] == [
        "TimestepEncoder",
        "TextTimeEmbedding",
        "DownBlocks",
        "MiddleBlock",
        "UpBlocks",
        "OutputBlock",
    ]
    assert len(list(unet.layers(TextTimeEmbedding))) == 1
    assert sum(parameter.numel() for parameter in unet.parameters()) == 2_567_463_684  # diffusers' count


# Wrong models


def test_sd15_config_is_refused_by_sdxl_unet_and_the_reverse() -> None:
    sd15_like = unet_config_from_diffusers({**SMALL_SDXL_UNET_CONFIG, "addition_embed_type": None})
    with pytest.raises(ValueError, match="addition_embed_type=None.*SD1UNet"):
        SDXLUNet(sd15_like)
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*SDXLUNet"):
        SD1UNet(unet_config_from_diffusers(SMALL_SDXL_UNET_CONFIG))


def test_sdxl_folder_given_to_sd1_unet_names_the_added_embedding(
    small_reference: UNet2DConditionModel, tmp_path: Path
) -> None:
    folder = save_in_the_published_layout(small_reference, tmp_path)
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*refiners_sdxl.SDXLUNet"):
        SD1UNet.from_pretrained(folder)


def test_text_time_config_without_its_dimensions_is_refused() -> None:
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        unet_config_from_diffusers({**SDXL_BASE_UNET_CONFIG, "projection_class_embeddings_input_dim": None})
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        replace(SDXL_BASE_UNET, addition_time_embed_dim=None)


# The full published architecture


FULL = {
    "base": (
        SDXL_BASE_UNET_CONFIG,
        SDXL_BASE_UNET,
        Inputs(1, 4, (16, 16), text_dim=2048, pooled_dim=1280, time_ids=6, seed=5),
    ),
    "refiner": (
        SDXL_REFINER_UNET_CONFIG,
        SDXL_REFINER_UNET,
        Inputs(1, 4, (16, 16), text_dim=1280, pooled_dim=1280, time_ids=5, seed=6),
    ),
    "inpainting": (
        SDXL_INPAINTING_UNET_CONFIG,
        SDXL_INPAINTING_UNET,
        Inputs(1, 9, (16, 16), text_dim=2048, pooled_dim=1280, time_ids=6, seed=7),
    ),
}


@pytest.mark.parametrize("name", FULL)
def test_full_published_sdxl_unet_matches_diffusers(name: str, tmp_path: Path) -> None:
    """The published SDXL base (2.6 B parameters, 10.3 GB in float32), refiner (2.3 B, 9.1 GB) and inpainting (the
    base with 9 input channels) architectures, batch 1 on a 16x16 latent.

    One full UNet in memory at a time: the reference's output is computed and kept, the reference written in
    1 GB shards (so that writing does not hold a second copy of the weights) and freed, then ours is loaded
    memory-mapped from that folder. The folder is deleted at the end.
    """
    config, unet_config, inputs = FULL[name]
    reference = random_diffusers_unet(config, seed=3)
    expected = inputs.reference(reference)
    try:
        save_in_the_published_layout(reference, tmp_path, max_shard_size="1GB")
        del reference
        gc.collect()
        unet = SDXLUNet.from_pretrained(tmp_path).eval()
        assert unet.config == unet_config
        assert_relative_close(inputs.ours(unet), expected, TOLERANCE)
        del unet
        gc.collect()
    finally:
        shutil.rmtree(tmp_path / "unet", ignore_errors=True)
