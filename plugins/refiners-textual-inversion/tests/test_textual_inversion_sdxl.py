"""SDXLTextualInversion against its reference, diffusers' SDXL recipe: `load_textual_inversion` of the file's `clip_l`
tensor into `text_encoder` / `tokenizer` and of its `clip_g` tensor into `text_encoder_2` / `tokenizer_2`, then
`StableDiffusionXLPipeline.encode_prompt`.

The reference's text encoders have random weights, small (refiners-sdxl's `SMALL_TEXT_L` / `SMALL_TEXT_G`) and the
full published SDXL ones; its tokenizers are transformers `CLIPTokenizer`s built offline from the vocabulary
refiners-sd15 ships (CLIP-G's padding with `!`, as published). Our `DoubleTextEncoder` loads the folders they are saved
to. Text embeddings and pooled embeddings must match within max |ours - reference| <= 1e-4 * max |reference|.
"""

# pyright: reportPrivateImportUsage=false
from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizer_files import write_tokenizer_files

from refiners_core.cli import main
from refiners_core.testing import assert_relative_close
from refiners_core.weights import WeightsError
from refiners_sd15.clip import SDXL_TEXT_ENCODER_FORMAT, CLIPTextEncoderG, CLIPTextEncoderL, DoubleTextEncoder
from refiners_sd15.loading import load_component
from refiners_sdxl.testing import (
    G_DIM,
    L_DIM,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SMALL_TEXT_G,
    SMALL_TEXT_L,
    randomize,
    small_sdxl_pipeline,
    write_small_sdxl_folder,
)
from refiners_textual_inversion import (
    SDXLTextualInversion,
    TextualInversionAdapter,
    read_any_embedding,
    read_sdxl_embedding,
)
from refiners_textual_inversion.options import apply_embedding_option, validate_embedding_option

TOLERANCE = 1e-4
PROMPTS = ["a photo of <sdxl-style> cat", "<sdxl-style>, bad-hands and <SDXL-STYLE>_1", "no new token at all"]
TEXT_CONFIGS = {
    "small": (SMALL_TEXT_L, SMALL_TEXT_G),
    "published": (SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG),
}


def write_sdxl_embedding(path: Path, vectors: int, l_dim: int, g_dim: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {
            "clip_l": torch.randn(vectors, l_dim, generator=generator) * l_dim**-0.5,
            "clip_g": torch.randn(vectors, g_dim, generator=generator) * g_dim**-0.5,
        },
        path,
    )
    return path


def reference_pipeline(folder: Path, name: str) -> Any:
    """A diffusers `StableDiffusionXLPipeline` with these text encoders (random weights) and both tokenizers; the
    UNet, autoencoder and scheduler of refiners-sdxl's small pipeline (`encode_prompt` does not use them). The text
    encoders are also saved in `folder/text_encoder` and `folder/text_encoder_2`."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tokenizer_files(folder / "tokenizer_files")
    tokenizers = [
        CLIPTokenizer.from_pretrained(str(folder / "tokenizer_files"), pad_token=pad, model_max_length=77)  # pyright: ignore[reportUnknownMemberType]
        for pad in ("<|endoftext|>", "!")
    ]
    config_l, config_g = TEXT_CONFIGS[name]
    text_encoder = CLIPTextModel(CLIPTextConfig(**config_l)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config_g)).eval()
    randomize(text_encoder, 11)
    randomize(text_encoder_2, 12)
    text_encoder.save_pretrained(folder / "text_encoder")
    text_encoder_2.save_pretrained(folder / "text_encoder_2")
    small = small_sdxl_pipeline().components
    return StableDiffusionXLPipeline(
        vae=small["vae"],
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=small["unet"],
        scheduler=small["scheduler"],
        add_watermarker=False,
    )


def our_encoder(folder: Path) -> DoubleTextEncoder:
    text_encoder_l = load_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, folder).eval()
    return DoubleTextEncoder(text_encoder_l, CLIPTextEncoderG.from_pretrained(folder).eval())


@pytest.mark.parametrize("name", TEXT_CONFIGS)
@torch.no_grad()
def test_sdxl_text_embeddings_match_diffusers_load_textual_inversion(name: str, tmp_path: Path) -> None:
    pipeline = reference_pipeline(tmp_path, name)
    l_dim, g_dim = pipeline.text_encoder.config.hidden_size, pipeline.text_encoder_2.config.hidden_size
    files = {
        "<sdxl-style>": write_sdxl_embedding(tmp_path / "style.safetensors", 2, l_dim, g_dim, seed=1),
        "bad-hands": write_sdxl_embedding(tmp_path / "bad-hands.safetensors", 1, l_dim, g_dim, seed=2),
    }

    def reference_embeddings(pipeline: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for prompt in PROMPTS:
            embeds, _, pooled, _ = pipeline.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            outputs.append((embeds, pooled))
        return outputs

    without = reference_embeddings(pipeline)
    for token, path in files.items():
        embedding = read_sdxl_embedding(path)
        pipeline.load_textual_inversion(
            embedding.clip_l, token=token, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer
        )
        pipeline.load_textual_inversion(
            embedding.clip_g, token=token, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2
        )
    expected = reference_embeddings(pipeline)
    del pipeline
    gc.collect()
    assert not torch.allclose(expected[0][0], without[0][0], atol=1e-3)  # the embeddings do change the text

    encoder = our_encoder(tmp_path)
    textual_inversion = SDXLTextualInversion(encoder)
    for token, path in files.items():
        assert textual_inversion.load(path, token=None if token == "bad-hands" else token) == token
    textual_inversion.inject()
    for prompt, (embeds, pooled) in zip(PROMPTS, expected):
        ours_embeds, ours_pooled = encoder(prompt)
        assert_relative_close(ours_embeds, embeds, TOLERANCE)
        assert_relative_close(ours_pooled, pooled, TOLERANCE)
    textual_inversion.eject()
    ours_embeds, ours_pooled = encoder(PROMPTS[0])
    assert_relative_close(ours_embeds, without[0][0], TOLERANCE)
    assert_relative_close(ours_pooled, without[0][1], TOLERANCE)


def small_double_encoder() -> DoubleTextEncoder:
    from refiners_sd15.clip import CLIPTextEncoderConfig

    def config(dim: int, projection: int | None) -> CLIPTextEncoderConfig:
        return CLIPTextEncoderConfig(
            embedding_dim=dim,
            num_layers=2,
            num_attention_heads=2,
            feedforward_dim=2 * dim,
            output="penultimate_and_pooled",
            projection_dim=projection,
        )

    torch.manual_seed(0)
    return DoubleTextEncoder(CLIPTextEncoderL(config(L_DIM, None)), CLIPTextEncoderG(config(G_DIM, 40)))


def test_one_token_feeds_both_encoders_and_eject_restores_them_exactly(tmp_path: Path) -> None:
    encoder = small_double_encoder()
    state = {key: value.clone() for key, value in encoder.state_dict().items()}
    with torch.no_grad():
        before = encoder("a <sdxl-style> cat")
    textual_inversion = SDXLTextualInversion(encoder)
    textual_inversion.load(write_sdxl_embedding(tmp_path / "x.safetensors", 2, L_DIM, G_DIM, 3), token="<sdxl-style>")
    textual_inversion.inject()
    assert textual_inversion.is_injected
    assert textual_inversion.adapter_l.tokens == textual_inversion.adapter_g.tokens == ("<sdxl-style>",)
    ids_l = textual_inversion.adapter_l.tokenizer("a <sdxl-style> cat")[0]
    ids_g = textual_inversion.adapter_g.tokenizer("a <sdxl-style> cat")[0]
    assert torch.equal(ids_l[:5], ids_g[:5]) and ids_l[2:4].tolist() == [49408, 49409]
    with torch.no_grad():
        changed = encoder("a <sdxl-style> cat")
    assert not torch.allclose(changed[0][..., :L_DIM], before[0][..., :L_DIM])  # CLIP-L's part
    assert not torch.allclose(changed[0][..., L_DIM:], before[0][..., L_DIM:])  # CLIP-G's part
    textual_inversion.eject()
    with torch.no_grad():
        after = encoder("a <sdxl-style> cat")
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(torch.equal(value, state[key]) for key, value in encoder.state_dict().items())


def test_wrong_kind_or_width_of_embedding_is_refused_naming_the_file_and_changes_nothing(tmp_path: Path) -> None:
    encoder = small_double_encoder()
    textual_inversion = SDXLTextualInversion(encoder)
    textual_inversion.load(write_sdxl_embedding(tmp_path / "ok.safetensors", 1, L_DIM, G_DIM, 4), token="<ok>")
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"emb_params": torch.zeros(1, L_DIM)}, sd15)
    with pytest.raises(WeightsError, match=r"sd15\.safetensors holds one embedding.*not an SDXL embedding"):
        textual_inversion.load(sd15, token="<x>")
    swapped = write_sdxl_embedding(tmp_path / "swapped.safetensors", 1, G_DIM, L_DIM, 5)
    with pytest.raises(ValueError, match=rf"swapped\.safetensors 'clip_l'.*dimension {L_DIM} expected.*\(1, {G_DIM}\)"):
        textual_inversion.load(swapped, token="<x>")
    wrong_g = write_sdxl_embedding(tmp_path / "wrong_g.safetensors", 1, L_DIM, 64, 6)
    with pytest.raises(ValueError, match=rf"wrong_g\.safetensors 'clip_g'.*dimension {G_DIM} expected.*\(1, 64\)"):
        textual_inversion.load(wrong_g, token="<x>")
    half = tmp_path / "half.safetensors"
    save_file({"clip_g": torch.zeros(1, G_DIM)}, half)
    with pytest.raises(WeightsError, match=r"half\.safetensors: an SDXL embedding needs both.*'clip_l' is missing"):
        textual_inversion.load(half, token="<x>")
    with pytest.raises(ValueError, match=r"'<ok>' is already added"):
        textual_inversion.load(tmp_path / "ok.safetensors", token="<ok>")
    # nothing was added to either encoder by the refused files (CLIP-L's vectors of `wrong_g` were fine)
    assert textual_inversion.adapter_l.tokens == textual_inversion.adapter_g.tokens == ("<ok>",)
    assert textual_inversion.adapter_l.new_embeddings.num_embeddings == 1

    sdxl_file = write_sdxl_embedding(tmp_path / "for_sdxl.safetensors", 1, 768, 1280, 7)
    with pytest.raises(WeightsError, match=r"for_sdxl\.safetensors is an SDXL embedding.*not one for a single"):
        TextualInversionAdapter(encoder.text_encoder_l).load(sdxl_file)
    with pytest.raises(TypeError, match="use SDXLTextualInversion"):
        TextualInversionAdapter(encoder)  # type: ignore[arg-type]


def test_embedding_option_on_sdxl_and_its_checks(tmp_path: Path) -> None:
    sdxl_file = write_sdxl_embedding(tmp_path / "style.safetensors", 1, L_DIM, G_DIM, 8)
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"emb_params": torch.zeros(1, L_DIM)}, sd15)
    assert read_any_embedding(sd15).name == "sd15"
    with pytest.raises(ValueError, match=r"--embedding .*style\.safetensors is an SDXL embedding .*sd15\.safetensors"):
        validate_embedding_option([str(sdxl_file), str(sd15)])
    model = SimpleNamespace(clip_text_encoder=small_double_encoder())
    with pytest.raises(WeightsError, match=r"sd15\.safetensors holds one embedding"):
        apply_embedding_option(model, [f"{sdxl_file}:<style>", str(sd15)])
    assert not any(isinstance(layer, TextualInversionAdapter) for layer in model.clip_text_encoder.modules())
    apply_embedding_option(model, [f"{sdxl_file}:<style>"])
    assert len([m for m in model.clip_text_encoder.modules() if isinstance(m, TextualInversionAdapter)]) == 2


def test_refiners_generate_runs_sdxl_with_an_embedding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_small_sdxl_folder(tmp_path / "model")
    embedding = write_sdxl_embedding(tmp_path / "style.safetensors", 2, L_DIM, G_DIM, 9)
    out = tmp_path / "out.png"
    arguments = ["generate", "a <style> cat", "--model", str(folder), "--steps", "2", "--size", "64x64"]
    assert main([*arguments, "--embedding", f"{embedding}:<style>", "--out", str(out)]) == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.size == (64, 64)
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"emb_params": torch.zeros(1, L_DIM)}, sd15)
    assert main([*arguments, "--embedding", str(sd15), "--out", str(tmp_path / "no.png")]) != 0
    assert "sd15.safetensors holds one embedding" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()
