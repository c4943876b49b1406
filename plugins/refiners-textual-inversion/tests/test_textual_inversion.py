"""TextualInversionAdapter against its reference, diffusers' `StableDiffusionPipeline.load_textual_inversion`.

The reference pipeline has SD1.5's published text encoder architecture (transformers `CLIPTextModel`, random
weights) and a transformers 5 `CLIPTokenizer` built offline from the vocabulary shipped with refiners-sd15; its UNet
and VAE are tiny (they play no part). Our text encoder is loaded from the folder the pipeline saves. Token ids must
be identical; text embeddings within max |ours - reference| <= 1e-4 * max |reference|.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tokenizer_files import write_tokenizer_files

from refiners_core.weights import WeightsError
from refiners_sd15.clip import CLIPTextEncoderConfig, CLIPTextEncoderL
from refiners_sd15.testing import SD15_TEXT_ENCODER_CONFIG
from refiners_textual_inversion import TextualInversionAdapter, read_embedding

TOLERANCE = 1e-4
DIM = 768

PROMPTS = [
    "a photo of <cat-toy> in mystyle",
    "<cat-toy>, bad-hands, mystyle",
    "x<cat-toy>y and MyStyle",  # inside words, and in any case (transformers lowercases the prompt)
    "only the second vector: <cat-toy>_1",
    "a <cat-toy> on the beach, " * 12,  # truncated in the middle of the multi-vector token
    "no new token at all",
]


def reference_pipeline(folder: Path) -> Any:
    """A diffusers `StableDiffusionPipeline` with SD1.5's text encoder and tokenizer, and a tiny UNet and VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tokenizer_files(folder / "tokenizer_files")
    tokenizer = CLIPTokenizer.from_pretrained(  # pyright: ignore[reportUnknownMemberType]
        str(folder / "tokenizer_files"), pad_token="<|endoftext|>", model_max_length=77
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=DIM,
        sample_size=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),  # pyright: ignore[reportArgumentType]
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One file per format, 3, 1 and 2 vectors."""
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(7)
    files = {
        "diffusers": folder / "learned_embeds.safetensors",
        "a1111_pt": folder / "mystyle.pt",
        "a1111_safetensors": folder / "bad-hands.safetensors",
    }
    save_file({"<cat-toy>": torch.randn(3, DIM, generator=generator) * 0.02}, files["diffusers"])
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.randn(1, DIM, generator=generator) * 0.02},
            "name": "mystyle",
            "step": 3000,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        files["a1111_pt"],
    )
    save_file({"emb_params": torch.randn(2, DIM, generator=generator) * 0.02}, files["a1111_safetensors"])
    return files


@pytest.fixture(scope="module")
def pipeline_and_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, CLIPTextEncoderL]:
    """The reference pipeline, and our text encoder loaded from the folder it saves (`text_encoder/`)."""
    folder = tmp_path_factory.mktemp("pipeline")
    pipeline = reference_pipeline(folder)
    pipeline.save_pretrained(folder / "saved")
    return pipeline, CLIPTextEncoderL.from_pretrained(folder / "saved").eval()


def load_reference_embeddings(pipeline: Any, files: dict[str, Path]) -> None:
    for kind, path in files.items():
        token = "bad-hands" if kind == "a1111_safetensors" else None  # diffusers names it after its only key
        pipeline.load_textual_inversion(str(path.parent), weight_name=path.name, token=token)


def test_text_embeddings_match_diffusers_load_textual_inversion(
    pipeline_and_encoder: tuple[Any, CLIPTextEncoderL], embedding_files: dict[str, Path]
) -> None:
    pipeline, encoder = pipeline_and_encoder
    load_reference_embeddings(pipeline, embedding_files)
    adapter = TextualInversionAdapter(encoder)
    tokens = [adapter.load(path) for path in embedding_files.values()]
    assert tokens == ["<cat-toy>", "mystyle", "bad-hands"]
    adapter.inject()
    try:
        for prompt in PROMPTS:
            converted = pipeline.maybe_convert_prompt(prompt, pipeline.tokenizer)
            expected_ids = pipeline.tokenizer(converted, padding="max_length", max_length=77, truncation=True)
            ids = adapter.tokenizer(prompt)
            assert ids[0].tolist() == expected_ids["input_ids"], prompt
            with torch.no_grad():
                expected = pipeline.encode_prompt(prompt, "cpu", 1, False)[0]
                ours = encoder(prompt)
            error, scale = (ours - expected).abs().max().item(), expected.abs().max().item()
            assert error <= TOLERANCE * scale, f"{prompt!r}: max |ours - reference| = {error:.3g}"
        with torch.no_grad():  # a batch
            expected = pipeline.encode_prompt(PROMPTS[:2], "cpu", 1, False)[0]
            ours = encoder(PROMPTS[:2])
        assert (ours - expected).abs().max().item() <= TOLERANCE * expected.abs().max().item()
    finally:
        adapter.eject()
    assert int(adapter.tokenizer(PROMPTS[0]).max()) >= 49408, "the prompts must use the new tokens"


def test_multi_vector_tokens_stand_for_all_their_vectors_in_any_case(embedding_files: dict[str, Path]) -> None:
    # diffusers expands a multi-vector token only where the prompt spells it as added (its `maybe_convert_prompt`
    # replaces case-sensitively what the tokenizer matched in any case): `<CAT-TOY>` gets the first vector only.
    adapter = TextualInversionAdapter(small_encoder())
    adapter.load(embedding_files["diffusers"])
    assert torch.equal(adapter.tokenizer("a <CAT-TOY>"), adapter.tokenizer("a <cat-toy>"))
    assert adapter.tokenizer("a <Cat-Toy>")[0, 2:5].tolist() == [49408, 49409, 49410]


def small_encoder() -> CLIPTextEncoderL:
    torch.manual_seed(0)
    config = CLIPTextEncoderConfig(embedding_dim=DIM, num_layers=1, num_attention_heads=4, feedforward_dim=64)
    return CLIPTextEncoderL(config).eval()


def test_eject_restores_the_vocabulary_and_weights_exactly(embedding_files: dict[str, Path]) -> None:
    encoder = small_encoder()
    state_dict = {key: value.clone() for key, value in encoder.state_dict().items()}
    prompts = ["a photo of <cat-toy> in mystyle", "bad-hands"]
    ids_before, output_before = encoder.tokenizer(prompts), encoder(prompts)

    adapter = TextualInversionAdapter(encoder)
    adapter.load(embedding_files["diffusers"])
    adapter.inject()
    adapter.load(embedding_files["a1111_safetensors"])  # added while injected
    assert adapter.tokens == ("<cat-toy>", "bad-hands")
    assert adapter.token_ids("bad-hands") == [49411, 49412]
    with torch.no_grad():
        assert not torch.equal(encoder(prompts), output_before)
    adapter.eject()

    assert encoder.state_dict().keys() == state_dict.keys()
    assert all(torch.equal(value, state_dict[key]) for key, value in encoder.state_dict().items())
    assert torch.equal(encoder.tokenizer(prompts), ids_before)
    assert torch.equal(encoder(prompts), output_before)
    adapter.inject()  # and it can go in again
    assert adapter.is_injected
    adapter.eject()


def test_new_vectors_are_those_of_the_files(embedding_files: dict[str, Path]) -> None:
    encoder = small_encoder()
    adapter = TextualInversionAdapter(encoder).inject()
    for path in embedding_files.values():
        token = adapter.load(path)
        vectors = read_embedding(path).vectors
        ids = torch.tensor([adapter.token_ids(token)])
        assert torch.equal(adapter(ids)[0], vectors)
    base_ids = torch.tensor([[49406, 320, 1125, 49407]])
    assert torch.equal(adapter(base_ids), adapter.target(base_ids))
    adapter.eject()


def test_embedding_formats_are_read_with_their_names(embedding_files: dict[str, Path], tmp_path: Path) -> None:
    assert read_embedding(embedding_files["diffusers"]).name == "<cat-toy>"
    assert read_embedding(embedding_files["a1111_pt"]).name == "mystyle"
    assert read_embedding(embedding_files["a1111_safetensors"]).name == "bad-hands"
    assert [read_embedding(path).vectors.shape[0] for path in embedding_files.values()] == [3, 1, 2]
    vector = torch.randn(DIM)
    torch.save({"<sks>": vector}, tmp_path / "learned_embeds.bin")  # diffusers' older format, one 1D vector
    embedding = read_embedding(tmp_path / "learned_embeds.bin")
    assert embedding.name == "<sks>" and torch.equal(embedding.vectors, vector[None])


def test_unreadable_or_foreign_files_are_rejected_naming_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_embedding(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(WeightsError, match="truncated.safetensors"):
        read_embedding(truncated)
    lora = tmp_path / "lora.safetensors"
    save_file(
        {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4)}, lora
    )
    with pytest.raises(WeightsError, match=r"lora\.safetensors is not a textual inversion embedding.*lora_unet_a"):
        read_embedding(lora)
    text = tmp_path / "notes.pt"
    text.write_text("not a pickle")
    with pytest.raises(WeightsError, match="notes.pt"):
        read_embedding(text)
    integers = tmp_path / "ids.safetensors"
    save_file({"<x>": torch.zeros(1, DIM, dtype=torch.int64)}, integers)
    with pytest.raises(WeightsError, match="ids.safetensors.*floating point"):
        read_embedding(integers)
    with pytest.raises(WeightsError, match="extension '.txt'"):
        (tmp_path / "embedding.txt").write_text("")
        read_embedding(tmp_path / "embedding.txt")


def test_tokens_taken_or_of_another_dimension_are_rejected_and_change_nothing(
    embedding_files: dict[str, Path], tmp_path: Path
) -> None:
    encoder = small_encoder()
    adapter = TextualInversionAdapter(encoder)
    adapter.load(embedding_files["diffusers"])
    adapter.inject()
    state_dict = {key: value.clone() for key, value in encoder.state_dict().items()}
    ids = adapter.tokenizer("<cat-toy> mystyle")

    with pytest.raises(ValueError, match=r"learned_embeds\.safetensors.*'<cat-toy>' is already added.*learned_embeds"):
        adapter.load(embedding_files["diffusers"])
    with pytest.raises(ValueError, match="'<CAT-TOY>' is already added"):
        adapter.load(embedding_files["diffusers"], token="<CAT-TOY>")
    with pytest.raises(ValueError, match="'cat' is already in the CLIP vocabulary"):
        adapter.load(embedding_files["a1111_pt"], token="cat")
    with pytest.raises(ValueError, match="'Photo' is already in the CLIP vocabulary"):
        adapter.add_embedding("Photo", torch.zeros(DIM))
    sd2 = tmp_path / "sd2_style.safetensors"
    save_file({"emb_params": torch.zeros(4, 1024)}, sd2)
    with pytest.raises(ValueError, match=r"sd2_style\.safetensors.*dimension 768 expected.*\(4, 1024\)"):
        adapter.load(sd2)

    assert adapter.tokens == ("<cat-toy>",)
    assert adapter.new_embeddings.num_embeddings == 3
    assert torch.equal(adapter.tokenizer("<cat-toy> mystyle"), ids)
    assert all(torch.equal(value, state_dict[key]) for key, value in encoder.state_dict().items())
    adapter.eject()


def test_adapter_rejects_what_is_not_a_clip_text_encoder() -> None:
    with pytest.raises(TypeError, match="CLIPTextEncoderL"):
        TextualInversionAdapter(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
