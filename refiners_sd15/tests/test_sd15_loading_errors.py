"""Config and loading errors name the file and the field (or key) at fault, for every component and format: a
diffusers `config.json`, our own format's metadata, the shapes of an original checkpoint, a hub id missing from
the cache; a missing `config.json` is reported as missing. Random `config.json` values load or are refused so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refiners_core.weights import NotInHubCacheError, WeightsError, load_tensors, save_tensors
from refiners_sd15 import SD1Autoencoder, SD1UNet, StableDiffusion_1
from refiners_sd15.autoencoder import AutoencoderConfig
from refiners_sd15.clip import CLIPTextEncoderConfig, CLIPTextEncoderL
from refiners_sd15.loading import CONFIG_KEY, PretrainedComponent, load_single_file_component
from refiners_sd15.unet import UNetConfig

COMPONENTS: dict[str, type[PretrainedComponent]] = {
    "unet": SD1UNet,
    "vae": SD1Autoencoder,
    "text_encoder": CLIPTextEncoderL,
}
TINY_UNET = UNetConfig(
    block_out_channels=(32, 64), attention_head_dim=8, cross_attention_dim=16, cross_attention_levels=(True, False)
)


def write_config(folder: Path, subfolder: str, config: object) -> Path:
    path = folder / subfolder / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("subfolder", "config", "message"),
    [
        ("unet", {"block_out_channels": 320}, "block_out_channels must be a list of positive integers, got 320"),
        ("unet", {"block_out_channels": [320, "640"]}, "block_out_channels[1] must be a positive integer, got '640'"),
        ("unet", {"attention_head_dim": 0}, "attention_head_dim must be a positive integer, got 0"),
        ("unet", {"layers_per_block": 2.5}, "layers_per_block must be a positive integer, got 2.5"),
        ("unet", {"norm_eps": "small"}, "norm_eps must be a positive finite number, got 'small'"),
        ("unet", {"in_channels": True}, "in_channels must be a positive integer, got True"),
        ("unet", {"down_block_types": 4}, "down_block_types=4"),
        ("unet", {"cross_attention_dim": [768, 1024]}, "cross_attention_dim=[768, 1024]"),
        ("vae", {"latent_channels": None}, "latent_channels must be a positive integer, got None"),
        ("vae", {"block_out_channels": []}, "block_out_channels must be a list of positive integers, got []"),
        ("vae", {"scaling_factor": float("nan")}, "scaling_factor must be a positive finite number, got nan"),
        ("vae", {"block_out_channels": [48]}, "not all divisible by norm_num_groups=32"),
        ("text_encoder", {"hidden_size": -768}, "hidden_size must be a positive integer, got -768"),
        ("text_encoder", {"layer_norm_eps": "1e-5"}, "layer_norm_eps must be a positive finite number, got '1e-5'"),
        ("text_encoder", {"hidden_act": ["gelu"]}, "'hidden_act' is ['gelu']"),
        ("unet", [1, 2], "should hold a JSON object"),
        ("vae", "{not json", "cannot read"),
        ("text_encoder", "[" * 100_000, "cannot read"),
    ],
)
def test_a_bad_config_json_is_refused_naming_the_file_and_field(
    subfolder: str, config: object, message: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, subfolder, config)
    with pytest.raises(WeightsError) as error:
        COMPONENTS[subfolder].from_pretrained(tmp_path)
    assert str(path) in str(error.value)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("subfolder", COMPONENTS)
def test_a_missing_config_json_is_reported_as_missing_not_as_a_shape_mismatch(subfolder: str, tmp_path: Path) -> None:
    (tmp_path / subfolder).mkdir()
    save_tensors(tmp_path / subfolder / "diffusion_pytorch_model.safetensors", {"w": torch.zeros(2)})
    save_tensors(tmp_path / subfolder / "model.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(FileNotFoundError, match=rf"^no config\.json in {tmp_path}/{subfolder}: "):
        COMPONENTS[subfolder].from_pretrained(tmp_path)


@pytest.mark.parametrize("subfolder", COMPONENTS)
def test_a_missing_component_folder_is_named(subfolder: str, tmp_path: Path) -> None:
    name = COMPONENTS[subfolder].component_format.name
    with pytest.raises(FileNotFoundError, match=rf"^no {tmp_path}/{subfolder} folder, so no {name}: "):
        COMPONENTS[subfolder].from_pretrained(tmp_path)


def saved_unet(tmp_path: Path) -> Path:
    path = tmp_path / "unet.safetensors"
    SD1UNet(TINY_UNET).save(path)
    return path


def with_metadata(path: Path, change: dict[str, str | None]) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:  # pyright: ignore[reportUnknownVariableType]
        metadata: dict[str, str] = dict(handle.metadata())  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
    for key, value in change.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    save_tensors(path, load_tensors(path), metadata=metadata)


def config_json(**change: Any) -> str:
    values = {"block_out_channels": [32, 64], "attention_head_dim": 8, "cross_attention_dim": 16}
    return json.dumps({**values, "cross_attention_levels": [True, False], **change})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (config_json(block_out_channels=320), "block_out_channels must be a list of positive integers, got 320"),
        (config_json(cross_attention_levels=[1, 0]), "cross_attention_levels[0] must be true or false, got 1"),
        (config_json(norm_eps=-1), "norm_eps must be a positive finite number, got -1"),
        (config_json(attention_head_dim=0), "attention_head_dim must be a positive integer, got 0"),
        (config_json(heads=8), "UNetConfig has no field 'heads'"),
        (json.dumps({"block_out_channels": [32, 64]}), "field 'attention_head_dim', 'cross_attention_dim'"),
        ("[]", "expected a JSON object of UNetConfig fields, got []"),
        ("{", "metadata"),
        ("[" * 100_000, "nested too deeply"),
        (None, "no 'refiners.config' metadata"),
    ],
)
def test_bad_config_metadata_of_our_own_format_is_refused_naming_the_file_and_field(
    config: str | None, message: str, tmp_path: Path
) -> None:
    path = saved_unet(tmp_path)
    with_metadata(path, {CONFIG_KEY: config})
    with pytest.raises(WeightsError) as error:
        SD1UNet.from_pretrained(path)
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".ckpt"])
def test_our_own_format_is_read_by_its_content_whatever_its_name(suffix: str, tmp_path: Path) -> None:
    path = saved_unet(tmp_path).rename(tmp_path / f"unet{suffix}")
    unet = SD1UNet.from_pretrained(path)
    assert unet.config == TINY_UNET
    assert all(torch.equal(unet.state_dict()[key], value) for key, value in load_tensors(path).items())


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 9\n", "it is a git-lfs pointer"),
        (b"", "the file is empty"),
        (None, "was not written by refiners-sd15 .*StableDiffusion_1.from_single_file"),
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_file_that_is_not_our_own_format_is_named_for_what_it_is(
    content: bytes | None, match: str, suffix: str, tmp_path: Path
) -> None:
    path = tmp_path / f"unet{suffix}"
    if content is None:
        torch.save({"model.diffusion_model.out.2.weight": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=f"{path}.*{match}"):
        SD1UNet.from_pretrained(path)


def conv(out: int, inputs: int) -> torch.Tensor:
    return torch.zeros(out, inputs, 3, 3)


UNET_KEYS = {
    "input_blocks.0.0.weight": conv(32, 4),
    "input_blocks.1.0.out_layers.3.weight": conv(32, 32),
    "input_blocks.2.0.op.weight": conv(32, 32),
    "input_blocks.3.0.out_layers.3.weight": conv(64, 32),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 16),
    "out.2.weight": conv(4, 32),
}
VAE_KEYS = {
    "encoder.conv_in.weight": conv(32, 3),
    "encoder.down.0.block.0.conv2.weight": conv(32, 32),
    "encoder.down.1.block.0.conv2.weight": conv(64, 64),
    "quant_conv.weight": torch.zeros(8, 8, 1, 1),
}
CLIP_KEYS = {
    "text_model.embeddings.token_embedding.weight": torch.zeros(100, 32),
    "text_model.embeddings.position_embedding.weight": torch.zeros(77, 32),
    "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(64, 32),
}


@pytest.mark.parametrize(
    ("component", "prefix", "keys", "change", "message"),
    [
        (SD1UNet, "model.diffusion_model.", UNET_KEYS, {"input_blocks.0.0.weight": torch.zeros(32)}, "in_channels"),
        (SD1UNet, "model.diffusion_model.", UNET_KEYS, {"out.2.weight": torch.zeros(4, 32, 0, 3)}, "out_channels"),
        (
            SD1UNet,
            "model.diffusion_model.",
            UNET_KEYS,
            {"input_blocks.3.0.out_layers.3.weight": None},
            "no 'input_blocks.3.0.out_layers.3.weight', from which block_out_channels[1] is read",
        ),
        (
            SD1UNet,
            "model.diffusion_model.",
            UNET_KEYS,
            {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32)},
            "cross_attention_dim",
        ),
        (SD1UNet, "model.diffusion_model.", UNET_KEYS, {"input_blocks.1.0.op.weight": conv(4, 4)}, "layers_per_block"),
        (
            SD1Autoencoder,
            "first_stage_model.",
            VAE_KEYS,
            {"encoder.down.1.block.0.conv2.weight": torch.zeros(64)},
            "'encoder.down.1.block.0.conv2.weight' has shape (64,), expected 4 non-empty dimensions",
        ),
        (SD1Autoencoder, "first_stage_model.", VAE_KEYS, {"quant_conv.weight": torch.zeros(8)}, "latent_channels"),
        (
            CLIPTextEncoderL,
            "cond_stage_model.transformer.",
            CLIP_KEYS,
            {"text_model.embeddings.token_embedding.weight": torch.zeros(100, 32, 1)},
            "vocabulary_size and embedding_dim",
        ),
        (
            CLIPTextEncoderL,
            "cond_stage_model.transformer.",
            CLIP_KEYS,
            {"text_model.embeddings.position_embedding.weight": None},
            "max_sequence_length",
        ),
    ],
)
def test_a_shape_inferred_from_a_checkpoint_is_reported_for_the_key_it_came_from(
    component: type[PretrainedComponent],
    prefix: str,
    keys: dict[str, torch.Tensor],
    change: dict[str, torch.Tensor | None],
    message: str,
) -> None:
    tensors = {**keys, **change}
    checkpoint = {prefix + key: value for key, value in tensors.items() if value is not None}
    source = Path("sd15.safetensors")
    with pytest.raises(WeightsError) as error:
        load_single_file_component(component, component.component_format, source=source, tensors=checkpoint)  # pyright: ignore[reportArgumentType]
    assert str(error.value).startswith(f"{source}: the {component.component_format.name} under '{prefix}': ")
    assert message in str(error.value)
    changed = next(iter(change))
    assert f"'{changed}'" in str(error.value) or "input_blocks.N" in str(error.value)


@pytest.mark.parametrize(
    "loader", [SD1UNet.from_pretrained, SD1Autoencoder.from_pretrained, StableDiffusion_1.from_pretrained]
)
def test_a_hub_id_missing_from_the_cache_says_so_and_how_to_get_it(
    loader: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotInHubCacheError) as error:
        loader("acme/not-cached")
    message = str(error.value)
    assert "'acme/not-cached' is no local file or folder" in message
    assert "Hugging Face Hub repository id" in message
    assert f"{tmp_path}/hub/models--acme--not-cached/snapshots/" in message
    assert "`hf download acme/not-cached`" in message
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message


def test_a_cached_hub_id_lacking_a_component_names_the_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hub" / "models--acme--partial" / "snapshots" / ("0" * 40)
    write_config(snapshot, "unet", {})
    (tmp_path / "hub" / "models--acme--partial" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--partial" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotInHubCacheError, match=r"'unet/diffusion_pytorch_model\.safetensors' of 'acme/partial'"):
        SD1UNet.from_pretrained("acme/partial")
    with pytest.raises(NotInHubCacheError, match=r"'vae/config\.json' of 'acme/partial'"):
        SD1Autoencoder.from_pretrained("acme/partial")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2000) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=8,
)
FIELDS = {
    "unet": [
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "attention_head_dim",
        "cross_attention_dim",
        "norm_num_groups",
        "norm_eps",
        "down_block_types",
        "up_block_types",
        "use_linear_projection",
        "time_embedding_dim",
    ],
    "vae": ["block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor", "act_fn"],
    "text_encoder": [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "layer_norm_eps",
        "vocab_size",
        "architectures",
        "model_type",
    ],
}


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), subfolder=st.sampled_from(sorted(FIELDS)))
def test_random_config_json_values_are_read_or_refused_naming_the_file(
    data: st.DataObject, subfolder: str, tmp_path: Path
) -> None:
    config = data.draw(st.dictionaries(st.sampled_from(FIELDS[subfolder]), json_values, max_size=4))
    path = write_config(tmp_path / "model", subfolder, config)
    try:
        COMPONENTS[subfolder].from_pretrained(tmp_path / "model")
    except WeightsError as error:  # the config is refused
        assert str(error).startswith(f"{path}: ")
    except FileNotFoundError as error:  # the config was read: then the weights are looked for
        assert str(error).startswith(f"no {COMPONENTS[subfolder].component_format.name} weights in ")


def test_config_dataclasses_check_their_fields_when_built_directly() -> None:
    with pytest.raises(ValueError, match=r"^block_out_channels must be a list of positive integers, got 320$"):
        UNetConfig(block_out_channels=320, attention_head_dim=8, cross_attention_dim=16, cross_attention_levels=(True,))  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=r"^num_layers must be a positive integer, got 0$"):
        CLIPTextEncoderConfig(embedding_dim=32, num_layers=0, num_attention_heads=4, feedforward_dim=64)
    with pytest.raises(ValueError, match=r"^scaling_factor must be a positive finite number, got inf$"):
        AutoencoderConfig(block_out_channels=(32,), layers_per_block=1, scaling_factor=float("inf"))
    config = AutoencoderConfig(block_out_channels=[32, 64], layers_per_block=1, scaling_factor=1)  # pyright: ignore[reportArgumentType]
    assert config.block_out_channels == (32, 64) and isinstance(config.scaling_factor, float)


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 3438167536\n"


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ({"vae/config.json": '{"latent_channels": 0}'}, WeightsError),
        ({"vae/config.json": "{}"}, FileNotFoundError),  # no vae weights
        (
            {"vae/config.json": "{}", "vae/diffusion_pytorch_model.safetensors": ""},
            FileNotFoundError,
        ),  # no text_encoder/
        (
            {"vae/config.json": "{}", "vae/diffusion_pytorch_model.safetensors": "", "text_encoder/config.json": "[]"},
            WeightsError,
        ),
    ],
)
def test_the_pipeline_checks_every_component_before_reading_any_weights(
    broken: dict[str, str], expected: type[Exception], tmp_path: Path
) -> None:
    write_config(tmp_path, "unet", {})
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(LFS_POINTER)  # fails if it is read
    for name, content in broken.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(content)
    with pytest.raises(expected) as error:
        StableDiffusion_1.from_pretrained(tmp_path)
    assert "git-lfs" not in str(error.value)
    assert "vae" in str(error.value) or "text_encoder" in str(error.value)
