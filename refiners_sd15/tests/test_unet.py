"""SD1UNet against its reference, diffusers' `UNet2DConditionModel`, built offline from the published configs.

Reference models get random weights, every parameter perturbed (norms and biases included) so that a swapped or
missing key cannot hide behind an initial value. Parity is checked in float32 on the noise prediction:
max |ours - reference| <= 1e-4 * max |reference|.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from torch.overrides import TorchFunctionMode

import refiners_core.fluxion as fl
from refiners_core.state_dicts import compose, invert, load_state_dict_checked
from refiners_core.testing import assert_relative_close
from refiners_core.weights import WeightsError, load_tensors
from refiners_sd15.testing import SD15_UNET_CONFIG, random_diffusers_unet
from refiners_sd15.testing import SMALL_THREE_LEVEL_UNET_DIFFUSERS_CONFIG as SMALL_UNET_CONFIG
from refiners_sd15.unet import (
    SD15_INPAINTING_UNET,
    SD15_UNET,
    SD1UNet,
    UNetConfig,
    diffusers_unet_mapping,
    ldm_unet_mapping,
    unet_config_from_diffusers,
    unet_config_from_ldm,
)
from refiners_sd15.unet.blocks import (
    ConcatenateSkip,
    CrossAttentionBlock2d,
    FeedForward,
    SaveSkip,
    SinusoidalEmbedding,
    Upsample,
    projects_transposed,
)

TOLERANCE = 1e-4
LDM_PREFIX = "model.diffusion_model."

# runwayml/stable-diffusion-inpainting, unet/config.json: the same with 9 input channels
SD15_INPAINTING_UNET_CONFIG: dict[str, Any] = {**SD15_UNET_CONFIG, "_diffusers_version": "0.6.0.dev0", "in_channels": 9}
# stabilityai/stable-diffusion-2-1, unet/config.json
SD21_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
# The small UNet with what SD2 and SDXL changed: heads and transformer depths per level, linear projections.
PER_LEVEL_UNET_CONFIG: dict[str, Any] = {
    **SMALL_UNET_CONFIG,
    "attention_head_dim": [2, 4, 8],
    "transformer_layers_per_block": [2, 1, 3],
    "use_linear_projection": True,
}
# diffusers' own tiny test UNet (hf-internal-testing/tiny-stable-diffusion-pipe): attention on the deeper level only.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": 8,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "sample_size": 32,
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


def diffusers_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    return cast(UNet2DConditionModel, UNet2DConditionModel.from_config(config))  # pyright: ignore[reportUnknownMemberType]


def reference_output(
    unet: UNet2DConditionModel, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, timestep, encoder_hidden_states=text).sample  # pyright: ignore[reportUnknownMemberType]


def our_output(unet: SD1UNet, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    with torch.no_grad():
        return unet(x)


def save_and_load(reference: UNet2DConditionModel, folder: Path) -> tuple[SD1UNet, Path]:
    """Save `reference` with `save_pretrained`, then build an SD1UNet from its config and load its file."""
    reference.save_pretrained(folder, safe_serialization=True)  # pyright: ignore[reportUnknownMemberType]
    unet_config = unet_config_from_diffusers(dict(reference.config))  # pyright: ignore[reportUnknownArgumentType]
    path = folder / "diffusion_pytorch_model.safetensors"
    ours = SD1UNet(unet_config).eval()
    load_state_dict_checked(ours, load_tensors(path), source=str(path), mapping=diffusers_unet_mapping(unet_config))
    return ours, path


def inputs(batch: int, channels: int, height: int, width: int, context_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, channels, height, width), torch.randn(batch, 77, context_dim)


def test_sd15_unet_matches_diffusers_with_the_published_architecture(tmp_path: Path) -> None:
    torch.manual_seed(1)
    cases = [
        (*inputs(2, 4, 32, 32, 768), torch.tensor([999])),
        (*inputs(2, 4, 40, 24, 768), torch.tensor([10.0, 500.0])),
    ]
    reference = random_diffusers_unet(SD15_UNET_CONFIG)
    expected = [reference_output(reference, x, t, text) for x, text, t in cases]
    reference.save_pretrained(tmp_path, safe_serialization=True)  # pyright: ignore[reportUnknownMemberType]
    del reference
    gc.collect()  # a full UNet is 3.4 GB in float32: keep one at a time

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    ours = SD1UNet(device="meta").to_empty(device="cpu").eval()  # no initialisation: every weight is loaded
    tensors = load_tensors(path)
    load_state_dict_checked(ours, tensors, source=str(path), mapping=diffusers_unet_mapping())
    del tensors
    for (x, text, t), reference_noise in zip(cases, expected):
        assert_relative_close(our_output(ours, x, t, text), reference_noise, TOLERANCE)


@pytest.fixture(scope="module")
def small_reference() -> UNet2DConditionModel:
    return random_diffusers_unet(SMALL_UNET_CONFIG)


@pytest.fixture(scope="module")
def small_unet(small_reference: UNet2DConditionModel, tmp_path_factory: pytest.TempPathFactory) -> SD1UNet:
    ours, _ = save_and_load(small_reference, tmp_path_factory.mktemp("small_unet"))
    return ours


@pytest.mark.parametrize(
    "size, timestep",
    [
        ((16, 16), torch.tensor(999)),  # a scalar timestep
        ((16, 16), torch.tensor([1])),
        ((20, 12), torch.tensor([250.0, 750.0])),  # one timestep per sample
        ((13, 7), torch.tensor([500])),  # odd sizes: the up path matches the skip connections' sizes
        ((18, 10), torch.tensor([500])),  # 9x5 then 5x3 on the way down
    ],
)
def test_small_unet_matches_diffusers(
    small_reference: UNet2DConditionModel, small_unet: SD1UNet, size: tuple[int, int], timestep: torch.Tensor
) -> None:
    torch.manual_seed(2)
    x, text = inputs(2, 4, *size, 24)
    assert_relative_close(
        our_output(small_unet, x, timestep, text), reference_output(small_reference, x, timestep, text), TOLERANCE
    )


def test_inpainting_unet_with_nine_input_channels_matches_diffusers(tmp_path: Path) -> None:
    reference = random_diffusers_unet({**SMALL_UNET_CONFIG, "in_channels": 9})
    ours, _ = save_and_load(reference, tmp_path)
    assert ours.config.in_channels == 9
    torch.manual_seed(3)
    x, text = inputs(2, 9, 16, 16, 24)
    timestep = torch.tensor([300])
    assert_relative_close(
        our_output(ours, x, timestep, text), reference_output(reference, x, timestep, text), TOLERANCE
    )


def test_unet_with_attention_on_deeper_levels_only_matches_diffusers(tmp_path: Path) -> None:
    reference = random_diffusers_unet(TINY_UNET_CONFIG)
    ours, _ = save_and_load(reference, tmp_path)
    assert ours.config.cross_attention_levels == (False, True)
    torch.manual_seed(4)
    x, text = inputs(2, 4, 12, 12, 32)
    timestep = torch.tensor([42])
    assert_relative_close(
        our_output(ours, x, timestep, text), reference_output(reference, x, timestep, text), TOLERANCE
    )


def test_skip_connections_go_through_the_context(small_unet: SD1UNet) -> None:
    saved = [layer.index for layer in small_unet.layers(SaveSkip)]
    concatenated = [layer.index for layer in small_unet.layers(ConcatenateSkip)]
    assert saved == list(range(len(saved)))
    assert concatenated == saved[::-1]
    assert len(list(small_unet.layers(Upsample))) == len(small_unet.config.block_out_channels) - 1


def test_unet_without_timestep_names_the_missing_context() -> None:
    unet = SD1UNet(unet_config_from_diffusers(SMALL_UNET_CONFIG))
    unet.set_clip_text_embedding(torch.randn(1, 77, 24))
    with pytest.raises(fl.ContextError, match="timestep"):
        unet(torch.randn(1, 4, 8, 8))


# Mappings


def meta_state_dict(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        reference = diffusers_unet(config)
    return reference.state_dict()


CONFIGS = {"sd15": SD15_UNET_CONFIG, "inpainting": SD15_INPAINTING_UNET_CONFIG, "small": SMALL_UNET_CONFIG}
CONFIGS["tiny"] = TINY_UNET_CONFIG


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_mapping_covers_every_key_one_to_one(name: str) -> None:
    config = CONFIGS[name]
    unet_config = unet_config_from_diffusers(config)
    mapping = diffusers_unet_mapping(unet_config)
    ours = SD1UNet(unet_config, device="meta").state_dict()
    assert set(mapping) == set(meta_state_dict(config))
    assert sorted(mapping.values()) == sorted(ours)  # every key of ours, each exactly once
    invert(mapping)  # raises if two file keys map to one of ours


@pytest.mark.parametrize("name", CONFIGS)
def test_ldm_mapping_agrees_with_the_diffusers_converter(name: str) -> None:
    """Rename a diffusers state dict to the original layout through our mappings; diffusers must convert it back."""
    config = CONFIGS[name]
    unet_config = unet_config_from_diffusers(config)
    ldm_mapping = ldm_unet_mapping(unet_config)
    ldm_to_diffusers = compose(ldm_mapping, invert(diffusers_unet_mapping(unet_config)))
    assert sorted(ldm_mapping.values()) == sorted(SD1UNet(unet_config, device="meta").state_dict())
    diffusers_keys = list(meta_state_dict(config))
    assert sorted(ldm_to_diffusers.values()) == sorted(diffusers_keys)
    diffusers_tensors = {key: torch.full((1,), float(index)) for index, key in enumerate(diffusers_keys)}
    checkpoint = {LDM_PREFIX + ldm: diffusers_tensors[diffusers] for ldm, diffusers in ldm_to_diffusers.items()}

    converted = convert_ldm_unet_checkpoint(checkpoint, config)

    assert set(converted) == set(diffusers_tensors)
    for key, tensor in diffusers_tensors.items():
        assert torch.equal(converted[key], tensor), key


def test_ldm_mapping_names_the_original_keys() -> None:
    mapping = ldm_unet_mapping()
    assert mapping["input_blocks.1.0.in_layers.0.weight"] == "DownBlocks.Chain_2.ResidualBlock.Chain.GroupNorm_1.weight"
    assert (
        mapping["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
        == "DownBlocks.Chain_2.CrossAttentionBlock2d.Tokens.TransformerBlock.Residual_2.CrossAttention.Attention"
        ".Distribute.Linear_2.weight"
    )
    assert mapping["middle_block.1.proj_in.weight"] == "MiddleBlock.CrossAttentionBlock2d.Tokens.Linear_1.weight"
    assert mapping["output_blocks.2.1.conv.weight"] == "UpBlocks.Chain_3.Upsample.Conv2d.weight"
    assert mapping["output_blocks.5.2.conv.weight"] == "UpBlocks.Chain_6.Upsample.Conv2d.weight"
    assert mapping["out.2.weight"] == "OutputBlock.Conv2d.weight"
    assert mapping["time_embed.0.weight"] == "TimestepEncoder.Linear_1.weight"


def ldm_shapes(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors (on the meta device) of an original checkpoint's UNet for `config`, without their prefix."""
    unet_config = unet_config_from_diffusers(config)
    ldm_to_diffusers = compose(ldm_unet_mapping(unet_config), invert(diffusers_unet_mapping(unet_config)))
    diffusers_tensors = meta_state_dict(config)
    return {ldm: diffusers_tensors[diffusers] for ldm, diffusers in ldm_to_diffusers.items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_read_from_ldm_tensors_matches_the_diffusers_config(name: str) -> None:
    unet_config = unet_config_from_diffusers(CONFIGS[name])
    from_ldm = unet_config_from_ldm(ldm_shapes(CONFIGS[name]))
    assert from_ldm == replace(unet_config, attention_head_dim=8, norm_num_groups=32)  # not in the weights: SD1's


def test_config_from_sd2_ldm_tensors_reads_linear_projections_and_64_channels_per_head() -> None:
    config = unet_config_from_ldm(ldm_shapes(SD21_UNET_CONFIG))
    assert config == unet_config_from_diffusers(SD21_UNET_CONFIG)  # heads (5, 10, 20, 20): not in the weights


def test_config_from_ldm_tensors_counts_the_transformer_depths() -> None:
    config = unet_config_from_ldm(ldm_shapes(PER_LEVEL_UNET_CONFIG))
    assert config.transformer_layers_per_block == (2, 1, 3)  # the last level's is the middle block's
    assert config.use_linear_projection and config.attention_head_dim == 1  # 32 or 64 channels: one 64-wide head


def test_config_from_ldm_tensors_with_a_class_embedding_is_refused() -> None:
    tensors = ldm_shapes(SMALL_UNET_CONFIG)
    tensors["label_emb.0.0.weight"] = torch.empty(128, 256, device="meta")  # attention on the first level: not SDXL
    with pytest.raises(ValueError, match=r"'label_emb\.0\.0\.weight' is a class embedding"):
        unet_config_from_ldm(tensors)


# Configs


def test_published_sd15_config_gives_the_default_unet() -> None:
    unet_config = unet_config_from_diffusers(SD15_UNET_CONFIG)
    default = SD1UNet(device="meta")
    built = SD1UNet(unet_config, device="meta")
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    assert unet_config_from_diffusers(SD15_INPAINTING_UNET_CONFIG) == replace(unet_config, in_channels=9)
    assert (unet_config, replace(unet_config, in_channels=9)) == (SD15_UNET, SD15_INPAINTING_UNET)


@pytest.mark.parametrize(
    "field, value",
    [
        ("addition_embed_type", "text"),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("time_cond_proj_dim", 256),
        ("attention_head_dim", [5, 10, 20]),  # one per level, but 3 levels for 4
        ("transformer_layers_per_block", [[1, 2], [1, 2], [1, 2], [1, 2]]),  # one per transformer: not supported
        ("reverse_transformer_layers_per_block", [[1, 1, 1]] * 4),
        ("num_attention_heads", 8),
        ("down_block_types", ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
        ("mid_block_type", None),
        ("resnet_time_scale_shift", "scale_shift"),
        ("_class_name", "UNet2DModel"),
    ],
)
def test_config_outside_the_sd1_family_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers({**SD15_UNET_CONFIG, field: value})


def test_config_with_one_value_per_level_or_attention_upcast_is_accepted() -> None:
    config = {
        **SD15_UNET_CONFIG,
        "attention_head_dim": [8, 8, 8, 8],
        "cross_attention_dim": [768, 768, 768, 768],
        "upcast_attention": True,  # changes numerics only, not the architecture
        "transformer_layers_per_block": [1, 1, 1, 1],
    }
    assert unet_config_from_diffusers(config) == unet_config_from_diffusers(SD15_UNET_CONFIG)


def test_sd21_config_gives_heads_per_level_and_linear_projections() -> None:
    config = unet_config_from_diffusers(SD21_UNET_CONFIG)
    assert config == replace(
        SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True
    )
    assert [config.num_heads(level) for level in range(4)] == [5, 10, 20, 20]  # 64 channels per head
    assert config.transformer_depth(-1) == 1


def test_unet_with_heads_and_depths_per_level_and_linear_projections_matches_diffusers(tmp_path: Path) -> None:
    """What SD2 and SDXL changed in the spatial transformers: per-level heads and transformer depths (the middle
    block takes the last level's), and linear projections."""
    reference = random_diffusers_unet(PER_LEVEL_UNET_CONFIG, seed=1)
    ours, _ = save_and_load(reference, tmp_path)
    assert ours.config.attention_head_dim == (2, 4, 8)
    assert ours.config.transformer_layers_per_block == (2, 1, 3)
    assert ours.config.use_linear_projection
    assert ours.foreign_pointwise_convolutions("diffusers") == set()  # diffusers' proj_in / proj_out are Linears
    depths = [block.depth for block in ours.layers(CrossAttentionBlock2d)]
    assert depths == [2, 2, 1, 1, 3, 1, 1, 1, 2, 2, 2]  # down levels 0 and 1, middle, up levels 1 and 0
    torch.manual_seed(7)
    x, text = inputs(2, 4, 13, 7, 24)
    timestep = torch.tensor([10, 600])
    assert_relative_close(
        our_output(ours, x, timestep, text), reference_output(reference, x, timestep, text), TOLERANCE
    )


def test_heads_per_level_that_do_not_divide_the_channels_are_refused() -> None:
    with pytest.raises(ValueError, match="64 channels of level 1 cannot be split in 5 attention heads"):
        unet_config_from_diffusers({**SMALL_UNET_CONFIG, "attention_head_dim": [4, 5, 4]})


# Wrong weights


def test_sd2_weights_name_file_key_layer_and_shapes(tmp_path: Path) -> None:
    """SD2-style weights (1024-d text embedding, per-level heads, linear projections) in an SD1 UNet."""
    sd2_like = {
        **SMALL_UNET_CONFIG,
        "attention_head_dim": [4, 8, 8],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
    }
    reference = diffusers_unet(sd2_like)
    reference.save_pretrained(tmp_path, safe_serialization=True)  # pyright: ignore[reportUnknownMemberType]
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    unet_config = unet_config_from_diffusers(
        {**sd2_like, "attention_head_dim": 4, "cross_attention_dim": 768, "use_linear_projection": False}
    )
    ours = SD1UNet(unet_config)
    before = {key: value.clone() for key, value in ours.state_dict().items()}

    with pytest.raises(WeightsError) as error:
        load_state_dict_checked(ours, load_tensors(path), source=str(path), mapping=diffusers_unet_mapping(unet_config))

    message = str(error.value)
    assert str(path) in message
    assert "attn2.to_k.weight" in message
    assert "SD1UNet." in message and "CrossAttention.Attention.Distribute.Linear_2" in message
    assert "(32, 1024)" in message and "(32, 24)" not in message and "(32, 768)" in message
    assert all(torch.equal(value, before[key]) for key, value in ours.state_dict().items())


def test_published_sd21_weights_are_refused_with_the_key_and_shapes() -> None:
    tensors = meta_state_dict(SD21_UNET_CONFIG)
    with pytest.raises(WeightsError, match=r"sd21\.safetensors: '.*attn2\.to_k\.weight' has shape \(\d+, 1024\)"):
        load_state_dict_checked(
            SD1UNet(device="meta"), tensors, source="sd21.safetensors", mapping=diffusers_unet_mapping()
        )


# Devices and dtypes


class RecordDtypes(TorchFunctionMode):
    """Record the dtype and device of every tensor that torch functions return."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[torch.dtype, str]] = set()

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else (result,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.seen.add((tensor.dtype, tensor.device.type))
        return result


def small_config() -> UNetConfig:
    return unet_config_from_diffusers(SMALL_UNET_CONFIG)


def test_float64_unet_creates_and_computes_everything_in_float64(small_unet: SD1UNet) -> None:
    unet = SD1UNet(small_config(), dtype=torch.float64).eval()
    tensors = list(unet.parameters()) + list(unet.buffers())
    assert tensors and all(tensor.dtype == torch.float64 for tensor in tensors)
    unet.load_state_dict(small_unet.state_dict())
    torch.manual_seed(5)
    x, text = inputs(2, 4, 13, 7, 24)
    timestep = torch.tensor([700])  # an integer timestep, as schedulers give them

    with RecordDtypes() as record:
        output = our_output(unet, x.double(), timestep, text.double())

    assert output.dtype == torch.float64
    assert record.seen == {(torch.float64, "cpu")}
    assert_relative_close(output.float(), our_output(small_unet, x, timestep, text), TOLERANCE)


def test_meta_unet_creates_nothing_on_another_device() -> None:
    unet = SD1UNet(small_config(), device="meta", dtype=torch.float16)
    tensors = list(unet.parameters()) + list(unet.buffers())
    assert all(tensor.device.type == "meta" and tensor.dtype == torch.float16 for tensor in tensors)
    x = torch.empty(2, 4, 16, 16, device="meta", dtype=torch.float16)
    text = torch.empty(2, 77, 24, device="meta", dtype=torch.float16)

    with RecordDtypes() as record:
        output = our_output(unet, x, torch.tensor([999]), text)  # the timestep comes from the CPU

    assert output.shape == (2, 4, 16, 16) and output.dtype == torch.float16
    assert {device for _, device in record.seen} == {"meta"}


def test_timestep_embedding_is_computed_in_float32_for_a_half_precision_unet() -> None:
    sinusoids = SD1UNet(small_config(), dtype=torch.bfloat16).ensure_find(SinusoidalEmbedding)
    timestep = torch.tensor([999])
    embedding = sinusoids(timestep)
    half = 16
    angles = 999 * torch.exp(-torch.arange(half, dtype=torch.float64) * torch.log(torch.tensor(10000.0)) / half)
    expected = torch.cat([angles.cos(), angles.sin()])[None]
    assert embedding.dtype == torch.bfloat16
    assert (embedding.double() - expected).abs().max() < 1e-2  # bfloat16 angles would be off by radians


# Compilation


@pytest.mark.usefixtures("fresh_dynamo")
def test_small_unet_compiles_as_one_graph(small_unet: SD1UNet) -> None:
    """Dynamo captures the whole UNet (fullgraph: no graph break); the AOT backend keeps the test fast."""
    torch.manual_seed(6)
    x, text = inputs(2, 4, 16, 16, 24)
    timestep = torch.tensor([123])
    expected = our_output(small_unet, x, timestep, text)
    compiled = torch.compile(small_unet, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        output = compiled(x)
    assert_relative_close(output, expected, TOLERANCE)
    small_unet.set_timestep(torch.tensor([456]))  # a new timestep value is an input, not a recompilation
    with torch.no_grad():
        assert_relative_close(compiled(x), our_output(small_unet, x, torch.tensor([456]), text), TOLERANCE)


def test_feed_forward_projected_transposed_for_few_tokens_gives_the_layers_output() -> None:
    torch.manual_seed(0)
    feed_forward = FeedForward(64).eval()
    few, many = torch.randn(2, 32, 64), torch.randn(2, 64, 64)  # 64 and 128 rows against 512 projected features
    assert not projects_transposed(few, 512)  # with gradients on (training), the usual orientation
    with torch.no_grad():
        assert projects_transposed(few, 512) and not projects_transposed(many, 512)
        assert not projects_transposed(few.double(), 512)
        for x in (few, many):
            layers = tuple(feed_forward)
            expected = layers[2](layers[1](layers[0](x)))
            output = feed_forward(x)
            assert output.shape == x.shape and output.is_contiguous()
            assert_relative_close(output, expected, 1e-6)


def test_feed_forward_with_an_adapted_projection_runs_the_adapter() -> None:
    torch.manual_seed(0)
    feed_forward = FeedForward(64).eval()
    x = torch.randn(1, 8, 64)
    with torch.no_grad():
        plain = feed_forward(x)
        feed_forward.replace(feed_forward[0], fl.Chain(feed_forward[0], fl.Multiply(2.0)))  # not a plain Linear
        doubled = feed_forward(x)
        layers = tuple(feed_forward)
    assert not torch.allclose(doubled, plain)
    assert_relative_close(doubled, layers[2](layers[1](layers[0](x))), 1e-6)
