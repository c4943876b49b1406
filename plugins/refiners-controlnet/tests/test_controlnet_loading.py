"""The ControlNet config reader, its key mapping and its loader: exact key sets against diffusers' ControlNetModel,
variants, our own format, and the errors a bad folder or file gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from diffusers import ControlNetModel  # pyright: ignore[reportPrivateImportUsage]
from safetensors.torch import load_file, save_file  # pyright: ignore[reportUnknownVariableType]

from refiners_controlnet import (
    SD15_CONTROLNET,
    ControlNet,
    ControlNetConfig,
    controlnet_config_from_diffusers,
    diffusers_controlnet_mapping,
)
from refiners_controlnet.testing import SD15_CONTROLNET_CONFIG, SMALL_CONTROLNET_CONFIG, reference_controlnet
from refiners_core.weights import WeightsError, read_metadata
from refiners_sd15.unet import UNetConfig

ARCHITECTURES: list[dict[str, Any]] = [
    SMALL_CONTROLNET_CONFIG,
    {**SMALL_CONTROLNET_CONFIG, "layers_per_block": 1, "conditioning_embedding_out_channels": [8, 16]},
    {**SMALL_CONTROLNET_CONFIG, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
]


def diffusers_keys(config: dict[str, Any]) -> set[str]:
    with torch.device("meta"):
        model = cast(ControlNetModel, ControlNetModel.from_config(config))  # pyright: ignore[reportUnknownMemberType]
    return set(model.state_dict())


@pytest.mark.parametrize("config", [SD15_CONTROLNET_CONFIG, *ARCHITECTURES])
def test_mapping_takes_every_diffusers_key_to_every_key_of_ours(config: dict[str, Any]) -> None:
    controlnet_config = controlnet_config_from_diffusers(config)
    mapping = diffusers_controlnet_mapping(controlnet_config)
    assert set(mapping) == diffusers_keys(config)
    ours = ControlNet(controlnet_config, device="meta")
    assert sorted(mapping.values()) == sorted(ours.state_dict())


def test_published_config_reads_as_the_sd15_architecture() -> None:
    assert controlnet_config_from_diffusers(SD15_CONTROLNET_CONFIG) == ControlNetConfig(
        unet=UNetConfig(
            in_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            cross_attention_levels=(True, True, True, False),
            norm_num_groups=32,
            norm_eps=1e-5,
        ),
        conditioning_channels=3,
        conditioning_embedding_out_channels=(16, 32, 96, 256),
    )
    assert controlnet_config_from_diffusers(SD15_CONTROLNET_CONFIG) == SD15_CONTROLNET


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_class_name": "UNet2DConditionModel"}, "_class_name='UNet2DConditionModel'; expected 'ControlNetModel'"),
        ({"controlnet_conditioning_channel_order": "bgr"}, "controlnet_conditioning_channel_order='bgr'"),
        ({"global_pool_conditions": True}, "global_pool_conditions=true"),
        ({"addition_embed_type": "text_time"}, "addition_time_embed_dim=None"),
        ({"transformer_layers_per_block": [1, 1, 1, 0]}, "transformer_layers_per_block"),
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
        ({"down_block_types": ["CrossAttnDownBlock2D", "Whatever"]}, "down_block_types"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="unsupported ControlNet config") as error:
        controlnet_config_from_diffusers({**SD15_CONTROLNET_CONFIG, **change})
    assert message in str(error.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[ControlNetModel, Path]:
    folder = tmp_path_factory.mktemp("controlnet")
    reference = reference_controlnet(SMALL_CONTROLNET_CONFIG)
    reference.save_pretrained(folder)  # pyright: ignore[reportUnknownMemberType]
    return reference, folder


def test_loaded_weights_are_the_files(saved: tuple[ControlNetModel, Path]) -> None:
    reference, folder = saved
    controlnet = ControlNet.from_pretrained(folder, dtype=torch.float64)
    theirs = reference.state_dict()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    ours = controlnet.state_dict()
    controlnet_config = controlnet_config_from_diffusers(dict(reference.config))  # pyright: ignore[reportUnknownArgumentType]
    for key, our_key in diffusers_controlnet_mapping(controlnet_config).items():
        assert ours[our_key].dtype == torch.float64
        assert torch.equal(ours[our_key].float().reshape(theirs[key].shape), theirs[key]), key


def test_variant_and_own_format_round_trip(saved: tuple[ControlNetModel, Path], tmp_path: Path) -> None:
    reference, _ = saved
    reference.save_pretrained(tmp_path / "variant", variant="fp16")  # pyright: ignore[reportUnknownMemberType]
    assert (tmp_path / "variant" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    controlnet = ControlNet.from_pretrained(tmp_path / "variant", variant="fp16")
    controlnet.save(tmp_path / "ours.safetensors")
    again = ControlNet.from_pretrained(tmp_path / "ours.safetensors")
    assert again.config == controlnet.config and again.config.conditioning_embedding_out_channels == (8, 16, 16, 32)
    assert all(torch.equal(again.state_dict()[key], value) for key, value in controlnet.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        ControlNet.from_pretrained(tmp_path / "variant")  # no weights without the variant's name


def test_bad_weights_name_the_file_key_and_layer(saved: tuple[ControlNetModel, Path], tmp_path: Path) -> None:
    _, folder = saved
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    weights = tmp_path / "diffusion_pytorch_model.safetensors"

    save_file({**tensors, "controlnet_mid_block.weight": torch.zeros(64, 32, 1, 1)}, weights)
    with pytest.raises(WeightsError) as error:
        ControlNet.from_pretrained(tmp_path)
    message = str(error.value)
    assert str(weights) in message and "'controlnet_mid_block.weight'" in message
    assert "ControlNet.ZeroConvolutions.MiddleZeroConvolution.Conv2d" in message

    save_file(
        {key: value for key, value in tensors.items() if not key.startswith("controlnet_cond_embedding.conv_in")},
        weights,
    )
    with pytest.raises(WeightsError, match=r"ConditionEncoder\.Conv2d_1.*controlnet_cond_embedding\.conv_in"):
        ControlNet.from_pretrained(tmp_path)

    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(ValueError, match=r"config\.json: unsupported ControlNet config: .*class_embed_type"):
        ControlNet.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        ControlNet.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_out_channels": 320}, "block_out_channels must be a list of positive integers, got 320"),
        ({"down_block_types": 4}, "down_block_types=4"),
        ({"down_block_types": [["CrossAttnDownBlock2D"]] * 4}, "down_block_types"),
        ({"conditioning_channels": "3"}, "conditioning_channels must be a positive integer, got '3'"),
        ({"conditioning_embedding_out_channels": [16, 0]}, "conditioning_embedding_out_channels[1] must be a positive"),
        ({"conditioning_embedding_out_channels": None}, "conditioning_embedding_out_channels must be a list of"),
    ],
)
def test_a_bad_config_json_value_is_refused_naming_the_file_and_field(
    change: dict[str, Any], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SD15_CONTROLNET_CONFIG, **change}))
    with pytest.raises(WeightsError) as error:
        ControlNet.from_pretrained(tmp_path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_a_missing_config_json_is_reported_as_missing(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match=rf"^no config\.json in {tmp_path}: "):
        ControlNet.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_out_channels": 320}, "block_out_channels must be a list of positive integers, got 320"),
        ({"conditioning_channels": 0}, "conditioning_channels must be a positive integer, got 0"),
        ({"conditioning_embedding_out_channels": "16"}, "conditioning_embedding_out_channels must be a list of"),
        ({"extra": 1}, "UNetConfig has no field 'extra'"),
        (None, "expected a JSON object of ControlNetConfig fields, got []"),
    ],
)
def test_bad_config_metadata_of_our_own_format_is_refused_naming_the_file_and_field(
    saved: tuple[ControlNetModel, Path], change: dict[str, Any] | None, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "ours.safetensors"
    ControlNet.from_pretrained(saved[1]).save(path)
    metadata = read_metadata(path)
    config = json.loads(metadata["refiners.config"])
    metadata["refiners.config"] = json.dumps([] if change is None else {**config, **change})
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(WeightsError) as error:
        ControlNet.from_pretrained(path)
    assert str(error.value).startswith(f"{path}: the 'refiners.config' metadata: ")
    assert message in str(error.value)
