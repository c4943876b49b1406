"""CLIPTextEncoderL against transformers' `CLIPTextModel(input_ids).last_hidden_state`, its key mappings and config.

Reference models are built offline from the published configs with random weights, every parameter perturbed so that
no zero or one initialisation can hide a wrong mapping. Tolerance: max |ours - ref| <= 1e-4 * max |ref|, in float32.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from published_configs import SD15_TEXT_ENCODER_CONFIG
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from refiners_core.state_dicts import invert, load_state_dict_checked
from refiners_core.weights import WeightsError, load_tensors
from refiners_sd15.clip.config import CLIP_TEXT_L, CLIPTextEncoderConfig, clip_text_config_from_transformers
from refiners_sd15.clip.mapping import CLIP_TEXT_IGNORED_KEYS, ldm_clip_text_mapping, transformers_clip_text_mapping
from refiners_sd15.clip.text_encoder import CLIPTextEncoderL, TokenIds
from refiners_sd15.clip.tokenizer import CLIPTokenizer

# stabilityai/stable-diffusion-2, text_encoder/config.json (OpenCLIP ViT-H/14's text model).
SD2_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "transformers_version": "4.25.0.dev0",
    "vocab_size": 49408,
}

SMALL_CONFIG: dict[str, Any] = SD15_TEXT_ENCODER_CONFIG | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 16,
    "vocab_size": 1000,
}

PROMPTS = [
    "a photo of a cat",
    "",
    "portrait of an old fisherman, highly detailed oil painting, dramatic lighting, by rembrandt, trending on "
    "artstation, sharp focus, intricate details, weathered skin, deep wrinkles, stormy sea in the background, "
    "seagulls, golden hour, volumetric light, 8k, masterpiece, best quality, award winning photograph",
]

TOLERANCE = 1e-4


def reference_model(config: dict[str, Any], seed: int = 0) -> CLIPTextModel:
    """transformers' CLIPTextModel for `config`, every parameter drawn at random (norm scales near 1, biases not 0)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            is_norm_scale = "layer_norm" in name and name.endswith(".weight")
            parameter.normal_(1.0 if is_norm_scale else 0.0, 0.1 if is_norm_scale else 0.02)
        for buffer in model.buffers():  # the position ids 0..L-1, which `to_empty` leaves uninitialised
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return model


def key_prefix(tensors: dict[str, torch.Tensor]) -> str:
    """transformers 4.x writes `text_model.` keys, transformers >= 5.6 writes them without it."""
    return "text_model." if any(key.startswith("text_model.") for key in tensors) else ""


def published_state_dict(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The state_dict with the keys of the published files: `text_model.` first, as transformers 4.x names them."""
    return {
        key if key.startswith("text_model.") else f"text_model.{key}": value
        for key, value in model.state_dict().items()
    }


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert error <= TOLERANCE * scale, f"max |ours - ref| = {error:.3g} > {TOLERANCE} * max |ref| = {scale:.3g}"


def reference_output(model: CLIPTextModel, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_ids).last_hidden_state


def small_encoder(tokenizer: CLIPTokenizer | None = None, **changes: Any) -> CLIPTextEncoderL:
    config = replace(clip_text_config_from_transformers(SMALL_CONFIG), **changes)
    return CLIPTextEncoderL(config, tokenizer=tokenizer or CLIPTokenizer(sequence_length=16))


def test_sd15_text_encoder_matches_transformers_clip_text_model(tmp_path: Path) -> None:
    reference = reference_model(SD15_TEXT_ENCODER_CONFIG)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    tensors = load_tensors(tmp_path / "model.safetensors")

    encoder = CLIPTextEncoderL(clip_text_config_from_transformers(config))
    mapping = transformers_clip_text_mapping(encoder.config, prefix=key_prefix(tensors))
    load_state_dict_checked(
        encoder, tensors, source="model.safetensors", mapping=mapping, ignore=CLIP_TEXT_IGNORED_KEYS
    )
    del tensors

    token_ids = encoder.tokenizer(PROMPTS)
    assert token_ids.shape == (len(PROMPTS), 77)
    assert token_ids[2, -1] == 49407 and token_ids[1, 2:].eq(49407).all()  # long prompt cut, empty one padded
    with torch.no_grad():
        embeddings = encoder(PROMPTS)
    assert embeddings.shape == (len(PROMPTS), 77, 768)
    assert_close(embeddings, reference_output(reference, token_ids))


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_small_text_encoder_loaded_from_save_pretrained_matches_transformers(tmp_path: Path, hidden_act: str) -> None:
    reference = reference_model(SMALL_CONFIG | {"hidden_act": hidden_act})
    reference.save_pretrained(tmp_path)
    config = clip_text_config_from_transformers(json.loads((tmp_path / "config.json").read_text()))
    assert config.use_quick_gelu is (hidden_act == "quick_gelu")
    encoder = CLIPTextEncoderL(config, tokenizer=CLIPTokenizer(sequence_length=16))
    tensors = load_tensors(tmp_path / "model.safetensors")
    mapping = transformers_clip_text_mapping(config, prefix=key_prefix(tensors))
    load_state_dict_checked(
        encoder, tensors, source="model.safetensors", mapping=mapping, ignore=CLIP_TEXT_IGNORED_KEYS
    )

    torch.manual_seed(1)
    for length in (16, 7):  # full sequences, and shorter ones (positions 0..6 only)
        token_ids = torch.randint(0, 1000, (3, length))
        with torch.no_grad():
            assert_close(encoder(token_ids), reference_output(reference, token_ids))


def test_published_layout_with_position_ids_loads_with_default_mapping(tmp_path: Path) -> None:
    """SD1.5's text_encoder/model.safetensors: transformers 4.x keys (`text_model.`) and a position ids buffer."""
    reference = reference_model(SMALL_CONFIG)
    tensors = published_state_dict(reference)
    tensors["text_model.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    save_file(tensors, tmp_path / "model.safetensors")

    encoder = small_encoder()
    load_state_dict_checked(
        encoder,
        load_tensors(tmp_path / "model.safetensors"),
        source="model.safetensors",
        mapping=transformers_clip_text_mapping(encoder.config),
        ignore=CLIP_TEXT_IGNORED_KEYS,
    )
    token_ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert_close(encoder(token_ids), reference_output(reference, token_ids))


def test_single_file_checkpoint_loads_with_ldm_mapping(tmp_path: Path) -> None:
    reference = reference_model(SMALL_CONFIG)
    prefix = "cond_stage_model.transformer."
    checkpoint = {prefix + key: value for key, value in published_state_dict(reference).items()}
    checkpoint[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    torch.save({"state_dict": checkpoint}, tmp_path / "model.ckpt")

    tensors = load_tensors(tmp_path / "model.ckpt")
    text_tensors = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
    encoder = small_encoder()
    load_state_dict_checked(
        encoder,
        text_tensors,
        source="model.ckpt",
        mapping=ldm_clip_text_mapping(encoder.config),
        ignore=CLIP_TEXT_IGNORED_KEYS,
    )
    token_ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert_close(encoder(token_ids), reference_output(reference, token_ids))


@pytest.mark.parametrize("num_layers", [1, 2, 12])
def test_transformers_mapping_is_complete_and_bijective(num_layers: int) -> None:
    config = SD15_TEXT_ENCODER_CONFIG | {"num_hidden_layers": num_layers}
    with torch.device("meta"):
        reference_keys = set(CLIPTextModel(CLIPTextConfig.from_dict(config)).state_dict())
    # as transformers >= 5.6 names them; transformers < 4.31 also lists the position ids buffer
    reference_keys = {key.removeprefix("text_model.") for key in reference_keys - CLIP_TEXT_IGNORED_KEYS}
    ours = CLIPTextEncoderL(replace(CLIP_TEXT_L, num_layers=num_layers), device="meta")
    our_keys = set(ours.state_dict())

    for prefix in ("text_model.", ""):
        mapping = transformers_clip_text_mapping(ours.config, prefix=prefix)
        assert set(mapping) == {prefix + key for key in reference_keys}
        assert set(mapping.values()) == our_keys
        assert len(invert(mapping)) == len(mapping) == len(our_keys)
        assert not CLIP_TEXT_IGNORED_KEYS & set(mapping)


def test_ldm_mapping_agrees_with_diffusers_single_file_conversion() -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    mapping = ldm_clip_text_mapping()
    prefix = "cond_stage_model.transformer."
    checkpoint = {prefix + key: torch.tensor([index]) for index, key in enumerate(mapping)}
    checkpoint["model.diffusion_model.out.2.bias"] = torch.tensor([-1])
    converted = convert_ldm_clip_checkpoint(checkpoint)

    # diffusers loads what it converted into transformers' CLIPTextModel (dropping `text_model.` for >= 5.6).
    with torch.device("meta"):
        model_keys = set(CLIPTextModel(CLIPTextConfig.from_dict(SD15_TEXT_ENCODER_CONFIG)).state_dict())
    model_keys -= CLIP_TEXT_IGNORED_KEYS
    flat = not any(key.startswith("text_model.") for key in model_keys)
    loaded = {key.removeprefix("text_model.") if flat else key: value for key, value in converted.items()}
    assert set(loaded) == model_keys
    transformers_mapping = transformers_clip_text_mapping(prefix="" if flat else "text_model.")
    ours_by_index = {int(value): transformers_mapping[key] for key, value in loaded.items()}
    assert ours_by_index == {index: ours for index, ours in enumerate(mapping.values())}


def test_sd2_text_encoder_file_raises_weights_error_naming_file_key_layer_and_shapes(tmp_path: Path) -> None:
    # OpenCLIP ViT-H/14 text model of SD2 at its full width; 2 of its 23 layers keep the file small.
    with torch.device("meta"):
        reference = CLIPTextModel(CLIPTextConfig.from_dict(SD2_TEXT_ENCODER_CONFIG | {"num_hidden_layers": 2}))
    tensors = {key: torch.zeros(value.shape) for key, value in published_state_dict(reference).items()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)

    encoder = CLIPTextEncoderL(device="meta")
    with pytest.raises(WeightsError) as error:
        load_state_dict_checked(
            encoder,
            load_tensors(path),
            source=str(path),
            mapping=transformers_clip_text_mapping(),
            ignore=CLIP_TEXT_IGNORED_KEYS,
        )
    message = str(error.value)
    assert str(path) in message
    assert "'text_model.embeddings.position_embedding.weight' has shape (77, 1024)" in message
    assert "`CLIPTextEncoderL.Sum.PositionalEncoder`" in message
    assert "expects (77, 768)" in message


def test_constructor_defaults_are_sd15_and_config_conversion() -> None:
    defaults = inspect.signature(CLIPTextEncoderL).parameters["config"].default
    assert defaults is CLIP_TEXT_L
    assert clip_text_config_from_transformers(SD15_TEXT_ENCODER_CONFIG) == defaults
    assert clip_text_config_from_transformers(SD2_TEXT_ENCODER_CONFIG) == replace(
        defaults,
        embedding_dim=1024,
        num_layers=23,
        num_attention_heads=16,
        feedforward_dim=4096,
        use_quick_gelu=False,
    )
    # Fields left out take transformers' CLIPTextConfig defaults, as transformers reads the file.
    transformers_defaults = CLIPTextConfig()
    assert clip_text_config_from_transformers({}) == CLIPTextEncoderConfig(
        embedding_dim=transformers_defaults.hidden_size,
        num_layers=transformers_defaults.num_hidden_layers,
        num_attention_heads=transformers_defaults.num_attention_heads,
        feedforward_dim=transformers_defaults.intermediate_size,
        max_sequence_length=transformers_defaults.max_position_embeddings,
        vocabulary_size=transformers_defaults.vocab_size,
        layer_norm_eps=cast(float, transformers_defaults.layer_norm_eps),
        use_quick_gelu=transformers_defaults.hidden_act == "quick_gelu",
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "clip"}, "'model_type'"),
        ({"architectures": ["CLIPTextModelWithProjection"]}, "'architectures'"),
        ({"hidden_act": "gelu_new"}, "'hidden_act'"),
        ({"hidden_size": 770}, "'num_attention_heads'"),
        ({"num_hidden_layers": 0}, "'num_hidden_layers'"),
        ({"vocab_size": "49408"}, "'vocab_size'"),
        ({"layer_norm_eps": -1.0}, "'layer_norm_eps'"),
    ],
)
def test_unsupported_config_raises_value_error_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        clip_text_config_from_transformers(SD15_TEXT_ENCODER_CONFIG | change)


def test_float64_construction_puts_every_parameter_in_float64_and_computes_in_it() -> None:
    encoder = CLIPTextEncoderL(
        CLIPTextEncoderConfig(embedding_dim=32, num_layers=2, num_attention_heads=4, feedforward_dim=64),
        dtype=torch.float64,
    )
    assert {parameter.dtype for parameter in encoder.parameters()} == {torch.float64}
    assert list(encoder.buffers()) == []
    with torch.no_grad():
        output = encoder(["a photo of a cat", "a dog"])
    assert output.shape == (2, 77, 32) and output.dtype == torch.float64

    on_meta = CLIPTextEncoderL(device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in on_meta.parameters()} == {("meta", torch.float16)}


def test_tokenizer_is_the_first_layer_and_holds_no_weights() -> None:
    tokenizer = CLIPTokenizer(sequence_length=16)
    encoder = small_encoder(tokenizer=tokenizer, vocabulary_size=49408)
    assert encoder.tokenizer is tokenizer
    assert isinstance(encoder[0], TokenIds)
    assert all(key.startswith(("Sum.", "TransformerLayer_", "LayerNorm.")) for key in encoder.state_dict())
    assert "TokenIds(CLIPTokenizer(sequence_length=16))" in repr(encoder)
    token_ids = tokenizer(["a photo of a cat", ""])
    with torch.no_grad():
        assert torch.equal(encoder("a photo of a cat"), encoder(token_ids[:1]))
        assert torch.equal(encoder(["a photo of a cat", ""]), encoder(token_ids))
        assert torch.equal(encoder(token_ids.to(torch.int32)), encoder(token_ids))


def test_too_long_sequences_are_refused() -> None:
    encoder = small_encoder()
    with pytest.raises(ValueError, match="at most 16 tokens, got 17"):
        encoder(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_sequence_length=16"):
        small_encoder(tokenizer=CLIPTokenizer(sequence_length=77))
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        small_encoder(num_attention_heads=5)


def test_compiles_with_fullgraph() -> None:
    encoder = small_encoder().eval()
    token_ids = torch.randint(0, 1000, (2, 16))
    # aot_eager traces exactly what inductor would compile, without spending a minute generating C++.
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(token_ids), encoder(token_ids))
