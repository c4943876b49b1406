"""CLIPTextEncoderL against transformers' `CLIPTextModel(input_ids).last_hidden_state`, its key mappings and config;
SDXL's encoders (`CLIPTextEncoderL` with its penultimate output, `CLIPTextEncoderG`, `DoubleTextEncoder`) against
`CLIPTextModel` / `CLIPTextModelWithProjection(input_ids, output_hidden_states=True)`: `hidden_states[-2]`,
`pooler_output` and `text_embeds`, as diffusers' `StableDiffusionXLPipeline.encode_prompt` uses them.

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
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from refiners_core.fluxion.context import ContextError
from refiners_core.state_dicts import invert, load_state_dict_checked
from refiners_core.testing import assert_relative_close
from refiners_core.weights import WeightsError, load_tensors
from refiners_sd15.clip import (
    CLIP_TEXT_G,
    CLIP_TEXT_L_PENULTIMATE,
    SDXL_TEXT_ENCODER_2_FORMAT,
    SDXL_TEXT_ENCODER_FORMAT,
    CLIPTextEncoderG,
    DoubleTextEncoder,
    PooledTextEmbedding,
    open_clip_text_mapping,
    open_clip_text_tensors,
)
from refiners_sd15.clip.config import CLIP_TEXT_L, CLIPTextEncoderConfig, clip_text_config_from_transformers
from refiners_sd15.clip.mapping import CLIP_TEXT_IGNORED_KEYS, ldm_clip_text_mapping, transformers_clip_text_mapping
from refiners_sd15.clip.text_encoder import CLIPTextEncoderL, TokenIds
from refiners_sd15.clip.tokenizer import CLIPTokenizer
from refiners_sd15.loading import load_component, load_single_file_component
from refiners_sd15.testing import SD15_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, open_clip_state_dict

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

# A small bigG: exact GeLU, text projection, the published legacy eos_token_id (2); CLIP's vocabulary, so that the
# tokenizer's ids (end-of-text token 49407 included) are valid.
SMALL_G_CONFIG: dict[str, Any] = SDXL_TEXT_ENCODER_2_CONFIG | {
    "hidden_size": 80,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "max_position_embeddings": 16,
    "projection_dim": 48,
    "torch_dtype": "float32",
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


def reference_model(config: dict[str, Any], seed: int = 0, model_class: Any = CLIPTextModel) -> Any:
    """transformers' CLIPTextModel (or `model_class`) for `config`, every parameter drawn at random (norm scales near
    1, biases not 0)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = model_class(CLIPTextConfig.from_dict(config))
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
    assert_relative_close(embeddings, reference_output(reference, token_ids), TOLERANCE)


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
            assert_relative_close(encoder(token_ids), reference_output(reference, token_ids), TOLERANCE)


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
        assert_relative_close(encoder(token_ids), reference_output(reference, token_ids), TOLERANCE)


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
        assert_relative_close(encoder(token_ids), reference_output(reference, token_ids), TOLERANCE)


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
        ({"num_hidden_layers": 0}, "^num_hidden_layers must be a positive integer, got 0$"),
        ({"vocab_size": "49408"}, "^vocab_size must be a positive integer, got '49408'$"),
        ({"layer_norm_eps": -1.0}, "^layer_norm_eps must be a positive finite number, got -1.0$"),
        ({"hidden_act": ["gelu"]}, "'hidden_act'"),
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


# SDXL: CLIP ViT-L/14's penultimate hidden states, OpenCLIP ViT-bigG/14's and its projected pooled embedding.


def reference_sdxl_outputs(model: Any, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(hidden_states[-2], text_embeds)` of a CLIPTextModelWithProjection, `(hidden_states[-2], pooler_output)` of a
    CLIPTextModel: what diffusers' `StableDiffusionXLPipeline.encode_prompt` takes from each text encoder."""
    with torch.no_grad():
        output = model(input_ids=token_ids, output_hidden_states=True)
    pooled = output.text_embeds if isinstance(model, CLIPTextModelWithProjection) else output.pooler_output
    return output.hidden_states[-2], pooled


def assert_sdxl_close(ours: Any, reference: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert isinstance(ours, tuple) and len(ours) == 2
    assert_relative_close(ours[0], reference[0], TOLERANCE)
    assert_relative_close(ours[1], reference[1], TOLERANCE)


@pytest.mark.parametrize("eos_token_id", [2, 49407])
def test_sdxl_text_encoder_2_loaded_from_save_pretrained_matches_clip_text_model_with_projection(
    tmp_path: Path, eos_token_id: int
) -> None:
    """eos_token_id 2 (published): pooled at the largest id; another: at its first position, as transformers does."""
    reference = reference_model(
        SMALL_G_CONFIG | {"eos_token_id": eos_token_id}, model_class=CLIPTextModelWithProjection
    )
    reference.save_pretrained(tmp_path)
    encoder = CLIPTextEncoderG.from_pretrained(tmp_path, subfolder="")
    assert encoder.config == replace(
        CLIP_TEXT_G,
        embedding_dim=80,
        num_layers=3,
        num_attention_heads=4,
        feedforward_dim=160,
        max_sequence_length=16,
        projection_dim=48,
        end_of_text_token_id=None if eos_token_id == 2 else 49407,
    )
    assert encoder.tokenizer.sequence_length == 16 and encoder.tokenizer.pad_token_id == 0

    token_ids = encoder.tokenizer(PROMPTS)
    assert token_ids[1, 2:].eq(0).all() and token_ids[2, -1] == 49407  # padded with `!`, long prompt cut
    with torch.no_grad():
        outputs = encoder(PROMPTS)
    expected = reference_sdxl_outputs(reference, token_ids)
    assert outputs[0].shape == (3, 16, 80) and outputs[1].shape == (3, 48)
    assert not torch.allclose(expected[0], reference_output(reference, token_ids), atol=1e-2)  # not the last layer
    assert_sdxl_close(outputs, expected)

    torch.manual_seed(1)
    random_ids = torch.randint(0, 49408, (4, 16))  # end-of-text id not first, largest id elsewhere: the rules differ
    random_ids[:, 9] = 49407
    random_ids[:, 3] = 49406
    with torch.no_grad():
        assert_sdxl_close(encoder(random_ids), reference_sdxl_outputs(reference, random_ids))
    random_ids[:, 3] = 49407
    with torch.no_grad():
        assert_sdxl_close(encoder(random_ids), reference_sdxl_outputs(reference, random_ids))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_sdxl_text_encoder_l_penultimate_matches_clip_text_model_hidden_states(tmp_path: Path, num_layers: int) -> None:
    """One layer: the penultimate hidden states are the embeddings."""
    reference = reference_model(SMALL_CONFIG | {"num_hidden_layers": num_layers})
    reference.save_pretrained(tmp_path)
    encoder = load_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, tmp_path, subfolder="")
    assert encoder.config.output == "penultimate_and_pooled" and encoder.config.projection_dim is None

    torch.manual_seed(1)
    for length in (16, 7):
        token_ids = torch.randint(0, 1000, (3, length))
        with torch.no_grad():
            outputs = encoder(token_ids)
        assert outputs[1].shape == (3, 64)
        assert_sdxl_close(outputs, reference_sdxl_outputs(reference, token_ids))


def test_double_text_encoder_concatenates_penultimate_states_and_pools_clip_g(tmp_path: Path) -> None:
    """Reference: diffusers' `encode_prompt` steps, on the ids of the two published tokenizers (CLIP-L's pads with its
    end-of-text token, `tokenizer_2` with `!`; their ids match transformers' in test_clip_tokenizer.py)."""
    reference_l = reference_model(SMALL_CONFIG | {"vocab_size": 49408}, seed=0)
    reference_g = reference_model(SMALL_G_CONFIG, seed=1, model_class=CLIPTextModelWithProjection)
    reference_l.save_pretrained(tmp_path / "text_encoder")
    reference_g.save_pretrained(tmp_path / "text_encoder_2")
    encoder_l = load_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, tmp_path)
    encoder_g = CLIPTextEncoderG.from_pretrained(tmp_path)
    double = DoubleTextEncoder(encoder_l, encoder_g)
    assert double.text_encoder_l is encoder_l and double.text_encoder_g is encoder_g

    with torch.no_grad():
        embedding, pooled = double(PROMPTS)
    ids_l = CLIPTokenizer(sequence_length=16)(PROMPTS)
    ids_g = CLIPTokenizer(sequence_length=16, pad_token_id=0)(PROMPTS)
    assert not torch.equal(ids_l, ids_g)
    penultimate_l, _ = reference_sdxl_outputs(reference_l, ids_l)
    penultimate_g, pooled_g = reference_sdxl_outputs(reference_g, ids_g)
    assert embedding.shape == (3, 16, 64 + 80) and pooled.shape == (3, 48)
    assert_relative_close(embedding, torch.cat((penultimate_l, penultimate_g), dim=-1), TOLERANCE)
    assert_relative_close(pooled, pooled_g, TOLERANCE)
    with torch.no_grad():
        assert torch.equal(double("a photo of a cat")[0], embedding[:1])


def test_double_text_encoder_defaults_are_published_sdxl_and_refuses_sd15_output() -> None:
    double = DoubleTextEncoder(device="meta")
    assert double.text_encoder_l.config == CLIP_TEXT_L_PENULTIMATE
    assert double.text_encoder_g.config == CLIP_TEXT_G
    assert double.text_encoder_g.tokenizer.pad_token_id == 0 and double.text_encoder_l.tokenizer.pad_token_id == 49407
    with pytest.raises(ValueError, match="text_encoder_l must return its penultimate hidden states"):
        DoubleTextEncoder(CLIPTextEncoderL(device="meta"), CLIPTextEncoderG(device="meta"))
    with pytest.raises(ValueError, match="sequences of 16 .* and 77"):
        DoubleTextEncoder(
            CLIPTextEncoderL(CLIP_TEXT_L_PENULTIMATE, device="meta", tokenizer=CLIPTokenizer(sequence_length=16)),
            CLIPTextEncoderG(device="meta"),
        )
    with pytest.raises(ValueError, match="output='penultimate_and_pooled', got 'last_hidden_state'"):
        CLIPTextEncoderG(CLIP_TEXT_L, device="meta")


def test_published_sdxl_configs_read_as_clip_text_g_and_l_penultimate() -> None:
    g = clip_text_config_from_transformers(SDXL_TEXT_ENCODER_2_CONFIG, output="penultimate_and_pooled")
    assert g == CLIP_TEXT_G
    assert (g.embedding_dim, g.num_layers, g.num_attention_heads, g.feedforward_dim) == (1280, 32, 20, 5120)
    assert (g.use_quick_gelu, g.projection_dim, g.end_of_text_token_id) == (False, 1280, None)
    penultimate = clip_text_config_from_transformers(SD15_TEXT_ENCODER_CONFIG, output="penultimate_and_pooled")
    assert penultimate == CLIP_TEXT_L_PENULTIMATE
    with pytest.raises(ValueError, match="read it with output='penultimate_and_pooled'"):
        clip_text_config_from_transformers(SDXL_TEXT_ENCODER_2_CONFIG)
    with pytest.raises(ValueError, match="projection_dim must be a positive integer, got 0"):
        clip_text_config_from_transformers(
            SDXL_TEXT_ENCODER_2_CONFIG | {"projection_dim": 0}, output="penultimate_and_pooled"
        )
    with pytest.raises(ValueError, match="projection_dim=1280 describes the pooled embedding"):
        replace(CLIP_TEXT_G, output="last_hidden_state")
    with pytest.raises(ValueError, match="output='penultimate'"):
        replace(CLIP_TEXT_L, output="penultimate")  # type: ignore[arg-type]


@pytest.mark.parametrize("num_layers", [1, 2, 32])
def test_with_projection_mapping_is_complete_and_bijective(num_layers: int) -> None:
    config = SDXL_TEXT_ENCODER_2_CONFIG | {"num_hidden_layers": num_layers}
    with torch.device("meta"):
        reference_keys = set(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config)).state_dict())
    reference_keys -= CLIP_TEXT_IGNORED_KEYS
    ours = CLIPTextEncoderG(replace(CLIP_TEXT_G, num_layers=num_layers), device="meta")
    mapping = transformers_clip_text_mapping(ours.config)
    assert set(mapping) == reference_keys
    assert set(mapping.values()) == set(ours.state_dict())
    assert len(invert(mapping)) == len(mapping)
    penultimate_l = CLIPTextEncoderL(replace(CLIP_TEXT_L_PENULTIMATE, num_layers=num_layers), device="meta")
    assert set(transformers_clip_text_mapping(penultimate_l.config).values()) == set(penultimate_l.state_dict())


def test_sdxl_single_file_text_encoders_load_and_match_transformers(tmp_path: Path) -> None:
    """`conditioner.embedders.0.transformer.*` (transformers names) and `.1.model.*` (OpenCLIP names, fused q/k/v,
    converted as diffusers' `convert_open_clip_checkpoint` does): heads of 64 dimensions, as the readers assume."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    config_l = SMALL_CONFIG | {"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256}
    config_g = SMALL_G_CONFIG | {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 384}
    reference_l = reference_model(config_l, seed=0)
    reference_g = reference_model(config_g, seed=1, model_class=CLIPTextModelWithProjection)
    open_clip = open_clip_state_dict(reference_g.state_dict(), reference_g.config.num_hidden_layers)
    checkpoint = {
        f"conditioner.embedders.0.transformer.{key}": value for key, value in published_state_dict(reference_l).items()
    }
    checkpoint |= {f"conditioner.embedders.1.model.{key}": value for key, value in open_clip.items()}
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    save_file(checkpoint, tmp_path / "sdxl.safetensors")

    # the OpenCLIP layout written above is the one diffusers converts back to transformers' keys
    converted = convert_open_clip_checkpoint(reference_g, checkpoint, prefix="conditioner.embedders.1.model.")
    expected_state = {key.removeprefix("text_model."): value for key, value in reference_g.state_dict().items()}
    assert {
        key.removeprefix("text_model."): value for key, value in converted.items()
    }.keys() == expected_state.keys() - CLIP_TEXT_IGNORED_KEYS
    assert all(torch.equal(value, expected_state[key.removeprefix("text_model.")]) for key, value in converted.items())

    tensors = load_tensors(tmp_path / "sdxl.safetensors")
    source = tmp_path / "sdxl.safetensors"
    encoder_l = load_single_file_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, source=source, tensors=tensors)
    encoder_g = load_single_file_component(CLIPTextEncoderG, SDXL_TEXT_ENCODER_2_FORMAT, source=source, tensors=tensors)
    assert encoder_l.config.output == encoder_g.config.output == "penultimate_and_pooled"
    assert encoder_g.config == clip_text_config_from_transformers(config_g, output="penultimate_and_pooled")

    torch.manual_seed(2)
    token_ids = torch.randint(0, 1000, (3, 16))
    with torch.no_grad():
        assert_sdxl_close(encoder_l(token_ids), reference_sdxl_outputs(reference_l, token_ids))
        assert_sdxl_close(encoder_g(token_ids), reference_sdxl_outputs(reference_g, token_ids))


def test_open_clip_mapping_is_complete_and_splits_without_copying() -> None:
    with torch.device("meta"):
        reference = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(SDXL_TEXT_ENCODER_2_CONFIG))
    open_clip = open_clip_state_dict(reference.state_dict(), reference.config.num_hidden_layers)
    converted = open_clip_text_tensors(open_clip)
    mapping = open_clip_text_mapping()
    ours = CLIPTextEncoderG(device="meta")
    assert set(converted) - set(mapping) == {"logit_scale"}
    assert set(mapping.values()) == set(ours.state_dict())
    own = ours.state_dict()
    assert all(converted[key].shape == own[value].shape for key, value in mapping.items())

    fused = torch.arange(12.0).reshape(6, 2)
    thirds = open_clip_text_tensors({"transformer.resblocks.0.attn.in_proj_weight": fused})
    assert [tensor.data_ptr() for tensor in thirds.values()] == [fused[i].data_ptr() for i in (0, 2, 4)]


def test_pooling_without_token_ids_raises_context_error_naming_the_context() -> None:
    pooled = PooledTextEmbedding(replace(CLIP_TEXT_G, embedding_dim=64, num_attention_heads=4, feedforward_dim=128))
    with pytest.raises(
        ContextError, match="EndOfTextToken at `PooledTextEmbedding.EndOfTextToken` needs the token ids"
    ):
        pooled(torch.zeros(1, 3, 64))


def test_sdxl_text_encoder_2_saves_and_loads_in_our_format(tmp_path: Path) -> None:
    config = clip_text_config_from_transformers(SMALL_G_CONFIG, output="penultimate_and_pooled")
    encoder = CLIPTextEncoderG(config, tokenizer=CLIPTokenizer(sequence_length=16, pad_token_id=0))
    encoder.save(tmp_path / "text_encoder_2.safetensors")
    loaded = CLIPTextEncoderG.from_pretrained(tmp_path / "text_encoder_2.safetensors")
    assert loaded.config == config
    token_ids = torch.randint(0, 49408, (2, 16))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(token_ids), encoder(token_ids)))


def test_sdxl_text_encoder_2_compiles_with_fullgraph() -> None:
    config = clip_text_config_from_transformers(SMALL_G_CONFIG, output="penultimate_and_pooled")
    encoder = CLIPTextEncoderG(config, tokenizer=CLIPTokenizer(sequence_length=16, pad_token_id=0)).eval()
    token_ids = torch.randint(0, 49408, (2, 16))
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert all(torch.allclose(a, b) for a, b in zip(compiled(token_ids), encoder(token_ids)))


def test_published_sdxl_text_encoder_2_matches_transformers(tmp_path: Path) -> None:
    """The full OpenCLIP ViT-bigG/14 text model (695M parameters, 2.8 GB in float32): one model in memory at a time,
    the reference's outputs kept, then ours loaded (memory-mapped) from the folder the reference saved, in the
    published layout (`text_encoder_2/config.json` and `model.safetensors`), as `StableDiffusion_XL` loads it."""
    reference = reference_model(
        SDXL_TEXT_ENCODER_2_CONFIG | {"torch_dtype": "float32"}, model_class=CLIPTextModelWithProjection
    )
    token_ids = CLIPTokenizer(pad_token_id=0)(PROMPTS)
    expected = reference_sdxl_outputs(reference, token_ids)
    reference.save_pretrained(tmp_path / "text_encoder_2")
    del reference

    encoder = CLIPTextEncoderG.from_pretrained(tmp_path)
    assert encoder.config == CLIP_TEXT_G
    with torch.no_grad():
        outputs = encoder(PROMPTS)
    assert outputs[0].shape == (3, 77, 1280) and outputs[1].shape == (3, 1280)
    assert_sdxl_close(outputs, expected)


def test_set_tokenizer_replaces_the_tokenizer_and_refuses_longer_sequences() -> None:
    config = replace(CLIP_TEXT_L, embedding_dim=32, num_layers=1, num_attention_heads=2, feedforward_dim=64)
    encoder = CLIPTextEncoderL(config)
    layers = [type(layer) for layer in encoder]

    encoder.set_tokenizer(CLIPTokenizer(sequence_length=77, pad_token_id=0))

    assert encoder.tokenizer.pad_token_id == 0
    assert [type(layer) for layer in encoder] == layers  # replaced inside TokenIds, no layer added
    assert encoder.ensure_find(TokenIds).tokenizer is encoder.tokenizer
    with pytest.raises(ValueError, match="the tokenizer gives sequences of 78 ids but the encoder has max_sequence"):
        encoder.set_tokenizer(CLIPTokenizer(sequence_length=78))
