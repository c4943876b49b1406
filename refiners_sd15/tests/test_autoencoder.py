"""SD1Autoencoder against diffusers' AutoencoderKL (reference), with random perturbed weights.

Parity tolerance: max |ours - reference| <= 1e-4 * max |reference|, in float32.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image

from refiners_core.state_dicts import invert, load_state_dict_checked
from refiners_core.testing import assert_relative_close
from refiners_core.weights import WeightsError, load_tensors, save_tensors
from refiners_sd15.autoencoder import (
    SD15_AUTOENCODER,
    AutoencoderConfig,
    SD1Autoencoder,
    autoencoder_config_from_diffusers,
    diffusers_autoencoder_mapping,
    image_to_tensor,
    ldm_autoencoder_mapping,
    tensor_to_image,
)
from refiners_sd15.testing import SD15_VAE_CONFIG

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "_diffusers_version": "0.20.0.dev0",
    "force_upcast": True,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}

SMALL_CONFIGS: list[dict[str, Any]] = [
    {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4},
    {"block_out_channels": [32], "layers_per_block": 2, "norm_num_groups": 8, "latent_channels": 4},
    {"block_out_channels": [16, 32, 32], "layers_per_block": 2, "norm_num_groups": 8, "latent_channels": 16},
]


def small_diffusers_config(**architecture: Any) -> dict[str, Any]:
    blocks = len(architecture["block_out_channels"])
    return {
        **SD15_VAE_CONFIG,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        **architecture,
    }


def perturbed_diffusers_vae(config: dict[str, Any], seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{key: value for key, value in config.items() if not key.startswith("_")}).eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return vae


def reference_encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """diffusers' latents for the diffusion model: posterior mean times the scaling factor."""
    return vae.encode(images).latent_dist.mean * 0.18215  # pyright: ignore[reportAttributeAccessIssue]


def reference_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' decoding of latents for the diffusion model: `vae.decode(latents / 0.18215).sample`."""
    return vae.decode(latents / 0.18215).sample  # pyright: ignore


def our_config(config: dict[str, Any]) -> AutoencoderConfig:
    return autoencoder_config_from_diffusers(config)


def load_ours(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str = "test") -> SD1Autoencoder:
    ours = SD1Autoencoder(our_config(config)).eval()
    mapping = diffusers_autoencoder_mapping(ours.config)
    load_state_dict_checked(ours, tensors, source=source, mapping=mapping)
    return ours


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height * width * 3,), dtype=torch.uint8, generator=generator)
    return Image.frombytes("RGB", (width, height), bytes(pixels.tolist()))


def pixel_values(image: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).to(torch.int16)


@pytest.fixture(scope="module")
def sd15_reference() -> AutoencoderKL:
    return perturbed_diffusers_vae(SD15_VAE_CONFIG)


@pytest.fixture(scope="module")
def sd15_folder(sd15_reference: AutoencoderKL, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    sd15_reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd15_ours(sd15_folder: Path) -> SD1Autoencoder:
    weights = sd15_folder / "diffusion_pytorch_model.safetensors"
    return load_ours(SD15_VAE_CONFIG, load_tensors(weights), source=str(weights))


# Full published architecture


@torch.no_grad()
def test_decode_matches_diffusers_full_architecture(sd15_reference: AutoencoderKL, sd15_ours: SD1Autoencoder) -> None:
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    reference = reference_decode(sd15_reference, latents)
    assert_relative_close(sd15_ours.decode(latents), reference, 1e-4)


@torch.no_grad()
def test_encode_matches_diffusers_posterior_mean_full_architecture(
    sd15_reference: AutoencoderKL, sd15_ours: SD1Autoencoder
) -> None:
    images = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert_relative_close(sd15_ours.encode(images), reference_encode(sd15_reference, images), 1e-4)


@torch.no_grad()
def test_pil_round_trip_matches_vae_image_processor(sd15_reference: AutoencoderKL, sd15_ours: SD1Autoencoder) -> None:
    """Pixels of latents_to_image equal diffusers' postprocess(output_type="pil") on >= 99.9% of values, and
    differ by at most one level elsewhere (float rounding of the decoders can cross a .5 boundary)."""
    processor = VaeImageProcessor(vae_scale_factor=8)
    image = random_image(width=48, height=64)

    latents = sd15_ours.image_to_latents(image)
    preprocessed = processor.preprocess(image)
    assert torch.equal(image_to_tensor(image), preprocessed[0])
    assert_relative_close(latents, reference_encode(sd15_reference, preprocessed), 1e-4)

    decoded = reference_decode(sd15_reference, latents)
    reference_images = processor.postprocess(decoded, output_type="pil")
    assert isinstance(reference_images, list) and isinstance(reference_image := reference_images[0], Image.Image)
    ours_image = sd15_ours.latents_to_image(latents)
    assert ours_image.mode == "RGB" and ours_image.size == (48, 64)
    difference = (pixel_values(ours_image) - pixel_values(reference_image)).abs()
    assert difference.max().item() <= 1
    assert (difference > 0).float().mean().item() < 1e-3


def test_tensor_to_image_rounds_and_clamps_as_diffusers_postprocess() -> None:
    values = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(3)) * 2.4 - 1.2
    values[0, 0, 0, :5] = torch.tensor([-1.5, 1.5, 1 / 255, 3 / 255 - 1, 0.0])  # out of range and .5 boundaries
    reference = VaeImageProcessor().postprocess(values, output_type="pil")
    assert isinstance(reference, list)
    for ours_image, reference_image in zip([tensor_to_image(v) for v in values], reference, strict=True):
        assert ours_image.tobytes() == reference_image.tobytes()


def test_diffusers_mapping_is_complete_and_bijective(sd15_reference: AutoencoderKL, sd15_ours: SD1Autoencoder) -> None:
    mapping = diffusers_autoencoder_mapping()
    assert set(mapping) == set(sd15_reference.state_dict())
    assert set(mapping.values()) == set(sd15_ours.state_dict())
    assert len(set(mapping.values())) == len(mapping)


def ldm_state_dict(
    reference: dict[str, torch.Tensor], config: AutoencoderConfig = SD15_AUTOENCODER
) -> dict[str, torch.Tensor]:
    """The original checkpoint layout written from a diffusers state dict through our mappings only."""
    ours_to_diffusers = invert(diffusers_autoencoder_mapping(config))
    ldm: dict[str, torch.Tensor] = {}
    for ldm_key, our_key in ldm_autoencoder_mapping(config).items():
        tensor = reference[ours_to_diffusers[our_key]]
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # the original stores the attention projections as 1x1 convolutions
        ldm[ldm_key] = tensor
    return ldm


def test_ldm_mapping_agrees_with_diffusers_single_file_converter(sd15_reference: AutoencoderKL) -> None:
    reference = sd15_reference.state_dict()
    ldm = ldm_state_dict(reference)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert ldm["decoder.up.3.block.0.conv1.weight"] is reference["decoder.up_blocks.0.resnets.0.conv1.weight"]
    converted = convert_ldm_vae_checkpoint(ldm, SD15_VAE_CONFIG)
    assert set(converted) == set(reference)
    for key, tensor in reference.items():
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("architecture", SMALL_CONFIGS, ids=lambda c: str(c["block_out_channels"]))
@torch.no_grad()
def test_small_configs_match_diffusers_through_both_mappings(architecture: dict[str, Any]) -> None:
    config = small_diffusers_config(**architecture)
    reference = perturbed_diffusers_vae(config)
    state_dict = reference.state_dict()
    ours = load_ours(config, state_dict)
    keys = our_config(config)
    assert set(diffusers_autoencoder_mapping(keys)) == set(state_dict)
    ldm = ldm_state_dict(state_dict, keys)
    converted = convert_ldm_vae_checkpoint(ldm, config)
    assert set(converted) == set(state_dict) and all(torch.equal(converted[k], v) for k, v in state_dict.items())
    from_ldm = SD1Autoencoder(our_config(config)).eval()
    load_state_dict_checked(from_ldm, ldm, source="ldm", mapping=ldm_autoencoder_mapping(keys))

    factor = 2 ** (len(architecture["block_out_channels"]) - 1)
    images = torch.rand(2, 3, 8 * factor, 6 * factor, generator=torch.Generator().manual_seed(4)) * 2 - 1
    expected_latents = reference_encode(reference, images)
    latents = torch.randn_like(expected_latents)
    expected_images = reference_decode(reference, latents)
    for model in (ours, from_ldm):
        assert_relative_close(model.encode(images), expected_latents, 1e-4)
        assert_relative_close(model.decode(latents), expected_images, 1e-4)


# Images in and out


@pytest.fixture(scope="module")
def small() -> SD1Autoencoder:
    torch.manual_seed(0)
    return SD1Autoencoder(our_config(small_diffusers_config(**SMALL_CONFIGS[0]))).eval()


@pytest.mark.parametrize("size", [(60, 64), (64, 36), (7, 7)])
def test_image_size_not_multiple_of_eight_raises(size: tuple[int, int]) -> None:
    four_stages = SD1Autoencoder(
        replace(SD15_AUTOENCODER, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    )
    assert four_stages.downscale_factor == 8
    with pytest.raises(ValueError, match=rf"{size[0]}x{size[1]} .*not a multiple of 8"):
        four_stages.image_to_latents(random_image(*size))


def test_images_to_latents_batches_and_checks_sizes(small: SD1Autoencoder) -> None:
    images = [random_image(16, 8, seed=0), random_image(16, 8, seed=1)]
    with torch.no_grad():
        latents = small.images_to_latents(images)
        assert latents.shape == (2, 4, 4, 8)
        assert_relative_close(latents[1:], small.image_to_latents(images[1]), tolerance=1e-5)
        decoded = small.latents_to_images(latents)
    assert [image.size for image in decoded] == [(16, 8), (16, 8)]
    with pytest.raises(ValueError, match="same size"):
        small.images_to_latents([random_image(16, 8), random_image(8, 16)])
    with pytest.raises(ValueError, match="latents_to_images"):
        small.latents_to_image(latents)


def test_image_to_latents_converts_to_rgb(small: SD1Autoencoder) -> None:
    rgb = random_image(8, 8)
    with torch.no_grad():
        assert torch.equal(small.image_to_latents(rgb.convert("RGBA")), small.image_to_latents(rgb))


# Construction and loading


def test_dtype_and_device_apply_to_every_parameter_and_buffer() -> None:
    model = SD1Autoencoder(device="cpu", dtype=torch.float64)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert tensors and all(t.dtype == torch.float64 and t.device.type == "cpu" for t in tensors.values())
    small = SD1Autoencoder(our_config(small_diffusers_config(**SMALL_CONFIGS[0])), dtype=torch.float64)
    with torch.no_grad():
        latents = small.image_to_latents(random_image(8, 8))
        assert latents.dtype == torch.float64
        assert small.decode(latents).dtype == torch.float64


def test_default_construction_is_the_published_sd15_autoencoder() -> None:
    config = autoencoder_config_from_diffusers(SD15_VAE_CONFIG)
    assert config == AutoencoderConfig(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    model = SD1Autoencoder(device="meta")
    assert model.config == config == SD15_AUTOENCODER
    assert model.downscale_factor == 8 and model.config.scaling_factor == 0.18215
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_config_from_diffusers_reads_saved_configs() -> None:
    assert autoencoder_config_from_diffusers(SDXL_VAE_CONFIG).scaling_factor == 0.13025
    saved = dict(perturbed_diffusers_vae(small_diffusers_config(**SMALL_CONFIGS[2])).config)
    config = autoencoder_config_from_diffusers(saved)
    assert config.latent_channels == 16 and config.block_out_channels == (16, 32, 32)


@pytest.mark.parametrize(
    "field, value",
    [
        ("_class_name", "AutoencoderTiny"),
        ("act_fn", "gelu"),
        ("use_quant_conv", False),
        ("shift_factor", 0.1159),
        ("latents_mean", [0.0] * 4),
        ("in_channels", 4),
        ("up_block_types", ["UpDecoderBlock2D"] * 3),
        ("mid_block_add_attention", False),
        ("norm_num_groups", 24),
        ("some_new_option", 1),
    ],
)
def test_config_from_diffusers_rejects_unsupported_fields(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        autoencoder_config_from_diffusers({**SD15_VAE_CONFIG, field: value})


def test_wrong_latent_channels_file_raises_weights_error_naming_key_layer_and_shapes(tmp_path: Path) -> None:
    file = tmp_path / "vae.safetensors"
    other = small_diffusers_config(**{**SMALL_CONFIGS[0], "latent_channels": 16})
    save_tensors(file, perturbed_diffusers_vae(other).state_dict())
    ours = SD1Autoencoder(our_config(small_diffusers_config(**SMALL_CONFIGS[0])))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(WeightsError) as error:
        load_state_dict_checked(
            ours,
            load_tensors(file),
            source=str(file),
            mapping=diffusers_autoencoder_mapping(
                replace(SD15_AUTOENCODER, block_out_channels=(32, 64), layers_per_block=1)
            ),
        )
    message = str(error.value)
    assert str(file) in message
    # safetensors files list their keys sorted: the decoder's input convolution is the first mismatch
    assert "'decoder.conv_in.weight' has shape (64, 16, 3, 3)" in message
    assert "`SD1Autoencoder.Decoder.Conv2d_2`" in message and "expects (64, 4, 3, 3)" in message
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


def test_sd15_architecture_rejects_a_differently_sized_autoencoder(tmp_path: Path) -> None:
    file = tmp_path / "vae.safetensors"
    wider = small_diffusers_config(block_out_channels=[32, 64], layers_per_block=2, norm_num_groups=8)
    save_tensors(file, perturbed_diffusers_vae(wider).state_dict())
    ours = SD1Autoencoder(our_config(small_diffusers_config(**SMALL_CONFIGS[0])))
    with pytest.raises(WeightsError, match=r"match no layer of SD1Autoencoder: 'decoder\.up_blocks\.0\.resnets\.2\."):
        load_state_dict_checked(
            ours,
            load_tensors(file),
            source=str(file),
            mapping=diffusers_autoencoder_mapping(
                replace(SD15_AUTOENCODER, block_out_channels=(32, 64), layers_per_block=1)
            ),
        )


def test_unet_file_given_as_autoencoder_raises_weights_error(tmp_path: Path) -> None:
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
    )
    save_tensors(file, unet.state_dict())
    with pytest.raises(WeightsError, match=rf"{file}.*match no layer of SD1Autoencoder.*'conv_in.weight'"):
        load_state_dict_checked(
            SD1Autoencoder(device="meta"), load_tensors(file), source=str(file), mapping=diffusers_autoencoder_mapping()
        )
